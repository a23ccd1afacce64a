//! The JSON `quant_state` bitsandbytes stores beside each 4-bit weight of a checkpoint
//! (`W.weight.quant_state.bitsandbytes__nf4`): quant type, block size, the weight's dtype and
//! shape, and for double quantization the nested block size and offset.
//!
//! The bytes come from a file anyone can write, so they are parsed on their own, before any
//! tensor is read: every field is checked for type and range, and nothing is allocated from them.

use candle_core::DType;
use nibble_core::{Error, Result};
use serde_json::Value;

use crate::functional::{QuantType, BLOCKSIZES};

/// A quant_state longer than this is not bitsandbytes' (its own are about 200 bytes).
pub const MAX_QUANT_STATE_BYTES: usize = 1 << 16;

/// A parsed 4-bit quant_state.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantState {
    /// NF4 or FP4.
    pub quant_type: QuantType,
    /// Weights per absmax block.
    pub blocksize: usize,
    /// The dtype the weight had before quantization (`quant_state.dtype`).
    pub dtype: DType,
    /// The weight's shape (two dimensions for a linear layer).
    pub shape: Vec<usize>,
    /// `nested_blocksize`, present for double quantization.
    pub nested_blocksize: Option<usize>,
    /// `nested_offset`, present for double quantization.
    pub nested_offset: Option<f32>,
}

fn usize_field(state: &Value, key: &str, tensor: &str) -> Result<Option<usize>> {
    match state.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| Error::quant_state(tensor, format!("quant_state `{key}` = {v} is not a non-negative integer"))),
    }
}

impl QuantState {
    /// Parses the JSON bytes of the tensor named `tensor` (for error messages).
    pub fn parse(bytes: &[u8], tensor: &str) -> Result<Self> {
        if bytes.len() > MAX_QUANT_STATE_BYTES {
            return Err(Error::quant_state(
                tensor,
                format!("quant_state is {} bytes; bitsandbytes writes about 200 (at most {MAX_QUANT_STATE_BYTES} read)", bytes.len()),
            ));
        }
        let state: Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::quant_state(tensor, format!("quant_state is not valid JSON: {e}")))?;
        if !state.is_object() {
            return Err(Error::quant_state(tensor, "quant_state is not a JSON object"));
        }
        let quant_type = match state.get("quant_type").and_then(Value::as_str) {
            Some("nf4") => QuantType::Nf4,
            Some("fp4") => QuantType::Fp4,
            other => return Err(Error::quant_state(tensor, format!("quant_type {other:?} is neither nf4 nor fp4"))),
        };
        let blocksize = usize_field(&state, "blocksize", tensor)?
            .ok_or_else(|| Error::quant_state(tensor, "quant_state has no integer `blocksize`"))?;
        if !BLOCKSIZES.contains(&blocksize) {
            return Err(Error::quant_state(tensor, format!("blocksize {blocksize} is not one of bitsandbytes' {BLOCKSIZES:?}")));
        }
        let dtype = match state.get("dtype").and_then(Value::as_str).map(|s| s.trim_start_matches("torch.")) {
            Some("float32") => DType::F32,
            Some("float16") => DType::F16,
            Some("bfloat16") => DType::BF16,
            other => {
                return Err(Error::quant_state(tensor, format!("quant_state dtype {other:?} is not float32, float16 or bfloat16")))
            }
        };
        let shape = match state.get("shape") {
            Some(Value::Array(items)) if items.len() <= 8 => items
                .iter()
                .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| Error::quant_state(tensor, "quant_state `shape` holds something other than sizes"))?,
            other => return Err(Error::quant_state(tensor, format!("quant_state `shape` is {other:?}, not a short list of sizes"))),
        };
        let nested_blocksize = usize_field(&state, "nested_blocksize", tensor)?;
        let nested_offset = match state.get("nested_offset") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| Error::quant_state(tensor, format!("quant_state `nested_offset` = {v} is not a finite number")))?
                    as f32,
            ),
        };
        Ok(Self { quant_type, blocksize, dtype, shape, nested_blocksize, nested_offset })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bitsandbytes_own_and_refuses_the_rest() {
        let ok = br#"{"quant_type": "nf4", "absmax": "x", "blocksize": 64, "quant_map": "x", "dtype": "bfloat16", "shape": [576, 1536], "nested_blocksize": 256, "nested_offset": 0.0315, "nested_absmax": "x", "nested_quant_map": "x"}"#;
        let s = QuantState::parse(ok, "w").unwrap();
        assert_eq!((s.quant_type, s.blocksize, s.dtype, s.shape.as_slice()), (QuantType::Nf4, 64, DType::BF16, &[576, 1536][..]));
        assert_eq!((s.nested_blocksize, s.nested_offset), (Some(256), Some(0.0315)));
        for bad in [
            &br#"[]"#[..],
            br#"{"quant_type": "int4", "blocksize": 64, "dtype": "float32", "shape": [2, 2]}"#,
            br#"{"quant_type": "nf4", "blocksize": 63, "dtype": "float32", "shape": [2, 2]}"#,
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float64", "shape": [2, 2]}"#,
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2, -2]}"#,
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2, 2], "nested_offset": "x"}"#,
        ] {
            assert!(matches!(QuantState::parse(bad, "w"), Err(Error::QuantState { .. })), "{}", String::from_utf8_lossy(bad));
        }
    }
}

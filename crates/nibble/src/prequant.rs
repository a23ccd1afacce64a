//! Reading layers that a checkpoint already stores in the bitsandbytes layout.
//!
//! 4-bit: `W.weight` (packed bytes, any storage dtype, two values a byte), `W.weight.absmax`,
//! `W.weight.quant_map`, with double quant `W.weight.nested_absmax` and
//! `W.weight.nested_quant_map`, and `W.weight.quant_state.bitsandbytes__nf4|fp4` (JSON bytes).
//! 8-bit: `W.weight` (int8) and `W.SCB` (f32 row scales).

use candle_core::{DType, Device};
use nibble_core::{Error, Result};
use nibble_load::{RawTensor, Weights};
use nibble_quant::functional::{self, Absmax, DoubleQuant, Packed4bit, QuantType};
use nibble_quant::quant_state::QuantState;
use nibble_quant::{Linear4bit, Linear8bit};
use safetensors::Dtype;

/// The pre-quantized form a checkpoint stores a linear layer in, if any.
pub(crate) enum Stored {
    /// bitsandbytes 4-bit, with the quant_state tensor's name and type.
    FourBit(String, QuantType),
    /// bitsandbytes LLM.int8().
    Int8,
    /// A dense weight.
    Dense,
}

/// Looks at which companion tensors exist next to `weight` (`…/q_proj.weight`).
pub(crate) fn detect(weights: &Weights, weight: &str) -> Stored {
    for (suffix, qt) in [("bitsandbytes__nf4", QuantType::Nf4), ("bitsandbytes__fp4", QuantType::Fp4)] {
        let name = format!("{weight}.quant_state.{suffix}");
        if weights.contains(&name) {
            return Stored::FourBit(name, qt);
        }
    }
    let base = weight.strip_suffix(".weight").unwrap_or(weight);
    if weights.contains(&format!("{base}.SCB")) {
        return Stored::Int8;
    }
    Stored::Dense
}

fn f32_values(raw: &RawTensor<'_>, name: &str) -> Result<Vec<f32>> {
    if raw.dtype != Dtype::F32 {
        return Err(Error::DtypeMismatch {
            path: raw.path.to_path_buf(),
            tensor: name.to_string(),
            expected: "F32".into(),
            found: format!("{:?}", raw.dtype),
        });
    }
    Ok(raw.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// Reads a 4-bit layer stored by bitsandbytes.
pub(crate) fn load_4bit(
    weights: &Weights,
    weight: &str,
    state_name: &str,
    qt: QuantType,
    (out_f, in_f): (usize, usize),
    compute: DType,
    device: &Device,
) -> Result<Linear4bit> {
    let state_raw = weights.raw(state_name)?;
    let state = QuantState::parse(state_raw.data, state_name)?;
    if state.quant_type != qt {
        return Err(Error::quant_state(
            state_name,
            format!("quant_type {:?} does not match the tensor name ({qt:?})", state.quant_type),
        ));
    }
    let (blocksize, dtype) = (state.blocksize, state.dtype);
    if state.shape != [out_f, in_f] {
        return Err(Error::ShapeMismatch {
            path: state_raw.path.to_path_buf(),
            tensor: weight.to_string(),
            expected: vec![out_f, in_f],
            found: state.shape,
        });
    }
    let numel = out_f * in_f;
    let packed_raw = weights.raw(weight)?;
    if packed_raw.data.len() != numel.div_ceil(2) {
        return Err(Error::quant_state(
            weight,
            format!("{} bytes of packed weight, a [{out_f}, {in_f}] 4-bit weight needs {}", packed_raw.data.len(), numel.div_ceil(2)),
        ));
    }
    let qmap_name = format!("{weight}.quant_map");
    let qmap = f32_values(&weights.raw(&qmap_name)?, &qmap_name)?;
    if qmap.as_slice() != functional::code_book(qt).as_slice() {
        return Err(Error::quant_state(&qmap_name, "custom 4-bit code books are not supported; expected bitsandbytes' own"));
    }
    let absmax_name = format!("{weight}.absmax");
    let absmax_raw = weights.raw(&absmax_name)?;
    let nested_name = format!("{weight}.nested_absmax");
    let absmax = if weights.contains(&nested_name) {
        if absmax_raw.dtype != Dtype::U8 {
            return Err(Error::DtypeMismatch {
                path: absmax_raw.path.to_path_buf(),
                tensor: absmax_name,
                expected: "U8 (double quantized)".into(),
                found: format!("{:?}", absmax_raw.dtype),
            });
        }
        let nmap_name = format!("{weight}.nested_quant_map");
        let nmap = f32_values(&weights.raw(&nmap_name)?, &nmap_name)?;
        if nmap.as_slice() != functional::dynamic_map().as_slice() {
            return Err(Error::quant_state(&nmap_name, "expected bitsandbytes' 8-bit dynamic code book"));
        }
        let offset = state
            .nested_offset
            .ok_or_else(|| Error::quant_state(state_name, "double-quantized state has no `nested_offset`"))?;
        Absmax::Double(DoubleQuant {
            codes: absmax_raw.data.to_vec(),
            offset,
            nested_absmax: f32_values(&weights.raw(&nested_name)?, &nested_name)?,
            nested_blocksize: state
                .nested_blocksize
                .ok_or_else(|| Error::quant_state(state_name, "double-quantized state has no `nested_blocksize`"))?,
        })
    } else {
        Absmax::F32(f32_values(&absmax_raw, &absmax_name)?)
    };
    let q = Packed4bit { packed: packed_raw.data.to_vec(), absmax, numel, blocksize, quant_type: qt };
    // Copied: the mapped pages may leave this process's resident memory.
    weights.release(weight);
    weights.release(&absmax_name);
    q.validate().map_err(|e| Error::quant_state(weight, e.to_string()))?;
    Linear4bit::from_packed(q, out_f, in_f, dtype, compute, device.clone())
}

/// Reads an LLM.int8() layer stored by bitsandbytes.
pub(crate) fn load_int8(
    weights: &Weights,
    weight: &str,
    (out_f, in_f): (usize, usize),
    threshold: f32,
    dtype: DType,
    device: &Device,
) -> Result<Linear8bit> {
    weights.check_shape(weight, &[out_f, in_f])?;
    let raw = weights.raw(weight)?;
    if raw.dtype != Dtype::I8 {
        return Err(Error::DtypeMismatch {
            path: raw.path.to_path_buf(),
            tensor: weight.to_string(),
            expected: "I8".into(),
            found: format!("{:?}", raw.dtype),
        });
    }
    let cb: Vec<i8> = raw.data.iter().map(|&b| b as i8).collect();
    weights.release(weight);
    let base = weight.strip_suffix(".weight").unwrap_or(weight);
    let scb_name = format!("{base}.SCB");
    weights.check_shape(&scb_name, &[out_f])?;
    let scb = f32_values(&weights.raw(&scb_name)?, &scb_name)?;
    Linear8bit::from_parts(cb, scb, out_f, in_f, threshold, dtype, device.clone())
}

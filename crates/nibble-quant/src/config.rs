//! [`BitsAndBytesConfig`]: transformers' quantization settings, field for field.
//!
//! The JSON form is the `quantization_config` object Hugging Face checkpoints carry; both the
//! public (`load_in_4bit`) and private (`_load_in_4bit`) spellings are read, and both are written,
//! as transformers does.

use nibble_core::{Error, Result};
use serde_json::{json, Map, Value};

use crate::functional::{QuantType, BLOCKSIZES};

/// The dtype a quantized layer computes in (`bnb_4bit_compute_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ComputeDtype {
    /// float32: the transformers default when `bnb_4bit_compute_dtype` is unset.
    #[default]
    F32,
    /// float16.
    F16,
    /// bfloat16.
    Bf16,
}

impl ComputeDtype {
    /// Parses the spellings users write: `float32`, `torch.float32`, `fp32`, `f32`, and the same
    /// for float16/half and bfloat16.
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim().trim_start_matches("torch.").to_ascii_lowercase();
        match t.as_str() {
            "float32" | "fp32" | "f32" | "float" => Ok(Self::F32),
            "float16" | "fp16" | "f16" | "half" => Ok(Self::F16),
            "bfloat16" | "bf16" => Ok(Self::Bf16),
            _ => Err(Error::quant_config(
                "bnb_4bit_compute_dtype",
                format!("unknown dtype {s:?}; use float32, float16 or bfloat16"),
            )),
        }
    }

    /// The name transformers writes into config.json.
    pub fn as_hf_str(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
        }
    }

    /// The matching candle dtype.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::F16 => candle_core::DType::F16,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }
}

impl std::fmt::Display for ComputeDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_hf_str())
    }
}

/// transformers' `from_pretrained(dtype=...)`: the dtype of everything left unquantized
/// (embeddings, norms, an `lm_head` the quantization skips, biases), of the activations and the
/// KV cache, and of what the weights are cast to before they are quantized. Not the 4-bit
/// products' dtype: that is [`ComputeDtype`] (`bnb_4bit_compute_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ModelDtype {
    /// transformers 5's default: the checkpoint's dtype (config.json `dtype` / `torch_dtype`,
    /// else the dtype of its tensors; float32 for a GGUF file, whose tensors transformers
    /// dequantizes to float32).
    #[default]
    Auto,
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    Bf16,
}

impl ModelDtype {
    /// Parses `auto` and the spellings [`ComputeDtype::parse`] takes.
    pub fn parse(s: &str) -> Result<Self> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        match ComputeDtype::parse(s) {
            Ok(ComputeDtype::F32) => Ok(Self::F32),
            Ok(ComputeDtype::F16) => Ok(Self::F16),
            Ok(ComputeDtype::Bf16) => Ok(Self::Bf16),
            Err(_) => Err(Error::invalid_argument(
                "dtype",
                format!("unknown dtype {s:?}; use auto, float32, float16 or bfloat16"),
            )),
        }
    }

    /// The candle dtype, with `auto` resolved by `auto` (called only then).
    pub fn resolve(self, auto: impl FnOnce() -> candle_core::DType) -> candle_core::DType {
        match self {
            Self::Auto => auto(),
            Self::F32 => candle_core::DType::F32,
            Self::F16 => candle_core::DType::F16,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }

    /// The float dtype a config.json dtype name stands for (`float32`, `torch.bfloat16`,
    /// `half`, ...), `None` for anything else.
    pub fn from_hf_name(name: &str) -> Option<candle_core::DType> {
        match ComputeDtype::parse(name).ok()? {
            ComputeDtype::F32 => Some(candle_core::DType::F32),
            ComputeDtype::F16 => Some(candle_core::DType::F16),
            ComputeDtype::Bf16 => Some(candle_core::DType::BF16),
        }
    }
}

impl std::fmt::Display for ModelDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
        })
    }
}

/// Which weight format a config selects for the linear layers it quantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantMethod {
    /// No quantization: weights stay dense in the compute dtype.
    None,
    /// 4-bit blockwise (NF4 or FP4).
    FourBit(QuantType),
    /// LLM.int8(): row-wise int8 with 16-bit outlier columns.
    Int8,
}

/// Storage dtypes bitsandbytes accepts for packed 4-bit weights (`bnb_4bit_quant_storage`).
const QUANT_STORAGES: [&str; 6] = ["uint8", "int8", "float16", "bfloat16", "float32", "float64"];

/// transformers' `BitsAndBytesConfig`, with its field names and defaults, plus the 4-bit block size.
///
/// Build one with a constructor ([`nf4`](Self::nf4), [`fp4`](Self::fp4), [`int8`](Self::int8),
/// [`none`](Self::none)) and the `with_*` setters, or with [`builder`](Self::builder) for the
/// transformers field names; each path validates.
#[derive(Debug, Clone, PartialEq)]
pub struct BitsAndBytesConfig {
    /// Quantize linear layers to LLM.int8().
    pub load_in_8bit: bool,
    /// Quantize linear layers to 4 bits.
    pub load_in_4bit: bool,
    /// LLM.int8() outlier threshold (6.0).
    pub llm_int8_threshold: f32,
    /// Modules left unquantized; `None` means transformers' default (the lm_head).
    pub llm_int8_skip_modules: Option<Vec<String>>,
    /// Allow 8-bit models to keep offloaded modules in f32 on the CPU.
    pub llm_int8_enable_fp32_cpu_offload: bool,
    /// Keep 16-bit master weights for 8-bit layers (training); nibble only runs inference.
    pub llm_int8_has_fp16_weight: bool,
    /// The dtype quantized layers compute in (f32 when unset).
    pub bnb_4bit_compute_dtype: ComputeDtype,
    /// NF4 or FP4 (FP4 when unset, as in transformers).
    pub bnb_4bit_quant_type: QuantType,
    /// Quantize the per-block absmax again (8-bit, blocks of 256).
    pub bnb_4bit_use_double_quant: bool,
    /// The dtype the packed 4-bit bytes are stored as in a checkpoint (`uint8`).
    pub bnb_4bit_quant_storage: String,
    /// The 4-bit block size: a power of two from 32 to 4096 (64).
    pub bnb_4bit_blocksize: usize,
}

impl Default for BitsAndBytesConfig {
    /// No quantization, every other field at its transformers default.
    fn default() -> Self {
        Self {
            load_in_8bit: false,
            load_in_4bit: false,
            llm_int8_threshold: 6.0,
            llm_int8_skip_modules: None,
            llm_int8_enable_fp32_cpu_offload: false,
            llm_int8_has_fp16_weight: false,
            bnb_4bit_compute_dtype: ComputeDtype::F32,
            bnb_4bit_quant_type: QuantType::Fp4,
            bnb_4bit_use_double_quant: false,
            bnb_4bit_quant_storage: "uint8".to_string(),
            bnb_4bit_blocksize: 64,
        }
    }
}

impl BitsAndBytesConfig {
    /// No quantization: every linear stays dense in the compute dtype.
    pub fn none() -> Self {
        Self::default()
    }

    /// 4-bit NF4 (the QLoRA format), compute in f32.
    pub fn nf4() -> Self {
        Self { load_in_4bit: true, bnb_4bit_quant_type: QuantType::Nf4, ..Self::default() }
    }

    /// 4-bit FP4, compute in f32.
    pub fn fp4() -> Self {
        Self { load_in_4bit: true, bnb_4bit_quant_type: QuantType::Fp4, ..Self::default() }
    }

    /// LLM.int8() with the default outlier threshold 6.0.
    pub fn int8() -> Self {
        Self { load_in_8bit: true, ..Self::default() }
    }

    /// Turns double quantization on or off.
    pub fn with_double_quant(mut self, on: bool) -> Self {
        self.bnb_4bit_use_double_quant = on;
        self
    }

    /// Sets the compute dtype.
    pub fn with_compute_dtype(mut self, dtype: ComputeDtype) -> Self {
        self.bnb_4bit_compute_dtype = dtype;
        self
    }

    /// Sets the 4-bit block size, validated.
    pub fn with_blocksize(mut self, blocksize: usize) -> Result<Self> {
        self.bnb_4bit_blocksize = blocksize;
        self.validate()?;
        Ok(self)
    }

    /// Replaces the list of modules left unquantized.
    pub fn with_skip_modules(mut self, modules: Vec<String>) -> Self {
        self.llm_int8_skip_modules = Some(modules);
        self
    }

    /// A builder taking transformers' field names and strings, validated by `build`.
    pub fn builder() -> BitsAndBytesConfigBuilder {
        BitsAndBytesConfigBuilder::default()
    }

    /// The weight format this config selects.
    pub fn method(&self) -> QuantMethod {
        if self.load_in_4bit {
            QuantMethod::FourBit(self.bnb_4bit_quant_type)
        } else if self.load_in_8bit {
            QuantMethod::Int8
        } else {
            QuantMethod::None
        }
    }

    /// Whether any quantization is requested.
    pub fn is_quantized(&self) -> bool {
        self.method() != QuantMethod::None
    }

    /// Checks every field; the error names the field and what to change.
    pub fn validate(&self) -> Result<()> {
        if self.load_in_4bit && self.load_in_8bit {
            return Err(Error::quant_config(
                "load_in_4bit",
                "load_in_4bit and load_in_8bit are both set; choose one",
            ));
        }
        if !BLOCKSIZES.contains(&self.bnb_4bit_blocksize) {
            return Err(Error::quant_config(
                "bnb_4bit_blocksize",
                format!(
                    "{} is not a block size bitsandbytes supports; use a power of two from 32 to 4096 (default 64)",
                    self.bnb_4bit_blocksize
                ),
            ));
        }
        if !self.llm_int8_threshold.is_finite() || self.llm_int8_threshold < 0.0 {
            return Err(Error::quant_config(
                "llm_int8_threshold",
                format!("{} must be a finite number >= 0 (default 6.0; 0 disables outliers)", self.llm_int8_threshold),
            ));
        }
        if !QUANT_STORAGES.contains(&self.bnb_4bit_quant_storage.as_str()) {
            return Err(Error::quant_config(
                "bnb_4bit_quant_storage",
                format!("{:?} is not a storage dtype; use one of {QUANT_STORAGES:?}", self.bnb_4bit_quant_storage),
            ));
        }
        Ok(())
    }

    /// Whether the module named `name` (e.g. `model.layers.0.self_attn.q_proj`, `lm_head`) stays
    /// unquantized. transformers matches each skip entry as a substring of the module name; the
    /// default list is the output head (tied embeddings are never linear layers here).
    pub fn skips(&self, name: &str) -> bool {
        match &self.llm_int8_skip_modules {
            Some(list) => list.iter().any(|m| !m.is_empty() && name.contains(m.as_str())),
            None => name == "lm_head" || name.ends_with(".lm_head"),
        }
    }

    /// Reads the `quantization_config` object of a Hugging Face config.json. Unknown keys are
    /// ignored, as transformers does; a `quant_method` other than bitsandbytes is an error.
    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::quant_config("quantization_config", "must be a JSON object"))?;
        if let Some(m) = obj.get("quant_method") {
            if m.as_str() != Some("bitsandbytes") {
                return Err(Error::quant_config(
                    "quant_method",
                    format!("{m} is not supported; nibble loads bitsandbytes checkpoints (quant_method \"bitsandbytes\")"),
                ));
            }
        }
        let mut b = Self::builder();
        b.load_in_4bit = get_bool(obj, &["load_in_4bit", "_load_in_4bit"])?;
        b.load_in_8bit = get_bool(obj, &["load_in_8bit", "_load_in_8bit"])?;
        b.llm_int8_threshold = get_f32(obj, "llm_int8_threshold")?;
        b.llm_int8_enable_fp32_cpu_offload = get_bool(obj, &["llm_int8_enable_fp32_cpu_offload"])?;
        b.llm_int8_has_fp16_weight = get_bool(obj, &["llm_int8_has_fp16_weight"])?;
        b.bnb_4bit_use_double_quant = get_bool(obj, &["bnb_4bit_use_double_quant"])?;
        b.bnb_4bit_compute_dtype = get_str(obj, "bnb_4bit_compute_dtype")?;
        b.bnb_4bit_quant_type = get_str(obj, "bnb_4bit_quant_type")?;
        b.bnb_4bit_quant_storage = get_str(obj, "bnb_4bit_quant_storage")?;
        if let Some(v) = obj.get("bnb_4bit_blocksize").filter(|v| !v.is_null()) {
            let n = v.as_u64().ok_or_else(|| {
                Error::quant_config("bnb_4bit_blocksize", format!("{v} is not a positive integer"))
            })?;
            b.bnb_4bit_blocksize = Some(usize::try_from(n).unwrap_or(usize::MAX));
        }
        b.llm_int8_skip_modules = match obj.get("llm_int8_skip_modules") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).ok_or_else(|| {
                            Error::quant_config("llm_int8_skip_modules", format!("{v} is not a module name string"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            Some(other) => {
                return Err(Error::quant_config(
                    "llm_int8_skip_modules",
                    format!("{other} must be a list of module names or null"),
                ))
            }
        };
        b.build()
    }

    /// The `quantization_config` object as transformers writes it (both key spellings).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "quant_method": "bitsandbytes",
            "_load_in_4bit": self.load_in_4bit,
            "_load_in_8bit": self.load_in_8bit,
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_skip_modules": self.llm_int8_skip_modules,
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
            "bnb_4bit_compute_dtype": self.bnb_4bit_compute_dtype.as_hf_str(),
            "bnb_4bit_quant_type": quant_type_str(self.bnb_4bit_quant_type),
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_quant_storage": self.bnb_4bit_quant_storage,
        });
        // Only written when it differs from bitsandbytes' fixed 64, so transformers sees its own keys.
        if self.bnb_4bit_blocksize != 64 {
            if let Some(obj) = v.as_object_mut() {
                obj.insert("bnb_4bit_blocksize".into(), json!(self.bnb_4bit_blocksize));
            }
        }
        v
    }
}

impl serde::Serialize for BitsAndBytesConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for BitsAndBytesConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Self::from_json(&v).map_err(serde::de::Error::custom)
    }
}

/// The name bitsandbytes uses for a 4-bit type.
pub fn quant_type_str(q: QuantType) -> &'static str {
    match q {
        QuantType::Nf4 => "nf4",
        QuantType::Fp4 => "fp4",
    }
}

/// Parses `nf4` / `fp4`.
pub fn parse_quant_type(s: &str) -> Result<QuantType> {
    match s.trim().to_ascii_lowercase().as_str() {
        "nf4" => Ok(QuantType::Nf4),
        "fp4" => Ok(QuantType::Fp4),
        _ => Err(Error::quant_config(
            "bnb_4bit_quant_type",
            format!("{s:?} is not a 4-bit type; use \"nf4\" or \"fp4\""),
        )),
    }
}

fn get_bool(obj: &Map<String, Value>, keys: &[&str]) -> Result<Option<bool>> {
    for k in keys {
        match obj.get(*k) {
            None | Some(Value::Null) => continue,
            Some(Value::Bool(b)) => return Ok(Some(*b)),
            Some(other) => return Err(Error::quant_config(*k, format!("{other} must be true or false"))),
        }
    }
    Ok(None)
}

fn get_f32(obj: &Map<String, Value>, key: &str) -> Result<Option<f32>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|x| Some(x as f32))
            .ok_or_else(|| Error::quant_config(key, format!("{v} must be a number"))),
    }
}

fn get_str(obj: &Map<String, Value>, key: &str) -> Result<Option<String>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(Error::quant_config(key, format!("{other} must be a string"))),
    }
}

/// Builder with transformers' field names; unset fields take transformers' defaults.
#[derive(Debug, Clone, Default)]
pub struct BitsAndBytesConfigBuilder {
    /// See [`BitsAndBytesConfig::load_in_8bit`].
    pub load_in_8bit: Option<bool>,
    /// See [`BitsAndBytesConfig::load_in_4bit`].
    pub load_in_4bit: Option<bool>,
    /// See [`BitsAndBytesConfig::llm_int8_threshold`].
    pub llm_int8_threshold: Option<f32>,
    /// See [`BitsAndBytesConfig::llm_int8_skip_modules`].
    pub llm_int8_skip_modules: Option<Vec<String>>,
    /// See [`BitsAndBytesConfig::llm_int8_enable_fp32_cpu_offload`].
    pub llm_int8_enable_fp32_cpu_offload: Option<bool>,
    /// See [`BitsAndBytesConfig::llm_int8_has_fp16_weight`].
    pub llm_int8_has_fp16_weight: Option<bool>,
    /// A dtype string (`float32`, `bfloat16`, ...).
    pub bnb_4bit_compute_dtype: Option<String>,
    /// `nf4` or `fp4`.
    pub bnb_4bit_quant_type: Option<String>,
    /// See [`BitsAndBytesConfig::bnb_4bit_use_double_quant`].
    pub bnb_4bit_use_double_quant: Option<bool>,
    /// See [`BitsAndBytesConfig::bnb_4bit_quant_storage`].
    pub bnb_4bit_quant_storage: Option<String>,
    /// See [`BitsAndBytesConfig::bnb_4bit_blocksize`].
    pub bnb_4bit_blocksize: Option<usize>,
}

macro_rules! setter {
    ($name:ident, $t:ty) => {
        #[doc = concat!("Sets `", stringify!($name), "`.")]
        pub fn $name(mut self, v: $t) -> Self {
            self.$name = Some(v.into());
            self
        }
    };
}

impl BitsAndBytesConfigBuilder {
    setter!(load_in_8bit, bool);
    setter!(load_in_4bit, bool);
    setter!(llm_int8_threshold, f32);
    setter!(llm_int8_skip_modules, Vec<String>);
    setter!(llm_int8_enable_fp32_cpu_offload, bool);
    setter!(llm_int8_has_fp16_weight, bool);
    setter!(bnb_4bit_compute_dtype, &str);
    setter!(bnb_4bit_quant_type, &str);
    setter!(bnb_4bit_use_double_quant, bool);
    setter!(bnb_4bit_quant_storage, &str);
    setter!(bnb_4bit_blocksize, usize);

    /// Validates and builds the config.
    pub fn build(self) -> Result<BitsAndBytesConfig> {
        let d = BitsAndBytesConfig::default();
        let cfg = BitsAndBytesConfig {
            load_in_8bit: self.load_in_8bit.unwrap_or(d.load_in_8bit),
            load_in_4bit: self.load_in_4bit.unwrap_or(d.load_in_4bit),
            llm_int8_threshold: self.llm_int8_threshold.unwrap_or(d.llm_int8_threshold),
            llm_int8_skip_modules: self.llm_int8_skip_modules,
            llm_int8_enable_fp32_cpu_offload: self
                .llm_int8_enable_fp32_cpu_offload
                .unwrap_or(d.llm_int8_enable_fp32_cpu_offload),
            llm_int8_has_fp16_weight: self.llm_int8_has_fp16_weight.unwrap_or(d.llm_int8_has_fp16_weight),
            bnb_4bit_compute_dtype: match self.bnb_4bit_compute_dtype {
                Some(s) => ComputeDtype::parse(&s)?,
                None => d.bnb_4bit_compute_dtype,
            },
            bnb_4bit_quant_type: match self.bnb_4bit_quant_type {
                Some(s) => parse_quant_type(&s)?,
                None => d.bnb_4bit_quant_type,
            },
            bnb_4bit_use_double_quant: self.bnb_4bit_use_double_quant.unwrap_or(d.bnb_4bit_use_double_quant),
            bnb_4bit_quant_storage: self
                .bnb_4bit_quant_storage
                .map(|s| s.trim_start_matches("torch.").to_string())
                .unwrap_or(d.bnb_4bit_quant_storage),
            bnb_4bit_blocksize: self.bnb_4bit_blocksize.unwrap_or(d.bnb_4bit_blocksize),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_transformers() {
        let c = BitsAndBytesConfig::builder().load_in_4bit(true).build().unwrap();
        assert_eq!(c.bnb_4bit_quant_type, QuantType::Fp4);
        assert_eq!(c.bnb_4bit_compute_dtype, ComputeDtype::F32);
        assert_eq!(c.llm_int8_threshold, 6.0);
        assert_eq!(c.bnb_4bit_blocksize, 64);
        assert_eq!(c.bnb_4bit_quant_storage, "uint8");
        assert!(!c.bnb_4bit_use_double_quant);
        assert!(c.skips("lm_head"));
        assert!(!c.skips("model.layers.0.mlp.up_proj"));
    }

    #[test]
    fn validation_errors_name_the_field() {
        let both = BitsAndBytesConfig::builder().load_in_4bit(true).load_in_8bit(true).build();
        assert!(matches!(both, Err(Error::InvalidQuantConfig { ref field, .. }) if field == "load_in_4bit"));
        let bs = BitsAndBytesConfig::nf4().with_blocksize(48);
        assert!(matches!(bs, Err(Error::InvalidQuantConfig { ref field, .. }) if field == "bnb_4bit_blocksize"));
        let bs = BitsAndBytesConfig::nf4().with_blocksize(8192);
        assert!(matches!(bs, Err(Error::InvalidQuantConfig { .. })));
        let dt = BitsAndBytesConfig::builder().bnb_4bit_compute_dtype("float8").build();
        assert!(matches!(dt, Err(Error::InvalidQuantConfig { ref field, .. }) if field == "bnb_4bit_compute_dtype"));
        let qt = BitsAndBytesConfig::builder().bnb_4bit_quant_type("int4").build();
        assert!(matches!(qt, Err(Error::InvalidQuantConfig { ref field, .. }) if field == "bnb_4bit_quant_type"));
        let th = BitsAndBytesConfig::builder().llm_int8_threshold(-1.0).build();
        assert!(matches!(th, Err(Error::InvalidQuantConfig { ref field, .. }) if field == "llm_int8_threshold"));
    }

    #[test]
    fn json_round_trip_and_both_spellings() {
        let c = BitsAndBytesConfig::nf4()
            .with_double_quant(true)
            .with_compute_dtype(ComputeDtype::Bf16)
            .with_skip_modules(vec!["lm_head".into(), "mlp".into()]);
        let back = BitsAndBytesConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(back, c);
        let s = serde_json::to_string(&c).unwrap();
        let via_serde: BitsAndBytesConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(via_serde, c);

        let private_only = json!({"_load_in_4bit": true, "bnb_4bit_quant_type": "nf4", "quant_method": "bitsandbytes"});
        let p = BitsAndBytesConfig::from_json(&private_only).unwrap();
        assert_eq!(p.method(), QuantMethod::FourBit(QuantType::Nf4));
        let public_only = json!({"load_in_8bit": true, "bnb_4bit_compute_dtype": "torch.float16"});
        let q = BitsAndBytesConfig::from_json(&public_only).unwrap();
        assert_eq!(q.method(), QuantMethod::Int8);
        assert_eq!(q.bnb_4bit_compute_dtype, ComputeDtype::F16);
        let awq = json!({"quant_method": "awq"});
        assert!(matches!(BitsAndBytesConfig::from_json(&awq), Err(Error::InvalidQuantConfig { .. })));
    }

    #[test]
    fn reads_the_reference_checkpoint_config() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tiny-llama-bnb-nf4/config.json"
        ))
        .unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let c = BitsAndBytesConfig::from_json(&v["quantization_config"]).unwrap();
        assert_eq!(c, BitsAndBytesConfig::nf4().with_double_quant(true));
    }

    #[test]
    fn user_skip_list_replaces_default() {
        let c = BitsAndBytesConfig::int8().with_skip_modules(vec!["down_proj".into()]);
        assert!(c.skips("model.layers.2.mlp.down_proj"));
        assert!(!c.skips("lm_head"));
    }
}

//! `config.json` for Llama-family models, in the transformers 4.x layout (`rope_theta`,
//! `rope_scaling`, `torch_dtype`) and the 5.x layout (`rope_parameters`, `dtype`).
//!
//! Every field that changes the math is either understood or refused: a silently ignored
//! `rope_scaling` would give a model that loads and then talks nonsense at long context.

use std::path::{Path, PathBuf};

use nibble_core::{Error, Result};
use serde_json::{Map, Value};

/// How rotary position frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Scale for low frequencies.
        factor: f64,
        /// Wavelength bound (relative) below which frequencies are scaled fully.
        low_freq_factor: f64,
        /// Wavelength bound (relative) above which frequencies are left alone.
        high_freq_factor: f64,
        /// The context length the model was pretrained with.
        original_max_position_embeddings: f64,
    },
}

/// A checked Llama configuration.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// The config file it was read from (for error messages).
    pub path: PathBuf,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Whether lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// The dtype the checkpoint was saved in (`dtype` / `torch_dtype`), when given.
    pub dtype: Option<String>,
    /// bos id from config.json, when given.
    pub bos_token_id: Option<u32>,
    /// eos ids from config.json (an int or a list), possibly empty.
    pub eos_token_ids: Vec<u32>,
    /// The raw `quantization_config` object, when the checkpoint is pre-quantized.
    pub quantization_config: Option<Value>,
}

fn invalid(path: &Path, field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidConfig { path: path.to_path_buf(), field: field.into(), reason: reason.into() }
}

fn unsupported(path: &Path, field: &str, value: &Value, hint: impl Into<String>) -> Error {
    Error::UnsupportedConfig {
        path: path.to_path_buf(),
        field: field.into(),
        value: value.to_string(),
        hint: hint.into(),
    }
}

fn req_usize(obj: &Map<String, Value>, path: &Path, key: &str) -> Result<usize> {
    let v = obj.get(key).ok_or_else(|| invalid(path, key, "missing; a Llama config needs it"))?;
    let n = v.as_u64().ok_or_else(|| invalid(path, key, format!("{v} is not a non-negative integer")))?;
    let n = usize::try_from(n).map_err(|_| invalid(path, key, format!("{n} is too large")))?;
    if n == 0 {
        return Err(invalid(path, key, "must be at least 1"));
    }
    Ok(n)
}

fn opt_usize(obj: &Map<String, Value>, path: &Path, key: &str) -> Result<Option<usize>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => req_usize(obj, path, key).map(Some),
    }
}

fn opt_f64(obj: &Map<String, Value>, path: &Path, key: &str) -> Result<Option<f64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(invalid(path, key, format!("{v} is not a finite number"))),
        },
    }
}

fn opt_bool(obj: &Map<String, Value>, path: &Path, key: &str) -> Result<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(invalid(path, key, format!("{v} is not true or false"))),
    }
}

fn token_ids(obj: &Map<String, Value>, path: &Path, key: &str) -> Result<Vec<u32>> {
    let as_id = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| invalid(path, key, format!("{v} is not a token id")))
    };
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

/// Public helper: reads an int-or-list token id field (`eos_token_id`) from any JSON object.
pub fn read_token_ids(obj: &Map<String, Value>, path: &Path, key: &str) -> Result<Vec<u32>> {
    token_ids(obj, path, key)
}

/// Fields that change the math of other architectures; a Llama config carrying them with a
/// non-neutral value was not written for this implementation.
const FOREIGN_MATH_FIELDS: [&str; 6] = [
    "sliding_window",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "qk_layernorm",
    "use_qk_norm",
];

impl LlamaConfig {
    /// Reads and checks a config.json file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| invalid(path, "<root>", format!("not valid JSON: {e}")))?;
        Self::from_json(&v, path)
    }

    /// Checks a parsed config.json; `path` is used in error messages.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| invalid(path, "<root>", "config.json must be a JSON object"))?;
        check_architecture(obj, path)?;

        let hidden_size = req_usize(obj, path, "hidden_size")?;
        let num_attention_heads = req_usize(obj, path, "num_attention_heads")?;
        let num_key_value_heads = opt_usize(obj, path, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(invalid(
                path,
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        let head_dim = match opt_usize(obj, path, "head_dim")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(invalid(path, "head_dim", "missing, and hidden_size is not a multiple of num_attention_heads"))
            }
        };
        if head_dim % 2 != 0 {
            return Err(invalid(path, "head_dim", format!("{head_dim} must be even for rotary embeddings")));
        }

        if let Some(act) = obj.get("hidden_act").or_else(|| obj.get("hidden_activation")) {
            if act.as_str() != Some("silu") {
                return Err(unsupported(path, "hidden_act", act, "Llama models use \"silu\""));
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if opt_bool(obj, path, key)? == Some(true) {
                return Err(unsupported(path, key, &Value::Bool(true), "nibble implements Llama without biases"));
            }
        }
        for key in FOREIGN_MATH_FIELDS {
            if let Some(val) = obj.get(key) {
                if !val.is_null() && val != &Value::Bool(false) {
                    return Err(unsupported(path, key, val, "this field belongs to another architecture than Llama"));
                }
            }
        }
        if let Some(p) = opt_f64(obj, path, "partial_rotary_factor")? {
            if p != 1.0 {
                return Err(unsupported(path, "partial_rotary_factor", &serde_json::json!(p), "Llama rotates the whole head (1.0)"));
            }
        }

        let (rope_theta, rope_scaling) = parse_rope(obj, path)?;
        let dtype = obj
            .get("dtype")
            .or_else(|| obj.get("torch_dtype"))
            .and_then(|d| d.as_str())
            .map(str::to_string);

        Ok(Self {
            path: path.to_path_buf(),
            hidden_size,
            intermediate_size: req_usize(obj, path, "intermediate_size")?,
            num_hidden_layers: req_usize(obj, path, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: req_usize(obj, path, "vocab_size")?,
            rms_norm_eps: opt_f64(obj, path, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize(obj, path, "max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: opt_bool(obj, path, "tie_word_embeddings")?.unwrap_or(false),
            dtype,
            bos_token_id: token_ids(obj, path, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(obj, path, "eos_token_id")?,
            quantization_config: obj.get("quantization_config").filter(|q| !q.is_null()).cloned(),
        })
    }
}

fn check_architecture(obj: &Map<String, Value>, path: &Path) -> Result<()> {
    let archs: Vec<&str> = obj
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    let model_type = obj.get("model_type").and_then(|m| m.as_str());
    let arch_ok = archs.is_empty() || archs.contains(&"LlamaForCausalLM");
    let type_ok = model_type.is_none_or(|t| t == "llama");
    if archs.is_empty() && model_type.is_none() {
        return Err(invalid(path, "architectures", "neither `architectures` nor `model_type` is given"));
    }
    if !arch_ok || !type_ok {
        let found = archs.first().map(|s| s.to_string()).or(model_type.map(str::to_string)).unwrap_or_default();
        return Err(Error::UnsupportedArchitecture { path: path.to_path_buf(), architecture: found });
    }
    Ok(())
}

/// RoPE base and scaling from `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (4.x).
fn parse_rope(obj: &Map<String, Value>, path: &Path) -> Result<(f64, RopeScaling)> {
    let params = match obj.get("rope_parameters") {
        Some(Value::Object(p)) => Some(("rope_parameters", p)),
        Some(Value::Null) | None => match obj.get("rope_scaling") {
            Some(Value::Object(p)) => Some(("rope_scaling", p)),
            Some(Value::Null) | None => None,
            Some(v) => return Err(invalid(path, "rope_scaling", format!("{v} must be an object or null"))),
        },
        Some(v) => return Err(invalid(path, "rope_parameters", format!("{v} must be an object"))),
    };
    let top_theta = opt_f64(obj, path, "rope_theta")?;
    let Some((field, p)) = params else {
        return Ok((top_theta.unwrap_or(10000.0), RopeScaling::Default));
    };
    let theta = opt_f64(p, path, "rope_theta")?.or(top_theta).unwrap_or(10000.0);
    let kind_value = p.get("rope_type").or_else(|| p.get("type")).cloned().unwrap_or(Value::String("default".into()));
    let kind = kind_value.as_str().unwrap_or("");
    let num = |key: &str| -> Result<f64> {
        p.get(key)
            .and_then(|v| v.as_f64())
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| invalid(path, &format!("{field}.{key}"), "missing or not a positive number"))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        _ => {
            return Err(unsupported(
                path,
                &format!("{field}.rope_type"),
                &kind_value,
                "nibble implements rope types \"default\", \"linear\" and \"llama3\"",
            ))
        }
    };
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100
        })
    }

    #[test]
    fn reads_4x_layout_with_llama3_scaling() {
        let mut v = base();
        v["rope_theta"] = json!(500000.0);
        v["torch_dtype"] = json!("bfloat16");
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        v["eos_token_id"] = json!([128001, 128008]);
        let c = LlamaConfig::from_json(&v, Path::new("config.json")).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.eos_token_ids, vec![128001, 128008]);
        assert_eq!(c.head_dim, 16);
    }

    #[test]
    fn reads_5x_layout() {
        let mut v = base();
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1234.0});
        v["dtype"] = json!("float32");
        let c = LlamaConfig::from_json(&v, Path::new("config.json")).unwrap();
        assert_eq!(c.rope_theta, 1234.0);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        let mut v = base();
        v["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        assert!(matches!(
            LlamaConfig::from_json(&v, Path::new("c")),
            Err(Error::UnsupportedConfig { ref field, .. }) if field == "rope_scaling.rope_type"
        ));
        let mut v = base();
        v["hidden_act"] = json!("gelu");
        assert!(matches!(LlamaConfig::from_json(&v, Path::new("c")), Err(Error::UnsupportedConfig { .. })));
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        v["model_type"] = json!("gpt2");
        assert!(matches!(LlamaConfig::from_json(&v, Path::new("c")), Err(Error::UnsupportedArchitecture { .. })));
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        assert!(matches!(LlamaConfig::from_json(&v, Path::new("c")), Err(Error::InvalidConfig { .. })));
        let mut v = base();
        v["sliding_window"] = json!(4096);
        assert!(matches!(LlamaConfig::from_json(&v, Path::new("c")), Err(Error::UnsupportedConfig { .. })));
    }
}

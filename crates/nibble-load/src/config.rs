//! `config.json` for the Llama family (see [`crate::arch`]), in the transformers 4.x layout
//! (`rope_theta`, `rope_scaling`, `torch_dtype`) and the 5.x layout (`rope_parameters`, `dtype`).
//!
//! Every field that changes the math is either understood or refused: a silently ignored
//! `rope_scaling` would give a model that loads and then talks nonsense at long context.

use std::path::{Path, PathBuf};

use nibble_core::{Error, Result};
use serde_json::{Map, Value};

use crate::arch::{self, Arch, Biases, Common, Fields, Role};

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

/// A checked configuration of a Llama-family model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The config file it was read from (for error messages).
    pub path: PathBuf,
    /// The architecture.
    pub arch: Arch,
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
    /// Leading dimensions of each head that RoPE rotates (all of them but for Phi-3's
    /// `partial_rotary_factor`); even.
    pub rotary_dim: usize,
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
    /// Which linears carry biases.
    pub biases: Biases,
    /// Each layer's attention window: a query sees itself and the `window - 1` positions before
    /// it; `None` is full causal attention.
    pub layer_windows: Vec<Option<usize>>,
    /// The dtype the checkpoint was saved in (`dtype` / `torch_dtype`), when given.
    pub dtype: Option<String>,
    /// bos id from config.json, when given.
    pub bos_token_id: Option<u32>,
    /// eos ids from config.json (an int or a list), possibly empty.
    pub eos_token_ids: Vec<u32>,
    /// The raw `quantization_config` object, when the checkpoint is pre-quantized.
    pub quantization_config: Option<Value>,
    /// Whether the checkpoint's own `lm_head` is a GGUF `Q8_0` tensor (never for a folder): an
    /// f32 model on the CPU holds it as those blocks, whose `scale * code` values are exactly
    /// the f32 weights transformers' GGUF loader makes (`nibble_quant::BlockQ8Linear`).
    pub head_q8_blocks: bool,
}

/// A linear layer of a decoder layer, with its shape for one configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSpec {
    /// What it computes.
    pub role: Role,
    /// Hugging Face name inside `model.layers.N`.
    pub name: &'static str,
    /// llama.cpp name inside `blk.N`.
    pub gguf: &'static str,
    /// Rows of the weight.
    pub out_features: usize,
    /// Columns of the weight.
    pub in_features: usize,
    /// Whether it has a bias `[out_features]`.
    pub bias: bool,
}

/// A norm of a decoder layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormSpec {
    /// What it normalizes.
    pub role: Role,
    /// Hugging Face name inside `model.layers.N`.
    pub name: &'static str,
    /// llama.cpp name inside `blk.N`.
    pub gguf: &'static str,
    /// Length of its weight (the hidden size, or the head size for q/k norms).
    pub len: usize,
}

fn invalid(path: &Path, field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidConfig { path: path.to_path_buf(), field: field.into(), reason: reason.into() }
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

impl ModelConfig {
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
        let desc = find_architecture(obj, path)?;
        let f = Fields { obj, path };
        let defaults = desc.defaults;

        let hidden_size = f.req_usize("hidden_size")?;
        let num_attention_heads = f.req_usize("num_attention_heads")?;
        let num_key_value_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(f.invalid(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        let head_dim = match (f.opt_usize("head_dim")?, defaults.head_dim) {
            (Some(d), _) | (None, Some(d)) => d,
            (None, None) if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            (None, None) => {
                return Err(f.invalid(
                    "head_dim",
                    format!(
                        "missing, and hidden_size = {hidden_size} is not a multiple of num_attention_heads = {num_attention_heads}"
                    ),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(f.invalid("head_dim", format!("{head_dim} must be even for rotary embeddings")));
        }
        if let Some(act) = obj.get("hidden_act").or_else(|| obj.get("hidden_activation")) {
            if act.as_str() != Some("silu") {
                return Err(f.unsupported("hidden_act", act, "the Llama family uses \"silu\""));
            }
        }
        let num_hidden_layers = f.req_usize("num_hidden_layers")?;
        let specifics = (desc.read)(&f, &Common { num_hidden_layers, head_dim })?;
        // `int(head_dim * partial_rotary_factor)`; the reader checked it is even and at least 2.
        let rotary_dim = ((head_dim as f64) * specifics.partial_rotary_factor).floor() as usize;

        let (rope_theta, rope_scaling) = parse_rope(obj, path)?;
        let dtype = obj
            .get("dtype")
            .or_else(|| obj.get("torch_dtype"))
            .and_then(|d| d.as_str())
            .map(str::to_string);

        Ok(Self {
            path: path.to_path_buf(),
            arch: desc.arch,
            hidden_size,
            intermediate_size: f.req_usize("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rotary_dim,
            vocab_size: f.req_usize("vocab_size")?,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(defaults.rms_norm_eps),
            rope_theta,
            rope_scaling,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(defaults.max_position_embeddings),
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            biases: specifics.biases,
            layer_windows: specifics.layer_windows,
            dtype,
            bos_token_id: token_ids(obj, path, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(obj, path, "eos_token_id")?,
            quantization_config: obj.get("quantization_config").filter(|q| !q.is_null()).cloned(),
            head_q8_blocks: false,
        })
    }

    /// A transformers `config.json` for this configuration (4.x field names, which 5.x reads
    /// too), with weights stored as `dtype` (`"bfloat16"`): what an imported GGUF folder holds.
    pub fn to_hf_json(&self, dtype: &str) -> Value {
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::Default => Value::Null,
            RopeScaling::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => Value::from(*one),
            many => Value::from(many.to_vec()),
        };
        let d = self.description();
        let mut v = serde_json::json!({
            "architectures": [d.class],
            "model_type": d.model_type,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": rope_scaling,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": dtype,
            "use_cache": true,
            "vocab_size": self.vocab_size,
        });
        if let Some(obj) = v.as_object_mut() {
            (d.write)(self, obj);
        }
        v
    }

    /// The architecture's description.
    pub fn description(&self) -> &'static arch::Description {
        self.arch.description()
    }

    /// Width of the query projection (`num_attention_heads * head_dim`).
    pub fn q_width(&self) -> usize {
        self.num_attention_heads.saturating_mul(self.head_dim)
    }

    /// Width of the key (and the value) projection (`num_key_value_heads * head_dim`).
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads.saturating_mul(self.head_dim)
    }

    /// The linear layers of every decoder layer, in checkpoint order, with their shapes.
    pub fn layer_linears(&self) -> Vec<LinearSpec> {
        let (h, inter, q, kv) = (self.hidden_size, self.intermediate_size, self.q_width(), self.kv_width());
        let d = self.description();
        d.attention
            .iter()
            .chain(d.mlp)
            .map(|m| {
                let (out, inp, bias) = match m.role {
                    Role::Q => (q, h, self.biases.qkv),
                    Role::K | Role::V => (kv, h, self.biases.qkv),
                    Role::Qkv => (q.saturating_add(kv.saturating_mul(2)), h, self.biases.qkv),
                    Role::O => (h, q, self.biases.o),
                    Role::Gate | Role::Up => (inter, h, self.biases.mlp),
                    Role::GateUp => (inter.saturating_mul(2), h, self.biases.mlp),
                    Role::Down => (h, inter, self.biases.mlp),
                    // Norms are not linears; descriptions list them apart.
                    _ => (0, 0, false),
                };
                LinearSpec { role: m.role, name: m.name, gguf: m.gguf, out_features: out, in_features: inp, bias }
            })
            .collect()
    }

    /// The norms of every decoder layer.
    pub fn layer_norms(&self) -> Vec<NormSpec> {
        self.description()
            .norms
            .iter()
            .map(|m| {
                let len = if matches!(m.role, Role::QueryNorm | Role::KeyNorm) { self.head_dim } else { self.hidden_size };
                NormSpec { role: m.role, name: m.name, gguf: m.gguf, len }
            })
            .collect()
    }

    /// The attention window of layer `i` (`None`: full attention).
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.layer_windows.get(layer).copied().flatten()
    }

    /// Every tensor of the Hugging Face checkpoint this configuration describes, with its shape
    /// (`[out, in]` for linear weights); `lm_head.weight` only when the embeddings are not tied.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let (linears, norms) = (self.layer_linears(), self.layer_norms());
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab_size, h])];
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            for n in &norms {
                out.push((format!("{p}.{}.weight", n.name), vec![n.len]));
            }
            for l in &linears {
                out.push((format!("{p}.{}.weight", l.name), vec![l.out_features, l.in_features]));
                if l.bias {
                    out.push((format!("{p}.{}.bias", l.name), vec![l.out_features]));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }
}

/// The architecture config.json names (`architectures`, else `model_type`).
fn find_architecture(obj: &Map<String, Value>, path: &Path) -> Result<&'static arch::Description> {
    let archs: Vec<&str> = obj
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    let model_type = obj.get("model_type").and_then(|m| m.as_str());
    if archs.is_empty() && model_type.is_none() {
        return Err(invalid(path, "architectures", "neither `architectures` nor `model_type` is given"));
    }
    let desc = arch::by_class_or_type(&archs, model_type);
    match desc {
        // A class and a model_type that disagree (a Llama class with `model_type: gpt2`) are refused.
        Some(d) if model_type.is_none_or(|t| t == d.model_type) => Ok(d),
        _ => {
            let found = archs.first().map(|s| s.to_string()).or(model_type.map(str::to_string)).unwrap_or_default();
            Err(Error::UnsupportedArchitecture { path: path.to_path_buf(), architecture: found })
        }
    }
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
    let top_theta = Fields { obj, path }.opt_f64("rope_theta")?;
    let Some((field, p)) = params else {
        return Ok((top_theta.unwrap_or(10000.0), RopeScaling::Default));
    };
    let theta = Fields { obj: p, path }.opt_f64("rope_theta")?.or(top_theta).unwrap_or(10000.0);
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
            return Err(Fields { obj, path }.unsupported(
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
        let c = ModelConfig::from_json(&v, Path::new("config.json")).unwrap();
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
        let c = ModelConfig::from_json(&v, Path::new("config.json")).unwrap();
        assert_eq!(c.rope_theta, 1234.0);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        let mut v = base();
        v["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        assert!(matches!(
            ModelConfig::from_json(&v, Path::new("c")),
            Err(Error::UnsupportedConfig { ref field, .. }) if field == "rope_scaling.rope_type"
        ));
        let mut v = base();
        v["hidden_act"] = json!("gelu");
        assert!(matches!(ModelConfig::from_json(&v, Path::new("c")), Err(Error::UnsupportedConfig { .. })));
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        v["model_type"] = json!("gpt2");
        assert!(matches!(ModelConfig::from_json(&v, Path::new("c")), Err(Error::UnsupportedArchitecture { .. })));
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        assert!(matches!(ModelConfig::from_json(&v, Path::new("c")), Err(Error::InvalidConfig { .. })));
        let mut v = base();
        v["sliding_window"] = json!(4096);
        assert!(matches!(ModelConfig::from_json(&v, Path::new("c")), Err(Error::UnsupportedConfig { .. })));
    }
}

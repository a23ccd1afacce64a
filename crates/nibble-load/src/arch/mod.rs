//! One description per architecture of the Llama family.
//!
//! A [`Description`] says what an architecture's decoder layer is made of (its modules, under
//! their Hugging Face and llama.cpp names), the defaults its transformers config class gives
//! absent fields, and how to read the config fields only it has. Everything else reads the
//! description through [`crate::ModelConfig`]: the loader and the model
//! ([`crate::ModelConfig::layer_linears`], [`crate::ModelConfig::layer_norms`]), the memory
//! estimator, the saver and the GGUF tensor-name mapping. Adding an architecture is one file here
//! plus its entry in [`ALL`] (see `docs/architecture.md`).

use std::path::Path;

use nibble_core::{Error, Result};
use serde_json::{Map, Value};

mod llama;
mod mistral;
mod phi3;
mod qwen2;
mod qwen3;

/// The architectures nibble implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// `LlamaForCausalLM`.
    Llama,
    /// `MistralForCausalLM`: Llama with sliding-window attention.
    Mistral,
    /// `Qwen2ForCausalLM`: q/k/v biases, optional sliding window on the upper layers.
    Qwen2,
    /// `Qwen3ForCausalLM`: per-head RMSNorm of queries and keys, free `head_dim`.
    Qwen3,
    /// `Phi3ForCausalLM`: fused `qkv_proj` and `gate_up_proj`, partial rotary embeddings.
    Phi3,
}

/// What a module of a decoder layer computes; the model wires layers by role, never by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Query, key and value in one matrix, rows in that order (Phi-3's `qkv_proj`).
    Qkv,
    /// Attention output projection.
    O,
    /// MLP gate projection (through SiLU).
    Gate,
    /// MLP up projection.
    Up,
    /// Gate and up in one matrix, gate rows first (Phi-3's `gate_up_proj`).
    GateUp,
    /// MLP down projection.
    Down,
    /// RMSNorm before attention.
    InputNorm,
    /// RMSNorm before the MLP.
    PostAttentionNorm,
    /// RMSNorm of each query head (Qwen3's `q_norm`).
    QueryNorm,
    /// RMSNorm of each key head (Qwen3's `k_norm`).
    KeyNorm,
}

/// A module of the decoder layer: its role and its names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Module {
    /// What it computes.
    pub role: Role,
    /// Hugging Face name inside `model.layers.N` (`self_attn.q_proj`).
    pub name: &'static str,
    /// llama.cpp's name inside `blk.N` (`attn_q`).
    pub gguf: &'static str,
}

/// Defaults the architecture's transformers config class gives fields that config.json leaves
/// out (transformers 5.24).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Defaults {
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// `head_dim` when absent: `None` derives it as `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
}

/// The values of the common fields an architecture's own reader may depend on.
#[derive(Debug, Clone, Copy)]
pub struct Common {
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `head_dim` (given or derived).
    pub head_dim: usize,
}

/// What an architecture's own fields decide.
#[derive(Debug, Clone, PartialEq)]
pub struct Specifics {
    /// Which linears carry biases.
    pub biases: Biases,
    /// The attention window of each layer (`None`: full causal attention).
    pub layer_windows: Vec<Option<usize>>,
    /// Fraction of each head that is rotated (`partial_rotary_factor`).
    pub partial_rotary_factor: f64,
}

/// Which linear layers carry a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Biases {
    /// q, k and v projections (or the fused qkv).
    pub qkv: bool,
    /// The attention output projection.
    pub o: bool,
    /// gate, up and down projections.
    pub mlp: bool,
}

/// Everything nibble knows about one architecture.
#[derive(Debug)]
pub struct Description {
    /// Which one.
    pub arch: Arch,
    /// The transformers class in `architectures` (`Qwen2ForCausalLM`).
    pub class: &'static str,
    /// config.json's `model_type`.
    pub model_type: &'static str,
    /// llama.cpp's `general.architecture`, when it has its own (Mistral GGUFs say `llama`).
    pub gguf: Option<&'static str>,
    /// Whether llama.cpp's converter permutes Q and K rows to its interleaved rotary layout (its
    /// `llama` architecture does; the NeoX-rotary ones keep the Hugging Face layout).
    pub gguf_rotary_permuted: bool,
    /// The attention modules, in checkpoint order.
    pub attention: &'static [Module],
    /// The MLP modules, in checkpoint order.
    pub mlp: &'static [Module],
    /// The norms of a layer.
    pub norms: &'static [Module],
    /// Defaults of absent fields.
    pub defaults: Defaults,
    /// Reads the fields only this architecture has (biases, windows, partial rotary) and refuses
    /// the ones that would change the math in a way nibble does not implement.
    pub read: fn(&Fields<'_>, &Common) -> Result<Specifics>,
    /// Writes the fields only this architecture has into a config.json object, so that
    /// [`crate::ModelConfig::to_hf_json`] reads back as the same configuration.
    pub write: fn(&crate::ModelConfig, &mut Map<String, Value>),
}

/// Every architecture nibble loads.
pub const ALL: [&Description; 5] =
    [&llama::DESCRIPTION, &mistral::DESCRIPTION, &qwen2::DESCRIPTION, &qwen3::DESCRIPTION, &phi3::DESCRIPTION];

impl Arch {
    /// This architecture's description.
    pub fn description(self) -> &'static Description {
        match self {
            Arch::Llama => &llama::DESCRIPTION,
            Arch::Mistral => &mistral::DESCRIPTION,
            Arch::Qwen2 => &qwen2::DESCRIPTION,
            Arch::Qwen3 => &qwen3::DESCRIPTION,
            Arch::Phi3 => &phi3::DESCRIPTION,
        }
    }
}

/// The description whose transformers class or `model_type` is named.
pub fn by_class_or_type(classes: &[&str], model_type: Option<&str>) -> Option<&'static Description> {
    ALL.iter().copied().find(|d| classes.contains(&d.class)).or_else(|| {
        // A config naming only its model_type (or a class nibble does not know) is taken by type
        // only when no class contradicts it.
        let t = model_type?;
        ALL.iter().copied().find(|d| d.model_type == t && classes.iter().all(|c| !c.ends_with("ForCausalLM") || *c == d.class))
    })
}

/// The description for llama.cpp's `general.architecture`.
pub fn by_gguf(name: &str) -> Option<&'static Description> {
    ALL.iter().copied().find(|d| d.gguf == Some(name))
}

/// The llama.cpp architecture names nibble loads.
pub fn gguf_names() -> Vec<&'static str> {
    ALL.iter().filter_map(|d| d.gguf).collect()
}

impl Description {
    /// Every module of a layer: attention, MLP, norms.
    pub fn modules(&self) -> impl Iterator<Item = &'static Module> {
        self.attention.iter().chain(self.mlp).chain(self.norms)
    }

    /// The Hugging Face module name of llama.cpp's `blk.N.<gguf>` module.
    pub fn hf_module(&self, gguf: &str) -> Option<&'static str> {
        self.modules().find(|m| m.gguf == gguf).map(|m| m.name)
    }
}

/// Typed access to config.json's fields, naming the file in every error.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    /// The parsed object.
    pub obj: &'a Map<String, Value>,
    /// The file, for error messages.
    pub path: &'a Path,
}

impl Fields<'_> {
    /// `InvalidConfig` for `field`.
    pub fn invalid(&self, field: &str, reason: impl Into<String>) -> Error {
        Error::InvalidConfig { path: self.path.to_path_buf(), field: field.into(), reason: reason.into() }
    }

    /// `UnsupportedConfig` for `field` holding `value`.
    pub fn unsupported(&self, field: &str, value: &Value, hint: impl Into<String>) -> Error {
        Error::UnsupportedConfig {
            path: self.path.to_path_buf(),
            field: field.into(),
            value: value.to_string(),
            hint: hint.into(),
        }
    }

    /// The raw value of `key`, `None` when absent or null.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    /// A required integer of at least 1 (and at most its bound, [`crate::limits`]).
    pub fn req_usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key).ok_or_else(|| self.invalid(key, "missing; the model needs it"))?;
        let n = v.as_u64().ok_or_else(|| self.invalid(key, format!("{v} is not a non-negative integer")))?;
        let n = crate::limits::check(key, n).map_err(|r| self.invalid(key, r))?;
        let n = usize::try_from(n).map_err(|_| self.invalid(key, format!("{n} is too large")))?;
        if n == 0 {
            return Err(self.invalid(key, "must be at least 1"));
        }
        Ok(n)
    }

    /// An optional integer of at least 1.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.req_usize(key).map(Some),
        }
    }

    /// An optional finite number.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.invalid(key, format!("{v} is not a finite number"))),
            },
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.invalid(key, format!("{v} is not true or false"))),
        }
    }

    /// Refuses each of `keys` that is present with a value other than null or false: fields
    /// that change the math of some other architecture and that this one's class never reads.
    pub fn refuse(&self, keys: &[&str], arch: &str) -> Result<()> {
        for key in keys {
            if let Some(v) = self.get(key) {
                if v != &Value::Bool(false) {
                    return Err(self.unsupported(key, v, format!("{arch} has no such field; it belongs to another architecture")));
                }
            }
        }
        Ok(())
    }

    /// `sliding_window` as a config class with default `default` reads it: absent gives the
    /// default, null no window, else a positive integer.
    pub fn window(&self, default: Option<usize>) -> Result<Option<usize>> {
        match self.obj.get("sliding_window") {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(_) => self.req_usize("sliding_window").map(Some),
        }
    }

    /// `layer_types` (transformers 5's per-layer attention kinds), when given: each entry
    /// `full_attention` or `sliding_attention`, one per layer.
    pub fn layer_types(&self, num_layers: usize) -> Result<Option<Vec<bool>>> {
        let Some(v) = self.get("layer_types") else { return Ok(None) };
        let items = v.as_array().ok_or_else(|| self.invalid("layer_types", format!("{v} is not a list")))?;
        if items.len() != num_layers {
            return Err(self.invalid("layer_types", format!("{} entries for {num_layers} layers", items.len())));
        }
        items
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(false),
                Some("sliding_attention") => Ok(true),
                _ => Err(self.unsupported(
                    "layer_types",
                    t,
                    "nibble implements \"full_attention\" and \"sliding_attention\" layers",
                )),
            })
            .collect::<Result<Vec<bool>>>()
            .map(Some)
    }

    /// `partial_rotary_factor` as transformers 5 reads it: from `rope_parameters` (or the older
    /// `rope_scaling`), else the top level; 1.0 when absent.
    pub fn partial_rotary_factor(&self) -> Result<f64> {
        for holder in ["rope_parameters", "rope_scaling"] {
            if let Some(Value::Object(p)) = self.get(holder) {
                let nested = Fields { obj: p, path: self.path };
                if let Some(f) = nested.opt_f64("partial_rotary_factor")? {
                    return Ok(f);
                }
            }
        }
        Ok(self.opt_f64("partial_rotary_factor")?.unwrap_or(1.0))
    }

    /// The rotary type named by `rope_parameters.rope_type` (or the older `rope_scaling.type`).
    pub fn rope_type(&self) -> Result<Option<String>> {
        for holder in ["rope_parameters", "rope_scaling"] {
            if let Some(Value::Object(p)) = self.get(holder) {
                if let Some(t) = p.get("rope_type").or_else(|| p.get("type")).filter(|t| !t.is_null()) {
                    let t = t.as_str().ok_or_else(|| self.invalid(holder, format!("rope_type {t} is not a string")))?;
                    return Ok(Some(t.to_string()));
                }
            }
        }
        Ok(None)
    }

    /// Refuses a `partial_rotary_factor` other than 1.0, for architectures that rotate the whole
    /// head.
    pub fn whole_head_rotary(&self, arch: &str) -> Result<()> {
        let f = self.partial_rotary_factor()?;
        if f != 1.0 {
            return Err(self.unsupported("partial_rotary_factor", &serde_json::json!(f), format!("{arch} rotates the whole head (1.0)")));
        }
        Ok(())
    }
}

/// The one window every layer shares (Mistral's and Phi-3's `sliding_window`), as JSON.
pub(crate) fn uniform_window(cfg: &crate::ModelConfig) -> Value {
    cfg.layer_windows.first().copied().flatten().map_or(Value::Null, Value::from)
}

/// Qwen2's and Qwen3's window fields: `layer_types` spelled out, so no default is involved.
pub(crate) fn write_qwen_windows(cfg: &crate::ModelConfig, obj: &mut Map<String, Value>) {
    let window = cfg.layer_windows.iter().flatten().next().copied();
    obj.insert("use_sliding_window".into(), Value::Bool(window.is_some()));
    obj.insert("sliding_window".into(), window.map_or(Value::Null, Value::from));
    let types: Vec<Value> = cfg
        .layer_windows
        .iter()
        .map(|w| Value::from(if w.is_some() { "sliding_attention" } else { "full_attention" }))
        .collect();
    obj.insert("layer_types".into(), Value::Array(types));
}

/// The fields of other architectures that change the math (softcapping, scaled queries,
/// layer-norm variants, mixture of experts); none of the architectures here reads them.
pub(crate) const FOREIGN: [&str; 9] = [
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "qk_layernorm",
    "use_qk_norm",
    "num_local_experts",
    "num_experts",
    "sandwich_norm",
    "logits_scaling",
];

/// Llama's separate q, k, v and o projections (shared by every architecture but Phi-3).
pub(crate) const SEPARATE_ATTENTION: [Module; 4] = [
    Module { role: Role::Q, name: "self_attn.q_proj", gguf: "attn_q" },
    Module { role: Role::K, name: "self_attn.k_proj", gguf: "attn_k" },
    Module { role: Role::V, name: "self_attn.v_proj", gguf: "attn_v" },
    Module { role: Role::O, name: "self_attn.o_proj", gguf: "attn_output" },
];

/// Llama's gate, up and down projections.
pub(crate) const SEPARATE_MLP: [Module; 3] = [
    Module { role: Role::Gate, name: "mlp.gate_proj", gguf: "ffn_gate" },
    Module { role: Role::Up, name: "mlp.up_proj", gguf: "ffn_up" },
    Module { role: Role::Down, name: "mlp.down_proj", gguf: "ffn_down" },
];

/// Llama's two norms of a layer.
pub(crate) const LAYER_NORMS: [Module; 2] = [
    Module { role: Role::InputNorm, name: "input_layernorm", gguf: "attn_norm" },
    Module { role: Role::PostAttentionNorm, name: "post_attention_layernorm", gguf: "ffn_norm" },
];

/// transformers' windows for Qwen2 and Qwen3: `sliding_window` counts only when
/// `use_sliding_window` is true; `layer_types` when given, else layers from `max_window_layers`
/// on slide.
pub(crate) fn qwen_windows(f: &Fields<'_>, c: &Common) -> Result<Vec<Option<usize>>> {
    let use_sliding = f.opt_bool("use_sliding_window")?.unwrap_or(false);
    // The class default is 4096; the value is checked even when unused.
    let window = f.window(Some(4096))?;
    let window = if use_sliding { window } else { None };
    let sliding = match f.layer_types(c.num_hidden_layers)? {
        Some(types) => types,
        None => {
            let from = f.opt_usize("max_window_layers")?.unwrap_or(28);
            (0..c.num_hidden_layers).map(|i| window.is_some() && i >= from).collect()
        }
    };
    sliding
        .into_iter()
        .map(|s| match (s, window) {
            (false, _) => Ok(None),
            (true, Some(w)) => Ok(Some(w)),
            (true, None) => Err(f.invalid(
                "layer_types",
                "a layer is \"sliding_attention\" but there is no window (use_sliding_window is false or sliding_window is null)",
            )),
        })
        .collect()
}

//! `LlamaForCausalLM` (transformers' `models/llama`): the family's base.

use super::{Arch, Biases, Common, Defaults, Description, Fields, Specifics, FOREIGN, LAYER_NORMS, SEPARATE_ATTENTION, SEPARATE_MLP};
use nibble_core::Result;
use serde_json::{Map, Value};

/// Llama.
pub(crate) const DESCRIPTION: Description = Description {
    arch: Arch::Llama,
    class: "LlamaForCausalLM",
    model_type: "llama",
    gguf: Some("llama"),
    gguf_rotary_permuted: true,
    attention: &SEPARATE_ATTENTION,
    mlp: &SEPARATE_MLP,
    norms: &LAYER_NORMS,
    defaults: Defaults { rms_norm_eps: 1e-6, max_position_embeddings: 2048, head_dim: None },
    read,
    write,
};

/// `attention_bias` puts a bias on all four attention projections, `mlp_bias` on all three MLP
/// ones (`LlamaAttention`, `LlamaMLP`); Llama has no attention window.
fn read(f: &Fields<'_>, c: &Common) -> Result<Specifics> {
    f.refuse(&FOREIGN, "Llama")?;
    f.refuse(&["sliding_window", "use_sliding_window"], "Llama")?;
    f.whole_head_rotary("Llama")?;
    let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
    Ok(Specifics {
        biases: Biases { qkv: attention_bias, o: attention_bias, mlp: f.opt_bool("mlp_bias")?.unwrap_or(false) },
        layer_windows: vec![None; c.num_hidden_layers],
        partial_rotary_factor: 1.0,
    })
}

fn write(cfg: &crate::ModelConfig, obj: &mut Map<String, Value>) {
    obj.insert("attention_bias".into(), Value::Bool(cfg.biases.qkv));
    obj.insert("mlp_bias".into(), Value::Bool(cfg.biases.mlp));
}

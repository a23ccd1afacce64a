//! `Qwen3ForCausalLM` (transformers' `models/qwen3`): Qwen2 with per-head q/k RMSNorm and no
//! fixed biases.

use super::{qwen_windows, Arch, Biases, Common, Defaults, Description, Fields, Module, Role, Specifics, FOREIGN, SEPARATE_ATTENTION, SEPARATE_MLP};
use nibble_core::Result;
use serde_json::{Map, Value};

/// A layer's norms: Llama's two, plus RMSNorm over each query and key head (before RoPE).
const NORMS: [Module; 4] = [
    Module { role: Role::InputNorm, name: "input_layernorm", gguf: "attn_norm" },
    Module { role: Role::PostAttentionNorm, name: "post_attention_layernorm", gguf: "ffn_norm" },
    Module { role: Role::QueryNorm, name: "self_attn.q_norm", gguf: "attn_q_norm" },
    Module { role: Role::KeyNorm, name: "self_attn.k_norm", gguf: "attn_k_norm" },
];

/// Qwen3. Its config class defaults `head_dim` to 128, not `hidden_size / num_attention_heads`.
pub(crate) const DESCRIPTION: Description = Description {
    arch: Arch::Qwen3,
    class: "Qwen3ForCausalLM",
    model_type: "qwen3",
    gguf: Some("qwen3"),
    gguf_rotary_permuted: false,
    attention: &SEPARATE_ATTENTION,
    mlp: &SEPARATE_MLP,
    norms: &NORMS,
    defaults: Defaults { rms_norm_eps: 1e-6, max_position_embeddings: 32768, head_dim: Some(128) },
    read,
    write,
};

/// `attention_bias` puts a bias on q, k, v and o (`Qwen3Attention`); windows as [`qwen_windows`].
fn read(f: &Fields<'_>, c: &Common) -> Result<Specifics> {
    f.refuse(&FOREIGN, "Qwen3")?;
    f.refuse(&["mlp_bias"], "Qwen3")?;
    f.whole_head_rotary("Qwen3")?;
    let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
    Ok(Specifics {
        biases: Biases { qkv: bias, o: bias, mlp: false },
        layer_windows: qwen_windows(f, c)?,
        partial_rotary_factor: 1.0,
    })
}

fn write(cfg: &crate::ModelConfig, obj: &mut Map<String, Value>) {
    obj.insert("attention_bias".into(), Value::Bool(cfg.biases.qkv));
    super::write_qwen_windows(cfg, obj);
}

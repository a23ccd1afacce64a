//! `Qwen2ForCausalLM` (transformers' `models/qwen2`; Qwen2 and Qwen2.5).

use super::{qwen_windows, Arch, Biases, Common, Defaults, Description, Fields, Specifics, FOREIGN, LAYER_NORMS, SEPARATE_ATTENTION, SEPARATE_MLP};
use nibble_core::Result;
use serde_json::{Map, Value};

/// Qwen2.
pub(crate) const DESCRIPTION: Description = Description {
    arch: Arch::Qwen2,
    class: "Qwen2ForCausalLM",
    model_type: "qwen2",
    gguf: Some("qwen2"),
    gguf_rotary_permuted: false,
    attention: &SEPARATE_ATTENTION,
    mlp: &SEPARATE_MLP,
    norms: &LAYER_NORMS,
    defaults: Defaults { rms_norm_eps: 1e-6, max_position_embeddings: 32768, head_dim: None },
    read,
    write,
};

/// q, k and v always carry biases and o never does (`Qwen2Attention` hard-codes them; an
/// `attention_bias` field is not read). Windows as [`qwen_windows`].
fn read(f: &Fields<'_>, c: &Common) -> Result<Specifics> {
    f.refuse(&FOREIGN, "Qwen2")?;
    f.refuse(&["mlp_bias"], "Qwen2")?;
    f.whole_head_rotary("Qwen2")?;
    Ok(Specifics {
        biases: Biases { qkv: true, o: false, mlp: false },
        layer_windows: qwen_windows(f, c)?,
        partial_rotary_factor: 1.0,
    })
}

fn write(cfg: &crate::ModelConfig, obj: &mut Map<String, Value>) {
    super::write_qwen_windows(cfg, obj);
}

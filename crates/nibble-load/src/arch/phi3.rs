//! `Phi3ForCausalLM` (transformers' `models/phi3`; Phi-3 and Phi-3.5 mini, Phi-4 mini).

use super::{Arch, Biases, Common, Defaults, Description, Fields, Module, Role, Specifics, FOREIGN, LAYER_NORMS};
use nibble_core::Result;
use serde_json::{Map, Value};

/// One `qkv_proj` (q rows, then k, then v) and the output projection.
const ATTENTION: [Module; 2] = [
    Module { role: Role::Qkv, name: "self_attn.qkv_proj", gguf: "attn_qkv" },
    Module { role: Role::O, name: "self_attn.o_proj", gguf: "attn_output" },
];

/// One `gate_up_proj` (gate rows first, as `chunk(2)` splits it) and the down projection;
/// llama.cpp stores the fused matrix as `ffn_up`.
const MLP: [Module; 2] = [
    Module { role: Role::GateUp, name: "mlp.gate_up_proj", gguf: "ffn_up" },
    Module { role: Role::Down, name: "mlp.down_proj", gguf: "ffn_down" },
];

/// Phi-3.
pub(crate) const DESCRIPTION: Description = Description {
    arch: Arch::Phi3,
    class: "Phi3ForCausalLM",
    model_type: "phi3",
    gguf: Some("phi3"),
    gguf_rotary_permuted: false,
    attention: &ATTENTION,
    mlp: &MLP,
    norms: &LAYER_NORMS,
    defaults: Defaults { rms_norm_eps: 1e-5, max_position_embeddings: 4096, head_dim: None },
    read,
    write,
};

/// No biases; `partial_rotary_factor` rotates the first `int(head_dim * factor)` dimensions of
/// each head; `sliding_window` (default null) applies to every layer, as for Mistral. The
/// dropouts (`resid_pdrop`, `embd_pdrop`) do nothing at inference.
fn read(f: &Fields<'_>, c: &Common) -> Result<Specifics> {
    f.refuse(&FOREIGN, "Phi-3")?;
    f.refuse(&["attention_bias", "mlp_bias"], "Phi-3")?;
    if let Some(kind) = f.rope_type()? {
        if kind != "default" {
            return Err(f.unsupported(
                "rope_parameters.rope_type",
                &Value::String(kind.clone()),
                "nibble implements Phi-3 with default rotary embeddings; longrope (the 128k-context models) is not implemented",
            ));
        }
    }
    let factor = f.partial_rotary_factor()?;
    // transformers: `dim = int(head_dim * partial_rotary_factor)`, rotated in two halves.
    let rotary = (c.head_dim as f64 * factor).floor();
    if !(factor > 0.0 && factor <= 1.0) || rotary < 2.0 || !(rotary as usize).is_multiple_of(2) {
        return Err(f.unsupported(
            "partial_rotary_factor",
            &serde_json::json!(factor),
            format!("it must rotate an even number of at least 2 of the head's {} dimensions", c.head_dim),
        ));
    }
    let window = f.window(None)?;
    Ok(Specifics { biases: Biases::default(), layer_windows: vec![window; c.num_hidden_layers], partial_rotary_factor: factor })
}

fn write(cfg: &crate::ModelConfig, obj: &mut Map<String, Value>) {
    obj.insert("sliding_window".into(), super::uniform_window(cfg));
    // Exact: rotary_dim was read as int(head_dim * factor) from a factor that gives it.
    obj.insert("partial_rotary_factor".into(), Value::from(cfg.rotary_dim as f64 / cfg.head_dim.max(1) as f64));
}

//! `MistralForCausalLM` (transformers' `models/mistral`): Llama with sliding-window attention.

use super::{Arch, Biases, Common, Defaults, Description, Fields, Specifics, FOREIGN, LAYER_NORMS, SEPARATE_ATTENTION, SEPARATE_MLP};
use nibble_core::Result;
use serde_json::{Map, Value};

/// Mistral. llama.cpp writes Mistral models as its `llama` architecture, so there is no GGUF name.
pub(crate) const DESCRIPTION: Description = Description {
    arch: Arch::Mistral,
    class: "MistralForCausalLM",
    model_type: "mistral",
    gguf: None,
    gguf_rotary_permuted: true,
    attention: &SEPARATE_ATTENTION,
    mlp: &SEPARATE_MLP,
    norms: &LAYER_NORMS,
    defaults: Defaults { rms_norm_eps: 1e-6, max_position_embeddings: 4096 * 32, head_dim: None },
    read,
    write,
};

/// `sliding_window` applies to every layer (`MistralModel` builds one sliding mask for all of
/// them): absent means the class default 4096, null means full attention. `layer_types` is not
/// read by Mistral (transformers warns and ignores it); nor are biases.
fn read(f: &Fields<'_>, c: &Common) -> Result<Specifics> {
    f.refuse(&FOREIGN, "Mistral")?;
    f.refuse(&["attention_bias", "mlp_bias"], "Mistral")?;
    f.whole_head_rotary("Mistral")?;
    let window = f.window(Some(4096))?;
    if f.get("layer_types").is_some() {
        tracing::warn!("{}: Mistral ignores `layer_types` (as transformers does); every layer uses sliding_window", f.path.display());
    }
    Ok(Specifics { biases: Biases::default(), layer_windows: vec![window; c.num_hidden_layers], partial_rotary_factor: 1.0 })
}

fn write(cfg: &crate::ModelConfig, obj: &mut Map<String, Value>) {
    obj.insert("sliding_window".into(), super::uniform_window(cfg));
}

//! A PEFT `adapter_config.json`: its checks, then which modules of a Llama layer it targets and
//! with which rank and scale (the regular expressions of target_modules, exclude_modules,
//! rank_pattern, alpha_pattern and layers_pattern all come from the input).

use std::path::Path;

use nibble_load::adapter::AdapterConfig;

const MODULES: [&str; 9] = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.k_proj",
    "model.layers.2.self_attn.v_proj",
    "model.layers.10.self_attn.o_proj",
    "model.layers.3.mlp.gate_proj",
    "model.layers.3.mlp.up_proj",
    "model.layers.31.mlp.down_proj",
    "model.layers.0.self_attn.qkv_proj",
    "lm_head",
];

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
        let Ok(cfg) = AdapterConfig::from_json(&v, Path::new("adapter_config.json")) else { return };
        for m in MODULES {
            if let Some(t) = cfg.target(m) {
                assert!(t.r >= 1 && t.scale.is_finite(), "{m}: {t:?}");
            }
        }
    });
}

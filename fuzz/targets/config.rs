//! config.json -> the architecture's description -> the planner: every size the planner derives
//! from the config, for several quantizations, context lengths and device budgets.

use std::path::Path;

use nibble_load::ModelConfig;
use nibble_plan::{DeviceMap, Inventory, PlanRequest};
use nibble_quant::BitsAndBytesConfig;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
        let Ok(cfg) = ModelConfig::from_json(&v, Path::new("config.json")) else { return };
        let _ = cfg.tensor_shapes();
        let _ = (cfg.layer_linears(), cfg.layer_norms(), cfg.q_width(), cfg.kv_width());
        for layer in 0..cfg.num_hidden_layers.min(4) {
            let _ = cfg.window(layer);
        }
        let inventory = Inventory::simulated(&[24 << 30, 24 << 30], 64 << 30);
        for quant in [BitsAndBytesConfig::none(), BitsAndBytesConfig::nf4().with_double_quant(true), BitsAndBytesConfig::int8()] {
            for max_seq_len in [1, 4096, usize::MAX] {
                let mut req = PlanRequest::new(&cfg);
                req.device_map = DeviceMap::Auto;
                req.max_seq_len = max_seq_len;
                let _ = nibble_plan::plan(&cfg, &quant, &req, &inventory);
            }
        }
    });
}

//! The planner sizes exactly what the loader holds: for the tiny Llama (f32, untied), the
//! pre-quantized tiny checkpoint (NF4 with double quant, which keeps its own quantization
//! whatever is asked) and SmolLM2-135M (bf16, tied embeddings), for every quantization (none,
//! NF4, NF4 + double quant, FP4, int8) and every `dtype` (auto, f32, bf16, f16), the plan's total
//! weight bytes equal `Model::resident_weight_bytes()` after loading, to the byte (no tolerance).
//!
//! The SmolLM2 cases are skipped, with the reason printed, when `models/smollm2-135m-instruct` is
//! missing (`models/fetch-smollm2.sh` makes it).

mod common;

use std::time::Instant;

use common::*;
use nibble::{
    BitsAndBytesConfig, DType, DeviceMap, Inventory, ModelConfig, LoadOptions, Model, ModelDtype, PlanRequest,
};

/// The quantizations a user picks.
fn quants() -> Vec<(&'static str, BitsAndBytesConfig)> {
    vec![
        ("none", BitsAndBytesConfig::none()),
        ("nf4", BitsAndBytesConfig::nf4()),
        ("nf4+dq", BitsAndBytesConfig::nf4().with_double_quant(true)),
        ("fp4", BitsAndBytesConfig::fp4()),
        ("int8", BitsAndBytesConfig::int8()),
    ]
}

const DTYPES: [ModelDtype; 4] = [ModelDtype::Auto, ModelDtype::F32, ModelDtype::Bf16, ModelDtype::F16];

/// A host large enough for every model here, the same for the plan and the load.
fn inventory() -> Inventory {
    Inventory::simulated(&[], 64 << 30)
}

/// What the loaded model holds, split as the estimate splits it: (embed, each layer, head).
fn resident_parts(model: &Model) -> (u64, Vec<u64>, u64) {
    let llama = model.llama();
    let t = |t: &candle_core::Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
    let n = model.config().num_hidden_layers;
    let (mut embed, mut layers, mut head) = (0u64, vec![0u64; n], 0u64);
    let layer_of =
        |name: &str| -> Option<usize> { name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok() };
    for (name, tensor) in llama.dense_tensors() {
        match layer_of(&name) {
            Some(i) => layers[i] += t(tensor),
            None if name.starts_with("model.embed_tokens") => embed += t(tensor),
            None => head += t(tensor),
        }
    }
    for (name, lin) in llama.linears() {
        let bytes = lin.resident_bytes() as u64;
        match layer_of(&name) {
            Some(i) => layers[i] += bytes,
            None if model.head_is_shared() => {}
            None => head += bytes,
        }
    }
    (embed, layers, head)
}

/// Loads `dir` under every quantization and dtype, plans each as the loader does, and returns
/// one line per case whose figures differ (with the differing terms), after printing every case.
fn check_model(dir: &str) -> Vec<String> {
    let cfg = ModelConfig::from_file(format!("{dir}/config.json")).unwrap();
    // `dtype="auto"` as the planner resolves it from config.json alone.
    let auto = PlanRequest::new(&cfg).dtype;
    let mut errs = Vec::new();
    for (qname, requested) in quants() {
        // A pre-quantized checkpoint keeps the quantization its config states (the loader's
        // `effective_quant`); the compute dtype, which sizes no weight, is the requested one.
        let quant = match &cfg.quantization_config {
            Some(q) => BitsAndBytesConfig::from_json(q).unwrap(),
            None => requested.clone(),
        };
        for dtype in DTYPES {
            let case = format!("{dir} quant={qname} dtype={dtype:?}");
            let opts = LoadOptions {
                quant: requested.clone(),
                dtype,
                device_map: DeviceMap::Cpu,
                inventory: Some(inventory()),
                ..LoadOptions::default()
            };
            let started = Instant::now();
            let model = Model::load(dir, &opts).unwrap_or_else(|e| panic!("{case}: load failed: {e}"));
            let load_s = started.elapsed().as_secs_f64();
            assert_eq!(model.quantization().method(), quant.method(), "{case}: quantization the loader applied");
            let resolved = match dtype {
                ModelDtype::Auto => auto,
                ModelDtype::F32 => DType::F32,
                ModelDtype::Bf16 => DType::BF16,
                ModelDtype::F16 => DType::F16,
            };
            assert_eq!(model.dtype(), resolved, "{case}: the dtype the load resolved vs the planner's");

            let mut request = opts.plan_request(&cfg);
            request.dtype = model.dtype();
            let plan =
                nibble::plan(&cfg, &quant, &request, &inventory()).unwrap_or_else(|e| panic!("{case}: plan: {e}"));
            let planned: u64 = plan.usage.iter().map(|u| u.weight_bytes).sum();
            let resident = model.resident_weight_bytes() as u64;
            println!("{case}: planned {planned}, resident {resident} ({load_s:.2}s load)");
            // Term by term as well, so that two errors cannot cancel out in the total.
            let est = &plan.estimate;
            let (embed, layers, head) = resident_parts(&model);
            let held: u64 = embed + layers.iter().sum::<u64>() + head;
            assert_eq!(held, resident, "{case}: the parts of resident_weight_bytes() add up");
            let mut terms = Vec::new();
            if est.embed != embed {
                terms.push(format!("embed: planned {} vs held {embed}", est.embed));
            }
            if let Some(i) = (0..layers.len().max(est.layers.len())).find(|&i| est.layers.get(i) != layers.get(i)) {
                terms.push(format!("layer {i}: planned {:?} vs held {:?}", est.layers.get(i), layers.get(i)));
            }
            if est.head != head {
                terms.push(format!("head (norm + lm_head): planned {} vs held {head}", est.head));
            }
            if planned != resident || !terms.is_empty() {
                errs.push(format!("{case}: planned {planned} vs resident {resident}; {}", terms.join("; ")));
            }
        }
    }
    errs
}

#[test]
fn planned_weight_bytes_equal_resident_tiny_llama() {
    let errs = check_model(&tiny_model());
    assert!(errs.is_empty(), "{} mismatches:\n{}", errs.len(), errs.join("\n"));
}

#[test]
fn planned_weight_bytes_equal_resident_prequantized_tiny_llama() {
    let errs = check_model(&fixture("tiny-llama-bnb-nf4").display().to_string());
    assert!(errs.is_empty(), "{} mismatches:\n{}", errs.len(), errs.join("\n"));
}


#[test]
fn planned_weight_bytes_equal_resident_smollm2() {
    let Some(dir) = smollm2_dir() else { return };
    let errs = check_model(&dir);
    assert!(errs.is_empty(), "{} mismatches:\n{}", errs.len(), errs.join("\n"));
}

/// SmolLM2 NF4 holds its tied lm_head once: `docs/benchmarks.md` measured 165.1 MiB resident when
/// the loader kept a separate 54 MiB bf16 copy of the head; without it the model must hold at
/// least 50 MiB less.
#[test]
fn smollm2_nf4_holds_the_tied_head_once() {
    let Some(dir) = smollm2_dir() else { return };
    let opts = LoadOptions {
        quant: BitsAndBytesConfig::nf4(),
        device_map: DeviceMap::Cpu,
        inventory: Some(inventory()),
        ..LoadOptions::default()
    };
    let model = Model::load(&dir, &opts).unwrap();
    assert!(model.head_is_shared(), "a tied, unquantized lm_head is the embedding's storage");
    let mib = model.resident_weight_bytes() as f64 / (1u64 << 20) as f64;
    println!("SmolLM2 NF4 (auto = bf16): {mib:.1} MiB resident");
    assert!(mib < 165.1 - 50.0, "{mib:.1} MiB resident, not below 165.1 - 50 MiB");
}

/// Every architecture's tiny model (bf16 weights: Mistral, Qwen2 with biases, Qwen3 with q/k
/// norms, Phi-3 with fused matrices) and its pre-quantized save.
#[test]
fn planned_weight_bytes_equal_resident_architectures() {
    let mut errs = Vec::new();
    for arch in ["mistral", "qwen2", "qwen3", "phi3"] {
        errs.extend(check_model(&root().join(format!("models/tiny-{arch}")).display().to_string()));
        errs.extend(check_model(&fixture(&format!("arch/tiny-{arch}/hf-bnb-nf4-dq")).display().to_string()));
    }
    assert!(errs.is_empty(), "{} mismatches:\n{}", errs.len(), errs.join("\n"));
}

/// Mistral's KV cache is bounded by its window (32 here): after 52 positions, prefill and decode,
/// each layer holds 32 positions, and the planner counted exactly that.
#[test]
fn windowed_kv_cache_is_what_the_planner_counts() {
    use candle_core::{Device, Tensor};
    let dir = root().join("models/tiny-mistral").display().to_string();
    let cfg = ModelConfig::from_file(format!("{dir}/config.json")).unwrap();
    assert!(cfg.layer_windows.iter().all(|w| *w == Some(32)), "{:?}", cfg.layer_windows);
    let opts = LoadOptions {
        quant: BitsAndBytesConfig::nf4(),
        device_map: DeviceMap::Cpu,
        inventory: Some(inventory()),
        max_seq_len: Some(52),
        ..LoadOptions::default()
    };
    let model = Model::load(&dir, &opts).unwrap();
    let mut request = opts.plan_request(&cfg);
    request.dtype = model.dtype();
    let plan = nibble::plan(&cfg, &BitsAndBytesConfig::nf4(), &request, &inventory()).unwrap();
    let planned: u64 = plan.usage.iter().map(|u| u.kv_bytes).sum();
    let per_position = 2 * cfg.num_key_value_heads * cfg.head_dim * model.dtype().size_in_bytes();
    assert_eq!(planned, (cfg.num_hidden_layers * 32 * per_position) as u64, "planned KV bytes");

    let ids: Vec<u32> = (0..52u32).map(|i| (i * 7) % 500).collect();
    let mut cache = model.new_cache();
    let prefill = Tensor::new(&ids[..40], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    model.forward(&prefill, 0, &mut cache).unwrap();
    for (i, &id) in ids.iter().enumerate().skip(40) {
        let input = Tensor::new(&[id], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        model.forward(&input, i, &mut cache).unwrap();
    }
    assert_eq!(cache.len(), 52);
    assert_eq!(cache.bytes() as u64, planned, "KV bytes held after 52 positions");
}

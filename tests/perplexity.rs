//! Perplexity on the tiny model reproduces transformers' `exp(model(ids, labels=ids).loss)`
//! for every quantization in tests/fixtures/ppl.json, within 0.1%.

mod common;

use common::*;
use nibble::{BitsAndBytesConfig, DeviceMap};

fn check(key: &str, quant: BitsAndBytesConfig) {
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("ppl.json")).unwrap()).unwrap();
    let expected = figures[key].as_f64().unwrap();
    let n = figures["n_tokens"].as_u64().unwrap() as usize;
    let text = std::fs::read_to_string(fixture("ppl-text.txt")).unwrap();
    let model = nibble::from_pretrained(&tiny_model(), quant, DeviceMap::Auto).unwrap();
    let ids = model.tokenizer().unwrap().encode(&text, true).unwrap();
    let first: Vec<u32> = figures["first_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(&ids[..first.len()], first.as_slice(), "tokenization differs from transformers");
    let ppl = model.perplexity(&text, n).unwrap();
    let rel = (ppl - expected).abs() / expected;
    assert!(rel < 1e-3, "{key}: perplexity {ppl} vs {expected} (rel {rel})");
}

#[test]
fn f32() {
    check("f32", BitsAndBytesConfig::none());
}

#[test]
fn nf4() {
    check("nf4", BitsAndBytesConfig::nf4());
}

#[test]
fn nf4_double_quant() {
    check("nf4_dq", BitsAndBytesConfig::nf4().with_double_quant(true));
}

#[test]
fn fp4() {
    check("fp4", BitsAndBytesConfig::fp4());
}

#[test]
fn int8() {
    check("int8", BitsAndBytesConfig::int8());
}

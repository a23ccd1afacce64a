//! Shared helpers for the integration tests.
#![allow(dead_code)]

pub mod gguf;
pub mod server;

use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny random Llama (HF layout) that the reference logits were computed on.
pub fn tiny_model() -> String {
    root().join("models/tiny-llama").display().to_string()
}

/// `models/smollm2-135m-instruct` (made by `models/fetch-smollm2.sh`), or `None` with the reason
/// printed when it is missing, so that the tests needing it skip.
pub fn smollm2_dir() -> Option<String> {
    let dir = root().join("models/smollm2-135m-instruct");
    if dir.join("config.json").is_file() && dir.join("model.safetensors").is_file() {
        Some(dir.display().to_string())
    } else {
        println!("skipped: {} is missing; run models/fetch-smollm2.sh to make it", dir.display());
        None
    }
}

/// `models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf` (made by `models/fetch-qwen2.5-coder.sh`), or
/// `None` with the reason printed when it is missing, so that the tests needing it skip.
pub fn qwen_gguf() -> Option<String> {
    let file = root().join("models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    if file.is_file() {
        Some(file.display().to_string())
    } else {
        println!("skipped: {} is missing; run models/fetch-qwen2.5-coder.sh to make it", file.display());
        None
    }
}

/// A fixture path.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// Reads one tensor of `tests/fixtures/logits.safetensors`.
pub fn reference(name: &str) -> Tensor {
    let all = candle_core::safetensors::load(fixture("logits.safetensors"), &Device::Cpu).unwrap();
    all.get(name).unwrap_or_else(|| panic!("no {name} in logits.safetensors")).clone()
}

/// The reference prompt ids.
pub fn reference_ids() -> Vec<u32> {
    reference("input_ids").flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().map(|&i| i as u32).collect()
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Logits of `ids` fed as a prefill of `split` tokens and then one token at a time (the decode
/// step, which runs on host buffers for a CPU model), stacked as `[seq, vocab]`.
pub fn stepwise_logits(model: &nibble::Model, ids: &[u32], split: usize) -> Tensor {
    let mut cache = model.new_cache();
    let mut rows = Vec::new();
    let prefill = Tensor::new(&ids[..split], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    rows.push(model.forward(&prefill, 0, &mut cache).unwrap().squeeze(0).unwrap());
    for (i, &id) in ids.iter().enumerate().skip(split) {
        let input = Tensor::new(&[id], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        rows.push(model.forward(&input, i, &mut cache).unwrap().squeeze(0).unwrap());
    }
    assert_eq!(cache.len(), ids.len());
    Tensor::cat(&rows, 0).unwrap()
}

/// Copies a folder (flat) into a new temp dir, for tests that damage a model.
pub fn copy_model(src: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    dir
}

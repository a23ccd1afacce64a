//! A generation's prefill (one sequence, last logits only) runs on host buffers; scoring every
//! position runs on candle's tensors. Both must compute the same thing: on every tiny
//! architecture, quantization and model dtype, the last-only logits of a prompt equal the last
//! row of the scored logits, then again for a second chunk on top of the cache each left, and
//! for a decode step after it (so the caches hold the same keys and values). Mistral's window
//! (32) is longer than these 30 positions, so its prompt takes the host path too; a longer one
//! (past the window) takes the tensors and is checked the same way.
//!
//! Tolerances: 1e-4 of the largest logit in float32 (sums in another order); one bfloat16
//! rounding step of it in bfloat16 (the two paths' f32 sums differ in the last bit, which could
//! flip a value's bf16 rounding; measured: bit-equal); 2^-4 of it for LLM.int8() in bfloat16,
//! which quantizes activations at run time, so one flipped rounding upstream changes a code
//! (measured: 0.059 of 3.05 once on the tiny Llama, bit-equal elsewhere).

mod common;

use candle_core::{Device, Tensor};
use common::*;
use nibble::{BitsAndBytesConfig, DeviceMap, LoadOptions, Model, ModelDtype, QuantMethod};

const MODELS: [&str; 5] = ["llama", "mistral", "qwen2", "qwen3", "phi3"];

fn ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// The last position's logits of `chunk` at the cache's end, through `forward(.., last_only)`.
fn last_logits(model: &Model, chunk: &[u32], cache: &mut nibble::KvCache, last_only: bool) -> Tensor {
    let input = Tensor::new(chunk, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let offset = cache.len();
    let logits = model.llama().forward(&input, offset, cache, last_only).unwrap().squeeze(0).unwrap();
    let rows = logits.dim(0).unwrap();
    logits.narrow(0, rows - 1, 1).unwrap()
}

fn check(arch: &str, quant: BitsAndBytesConfig, dtype: ModelDtype, lens: [usize; 2]) {
    let dir = root().join(format!("models/tiny-{arch}")).display().to_string();
    let opts = LoadOptions { quant: quant.clone(), dtype, device_map: DeviceMap::Cpu, ..LoadOptions::default() };
    let model = Model::load(&dir, &opts).unwrap();
    let vocab = model.llama().config().vocab_size;
    let all = ids(lens[0] + lens[1] + 1, vocab);
    let chunks = [&all[..lens[0]], &all[lens[0]..lens[0] + lens[1]], &all[lens[0] + lens[1]..]];
    let (mut host, mut tensors) = (model.new_cache(), model.new_cache());
    for (i, chunk) in chunks.iter().enumerate() {
        // The windowed model's 40-token prompt is past its window (32); the rest fit.
        let window_passed = arch == "mistral" && host.len() + chunk.len() > 32;
        let want_host = chunk.len() > 1 && !window_passed;
        assert_eq!(model.llama().prefills_on_host(1, chunk.len(), &host), want_host, "tiny-{arch} chunk {i}");
        let a = last_logits(&model, chunk, &mut host, true);
        let b = last_logits(&model, chunk, &mut tensors, false);
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
        let tol = match (dtype, quant.method()) {
            (ModelDtype::F32, _) => 1e-4,
            (_, QuantMethod::Int8) => 2f32.powi(-4),
            _ => 2f32.powi(-7),
        } * scale;
        let diff = max_abs_diff(&a, &b);
        println!("tiny-{arch} {:?} {dtype:?} chunk {i}: {diff:e} of {scale}", quant.method());
        assert!(diff <= tol, "tiny-{arch} {quant:?} {dtype:?} chunk {i}: logits differ by {diff} (tolerance {tol})");
    }
    assert_eq!(host.len(), all.len());
    assert_eq!(host.bytes(), tensors.bytes(), "tiny-{arch}: both caches hold the same positions in the same dtype");
}

#[test]
fn generation_prefill_equals_scoring_on_every_architecture() {
    for arch in MODELS {
        for quant in [BitsAndBytesConfig::none(), BitsAndBytesConfig::nf4(), BitsAndBytesConfig::int8()] {
            for dtype in [ModelDtype::F32, ModelDtype::Bf16] {
                check(arch, quant.clone(), dtype, [24, 6]);
            }
        }
    }
}

/// A prompt past Mistral's window, and chunks longer than the 4-bit kernels' matrix-vector
/// limit (16 rows) on the others.
#[test]
fn long_prompts_and_windows() {
    for arch in MODELS {
        check(arch, BitsAndBytesConfig::nf4(), ModelDtype::F32, [40, 20]);
    }
}

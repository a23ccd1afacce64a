//! The batched decode step (`Llama::decode_rows`): several sequences, each with its own cache at
//! its own position, step together and get what each gets stepping alone.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use nibble::{BitsAndBytesConfig, LoadOptions, Model, ModelDtype};
use nibble_quant::kernels::Isa;

/// Three prompts of different lengths, prefilled into their own caches, then eight greedy
/// steps: all three in one `decode_rows` call per step, and each alone. Returns the largest
/// difference between the two logits and whether every greedy token agreed.
fn batched_vs_alone(model: &Model) -> (f32, bool) {
    let prompts: [Vec<u32>; 3] = [
        (0..5u32).map(|i| (i * 7 + 1) % 300).collect(),
        (0..17u32).map(|i| (i * 13 + 2) % 300).collect(),
        (0..40u32).map(|i| (i * 5 + 3) % 300).collect(),
    ];
    let llama = model.llama();
    let prefill = |p: &[u32]| {
        let mut cache = model.new_cache();
        let logits = model.forward(&Tensor::new(p, &Device::Cpu).unwrap().unsqueeze(0).unwrap(), 0, &mut cache).unwrap();
        let last = logits.squeeze(0).unwrap().get(p.len() - 1).unwrap();
        (cache, argmax(&last))
    };
    let (mut together, mut next): (Vec<_>, Vec<u32>) = prompts.iter().map(|p| prefill(p)).unzip();
    let mut alone: Vec<_> = prompts.iter().map(|p| prefill(p).0).collect();
    let mut worst = 0.0f32;
    let mut same = true;
    for _ in 0..8 {
        let mut refs: Vec<_> = together.iter_mut().collect();
        let batch = llama.decode_rows(&next, &mut refs).unwrap();
        let mut step = Vec::new();
        for (i, cache) in alone.iter_mut().enumerate() {
            let one = llama.decode_rows(&next[i..=i], &mut [cache]).unwrap();
            let row = batch.get(i).unwrap();
            worst = worst.max(max_abs_diff(&row, &one.get(0).unwrap()));
            same &= argmax(&row) == argmax(&one.get(0).unwrap());
            step.push(argmax(&row));
        }
        next = step;
    }
    for (t, a) in together.iter().zip(&alone) {
        assert_eq!(t.len(), a.len());
    }
    (worst, same)
}

fn argmax(v: &Tensor) -> u32 {
    v.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

fn load(dir: &str, quant: BitsAndBytesConfig, dtype: ModelDtype) -> Model {
    Model::load(&root().join(dir).display().to_string(), &LoadOptions { quant, dtype, ..LoadOptions::default() }).unwrap()
}

/// NF4 on Llama, Mistral (window) and Qwen2 (biases): a row's logits do not depend on the batch;
/// bit for bit where the 4-bit kernel's arithmetic is per row (AVX-512, the portable kernel),
/// within f32 rounding elsewhere (the AVX2 one-row kernel factors block scales).
#[test]
fn nf4_rows_step_as_they_do_alone() {
    let exact = matches!(Isa::detect(), Isa::Avx512 | Isa::Portable);
    for dir in ["models/tiny-llama", "models/tiny-mistral", "models/tiny-qwen2"] {
        for dtype in [ModelDtype::F32, ModelDtype::Bf16] {
            let (worst, same) = batched_vs_alone(&load(dir, BitsAndBytesConfig::nf4(), dtype));
            eprintln!("{dir} {dtype:?}: largest logit difference {worst:e}");
            if exact {
                assert_eq!(worst, 0.0, "{dir} {dtype:?}");
            } else {
                assert!(worst < 1e-3, "{dir} {dtype:?}: {worst}");
            }
            assert!(same, "{dir} {dtype:?}: greedy tokens differ batched");
        }
    }
}

/// Dense and int8 layers: the same tokens, logits within f32 rounding of the products.
#[test]
fn dense_and_int8_rows_step_as_they_do_alone() {
    for quant in [BitsAndBytesConfig::none(), BitsAndBytesConfig::int8()] {
        let (worst, same) = batched_vs_alone(&load("models/tiny-llama", quant.clone(), ModelDtype::F32));
        assert!(worst < 1e-3, "{quant:?}: {worst}");
        assert!(same, "{quant:?}: greedy tokens differ batched");
    }
}

/// Mismatched inputs are errors, not panics.
#[test]
fn decode_rows_rejects_bad_input() {
    let model = load("models/tiny-llama", BitsAndBytesConfig::nf4(), ModelDtype::F32);
    let mut a = model.new_cache();
    assert!(model.llama().decode_rows(&[], &mut []).is_err());
    assert!(model.llama().decode_rows(&[1, 2], &mut [&mut a]).is_err());
    assert!(model.llama().decode_rows(&[u32::MAX], &mut [&mut a]).is_err());
}

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

/// NF4 and dense on Llama, Mistral (window) and Qwen2 (biases): a row's logits do not depend on
/// the batch, bit for bit, with whichever kernels this CPU runs (the AVX-512 4-bit kernel keeps a
/// per-row order; the AVX2 and portable paths run each row through the one-row kernel; the dense
/// kernel dots each row in the one-row order).
#[test]
fn nf4_and_dense_rows_step_as_they_do_alone() {
    eprintln!("kernels: {:?}", Isa::detect());
    for dir in ["models/tiny-llama", "models/tiny-mistral", "models/tiny-qwen2"] {
        for dtype in [ModelDtype::F32, ModelDtype::Bf16] {
            for quant in [BitsAndBytesConfig::nf4(), BitsAndBytesConfig::none()] {
                let (worst, same) = batched_vs_alone(&load(dir, quant.clone(), dtype));
                assert_eq!(worst, 0.0, "{dir} {dtype:?} {quant:?}");
                assert!(same, "{dir} {dtype:?} {quant:?}: greedy tokens differ batched");
            }
        }
    }
}

/// LLM.int8() is the exception: as in bitsandbytes, a product's outlier columns are those of any
/// of its rows, so a sequence's int8 codes depend on the rows beside it. Same tokens here, logits
/// within the int8 rounding.
#[test]
fn int8_rows_step_close_to_alone() {
    let (worst, same) = batched_vs_alone(&load("models/tiny-llama", BitsAndBytesConfig::int8(), ModelDtype::F32));
    assert!(worst < 1e-2, "{worst}");
    assert!(same, "greedy tokens differ batched");
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

//! One system measured in its own process, so each load has its own peak resident memory.
//!
//! The parent runs `nibble-bench --child '<spec json>'`; the child loads the model, times the first
//! token, reads VmHWM, then times prefill and decode, and prints one JSON line of [`Measured`].

use std::fs::File;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor, D};
use candle_transformers::models::quantized_llama::ModelWeights;
use nibble::{BitsAndBytesConfig, DeviceMap, GenerateOptions, LoadOptions, Model, ModelDtype};
use nibble_quant::linear::LinearStorage;
use serde::{Deserialize, Serialize};

use crate::machine::{vm_hwm, AnonPeak};

/// What to measure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// `nibble` (a Hugging Face folder) or `candle` (a GGUF file through `quantized_llama`).
    pub system: String,
    /// The model folder or GGUF file.
    pub path: PathBuf,
    /// For nibble: `nf4`, `nf4-bf16`, `nf4-dq`, `fp4`, `int8`, `f32`, `bf16`.
    pub config: String,
    /// Greedy tokens to decode.
    pub decode: usize,
    /// Prompt length of the prefill measurement.
    pub prefill: usize,
    /// For nibble: a PEFT LoRA adapter folder to run unmerged on top.
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    /// For nibble: also decode `decode` tokens after a prompt of each of these lengths (0: one
    /// token), as llama-bench's `-d` does.
    #[serde(default)]
    pub depths: Vec<usize>,
}

/// What was measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Measured {
    /// Seconds from the start of the load until the model is ready.
    pub load_s: f64,
    /// Seconds from the start of the load until the first generated token (8-token prompt).
    pub first_token_s: f64,
    /// VmHWM right after the first token, bytes (includes the memory-mapped checkpoint's pages).
    pub peak_rss: u64,
    /// Largest anonymous resident memory (RssAnon, sampled every 2 ms) up to the first token.
    pub peak_anon: u64,
    /// Prompt tokens per second over a `prefill`-token prompt (best of up to three runs).
    pub prefill_tps: f64,
    /// Generated tokens per second after the first one (best of up to three runs).
    pub decode_tps: f64,
    /// Bytes of weights one decode step reads (every matrix once, with its scales).
    pub bytes_per_token: u64,
    /// Bytes of weights resident.
    pub resident_bytes: u64,
    /// The largest weight tensor, in f32 bytes (the memory target allows two of them).
    pub largest_f32: u64,
    /// Bytes of the checkpoint's files (safetensors or GGUF).
    #[serde(default)]
    pub checkpoint_bytes: u64,
    /// Decode tokens/s after a prompt of each of [`Spec::depths`] (best of up to three runs).
    #[serde(default)]
    pub decode_at: Vec<(usize, f64)>,
    /// Bytes of KV cache one position holds (and a decode step reads), every layer's keys and
    /// values in the cache's dtype.
    #[serde(default)]
    pub kv_bytes_per_position: u64,
}

/// The nibble configuration named `name`: the quantization and the model dtype (the quantized
/// ones at the default, `auto`; `f32` and `bf16` are the unquantized model in that dtype).
pub fn nibble_config(name: &str) -> Result<(BitsAndBytesConfig, ModelDtype)> {
    Ok(match name {
        "nf4" => (BitsAndBytesConfig::nf4(), ModelDtype::Auto),
        // NF4 with the unquantized parts (embeddings, lm_head, activations) in bf16: for a GGUF,
        // whose `auto` is float32 as in transformers' GGUF loader.
        "nf4-bf16" => (BitsAndBytesConfig::nf4(), ModelDtype::Bf16),
        "nf4-dq" => (BitsAndBytesConfig::nf4().with_double_quant(true), ModelDtype::Auto),
        "fp4" => (BitsAndBytesConfig::fp4(), ModelDtype::Auto),
        "int8" => (BitsAndBytesConfig::int8(), ModelDtype::Auto),
        "f32" => (BitsAndBytesConfig::none(), ModelDtype::F32),
        "bf16" => (BitsAndBytesConfig::none(), ModelDtype::Bf16),
        other => bail!("unknown nibble configuration {other}"),
    })
}

/// Arbitrary but fixed token ids below `vocab`.
fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab.max(1)) as u32).collect()
}

fn greedy(n: usize) -> GenerateOptions {
    let mut g = GenerateOptions::greedy(n);
    // Every run decodes exactly `n` tokens.
    g.stop_at_eos = false;
    g
}

/// Runs the measurement `spec` in this process.
pub fn run(spec: &Spec) -> Result<Measured> {
    match spec.system.as_str() {
        "nibble" => run_nibble(spec),
        "candle" => run_candle(spec),
        other => bail!("unknown system {other}"),
    }
}

fn run_nibble(spec: &Spec) -> Result<Measured> {
    let (quant, dtype) = nibble_config(&spec.config)?;
    let opts = LoadOptions {
        quant,
        dtype,
        device_map: DeviceMap::Cpu,
        max_seq_len: Some(spec.prefill.max(spec.depths.iter().max().unwrap_or(&0) + spec.decode + 8) + 16),
        adapters: spec
            .adapter
            .iter()
            .map(|p| nibble::AdapterSpec { name: "bench".into(), source: p.display().to_string() })
            .collect(),
        ..LoadOptions::default()
    };
    let path = spec.path.to_str().context("model path is not UTF-8")?;
    let anon = AnonPeak::start();
    let t0 = Instant::now();
    let model = Model::load(path, &opts)?;
    let load_s = t0.elapsed().as_secs_f64();
    let vocab = model.config().vocab_size;
    model.generate(&prompt(8, vocab), &greedy(1), |_| {})?;
    let first_token_s = t0.elapsed().as_secs_f64();
    let peak_rss = vm_hwm();
    let peak_anon = anon.finish();

    let mut m = Measured { load_s, first_token_s, peak_rss, peak_anon, ..Measured::default() };
    let cfg = model.config();
    m.largest_f32 = (cfg.vocab_size * cfg.hidden_size * 4) as u64;
    for (_, l) in model.llama().linears() {
        let read = match l.storage() {
            LinearStorage::FourBit(q, _) => q.packed.len() + 4 * q.n_blocks(),
            LinearStorage::Int8 { cb, scb } => cb.len() + 4 * scb.len(),
            LinearStorage::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            LinearStorage::Q8Blocks { scales, codes } => codes.len() + 4 * scales.len(),
        };
        m.bytes_per_token += read as u64;
        m.largest_f32 = m.largest_f32.max((l.in_features() * l.out_features() * 4) as u64);
    }
    m.resident_bytes = model.resident_weight_bytes() as u64;
    m.checkpoint_bytes = checkpoint_bytes(&spec.path);

    let long = prompt(spec.prefill, vocab);
    m.prefill_tps = best_rate(|| {
        let g = model.generate(&long, &greedy(1), |_| {})?;
        Ok((spec.prefill as f64, g.prefill_secs))
    })?;
    let decode_after = |n: usize| {
        let p = prompt(n, vocab);
        best_rate(|| {
            let g = model.generate(&p, &greedy(spec.decode), |_| {})?;
            Ok((g.tokens.len().saturating_sub(1) as f64, g.decode_secs))
        })
    };
    m.decode_tps = decode_after(8)?;
    for &d in &spec.depths {
        m.decode_at.push((d, decode_after(d.max(1))?));
    }
    let kv_values = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim;
    m.kv_bytes_per_position = (kv_values * model.dtype().size_in_bytes()) as u64;
    Ok(m)
}

/// The best of up to [`RUNS`] measurements of `(units, seconds)`, as units per second: the
/// machine is a shared virtual one whose speed drifts between runs, and the fastest run is the
/// one least disturbed. A run longer than 5 s is not repeated (the 1B rows would take minutes).
fn best_rate(mut run: impl FnMut() -> Result<(f64, f64)>) -> Result<f64> {
    let mut best = 0.0f64;
    for _ in 0..RUNS {
        let (units, secs) = run()?;
        best = best.max(units / secs.max(1e-9));
        if secs > 5.0 {
            break;
        }
    }
    Ok(best)
}

/// Runs per prefill and decode measurement (see [`best_rate`]).
const RUNS: usize = 3;

fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits.flatten_all()?.argmax(D::Minus1)?.to_scalar::<u32>()?)
}

fn run_candle(spec: &Spec) -> Result<Measured> {
    let dev = Device::Cpu;
    let anon = AnonPeak::start();
    let t0 = Instant::now();
    let mut file = File::open(&spec.path).with_context(|| format!("opening {}", spec.path.display()))?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut m = Measured::default();
    let mut vocab = 0;
    for (name, info) in &content.tensor_infos {
        m.resident_bytes += gguf_tensor_bytes(info);
        m.largest_f32 = m.largest_f32.max(info.shape.elem_count() as u64 * 4);
        if name == "token_embd.weight" {
            vocab = info.shape.dims().first().copied().unwrap_or(0);
            // candle keeps a dequantized f32 copy for the lookup.
            m.resident_bytes += info.shape.elem_count() as u64 * 4;
        }
    }
    m.bytes_per_token = gguf_bytes_per_token(&content);
    let mut model = ModelWeights::from_gguf(content, &mut file, &dev)?;
    m.load_s = t0.elapsed().as_secs_f64();
    let short = prompt(8, vocab);
    argmax(&model.forward(&Tensor::new(short.as_slice(), &dev)?.unsqueeze(0)?, 0)?)?;
    m.first_token_s = t0.elapsed().as_secs_f64();
    m.peak_rss = vm_hwm();
    m.peak_anon = anon.finish();

    let long = prompt(spec.prefill, vocab);
    m.prefill_tps = best_rate(|| {
        model.clear_kv_cache();
        let t = Instant::now();
        argmax(&model.forward(&Tensor::new(long.as_slice(), &dev)?.unsqueeze(0)?, 0)?)?;
        Ok((spec.prefill as f64, t.elapsed().as_secs_f64()))
    })?;
    m.decode_tps = best_rate(|| {
        model.clear_kv_cache();
        let mut next = argmax(&model.forward(&Tensor::new(short.as_slice(), &dev)?.unsqueeze(0)?, 0)?)?;
        let t = Instant::now();
        for i in 1..spec.decode {
            let input = Tensor::new(&[next], &dev)?.unsqueeze(0)?;
            next = argmax(&model.forward(&input, short.len() + i - 1)?)?;
        }
        Ok((spec.decode.saturating_sub(1) as f64, t.elapsed().as_secs_f64()))
    })?;
    Ok(m)
}

/// Bytes of one GGUF tensor as stored.
fn gguf_tensor_bytes(info: &gguf_file::TensorInfo) -> u64 {
    (info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64
}

/// Bytes of weights a decode step of a GGUF model reads: every tensor once, except the token
/// embedding (one row is looked up) unless it doubles as the output layer.
pub fn gguf_bytes_per_token(content: &gguf_file::Content) -> u64 {
    let has_output = content.tensor_infos.contains_key("output.weight");
    content
        .tensor_infos
        .iter()
        .filter(|(name, _)| !(has_output && name.as_str() == "token_embd.weight"))
        .map(|(_, info)| gguf_tensor_bytes(info))
        .sum()
}

/// Total size of the weight files at `path` (a folder's `.safetensors` files, or one file).
fn checkpoint_bytes(path: &std::path::Path) -> u64 {
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    if path.is_file() {
        return size(path);
    }
    std::fs::read_dir(path)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .map(|p| size(&p))
                .sum()
        })
        .unwrap_or(0)
}

//! Models made for the benchmark: a random Llama written as a bf16 safetensors checkpoint (and,
//! with the same weights, as GGUF for candle), and a Q4_0 re-quantization of a GGUF file.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::bf16;
use rayon::prelude::*;

/// A Llama shape.
#[derive(Debug, Clone, Copy)]
pub struct LlamaShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
}

impl LlamaShape {
    /// TinyLlama-1.1B's shape.
    pub const TINYLLAMA: LlamaShape =
        LlamaShape { hidden: 2048, intermediate: 5632, layers: 22, heads: 32, kv_heads: 4, vocab: 32000 };

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Every tensor as (Hugging Face name, llama.cpp name, shape, is a norm).
    fn tensors(&self) -> Vec<(String, String, Vec<usize>, bool)> {
        let (h, i, kv) = (self.hidden, self.intermediate, self.kv_heads * self.head_dim());
        let mut v = vec![("model.embed_tokens.weight".into(), "token_embd.weight".into(), vec![self.vocab, h], false)];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            let g = format!("blk.{l}");
            let mut add = |hf: &str, gg: &str, shape: Vec<usize>, norm: bool| {
                v.push((format!("{p}.{hf}"), format!("{g}.{gg}"), shape, norm));
            };
            add("self_attn.q_proj.weight", "attn_q.weight", vec![h, h], false);
            add("self_attn.k_proj.weight", "attn_k.weight", vec![kv, h], false);
            add("self_attn.v_proj.weight", "attn_v.weight", vec![kv, h], false);
            add("self_attn.o_proj.weight", "attn_output.weight", vec![h, h], false);
            add("mlp.gate_proj.weight", "ffn_gate.weight", vec![i, h], false);
            add("mlp.up_proj.weight", "ffn_up.weight", vec![i, h], false);
            add("mlp.down_proj.weight", "ffn_down.weight", vec![h, i], false);
            add("input_layernorm.weight", "attn_norm.weight", vec![h], true);
            add("post_attention_layernorm.weight", "ffn_norm.weight", vec![h], true);
        }
        v.push(("model.norm.weight".into(), "output_norm.weight".into(), vec![h], true));
        v.push(("lm_head.weight".into(), "output.weight".into(), vec![self.vocab, h], false));
        v
    }

    /// Parameter count.
    pub fn params(&self) -> usize {
        self.tensors().iter().map(|t| t.2.iter().product::<usize>()).sum()
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim(),
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        })
    }
}

/// splitmix64.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The values of tensor `index`: uniform with standard deviation 0.02 (norms are 1), as bf16,
/// generated in parallel from a seed per 64 Ki-value chunk (so any thread count gives the same).
fn tensor_values(index: usize, numel: usize, norm: bool) -> Vec<bf16> {
    if norm {
        return vec![bf16::ONE; numel];
    }
    let half_width = 0.02f32 * 3f32.sqrt();
    let mut out = vec![bf16::ZERO; numel];
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        let mut state = mix(((index as u64) << 32) ^ c as u64);
        for quad in chunk.chunks_mut(4) {
            state = mix(state);
            for (j, v) in quad.iter_mut().enumerate() {
                let bits = (state >> (16 * j)) & 0xffff;
                *v = bf16::from_f32((bits as f32 / 32768.0 - 1.0) * half_width);
            }
        }
    });
    out
}

/// Writes `dir/config.json` and `dir/model.safetensors` (bf16) for a random Llama of `shape`.
pub fn write_random_llama(dir: &Path, shape: &LlamaShape) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&shape.config_json())?)?;
    let tensors = shape.tensors();
    // The safetensors header: names to dtype, shape and byte range, padded to 8 bytes.
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, _, dims, _) in &tensors {
        let bytes = dims.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": dims, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let path = dir.join("model.safetensors");
    let mut w = BufWriter::with_capacity(1 << 22, File::create(&path).with_context(|| format!("creating {}", path.display()))?);
    w.write_all(&(h.len() as u64).to_le_bytes())?;
    w.write_all(&h)?;
    for (i, (_, _, dims, norm)) in tensors.iter().enumerate() {
        let v = tensor_values(i, dims.iter().product(), *norm);
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
        w.write_all(&bytes)?;
    }
    w.flush()?;
    Ok(())
}

/// Writes the same random Llama as a GGUF file with every matrix in `dtype` (norms in f32), the
/// layout candle's `quantized_llama` reads.
pub fn write_random_gguf(path: &Path, shape: &LlamaShape, dtype: GgmlDType) -> Result<()> {
    use gguf_file::Value;
    let tensors = shape.tensors();
    let mut q: Vec<(String, QTensor)> = Vec::with_capacity(tensors.len());
    for (i, (_, gg, dims, norm)) in tensors.iter().enumerate() {
        let v: Vec<f32> = tensor_values(i, dims.iter().product(), *norm).iter().map(|x| x.to_f32()).collect();
        let t = Tensor::from_vec(v, dims.as_slice(), &Device::Cpu)?;
        let qt = QTensor::quantize(&t, if *norm { GgmlDType::F32 } else { dtype })?;
        q.push((gg.clone(), qt));
    }
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.attention.head_count", Value::U32(shape.heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(shape.kv_heads as u32)),
        ("llama.block_count", Value::U32(shape.layers as u32)),
        ("llama.embedding_length", Value::U32(shape.hidden as u32)),
        ("llama.feed_forward_length", Value::U32(shape.intermediate as u32)),
        ("llama.context_length", Value::U32(2048)),
        ("llama.rope.dimension_count", Value::U32(shape.head_dim() as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut w = BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
    gguf_file::write(&mut w, &md_refs, &t_refs)?;
    w.flush()?;
    Ok(())
}

/// Re-quantizes every quantized matrix of the GGUF file `src` to `dtype` (through f32), keeping
/// metadata and unquantized tensors, as candle's `QTensor::quantize` does it.
pub fn requantize_gguf(src: &Path, dst: &Path, dtype: GgmlDType) -> Result<()> {
    let mut file = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut q: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let t = content.tensor(&mut file, name, &Device::Cpu)?;
        let keep = matches!(t.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
            || t.shape().dims().last().is_none_or(|d| d % dtype.block_size() != 0);
        let t = if keep { t } else { QTensor::quantize(&t.dequantize(&Device::Cpu)?, dtype)? };
        q.push((name.clone(), t));
    }
    let mut md: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    md.sort_by_key(|(k, _)| *k);
    let t_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut w = BufWriter::new(File::create(dst).with_context(|| format!("creating {}", dst.display()))?);
    gguf_file::write(&mut w, &md, &t_refs)?;
    w.flush()?;
    Ok(())
}

/// Writes a PEFT LoRA adapter of rank `r` on every linear layer of the decoder of `cfg` into
/// `dir` (`adapter_config.json`, `adapter_model.safetensors` with PEFT's tensor names), with
/// small random f32 matrices: what a trained adapter costs to run, whatever its values.
pub fn write_random_lora(dir: &Path, cfg: &nibble::ModelConfig, r: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let specs = cfg.layer_linears();
    let names: Vec<&str> = specs.iter().map(|s| s.name.rsplit('.').next().unwrap_or(s.name)).collect();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": names, "bias": "none",
        "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "use_dora": false, "use_rslora": false,
    });
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec_pretty(&config)?)?;
    let mut tensors = std::collections::HashMap::new();
    let mut index = 0usize;
    for layer in 0..cfg.num_hidden_layers {
        for s in &specs {
            let module = format!("base_model.model.model.layers.{layer}.{}", s.name);
            for (part, shape) in [("lora_A", (r, s.in_features)), ("lora_B", (s.out_features, r))] {
                let v: Vec<f32> = tensor_values(index, shape.0 * shape.1, false).iter().map(|x| x.to_f32()).collect();
                index += 1;
                tensors.insert(format!("{module}.{part}.weight"), candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?);
            }
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
    Ok(())
}

//! Writes GGUF files of the tiny models as llama.cpp's converter would: its tensor names, its
//! metadata keys under the architecture's prefix, Q and K (weights and biases) permuted to its
//! interleaved rotary layout for the `llama` architecture only.

use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

/// Rounds to bf16 and back, so that the GGUF's f32 values survive nibble's bf16 rounding intact.
pub fn bf16_exact(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()
}

/// llama.cpp's rotary permutation of a Q or K weight or bias (its converter's `permute`).
pub fn permute(w: &Tensor, n_head: usize) -> Tensor {
    let w = if w.rank() == 1 { w.unsqueeze(1).unwrap() } else { w.clone() };
    let (out, inp) = w.dims2().unwrap();
    let p = w
        .reshape((n_head, 2, out / n_head / 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap();
    if inp == 1 { p.squeeze(1).unwrap() } else { p }
}

/// llama.cpp's name of a Hugging Face tensor (written out here, independently of nibble's
/// descriptions, so the tests check them).
pub fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, part) = rest.split_once('.').unwrap();
    let (module, kind) = part.rsplit_once('.').unwrap();
    let module = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.qkv_proj" => "attn_qkv",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        // llama.cpp's phi3 keeps the fused matrix under `ffn_up`.
        "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("unexpected tensor {other}"),
    };
    format!("blk.{layer}.{module}.{kind}")
}

/// A model folder's weights, rounded to bf16 values (kept as f32), sorted by name.
pub fn bf16_weights(dir: &Path) -> Vec<(String, Tensor)> {
    let all = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut v: Vec<(String, Tensor)> = all.into_iter().map(|(n, t)| (n, bf16_exact(&t))).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A GGUF of the model folder `dir` (its config.json, tokenizer.json and weights), written with
/// `general.architecture` = `arch` and `tokenizer.ggml.pre` = `pre`.
pub fn gguf_of(dir: &Path, arch: &str, pre: &str) -> Vec<u8> {
    gguf_with(dir, arch, pre, Vec::new())
}

/// [`gguf_of`] with `extra` metadata entries appended.
pub fn gguf_with(dir: &Path, arch: &str, pre: &str, extra: Vec<(String, Value)>) -> Vec<u8> {
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
    let heads = cfg["num_attention_heads"].as_u64().unwrap() as usize;
    let kv_heads = cfg["num_key_value_heads"].as_u64().unwrap() as usize;

    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (text, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = text.clone();
    }
    let mut types = vec![1i32; tokens.len()];
    for added in tok["added_tokens"].as_array().unwrap() {
        types[added["id"].as_u64().unwrap() as usize] = 3;
    }
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Value::String(format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap())))
        .collect();
    let u32v = |k: &str| Value::U32(cfg[k].as_u64().unwrap() as u32);
    let theta = cfg["rope_parameters"]["rope_theta"].as_f64().or(cfg["rope_theta"].as_f64()).unwrap_or(10000.0);
    let key = |k: &str| format!("{arch}.{k}");
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (key("block_count"), u32v("num_hidden_layers")),
        (key("context_length"), u32v("max_position_embeddings")),
        (key("embedding_length"), u32v("hidden_size")),
        (key("feed_forward_length"), u32v("intermediate_size")),
        (key("attention.head_count"), u32v("num_attention_heads")),
        (key("attention.head_count_kv"), u32v("num_key_value_heads")),
        (key("rope.freq_base"), Value::F32(theta as f32)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(cfg["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
    ];
    if let Some(hd) = cfg["head_dim"].as_u64() {
        metadata.push((key("attention.key_length"), Value::U32(hd as u32)));
        metadata.push((key("attention.value_length"), Value::U32(hd as u32)));
    }
    metadata.extend(extra);
    let permuted = arch == "llama";
    let tensors: Vec<(String, QTensor)> = bf16_weights(dir)
        .into_iter()
        .map(|(name, t)| {
            let t = if permuted && (name.ends_with("q_proj.weight") || name.ends_with("q_proj.bias")) {
                permute(&t, heads)
            } else if permuted && (name.ends_with("k_proj.weight") || name.ends_with("k_proj.bias")) {
                permute(&t, kv_heads)
            } else {
                t
            };
            (gguf_name(&name), QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
    out.into_inner()
}

/// Overwrites the u32 value of metadata key `key` in GGUF `bytes` (the key must be stored as u32).
pub fn patch_u32(bytes: &mut [u8], key: &str, value: u32) {
    let at = bytes.windows(key.len()).position(|w| w == key.as_bytes()).unwrap() + key.len();
    assert_eq!(bytes[at..at + 4], 4u32.to_le_bytes(), "{key} is not a u32");
    bytes[at + 4..at + 8].copy_from_slice(&value.to_le_bytes());
}

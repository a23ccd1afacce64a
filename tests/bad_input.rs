//! Bad input gives a distinct, typed `nibble::Error` naming the file and tensor, never a panic.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::*;
use nibble::{BitsAndBytesConfig, DeviceMap, Error};

fn load(dir: &std::path::Path) -> Result<nibble::Model, Error> {
    nibble::from_pretrained(dir.to_str().unwrap(), BitsAndBytesConfig::nf4(), DeviceMap::Auto)
}

/// Rewrites `model.safetensors` of `dir` after `edit` changes its tensors.
fn edit_weights(dir: &std::path::Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn folder_without_config() {
    let dir = copy_model(&tiny_model());
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    match load(dir.path()) {
        Err(Error::MissingFile { path, .. }) => assert!(path.ends_with("config.json")),
        other => panic!("expected MissingFile, got {other:?}"),
    }
}

#[test]
fn missing_folder() {
    assert!(matches!(
        nibble::from_pretrained("/definitely/not/here", BitsAndBytesConfig::nf4(), DeviceMap::Auto),
        Err(Error::InvalidSource { .. })
    ));
}

#[test]
fn unsupported_architecture() {
    let dir = copy_model(&tiny_model());
    let p = dir.path().join("config.json");
    let text = std::fs::read_to_string(&p).unwrap();
    let text = text.replace("LlamaForCausalLM", "GPT2LMHeadModel").replace("\"llama\"", "\"gpt2\"");
    std::fs::write(&p, text).unwrap();
    match load(dir.path()) {
        Err(Error::UnsupportedArchitecture { path, architecture }) => {
            assert!(path.ends_with("config.json"));
            assert_eq!(architecture, "GPT2LMHeadModel");
        }
        other => panic!("expected UnsupportedArchitecture, got {other:?}"),
    }
}

#[test]
fn missing_tensor() {
    let dir = copy_model(&tiny_model());
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    match load(dir.path()) {
        Err(Error::MissingTensor { path, tensor }) => {
            assert_eq!(tensor, "model.layers.1.mlp.up_proj.weight");
            assert!(path.ends_with("model.safetensors"));
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
}

#[test]
fn wrong_shape() {
    let dir = copy_model(&tiny_model());
    edit_weights(dir.path(), |t| {
        t.insert("model.norm.weight".into(), Tensor::zeros(100, candle_core::DType::F32, &Device::Cpu).unwrap());
    });
    match load(dir.path()) {
        Err(Error::ShapeMismatch { tensor, expected, found, path }) => {
            assert_eq!(tensor, "model.norm.weight");
            assert_eq!(expected, vec![128]);
            assert_eq!(found, vec![100]);
            assert!(path.ends_with("model.safetensors"));
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn truncated_safetensors() {
    let dir = copy_model(&tiny_model());
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(load(dir.path()), Err(Error::CorruptCheckpoint { .. })));
    std::fs::write(&p, &bytes[..4]).unwrap();
    assert!(matches!(load(dir.path()), Err(Error::CorruptCheckpoint { .. })));
}

#[test]
fn unsupported_rope_scaling() {
    let dir = copy_model(&tiny_model());
    let p = dir.path().join("config.json");
    let text = std::fs::read_to_string(&p).unwrap().replace("\"rope_type\": \"default\"", "\"rope_type\": \"yarn\"");
    std::fs::write(&p, text).unwrap();
    assert!(matches!(load(dir.path()), Err(Error::UnsupportedConfig { .. })));
}

/// Sizes from config.json are bounded where they are read (#15): a layer count of 2^62 crashed
/// `plan` and `perplexity` with a capacity overflow; now each huge field is `InvalidConfig`
/// naming the file and the field, for the loader and for the planner's config read.
#[test]
fn huge_config_sizes_are_typed_errors() {
    for field in ["num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "max_position_embeddings", "head_dim"] {
        for value in [4_611_686_018_427_387_904u64, u64::MAX, 1 << 40] {
            let dir = copy_model(&tiny_model());
            let p = dir.path().join("config.json");
            let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            cfg[field] = serde_json::json!(value);
            std::fs::write(&p, cfg.to_string()).unwrap();
            let check = |err: Error| match err {
                Error::InvalidConfig { path, field: f, reason } => {
                    assert_eq!(path, p);
                    assert_eq!(f, field);
                    assert!(reason.contains("bound"), "{reason}");
                }
                other => panic!("{field} = {value}: {other}"),
            };
            check(load(dir.path()).unwrap_err());
            check(nibble::ModelConfig::from_file(&p).unwrap_err());
        }
    }
}

fn bnb_copy() -> tempfile::TempDir {
    copy_model(&fixture("tiny-llama-bnb-nf4").display().to_string())
}

const Q: &str = "model.layers.0.self_attn.q_proj.weight";

#[test]
fn prequantized_missing_absmax() {
    let dir = bnb_copy();
    edit_weights(dir.path(), |t| {
        t.remove(&format!("{Q}.absmax"));
    });
    match load(dir.path()) {
        Err(Error::MissingTensor { tensor, .. }) => assert_eq!(tensor, format!("{Q}.absmax")),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
}

#[test]
fn prequantized_bad_quant_state() {
    let state = format!("{Q}.quant_state.bitsandbytes__nf4");
    let dir = bnb_copy();
    edit_weights(dir.path(), |t| {
        t.insert(state.clone(), Tensor::new(b"{not json".as_slice(), &Device::Cpu).unwrap());
    });
    match load(dir.path()) {
        Err(Error::QuantState { tensor, .. }) => assert_eq!(tensor, state),
        other => panic!("expected QuantState, got {other:?}"),
    }
    let dir = bnb_copy();
    edit_weights(dir.path(), |t| {
        let json = br#"{"quant_type": "int3", "blocksize": 64, "dtype": "float32", "shape": [128, 128]}"#;
        t.insert(state.clone(), Tensor::new(json.as_slice(), &Device::Cpu).unwrap());
    });
    match load(dir.path()) {
        Err(Error::QuantState { tensor, reason }) => {
            assert_eq!(tensor, state);
            assert!(reason.contains("int3"), "{reason}");
        }
        other => panic!("expected QuantState, got {other:?}"),
    }
}

#[test]
fn prequantized_wrong_byte_count() {
    let dir = bnb_copy();
    edit_weights(dir.path(), |t| {
        t.insert(Q.into(), Tensor::zeros((8000, 1), candle_core::DType::U8, &Device::Cpu).unwrap());
    });
    match load(dir.path()) {
        Err(Error::QuantState { tensor, .. }) => assert_eq!(tensor, Q),
        other => panic!("expected QuantState, got {other:?}"),
    }
}

#[test]
fn bad_token_ids_and_options() {
    let model = nibble::from_pretrained(&tiny_model(), BitsAndBytesConfig::none(), DeviceMap::Auto).unwrap();
    assert!(matches!(model.logits(&[1, 9999]), Err(Error::InvalidArgument { .. })));
    assert!(matches!(model.generate(&[], &nibble::GenerateOptions::greedy(2), |_| {}), Err(Error::InvalidArgument { .. })));
    let mut bad = nibble::GenerateOptions::greedy(2);
    bad.top_p = Some(1.5);
    assert!(matches!(model.generate(&[1], &bad, |_| {}), Err(Error::InvalidArgument { .. })));
}

/// Writes a safetensors file by hand: an 8-byte header length, the JSON header, then `data`.
fn raw_safetensors(dir: &std::path::Path, header_len: u64, header: &str, data: &[u8]) {
    let mut bytes = header_len.to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
}

#[test]
fn hostile_safetensors_headers() {
    let dir = copy_model(&tiny_model());
    // A header length far past the end of the file (and past safetensors' 100 MB cap).
    raw_safetensors(dir.path(), u64::MAX / 2, "{}", &[]);
    assert!(matches!(load(dir.path()), Err(Error::CorruptCheckpoint { .. })));
    // A header length pointing past the end of a small file.
    raw_safetensors(dir.path(), 4096, "{}", &[]);
    assert!(matches!(load(dir.path()), Err(Error::CorruptCheckpoint { .. })));
    // Offsets past the end of the data.
    let h = r#"{"model.norm.weight":{"dtype":"F32","shape":[128],"data_offsets":[0,512]}}"#;
    raw_safetensors(dir.path(), h.len() as u64, h, &[0u8; 16]);
    assert!(matches!(load(dir.path()), Err(Error::CorruptCheckpoint { .. })));
    // A header that is not JSON.
    raw_safetensors(dir.path(), 5, "nope!", &[]);
    assert!(matches!(load(dir.path()), Err(Error::CorruptCheckpoint { .. })));
}

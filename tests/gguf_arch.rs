//! GGUF for every architecture: a GGUF written here from each tiny model as llama.cpp's converter
//! writes it (`qwen2` with q/k/v biases, `qwen3` with q/k norms and a free head size, `phi3` with
//! fused `attn_qkv` and `ffn_up`, Mistral as llama.cpp's `llama`, Q/K permuted) loads with the
//! folder's logits, unquantized and in NF4, and imports to a folder of the same architecture that
//! gives the same logits bit for bit.

mod common;

use std::path::Path;

use common::*;
use nibble::{Arch, BitsAndBytesConfig, LoadOptions, Model, ModelDtype};

fn load(path: &Path, quant: BitsAndBytesConfig) -> Model {
    let opts = LoadOptions { quant, dtype: ModelDtype::F32, ..LoadOptions::default() };
    Model::load(path.to_str().unwrap(), &opts).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_architecture_loads_from_gguf_and_imports() {
    let cases = [("mistral", "llama", Arch::Llama), ("qwen2", "qwen2", Arch::Qwen2), ("qwen3", "qwen3", Arch::Qwen3), ("phi3", "phi3", Arch::Phi3)];
    for (name, gguf_arch, arch) in cases {
        let dir = root().join(format!("models/tiny-{name}"));
        let tmp = tempfile::tempdir().unwrap();
        let gguf = tmp.path().join(format!("{name}.gguf"));
        std::fs::write(&gguf, common::gguf::gguf_of(&dir, gguf_arch, "gpt2")).unwrap();
        // 24 positions: inside Mistral's 32-token window, which a `llama` GGUF does not carry.
        let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 5) % 500).collect();
        for quant in [BitsAndBytesConfig::none(), BitsAndBytesConfig::nf4()] {
            let direct = load(&gguf, quant.clone());
            assert_eq!(direct.config().arch, arch, "{name}");
            let folder = load(&dir, quant.clone());
            let d = max_abs_diff(&direct.logits(&ids).unwrap(), &folder.logits(&ids).unwrap());
            assert!(d < 1e-5, "{name} {:?}: GGUF vs folder logits differ by {d}", quant.method());
        }
        let out = tmp.path().join("imported");
        nibble::import_gguf(&gguf, &out).unwrap();
        let imported = load(&out, BitsAndBytesConfig::none());
        assert_eq!(imported.config().arch, arch, "{name}: imported config.json's architecture");
        let direct = load(&gguf, BitsAndBytesConfig::none());
        let d = max_abs_diff(&direct.logits(&ids).unwrap(), &imported.logits(&ids).unwrap());
        assert!(d == 0.0, "{name}: GGUF vs imported folder logits differ by {d}");
    }
}

/// A `phi3` GGUF whose fused qkv matrix has the wrong number of rows is refused, naming it.
#[test]
fn a_fused_matrix_of_the_wrong_shape_is_refused() {
    use candle_core::quantized::gguf_file;
    let dir = root().join("models/tiny-phi3");
    let bytes = common::gguf::gguf_of(&dir, "phi3", "gpt2");
    // Rewrite the file with blk.0.attn_qkv one row short.
    let content = gguf_file::Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
    let mut tensors = Vec::new();
    for (n, info) in &content.tensor_infos {
        let t = info.read(&mut std::io::Cursor::new(&bytes), content.tensor_data_offset, &candle_core::Device::Cpu).unwrap();
        let t = if n == "blk.0.attn_qkv.weight" {
            let w = t.dequantize(&candle_core::Device::Cpu).unwrap();
            let (rows, cols) = w.dims2().unwrap();
            // A fresh tensor: quantize reads the whole storage, which a narrowed view shares.
            let short: Vec<f32> = w.narrow(0, 0, rows - 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let short = candle_core::Tensor::from_vec(short, (rows - 1, cols), &candle_core::Device::Cpu).unwrap();
            candle_core::quantized::QTensor::quantize(&short, candle_core::quantized::GgmlDType::F32).unwrap()
        } else {
            t
        };
        tensors.push((n.clone(), t));
    }
    let meta: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &candle_core::quantized::QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta, &refs).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.gguf");
    std::fs::write(&p, out.into_inner()).unwrap();
    let err = Model::load(p.to_str().unwrap(), &LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, nibble::Error::CorruptGguf { .. }) && msg.contains("qkv_proj"), "{msg}");
}

//! Writing a loaded model as a bitsandbytes-layout checkpoint that transformers loads as is.
//!
//! The layout mirrors what `prequant` reads: 4-bit layers as packed `uint8` `[ceil(n/2), 1]` plus
//! `absmax`, `quant_map`, nested tensors with double quant and the `quant_state.bitsandbytes__*`
//! JSON bytes; 8-bit layers as int8 `weight`, `SCB` and `weight_format`; everything else dense.

use std::borrow::Cow;
use std::path::Path;

use candle_core::{DType, Tensor};
use nibble_core::{Error, Result};
use nibble_quant::config::quant_type_str;
use nibble_quant::functional::{self, Absmax, Packed4bit};
use nibble_quant::linear::LinearStorage;
use safetensors::tensor::{Dtype, View};
use serde_json::Value;

use crate::source::Source;
use crate::staged::StagedDir;
use crate::Model;

/// One tensor to write: stored dtype, shape and little-endian bytes.
pub(crate) struct Owned {
    /// The stored dtype.
    pub(crate) dtype: Dtype,
    /// The shape.
    pub(crate) shape: Vec<usize>,
    /// Little-endian element bytes.
    pub(crate) data: Vec<u8>,
}

impl View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_tensor(v: &[f32]) -> Owned {
    Owned { dtype: Dtype::F32, shape: vec![v.len()], data: f32_bytes(v) }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

fn dense(t: &Tensor) -> Result<Owned> {
    let t = t.to_device(&candle_core::Device::Cpu)?.contiguous()?;
    let (dtype, data) = match t.dtype() {
        DType::F16 => (Dtype::F16, t.flatten_all()?.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
        DType::BF16 => (Dtype::BF16, t.flatten_all()?.to_vec1::<half::bf16>()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
        _ => (Dtype::F32, f32_bytes(&t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)),
    };
    Ok(Owned { dtype, shape: t.dims().to_vec(), data })
}

/// The quant_state JSON, formatted as Python's `json.dumps` does (`", "` and `": "`).
fn quant_state_json(q: &Packed4bit, weight_dtype: DType, shape: [usize; 2]) -> String {
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}, {}]",
        quant_type_str(q.quant_type),
        q.blocksize,
        dtype_name(weight_dtype),
        shape[0],
        shape[1]
    );
    if let Absmax::Double(d) = &q.absmax {
        let offset = Value::from(f64::from(d.offset));
        s.push_str(&format!(
            ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {offset}",
            d.nested_blocksize
        ));
    }
    s.push('}');
    s
}

fn four_bit(name: &str, q: &Packed4bit, weight_dtype: DType, shape: [usize; 2], out: &mut Vec<(String, Owned)>) {
    let w = format!("{name}.weight");
    out.push((w.clone(), Owned { dtype: Dtype::U8, shape: vec![q.packed.len(), 1], data: q.packed.clone() }));
    match &q.absmax {
        Absmax::F32(a) => out.push((format!("{w}.absmax"), f32_tensor(a))),
        Absmax::Double(d) => {
            out.push((format!("{w}.absmax"), Owned { dtype: Dtype::U8, shape: vec![d.codes.len()], data: d.codes.clone() }));
            out.push((format!("{w}.nested_absmax"), f32_tensor(&d.nested_absmax)));
            out.push((format!("{w}.nested_quant_map"), f32_tensor(functional::dynamic_map())));
        }
    }
    out.push((format!("{w}.quant_map"), f32_tensor(functional::code_book(q.quant_type))));
    let state = quant_state_json(q, weight_dtype, shape).into_bytes();
    out.push((
        format!("{w}.quant_state.bitsandbytes__{}", quant_type_str(q.quant_type)),
        Owned { dtype: Dtype::U8, shape: vec![state.len()], data: state },
    ));
}

impl Model {
    /// Writes the model to `dir` in the bitsandbytes checkpoint layout: `model.safetensors`,
    /// `config.json` with `quantization_config`, and the tokenizer and generation files copied.
    ///
    /// `dir` must not exist or be empty. The folder is written under a temporary name next to
    /// it and renamed when complete, so a process killed halfway leaves no folder that loads.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        if !self.adapters.is_empty() {
            // The bitsandbytes layout has no place for unmerged adapters: saving the base alone
            // would silently drop them.
            return Err(Error::invalid_argument(
                "adapters",
                format!(
                    "the model runs {} unmerged LoRA adapter(s); load it with merge_adapters (--merge-adapter) to save \
                     the merged weights",
                    self.adapters.len()
                ),
            ));
        }
        let staged = StagedDir::new(dir.as_ref(), "save")?;
        self.write_folder(staged.path())?;
        staged.commit()
    }

    /// Writes the checkpoint's files into the folder `dir`.
    fn write_folder(&self, dir: &Path) -> Result<()> {
        let llama = self.llama();
        let cfg = llama.config();
        let mut tensors: Vec<(String, Owned)> = Vec::new();
        for (name, t) in llama.dense_tensors() {
            tensors.push((name, dense(t)?));
        }
        for (name, layer) in llama.linears() {
            if name == "lm_head" && cfg.tie_word_embeddings {
                continue;
            }
            let shape = [layer.out_features(), layer.in_features()];
            match layer.storage() {
                LinearStorage::Dense(w) => tensors.push((format!("{name}.weight"), dense(w)?)),
                // A GGUF head held in its blocks is an unquantized layer: saved as its values.
                LinearStorage::Q8Blocks { .. } => {
                    tensors.push((format!("{name}.weight"), dense(&layer.dequantized_weight(llama.dtype())?)?));
                }
                LinearStorage::FourBit(q, dtype) => four_bit(&name, q, dtype, shape, &mut tensors),
                LinearStorage::Int8 { cb, scb } => {
                    let data = cb.iter().map(|&x| x as u8).collect();
                    tensors.push((format!("{name}.weight"), Owned { dtype: Dtype::I8, shape: shape.to_vec(), data }));
                    tensors.push((format!("{name}.SCB"), f32_tensor(scb)));
                    // bitsandbytes records the (row-major) layout for backward compatibility.
                    tensors.push((format!("{name}.weight_format"), Owned { dtype: Dtype::U8, shape: vec![], data: vec![0] }));
                }
            }
            // bitsandbytes keeps biases unquantized, as plain tensors in the model dtype.
            if let Some(b) = layer.bias() {
                tensors.push((format!("{name}.bias"), dense(b)?));
            }
        }
        let target = dir.join("model.safetensors");
        let metadata = Some(std::collections::HashMap::from([("format".to_string(), "pt".to_string())]));
        safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), metadata, &target)
            .map_err(|e| Error::CorruptCheckpoint { path: target.clone(), reason: format!("could not write: {e}") })?;

        self.write_config(dir, &tensors)?;
        // The safetensors crate writes through a private (0600) temp file; give the weights the
        // config's permissions, so whoever can read the config can read the model.
        let config = dir.join("config.json");
        let perms = std::fs::metadata(&config).map_err(|e| Error::io(&config, e))?.permissions();
        std::fs::set_permissions(&target, perms).map_err(|e| Error::io(&target, e))?;
        let files = match self.source() {
            Source::Folder(files) => files,
            // A GGUF file has no tokenizer files to copy: write them as import_gguf does.
            Source::Gguf(path) => return crate::gguf::write_side_files(path, dir),
        };
        let extra = [
            files.tokenizer.as_deref(),
            files.tokenizer_config.as_deref(),
            files.chat_template.as_deref(),
            files.generation_config.as_deref(),
        ];
        for src in extra.into_iter().flatten() {
            if let Some(name) = src.file_name() {
                let dst = dir.join(name);
                if dst != src {
                    std::fs::copy(src, &dst).map_err(|e| Error::io(&dst, e))?;
                }
            }
        }
        Ok(())
    }

    fn write_config(&self, dir: &Path, tensors: &[(String, Owned)]) -> Result<()> {
        let mut v: Value = match self.source() {
            Source::Folder(files) => {
                let src = &files.config;
                let text = std::fs::read_to_string(src).map_err(|e| Error::io(src, e))?;
                serde_json::from_str(&text).map_err(|e| Error::InvalidConfig {
                    path: src.clone(),
                    field: "<root>".into(),
                    reason: e.to_string(),
                })?
            }
            // The dtype is overwritten below with what is actually written.
            Source::Gguf(_) => crate::gguf::hf_config(self.config(), "bfloat16"),
        };
        let held = tensors
            .iter()
            .find(|(n, _)| n == "model.embed_tokens.weight")
            .map(|(_, t)| match t.dtype {
                Dtype::F16 => "float16",
                Dtype::BF16 => "bfloat16",
                _ => "float32",
            })
            .unwrap_or("float32");
        if let Some(obj) = v.as_object_mut() {
            if self.quantization().is_quantized() {
                obj.insert("quantization_config".into(), self.quantization().to_json());
            } else {
                obj.remove("quantization_config");
            }
            // Dense tensors are written in the dtype nibble holds them in; say so in both spellings.
            obj.insert("dtype".into(), Value::from(held));
            if obj.contains_key("torch_dtype") {
                obj.insert("torch_dtype".into(), Value::from(held));
            }
        }
        let out = dir.join("config.json");
        let pretty = serde_json::to_string_pretty(&v).map_err(|e| Error::InvalidConfig {
            path: out.clone(),
            field: "<root>".into(),
            reason: e.to_string(),
        })?;
        std::fs::write(&out, pretty + "\n").map_err(|e| Error::io(&out, e))
    }
}

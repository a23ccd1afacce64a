//! GGUF as a source format: loading a `.gguf` file directly, and importing it to a Hugging Face
//! folder ([`import_gguf`]).
//!
//! Both paths read the weights the same way: dequantized by candle to f32 and Q and K un-permuted
//! back to the Hugging Face layout. The folder stores them rounded to bf16 (to nearest even); the
//! direct load casts them to the model dtype, float32 under `dtype="auto"` as in transformers'
//! GGUF loader, and quantizes them (or keeps them dense) exactly as it would a folder's. So with
//! `dtype` bfloat16, loading the GGUF and loading the folder imported from it give the same
//! logits, bit for bit, with any `BitsAndBytesConfig`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use nibble_core::{Error, Result};
use nibble_llama::{LinearShape, WeightProvider};
use nibble_load::{GenerationConfig, GgufFile, GgufTokenizer, ModelConfig};
use nibble_quant::{BitsAndBytesConfig, QuantLinear};

use crate::staged::StagedDir;
use safetensors::tensor::Dtype;
use serde_json::{Map, Value};

use crate::adapter::Adapter;
use crate::model::{build_llama, placement, Build};
use crate::provider::{place, quantize_or_dense, quantizes};
use crate::save::Owned;
use crate::source::Source;
use crate::{LoadOptions, Model};

/// Supplies layers from a GGUF file, quantizing per `quant`.
struct GgufProvider<'a> {
    gguf: &'a GgufFile,
    quant: &'a BitsAndBytesConfig,
    dtype: candle_core::DType,
    compute: candle_core::DType,
    progress: ProgressBar,
}

impl WeightProvider for GgufProvider<'_> {
    fn linear(&mut self, name: &str, weight_name: &str, shape: LinearShape, device: &Device) -> Result<Box<dyn QuantLinear>> {
        self.progress.set_message(name.to_string());
        let dims = [shape.out_features, shape.in_features];
        // An f32 model's unquantized head from a Q8_0 tensor stays in its blocks on the CPU: the
        // same f32 weights (`scale * code`, exact), a quarter of the bytes read per token.
        let blocks = name == "lm_head" && !self.quantizes(name) && self.dtype == candle_core::DType::F32 && device.is_cpu();
        if blocks {
            if let Some((scales, codes)) = self.gguf.q8_0_blocks(weight_name, &dims)? {
                let bias = self.bias(name, shape, device)?;
                self.progress.inc(1);
                return Ok(Box::new(nibble_quant::BlockQ8Linear::new(scales, codes, dims[0], dims[1], bias)?));
            }
        }
        let w = self.gguf.tensor_f32(weight_name, &dims)?;
        let bias = self.bias(name, shape, device)?;
        let layer = quantize_or_dense(name, &w, bias, self.quant, (self.dtype, self.compute), device)?;
        self.progress.inc(1);
        Ok(layer)
    }

    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        place(&self.gguf.tensor_f32(name, shape)?, self.dtype, device)
    }

    fn quantizes(&self, name: &str) -> bool {
        quantizes(self.quant, name)
    }
}

/// What `generation_config.json` of the imported folder says, and what a direct load uses.
fn generation_config(tok: &GgufTokenizer) -> GenerationConfig {
    GenerationConfig {
        eos_token_ids: tok.eos_token_id.into_iter().collect(),
        bos_token_id: tok.bos_token_id,
        ..GenerationConfig::default()
    }
}

/// Loads a GGUF file; see [`crate::from_pretrained`].
pub(crate) fn load(path: &Path, opts: &LoadOptions, started: Instant, adapters: &[Adapter]) -> Result<Model> {
    let gguf = GgufFile::open(path)?;
    let cfg = gguf.config()?;
    // A GGUF has no bitsandbytes config of its own: the caller's applies as is.
    let quant = opts.quant.clone();
    let compute = quant.bnb_4bit_compute_dtype.dtype();
    let dtype = opts.dtype.resolve(|| candle_core::DType::F32);
    let (placement, plan) = placement(&cfg, opts, dtype, adapters)?;
    let tok = GgufTokenizer::from_gguf(&gguf)?;
    let tokenizer = tok.text_tokenizer(path)?;
    let generation = generation_config(&tok);
    let mut eos_ids = generation.eos_token_ids.clone();
    eos_ids.dedup();

    let name = path.display().to_string();
    let build = Build { cfg: &cfg, quant: &quant, placement, dtype, opts, name: &name, started, adapters };
    let llama = build_llama(build, |progress| GgufProvider { gguf: &gguf, quant: &quant, dtype, compute, progress })?;
    Ok(Model {
        llama,
        tokenizer: Some(tokenizer),
        generation,
        eos_ids,
        quant,
        source: Source::Gguf(path.to_path_buf()),
        context: crate::model::context_len(&cfg, opts),
        adapters: Vec::new(),
        plan,
    })
}

/// A transformers `config.json` for `cfg` (its architecture's class, the 4.x field names, which
/// 5.x reads too), with weights stored as `dtype`.
pub(crate) fn hf_config(cfg: &ModelConfig, dtype: &str) -> Value {
    cfg.to_hf_json(dtype)
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::InvalidConfig {
        path: path.to_path_buf(),
        field: "<root>".into(),
        reason: e.to_string(),
    })?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Writes `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` of the GGUF
/// tokenizer `tok` into `dir`.
fn write_tokenizer_files(tok: &GgufTokenizer, source: &Path, dir: &Path) -> Result<()> {
    let tokenizer_json = dir.join("tokenizer.json");
    // Serialized by the tokenizers crate itself, so the file is what it reads back.
    let text = tok
        .build(source)?
        .to_string(true)
        .map_err(|e| Error::Tokenizer { path: tokenizer_json.clone(), reason: e.to_string() })?;
    std::fs::write(&tokenizer_json, text).map_err(|e| Error::io(&tokenizer_json, e))?;
    write_json(&dir.join("tokenizer_config.json"), &tok.tokenizer_config())?;
    let mut generation = Map::new();
    if let Some(id) = tok.bos_token_id {
        generation.insert("bos_token_id".into(), Value::from(id));
    }
    if let Some(id) = tok.eos_token_id {
        generation.insert("eos_token_id".into(), Value::from(id));
    }
    if let Some(id) = tok.pad_token_id {
        generation.insert("pad_token_id".into(), Value::from(id));
    }
    write_json(&dir.join("generation_config.json"), &Value::Object(generation))
}

/// The tokenizer and generation files of the GGUF file at `source`, written into `dir` (for
/// `save_pretrained` of a model loaded from a GGUF file).
pub(crate) fn write_side_files(source: &Path, dir: &Path) -> Result<()> {
    let gguf = GgufFile::open(source)?;
    write_tokenizer_files(&GgufTokenizer::from_gguf(&gguf)?, source, dir)
}

/// Writes a Hugging Face folder at `out_dir` from the GGUF file `file`: `config.json`
/// (the architecture's class, `torch_dtype` bfloat16), `model.safetensors` (every weight dequantized,
/// Q and K un-permuted, rounded to bf16 to nearest even), `tokenizer.json`,
/// `tokenizer_config.json` (special tokens, chat template) and `generation_config.json` (eos id).
///
/// The folder is written under a temporary name next to `out_dir` and renamed when complete, so
/// `out_dir` either does not exist or holds a whole model. `out_dir` must not exist yet (an empty
/// folder is replaced). Loading the result gives the same logits as loading `file` directly.
pub fn import_gguf(file: impl AsRef<Path>, out_dir: impl AsRef<Path>) -> Result<()> {
    let file = file.as_ref();
    let out_dir = out_dir.as_ref();
    // Everything that can be refused is checked before anything is written.
    let gguf = GgufFile::open(file)?;
    let cfg = gguf.config()?;
    let tok = GgufTokenizer::from_gguf(&gguf)?;
    tok.build(file)?;

    let tmp = StagedDir::new(out_dir, "import")?;

    let config = tmp.path().join("config.json");
    write_json(&config, &hf_config(&cfg, "bfloat16"))?;

    let mut tensors: Vec<(String, Owned)> = Vec::new();
    for (name, shape) in cfg.tensor_shapes() {
        let t = gguf.tensor_bf16(&name, &shape)?;
        let data = t.flatten_all()?.to_vec1::<half::bf16>()?.iter().flat_map(|x| x.to_le_bytes()).collect();
        tensors.push((name, Owned { dtype: Dtype::BF16, shape, data }));
    }
    let weights = tmp.path().join("model.safetensors");
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), metadata, &weights)
        .map_err(|e| Error::CorruptCheckpoint { path: weights.clone(), reason: format!("could not write: {e}") })?;
    drop(tensors);
    // The safetensors crate writes through a private (0600) temp file; give the weights the same
    // permissions as the folder's other files, so whoever can read the config can read the model.
    let perms = std::fs::metadata(&config).map_err(|e| Error::io(&config, e))?.permissions();
    std::fs::set_permissions(&weights, perms).map_err(|e| Error::io(&weights, e))?;
    write_tokenizer_files(&tok, file, tmp.path())?;

    tmp.commit()?;
    tracing::info!("imported {} to {}", file.display(), out_dir.display());
    Ok(())
}

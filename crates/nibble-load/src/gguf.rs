//! GGUF files (llama.cpp's single-file format) as a model source.
//!
//! A [`GgufFile`] is opened and checked once: the magic, the header, the architecture (`llama`
//! only), every tensor's name (each must have a Hugging Face Llama counterpart) and every tensor's
//! extent (a truncated file is refused before any weight is read). Afterwards it yields:
//!
//! - the [`ModelConfig`] built from the `llama.*` metadata ([`GgufFile::config`]);
//! - each weight under its Hugging Face name, dequantized, with Q and K un-permuted from
//!   llama.cpp's rotary layout back to the Hugging Face one, and rounded to bf16
//!   ([`GgufFile::tensor_bf16`]);
//! - the tokenizer, rebuilt from the vocabulary and merges ([`crate::gguf_tokenizer`]).
//!
//! Why bf16: `nibble::import_gguf` writes the weights as bf16 safetensors, the format Hugging Face
//! Llama checkpoints ship in. Rounding the direct GGUF load the same way (round to nearest even,
//! as `half::bf16::from_f32` does) makes a GGUF and the folder imported from it the very same
//! model, bit for bit, whatever quantization is applied on top.

use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use nibble_core::{Error, Result};

use crate::arch;
use crate::config::{ModelConfig, RopeScaling};

/// The Hugging Face name of a GGUF tensor name of the architecture `desc`, or `None` when the
/// tensor has no counterpart in the Hugging Face model.
pub fn hf_tensor_name(desc: &arch::Description, gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    // A layer index is plain decimal digits (no sign, no leading `+`), as llama.cpp writes it.
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (module, kind) = part.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    Some(format!("model.layers.{layer}.{}.{kind}", desc.hf_module(module)?))
}

/// An opened, checked GGUF file of an architecture nibble implements.
pub struct GgufFile {
    path: PathBuf,
    desc: &'static arch::Description,
    mmap: Mmap,
    content: Content,
    /// `(hf_name, gguf_name)` for every tensor, sorted by Hugging Face name.
    names: Vec<(String, String)>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile").field("path", &self.path).field("tensors", &self.names.len()).finish()
    }
}

/// Bytes a tensor of `info` occupies in the file, or why it cannot be stored.
fn stored_size(info: &TensorInfo) -> std::result::Result<u64, String> {
    let elems = info.shape.elem_count();
    let block = info.ggml_dtype.block_size();
    if block == 0 || !elems.is_multiple_of(block) {
        return Err(format!("{elems} elements do not fill whole {:?} blocks of {block}", info.ggml_dtype));
    }
    u64::try_from(elems / block)
        .ok()
        .and_then(|blocks| blocks.checked_mul(info.ggml_dtype.type_size() as u64))
        .ok_or_else(|| "its size overflows".to_string())
}

/// Rounds f32 values to bf16, to nearest even (`half::bf16::from_f32`).
fn round_to_bf16(t: &Tensor) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let values: Vec<half::bf16> =
        t.flatten_all()?.to_vec1::<f32>()?.into_iter().map(half::bf16::from_f32).collect();
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
}

/// Undoes llama.cpp's rotary permutation of a Q or K weight `[n_head * head_dim, in]`.
///
/// llama.cpp's converter stores `w.reshape(n_head, 2, head_dim / 2, in).swapaxes(1, 2)`, which
/// interleaves the two rotary halves of each head (GPT-J style) for its rope kernel. The inverse
/// reads the stored rows as `[n_head, head_dim / 2, 2, in]` and swaps the same two axes back, so
/// each head again holds its first half then its second half, as Hugging Face's `rotate_half`
/// expects.
fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    if w.rank() == 1 {
        // A bias: the same permutation of its rows.
        let out = w.dim(0)?;
        return Ok(unpermute(&w.reshape((out, 1))?, n_head)?.reshape(out)?);
    }
    let (out, inp) = w.dims2()?;
    let head_dim = out / n_head;
    Ok(w.reshape((n_head, head_dim / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

impl GgufFile {
    /// Opens `path` and checks it: GGUF magic, parseable header, `general.architecture` =
    /// `llama`, every tensor known and lying entirely inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let corrupt = |reason: String| Error::CorruptGguf { path: path.clone(), reason };
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        // The fixed header is magic (4), version (4), tensor count (8) and metadata count (8).
        if len < 24 {
            return Err(corrupt(format!("the file is {len} bytes, shorter than a GGUF header (truncated?)")));
        }
        // SAFETY: the map is read-only; a file changed under a running process is outside what
        // any loader can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let content = crate::gguf_header::read(&mmap).map_err(corrupt)?;

        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(invalid(&path, "general.architecture", "is not a string")),
            None => return Err(invalid(&path, "general.architecture", "missing; every GGUF model names its architecture")),
        };
        let Some(desc) = arch::by_gguf(&arch) else {
            return Err(Error::UnsupportedArchitecture { path, architecture: arch });
        };

        let mut names = Vec::with_capacity(content.tensor_infos.len());
        for (name, info) in &content.tensor_infos {
            let size = stored_size(info).map_err(|r| corrupt(format!("tensor `{name}`: {r}")))?;
            let end = content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|s| s.checked_add(size))
                .ok_or_else(|| corrupt(format!("tensor `{name}`: its offset overflows")))?;
            if end > len {
                return Err(corrupt(format!(
                    "truncated: tensor `{name}` ends at byte {end} but the file has only {len} bytes"
                )));
            }
            let hf = match hf_tensor_name(desc, name) {
                Some(hf) => hf,
                None if name == "rope_freqs.weight" => {
                    return Err(Error::UnsupportedConfig {
                        path,
                        field: "rope_freqs.weight".into(),
                        value: "(a tensor)".into(),
                        hint: "per-frequency rope factors (Llama 3.1 rope scaling) are not read from GGUF; \
                               load the Hugging Face checkpoint instead"
                            .into(),
                    })
                }
                None => {
                    return Err(corrupt(format!(
                        "tensor `{name}` has no counterpart in a Hugging Face {}; \
                         nibble will not load a model with weights it would ignore",
                        desc.class
                    )))
                }
            };
            names.push((hf, name.clone()));
        }
        names.sort();
        Ok(Self { path, desc, mmap, content, names })
    }

    /// The architecture's description.
    pub fn description(&self) -> &'static arch::Description {
        self.desc
    }

    /// The metadata key `<architecture>.<key>` (`qwen2.block_count`).
    fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.desc.gguf.unwrap_or("llama"))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// The Hugging Face names of every tensor in the file, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|(hf, _)| hf.as_str())
    }

    /// Whether the file holds the tensor named `hf_name` (Hugging Face name).
    pub fn contains(&self, hf_name: &str) -> bool {
        self.gguf_name(hf_name).is_some()
    }

    fn gguf_name(&self, hf_name: &str) -> Option<&str> {
        self.names
            .binary_search_by(|(hf, _)| hf.as_str().cmp(hf_name))
            .ok()
            .and_then(|i| self.names.get(i))
            .map(|(_, g)| g.as_str())
    }

    /// A non-negative integer metadata value of any integer type; `None` when absent.
    pub fn meta_u64(&self, key: &str) -> Result<Option<u64>> {
        let v = match self.metadata(key) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n = match v {
            Value::U8(x) => Some(u64::from(*x)),
            Value::U16(x) => Some(u64::from(*x)),
            Value::U32(x) => Some(u64::from(*x)),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.map(Some).ok_or_else(|| invalid(&self.path, key, format!("{v:?} is not a non-negative integer")))
    }

    /// A required positive integer metadata value within its bound ([`crate::limits`]).
    fn req_usize(&self, key: &str) -> Result<usize> {
        let n = self
            .meta_u64(key)?
            .ok_or_else(|| invalid(&self.path, key, "missing; a llama GGUF needs it"))?;
        if let Some(field) = crate::limits::hf_field_of_gguf_key(key) {
            crate::limits::check(field, n).map_err(|r| invalid(&self.path, key, r))?;
        }
        let n = usize::try_from(n).map_err(|_| invalid(&self.path, key, format!("{n} is too large")))?;
        if n == 0 {
            return Err(invalid(&self.path, key, "must be at least 1"));
        }
        Ok(n)
    }

    /// A finite float metadata value; `None` when absent.
    ///
    /// GGUF stores hyperparameters as f32; the value is read back as the shortest decimal that
    /// rounds to that f32 (`1e-5`, not `9.99999974e-6`), which is what the original config.json
    /// said and what an imported config.json then says again.
    pub fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        let x = match self.metadata(key) {
            None => return Ok(None),
            Some(Value::F32(x)) => format!("{x}").parse::<f64>().unwrap_or(f64::from(*x)),
            Some(Value::F64(x)) => *x,
            Some(v) => return Err(invalid(&self.path, key, format!("{v:?} is not a number"))),
        };
        if !x.is_finite() {
            return Err(invalid(&self.path, key, format!("{x} is not finite")));
        }
        Ok(Some(x))
    }

    /// A string metadata value; `None` when absent.
    pub fn meta_str(&self, key: &str) -> Result<Option<&str>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(invalid(&self.path, key, format!("{:?} is not a string", v.value_type()))),
        }
    }

    /// A boolean metadata value; `None` when absent.
    pub fn meta_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(invalid(&self.path, key, format!("{:?} is not a bool", v.value_type()))),
        }
    }

    /// A metadata array; `None` when absent.
    pub fn meta_array(&self, key: &str) -> Result<Option<&[Value]>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a.as_slice())),
            Some(v) => Err(invalid(&self.path, key, format!("{:?} is not an array", v.value_type()))),
        }
    }

    /// The model's hyperparameters, from the `<architecture>.*` metadata and the vocabulary.
    ///
    /// `dtype` is not set: transformers' GGUF loader resolves `dtype="auto"` to float32 (the
    /// values are dequantized), and so does everything that reads this config (loader, planner).
    /// The embeddings are tied when the file has no `output.weight`, as llama.cpp does; biases are
    /// what the file holds (llama.cpp writes the ones the model has).
    pub fn config(&self) -> Result<ModelConfig> {
        let p = &self.path;
        let k = |key: &str| self.key(key);
        let hidden_size = self.req_usize(&k("embedding_length"))?;
        let num_attention_heads = self.req_usize(&k("attention.head_count"))?;
        let num_key_value_heads = self.kv_heads()?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(invalid(
                p,
                &k("attention.head_count_kv"),
                format!("{num_key_value_heads} does not divide {} = {num_attention_heads}", k("attention.head_count")),
            ));
        }
        let head_dim = match self.meta_u64(&k("attention.key_length"))? {
            Some(_) => self.req_usize(&k("attention.key_length"))?,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(invalid(
                    p,
                    &k("attention.key_length"),
                    format!("missing, and {} is not a multiple of {}", k("embedding_length"), k("attention.head_count")),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(invalid(p, &k("attention.key_length"), format!("head size {head_dim} must be even for rotary embeddings")));
        }
        if let Some(v) = self.meta_u64(&k("attention.value_length"))? {
            if v != head_dim as u64 {
                return Err(unsupported(p, &k("attention.value_length"), v, format!("the Llama family uses one head size ({head_dim}) for keys and values")));
            }
        }
        // Phi-3 may rotate part of each head; the others rotate all of it.
        let rotary_dim = match self.meta_u64(&k("rope.dimension_count"))? {
            None => head_dim,
            Some(rot) if rot == head_dim as u64 => head_dim,
            Some(rot) if self.desc.arch == arch::Arch::Phi3 && rot >= 2 && rot % 2 == 0 && rot < head_dim as u64 => rot as usize,
            Some(rot) => {
                return Err(unsupported(p, &k("rope.dimension_count"), rot, format!("{} rotates the whole head ({head_dim})", self.desc.class)))
            }
        };
        if let Some(experts) = self.meta_u64(&k("expert_count"))? {
            if experts > 0 {
                return Err(unsupported(p, &k("expert_count"), experts, "mixture-of-experts models are not implemented; nibble loads dense models"));
            }
        }
        if let Some(w) = self.meta_u64(&k("attention.sliding_window"))? {
            // transformers' GGUF loader does not read the window for these architectures, so
            // neither does nibble (it computes what transformers computes); say so.
            tracing::warn!("{}: ignoring {} = {w}, as transformers' GGUF loader does", p.display(), k("attention.sliding_window"));
        }
        let rope_scaling = match self.meta_str(&k("rope.scaling.type"))? {
            None | Some("none") => RopeScaling::Default,
            Some("linear") => {
                let factor = self
                    .meta_f64(&k("rope.scaling.factor"))?
                    .filter(|f| *f > 0.0)
                    .ok_or_else(|| invalid(p, &k("rope.scaling.factor"), "missing or not positive for linear scaling"))?;
                RopeScaling::Linear { factor }
            }
            Some(other) => {
                return Err(unsupported(p, &k("rope.scaling.type"), format!("{other:?}"), "nibble reads `none` and `linear` rope scaling from GGUF"))
            }
        };
        let tokens = self
            .meta_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| invalid(p, "tokenizer.ggml.tokens", "missing; the vocabulary size comes from it"))?;
        let vocab_size = tokens.len();
        if vocab_size == 0 {
            return Err(invalid(p, "tokenizer.ggml.tokens", "is empty"));
        }
        crate::limits::check("vocab_size", vocab_size as u64).map_err(|r| invalid(p, "tokenizer.ggml.tokens", r))?;
        let token_id = |key: &str| -> Result<Option<u32>> {
            match self.meta_u64(key)? {
                None => Ok(None),
                Some(id) if usize::try_from(id).is_ok_and(|i| i < vocab_size) => Ok(u32::try_from(id).ok()),
                Some(id) => Err(invalid(p, key, format!("{id} is outside the vocabulary of {vocab_size}"))),
            }
        };
        let num_hidden_layers = self.req_usize(&k("block_count"))?;
        let has = |module: &str| self.contains(&format!("model.layers.0.{module}.bias"));
        let biases = arch::Biases {
            qkv: has("self_attn.q_proj") || has("self_attn.qkv_proj"),
            o: has("self_attn.o_proj"),
            mlp: has("mlp.down_proj"),
        };
        let cfg = ModelConfig {
            path: p.clone(),
            arch: self.desc.arch,
            hidden_size,
            intermediate_size: self.req_usize(&k("feed_forward_length"))?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rotary_dim,
            vocab_size,
            // llama.cpp's own defaults when the keys are absent.
            rms_norm_eps: self.meta_f64(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_theta: self.meta_f64(&k("rope.freq_base"))?.unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: match self.meta_u64(&k("context_length"))? {
                Some(_) => self.req_usize(&k("context_length"))?,
                None => 2048,
            },
            tie_word_embeddings: !self.contains("lm_head.weight"),
            biases,
            layer_windows: vec![None; num_hidden_layers],
            dtype: None,
            bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: token_id("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
            quantization_config: None,
            head_q8_blocks: self.is_q8_0("lm_head.weight"),
        };
        self.check_tensors(&cfg)?;
        Ok(cfg)
    }

    /// Key/value heads (`head_count_kv`, else `head_count`).
    fn kv_heads(&self) -> Result<usize> {
        match self.meta_u64(&self.key("attention.head_count_kv"))? {
            Some(_) => self.req_usize(&self.key("attention.head_count_kv")),
            None => self.req_usize(&self.key("attention.head_count")),
        }
    }

    /// Checks that the file holds exactly the tensors of the Llama `cfg` describes, each with its
    /// shape, before any weight is read: a missing layer or a stray tensor is an error here, not
    /// a model that loads and computes something else.
    fn check_tensors(&self, cfg: &ModelConfig) -> Result<()> {
        let expected = cfg.tensor_shapes();
        for (name, shape) in &expected {
            match self.shape(name) {
                None => return Err(Error::MissingTensor { path: self.path.clone(), tensor: name.clone() }),
                Some(found) if found != shape.as_slice() => {
                    return Err(Error::CorruptGguf {
                        path: self.path.clone(),
                        reason: format!("tensor `{name}` has shape {found:?}, the metadata implies {shape:?}"),
                    })
                }
                Some(_) => {}
            }
        }
        if let Some((hf, g)) = self.names.iter().find(|(hf, _)| !expected.iter().any(|(n, _)| n == hf)) {
            return Err(Error::CorruptGguf {
                path: self.path.clone(),
                reason: format!(
                    "tensor `{g}` ({hf}) is not part of a {}-layer {}; the metadata and the tensors disagree",
                    cfg.num_hidden_layers,
                    self.desc.class
                ),
            });
        }
        Ok(())
    }

    /// The tensor `hf_name` (Hugging Face name) dequantized to f32 on the CPU, Q and K
    /// un-permuted to the Hugging Face layout, checked to have shape `expected`.
    pub fn tensor_f32(&self, hf_name: &str, expected: &[usize]) -> Result<Tensor> {
        let (gguf_name, info) = self.info(hf_name, expected)?;
        let q = info
            .read(&mut Cursor::new(&self.mmap[..]), self.content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| Error::CorruptGguf { path: self.path.clone(), reason: format!("tensor `{gguf_name}`: {e}") })?;
        let w = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
        if !self.desc.gguf_rotary_permuted {
            return Ok(w);
        }
        // llama.cpp's `llama` converter permutes Q and K (weights and biases) for its rotary kernel.
        let is = |module: &str| hf_name.ends_with(&format!("{module}.weight")) || hf_name.ends_with(&format!("{module}.bias"));
        if is("self_attn.q_proj") {
            unpermute(&w, self.req_usize(&self.key("attention.head_count"))?)
        } else if is("self_attn.k_proj") {
            unpermute(&w, self.kv_heads()?)
        } else {
            Ok(w)
        }
    }

    /// The GGUF name and tensor info of `hf_name`, checked to have shape `expected`.
    fn info(&self, hf_name: &str, expected: &[usize]) -> Result<(&str, &TensorInfo)> {
        let gguf_name = self
            .gguf_name(hf_name)
            .ok_or_else(|| Error::MissingTensor { path: self.path.clone(), tensor: hf_name.to_string() })?;
        let info = self
            .content
            .tensor_infos
            .get(gguf_name)
            .ok_or_else(|| Error::MissingTensor { path: self.path.clone(), tensor: gguf_name.to_string() })?;
        if info.shape.dims() != expected {
            return Err(Error::CorruptGguf {
                path: self.path.clone(),
                reason: format!(
                    "tensor `{gguf_name}` has shape {:?}, the metadata implies {expected:?}",
                    info.shape.dims()
                ),
            });
        }
        Ok((gguf_name, info))
    }

    /// Whether `hf_name` is stored as `Q8_0` blocks.
    fn is_q8_0(&self, hf_name: &str) -> bool {
        let info = self.gguf_name(hf_name).and_then(|g| self.content.tensor_infos.get(g));
        info.is_some_and(|i| i.ggml_dtype == candle_core::quantized::GgmlDType::Q8_0)
    }

    /// The `Q8_0` tensor `hf_name` (not a permuted Q or K) as its blocks: one scale per 32 values
    /// (the f16's exact f32 value) and the codes, row-major `[out, in]`, checked to have shape
    /// `expected`. `None` when the tensor is stored another way.
    pub fn q8_0_blocks(&self, hf_name: &str, expected: &[usize]) -> Result<Option<(Vec<f32>, Vec<i8>)>> {
        let is = |m: &str| hf_name.ends_with(&format!("{m}.weight"));
        if !self.is_q8_0(hf_name) || (self.desc.gguf_rotary_permuted && (is("self_attn.q_proj") || is("self_attn.k_proj"))) {
            return Ok(None);
        }
        let (_, info) = self.info(hf_name, expected)?;
        let corrupt = |reason: String| Error::CorruptGguf { path: self.path.clone(), reason: format!("tensor `{hf_name}`: {reason}") };
        let n = expected.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| corrupt("its size overflows".into()))?;
        if !n.is_multiple_of(32) || expected.last().is_some_and(|w| !w.is_multiple_of(32)) {
            return Err(corrupt("a Q8_0 row is not whole 32-value blocks".into()));
        }
        let blocks = n / 32;
        // Checked before anything is allocated: the blocks lie inside the file.
        let start = usize::try_from(self.content.tensor_data_offset)
            .ok()
            .and_then(|o| o.checked_add(usize::try_from(info.offset).ok()?));
        let bytes = self.mmap.get(start.unwrap_or(usize::MAX)..).and_then(|rest| rest.get(..blocks.checked_mul(34)?));
        let bytes = bytes.ok_or_else(|| corrupt("its Q8_0 blocks run past the end of the file".into()))?;
        let (mut scales, mut codes) = (Vec::with_capacity(blocks), Vec::with_capacity(n));
        for b in bytes.chunks_exact(34) {
            scales.push(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
            codes.extend(b[2..].iter().map(|&c| c as i8));
        }
        Ok(Some((scales, codes)))
    }

    /// [`GgufFile::tensor_f32`] rounded to bf16 (to nearest even): the exact values an imported
    /// folder's `model.safetensors` holds. Both load paths go through here.
    pub fn tensor_bf16(&self, hf_name: &str, expected: &[usize]) -> Result<Tensor> {
        round_to_bf16(&self.tensor_f32(hf_name, expected)?)
    }

    /// The shape of `hf_name` as stored (Hugging Face order: `[out, in]`), if present.
    pub fn shape(&self, hf_name: &str) -> Option<&[usize]> {
        let g = self.gguf_name(hf_name)?;
        self.content.tensor_infos.get(g).map(|i| i.shape.dims())
    }
}

fn invalid(path: &Path, field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidConfig { path: path.to_path_buf(), field: field.into(), reason: reason.into() }
}

fn unsupported(path: &Path, field: &str, value: impl std::fmt::Display, hint: impl Into<String>) -> Error {
    Error::UnsupportedConfig { path: path.to_path_buf(), field: field.into(), value: value.to_string(), hint: hint.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        let llama = arch::Arch::Llama.description();
        let name = |d, g| hf_tensor_name(d, g);
        assert_eq!(name(llama, "token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(name(llama, "blk.12.attn_q.weight").as_deref(), Some("model.layers.12.self_attn.q_proj.weight"));
        assert_eq!(name(llama, "blk.0.ffn_norm.weight").as_deref(), Some("model.layers.0.post_attention_layernorm.weight"));
        assert_eq!(name(llama, "output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(name(llama, "blk.x.attn_q.weight"), None);
        assert_eq!(name(llama, "blk.1.attn_q.bias").as_deref(), Some("model.layers.1.self_attn.q_proj.bias"));
        assert_eq!(name(llama, "blk.1.attn_q.scale"), None);
        assert_eq!(name(llama, "blk.1.attn_q_norm.weight"), None);
        assert_eq!(name(llama, "rope_freqs.weight"), None);
        let qwen3 = arch::Arch::Qwen3.description();
        assert_eq!(name(qwen3, "blk.2.attn_k_norm.weight").as_deref(), Some("model.layers.2.self_attn.k_norm.weight"));
        // Phi-3's fused matrices: llama.cpp's `ffn_up` holds gate and up together.
        let phi3 = arch::Arch::Phi3.description();
        assert_eq!(name(phi3, "blk.0.attn_qkv.weight").as_deref(), Some("model.layers.0.self_attn.qkv_proj.weight"));
        assert_eq!(name(phi3, "blk.0.ffn_up.weight").as_deref(), Some("model.layers.0.mlp.gate_up_proj.weight"));
        assert_eq!(name(phi3, "blk.0.ffn_gate.weight"), None);
    }

    /// The permutation llama.cpp's converter applies, written as its Python does.
    fn permute(w: &Tensor, n_head: usize) -> Tensor {
        let (out, inp) = w.dims2().unwrap();
        w.reshape((n_head, 2, out / n_head / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((out, inp))
            .unwrap()
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (heads, head_dim, inp) = (3, 8, 5);
        let w = Tensor::arange(0f32, (heads * head_dim * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * head_dim, inp))
            .unwrap();
        let back = unpermute(&permute(&w, heads), heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        // Row 1 of head 0 in llama.cpp's layout is row head_dim/2 (the second half's first row).
        let p = permute(&w, heads).to_vec2::<f32>().unwrap();
        assert_eq!(p[1], w.to_vec2::<f32>().unwrap()[head_dim / 2]);
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to even (1).
        let t = Tensor::new(&[1.0f32 + 1.0 / 256.0, 1.0 + 3.0 / 256.0], &Device::Cpu).unwrap();
        let r = round_to_bf16(&t).unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(r, vec![1.0, 1.0 + 4.0 / 256.0]);
    }
}

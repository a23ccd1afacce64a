//! [`ModelArgs`]: the flags of every command that loads a model, and how they become nibble's
//! [`LoadOptions`] and [`GenerateOptions`].

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use nibble::{AdapterSpec, BitsAndBytesConfig, ComputeDtype, DeviceMap, GenerateOptions, LoadOptions, Model, ModelDtype};

/// The instruct model a later setup step downloads; preferred when present because it gives
/// readable answers.
const SMOLLM_REL: &str = "models/smollm2-135m-instruct";
const SMOLLM_WS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/smollm2-135m-instruct");
/// The tiny random model checked into the repository: always there, but its output is noise.
const TINY_REL: &str = "models/tiny-llama";
const TINY_WS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/tiny-llama");

/// Weight format to quantize the linear layers to on load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Quant {
    /// 4-bit NormalFloat (QLoRA).
    Nf4,
    /// 4-bit float.
    Fp4,
    /// LLM.int8() with outlier decomposition.
    Int8,
    /// Dense weights in the compute dtype.
    None,
}

/// The dtype quantized layers compute in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// float32.
    #[value(alias = "float32", alias = "fp32")]
    F32,
    /// float16.
    #[value(alias = "float16", alias = "fp16")]
    F16,
    /// bfloat16.
    #[value(alias = "bfloat16")]
    Bf16,
}

impl From<DtypeArg> for ComputeDtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => Self::F32,
            DtypeArg::F16 => Self::F16,
            DtypeArg::Bf16 => Self::Bf16,
        }
    }
}

/// transformers' `dtype`: of activations, the KV cache and the weights left unquantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelDtypeArg {
    /// The checkpoint's dtype (config.json `dtype`/`torch_dtype`, else its tensors'; f32 for GGUF).
    Auto,
    /// float32.
    #[value(alias = "float32", alias = "fp32")]
    F32,
    /// float16.
    #[value(alias = "float16", alias = "fp16")]
    F16,
    /// bfloat16.
    #[value(alias = "bfloat16")]
    Bf16,
}

impl From<ModelDtypeArg> for ModelDtype {
    fn from(d: ModelDtypeArg) -> Self {
        match d {
            ModelDtypeArg::Auto => Self::Auto,
            ModelDtypeArg::F32 => Self::F32,
            ModelDtypeArg::F16 => Self::F16,
            ModelDtypeArg::Bf16 => Self::Bf16,
        }
    }
}

/// The quantization flags (shared by the commands that load a model and by `plan`).
#[derive(Debug, Clone, Args)]
pub struct QuantArgs {
    /// Quantization applied on load.
    #[arg(long, value_enum, default_value_t = Quant::Nf4)]
    pub quant: Quant,

    /// Quantize the 4-bit absmax constants too (saves about 0.4 bits per weight).
    #[arg(long)]
    pub double_quant: bool,

    /// Dtype the 4-bit layers compute in (`bnb_4bit_compute_dtype`).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub compute_dtype: DtypeArg,

    /// Model dtype, as transformers' `from_pretrained(dtype=...)`: activations, KV cache and the
    /// weights left unquantized (embeddings, norms, lm_head).
    #[arg(long, value_enum, default_value_t = ModelDtypeArg::Auto)]
    pub dtype: ModelDtypeArg,
}

impl QuantArgs {
    /// The quantization config the flags select.
    pub fn config(&self) -> BitsAndBytesConfig {
        let base = match self.quant {
            Quant::Nf4 => BitsAndBytesConfig::nf4(),
            Quant::Fp4 => BitsAndBytesConfig::fp4(),
            Quant::Int8 => BitsAndBytesConfig::int8(),
            Quant::None => BitsAndBytesConfig::none(),
        };
        base.with_double_quant(self.double_quant).with_compute_dtype(self.compute_dtype.into())
    }
}

/// Flags shared by every command that loads a model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model folder (Hugging Face layout), file or hub id [default: models/smollm2-135m-instruct
    /// if present, else the tiny random test model models/tiny-llama]
    #[arg(long, value_name = "PATH|ID")]
    pub model: Option<String>,

    /// Quantization applied on load.
    #[command(flatten)]
    pub quant: QuantArgs,

    /// Where modules go: auto, balanced, balanced_low_0, sequential, cpu, cuda:N, or
    /// `module=device,...`.
    #[arg(long, default_value = "auto", value_parser = parse_device_map)]
    pub device_map: DeviceMap,

    /// Context the KV cache is planned for, prompt plus new tokens [default: the model's
    /// max_position_embeddings, at most 4096]; a longer prompt is refused.
    #[arg(long)]
    pub max_seq_len: Option<usize>,

    /// Most new tokens to generate (for `perplexity`: tokens of the file to score).
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,

    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.7, allow_negative_numbers = true)]
    pub temperature: f64,

    /// Sample only from the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,

    /// Sample only from the smallest set of tokens whose probability reaches p.
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f64>,

    /// Sampling seed.
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,

    /// Penalty on tokens already in the context; 1 = off.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,

    /// Generate exactly --max-tokens, past any eos token (to reproduce a benchmark row).
    #[arg(long)]
    pub ignore_eos: bool,

    /// A PEFT LoRA adapter: a folder with adapter_config.json and adapter_model.safetensors, or a
    /// hub id; NAME=PATH names it. Repeat for several: the first runs by default, and `serve`
    /// answers each as "model": "<model>:<name>".
    #[arg(long = "adapter", value_name = "[NAME=]PATH|ID", value_parser = parse_adapter)]
    pub adapters: Vec<AdapterSpec>,

    /// Merge the adapters into the weights (PEFT's merge_and_unload; a quantized layer is
    /// dequantized, added to and quantized again) instead of running them beside the base.
    #[arg(long)]
    pub merge_adapter: bool,
}

pub(crate) fn parse_adapter(s: &str) -> Result<AdapterSpec, nibble::Error> {
    AdapterSpec::parse(s)
}

fn parse_device_map(s: &str) -> Result<DeviceMap, nibble::Error> {
    DeviceMap::parse(s)
}

/// The model a command runs when `--model` is not given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultModel {
    /// Where it is (or where it was looked for, when neither default exists).
    pub path: PathBuf,
    /// Whether it is the tiny random test model.
    pub is_tiny: bool,
}

/// `path` when it is a folder, tidied to an absolute path so messages show where it really is.
fn existing(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    p.is_dir().then(|| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()))
}

/// Finds the default model: the instruct model if it was fetched, else the tiny one; each looked
/// for under the current directory first, then under the workspace this binary was built from,
/// so both `cargo run` and an installed binary work from the repository.
pub fn default_model() -> DefaultModel {
    if let Some(path) = existing(SMOLLM_REL).or_else(|| existing(SMOLLM_WS)) {
        return DefaultModel { path, is_tiny: false };
    }
    // When even the tiny model is missing, the load error will name the relative path.
    let path = existing(TINY_REL).or_else(|| existing(TINY_WS)).unwrap_or_else(|| PathBuf::from(TINY_REL));
    DefaultModel { path, is_tiny: true }
}

impl ModelArgs {
    /// The model to load: `--model`, or the default, with a note on stderr when the default is
    /// the tiny random model (so nobody mistakes its noise for a bug).
    pub fn model_source(&self) -> String {
        if let Some(m) = &self.model {
            return m.clone();
        }
        let d = default_model();
        if d.is_tiny {
            eprintln!(
                "note: using {}, a tiny random test model (its output is noise); pass --model <folder> for a real one",
                d.path.display()
            );
        }
        d.path.to_string_lossy().into_owned()
    }

    /// The quantization config the flags select.
    pub fn quant_config(&self) -> BitsAndBytesConfig {
        self.quant.config()
    }

    /// Load options, with the quantization progress bar on.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            quant: self.quant_config(),
            dtype: self.quant.dtype.into(),
            device_map: self.device_map.clone(),
            max_seq_len: self.max_seq_len,
            progress: true,
            adapters: self.adapters.clone(),
            merge_adapters: self.merge_adapter,
            ..LoadOptions::default()
        }
    }

    /// Generation options, validated so that a bad flag fails before the (slow) load.
    pub fn generate_options(&self) -> nibble::Result<GenerateOptions> {
        let opts = GenerateOptions {
            max_new_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop_at_eos: !self.ignore_eos,
        };
        opts.validate()?;
        Ok(opts)
    }

    /// Loads the model the flags describe.
    pub fn load(&self) -> nibble::Result<Model> {
        let source = self.model_source();
        tracing::info!("loading {source} with {:?}", self.quant.quant);
        Model::load(&source, &self.load_options())
    }
}

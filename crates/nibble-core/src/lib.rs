//! `nibble-core`: the one error type that every nibble crate returns.
//!
//! Every failure a caller may want to react to has its own variant, carrying the file, tensor or
//! field it concerns, so a program can `match` on it instead of parsing messages. Each message says
//! what is wrong and what to do about it.

use std::path::PathBuf;

/// The result type of every fallible nibble API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while loading, quantizing, planning or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or folder concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A file the model needs is not there.
    #[error("{path} not found: {hint}")]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
        /// What to do about it.
        hint: String,
    },

    /// The model source (argument to `from_pretrained`) is not a folder, file or hub id nibble understands.
    #[error("cannot use {source_name:?} as a model: {reason}")]
    InvalidSource {
        /// What the caller passed.
        source_name: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// `config.json` names an architecture nibble does not implement.
    #[error("{path}: unsupported architecture {architecture:?}; nibble loads Llama-family models (LlamaForCausalLM, model_type \"llama\")")]
    UnsupportedArchitecture {
        /// The config file.
        path: PathBuf,
        /// The architecture or model_type found.
        architecture: String,
    },

    /// A config file does not parse or has a value out of range.
    #[error("{path}: invalid config field `{field}`: {reason}")]
    InvalidConfig {
        /// The config file.
        path: PathBuf,
        /// The offending field (dotted for nested fields).
        field: String,
        /// What is wrong and what is expected.
        reason: String,
    },

    /// A config field that changes the math has a value nibble does not implement; loading it anyway
    /// would compute something else than the model's authors meant.
    #[error("{path}: `{field}` = {value} is not supported: {hint}")]
    UnsupportedConfig {
        /// The config file.
        path: PathBuf,
        /// The field.
        field: String,
        /// The value found, as JSON.
        value: String,
        /// What nibble supports instead.
        hint: String,
    },

    /// A safetensors file is unreadable, truncated or inconsistent.
    #[error("{path}: corrupt safetensors file: {reason}")]
    CorruptCheckpoint {
        /// The safetensors file (or index) concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The checkpoint lacks a tensor the model needs.
    #[error("tensor `{tensor}` is missing from {path}")]
    MissingTensor {
        /// The file (or folder, for sharded checkpoints) searched.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
    },

    /// A tensor has another shape than config.json implies.
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?} from config.json")]
    ShapeMismatch {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },

    /// A tensor has a dtype nibble cannot use where it is.
    #[error("{path}: tensor `{tensor}` has dtype {found}, expected {expected}")]
    DtypeMismatch {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// What nibble expects.
        expected: String,
        /// What the file holds.
        found: String,
    },

    /// The quantization settings are invalid.
    #[error("invalid quantization config: `{field}`: {reason}")]
    InvalidQuantConfig {
        /// The BitsAndBytesConfig field.
        field: String,
        /// What is wrong and what to change.
        reason: String,
    },

    /// Quantized data (a pre-quantized tensor, its quant state) is inconsistent.
    #[error("quantized tensor `{tensor}`: {reason}")]
    QuantState {
        /// The tensor concerned.
        tensor: String,
        /// What is inconsistent.
        reason: String,
    },

    /// The tokenizer could not be loaded or failed on the input.
    #[error("tokenizer error ({path}): {reason}")]
    Tokenizer {
        /// tokenizer.json (or the model folder).
        path: PathBuf,
        /// The tokenizers crate's message.
        reason: String,
    },

    /// The chat template is missing, does not parse, or failed to render.
    #[error("chat template error: {reason}")]
    ChatTemplate {
        /// What went wrong.
        reason: String,
    },

    /// An argument of an API call is out of range (an empty prompt, a bad sampling parameter...).
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument.
        name: String,
        /// What is wrong and what is accepted.
        reason: String,
    },

    /// The device map cannot be used (unknown device, a module missing or repeated).
    #[error("invalid device map: {reason}")]
    InvalidDeviceMap {
        /// What is wrong.
        reason: String,
    },

    /// A device named in the device map is not available in this build or on this machine.
    #[error("device {device} is not available: {reason}")]
    DeviceUnavailable {
        /// The device as the user wrote it (`cuda:1`).
        device: String,
        /// Why, and what to do.
        reason: String,
    },

    /// A tensor operation failed at run time.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// Builds an [`Error::InvalidArgument`].
    pub fn invalid_argument(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { name: name.into(), reason: reason.into() }
    }

    /// Builds an [`Error::QuantState`].
    pub fn quant_state(tensor: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::QuantState { tensor: tensor.into(), reason: reason.into() }
    }

    /// Builds an [`Error::InvalidQuantConfig`].
    pub fn quant_config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidQuantConfig { field: field.into(), reason: reason.into() }
    }
}

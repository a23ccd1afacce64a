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

    /// A GGUF file is not GGUF, is truncated, or is inconsistent with itself.
    #[error("{path}: unusable GGUF file: {reason}")]
    CorruptGguf {
        /// The GGUF file.
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

    /// A LoRA adapter's matrix does not fit the layer it targets (another base model, or a
    /// rank other than `adapter_config.json` says).
    #[error("{path}: adapter tensor `{tensor}` has shape {found:?}, expected {expected:?} from the base layer and the adapter's rank")]
    AdapterShapeMismatch {
        /// The adapter's safetensors file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The shape the base layer and the rank need.
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

    /// The model does not fit: found by the planner before loading, or raised by the device at
    /// run time.
    #[error("out of memory on {device}: needs {needed} bytes, {available} available{}", if hint.is_empty() { String::new() } else { format!("; {hint}") })]
    OutOfMemory {
        /// The device that ran out (`cuda:0`, `cpu`).
        device: String,
        /// Bytes needed there (0 when unknown, at run time).
        needed: u64,
        /// Bytes available there (0 when unknown, at run time).
        available: u64,
        /// What would make it fit, computed from the numbers.
        hint: String,
        /// The largest context length that fits with everything else unchanged, when one does.
        max_seq_len_that_fits: Option<usize>,
        /// Whether the planner predicted it or the device raised it.
        phase: OomPhase,
    },

    /// A memory size computed from the config and the request does not fit in 64 bits: a dimension,
    /// `max_seq_len` or `batch` is far beyond anything a machine holds.
    #[error("the size of {what} overflows 64 bits; lower max_seq_len or batch, or check config.json's dimensions")]
    SizeOverflow {
        /// The quantity whose size overflowed (`KV cache per layer`, `device cuda:0 total`).
        what: String,
    },

    /// A GPU's compute capability is below what the kernels or the compute dtype need.
    #[error("{device} has compute capability {found}, {required} is needed for {hint}")]
    CapabilityMismatch {
        /// The device.
        device: String,
        /// Its compute capability.
        found: String,
        /// The capability needed.
        required: String,
        /// What needs it, and what to do.
        hint: String,
    },

    /// The CUDA driver is older than the CUDA version nibble was built for.
    #[error("the CUDA driver supports CUDA {found}, nibble needs {required}: update the NVIDIA driver")]
    DriverTooOld {
        /// CUDA version the driver supports.
        found: String,
        /// CUDA version needed.
        required: String,
    },

    /// A tensor operation failed at run time.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),

    /// The Hugging Face Hub has no repository with this id, or it is private and the request had
    /// no token with access to it (the Hub answers both the same way, so as not to reveal private
    /// repositories).
    #[error(
        "repository {repo} not found on {endpoint}: check the id (org/name); \
         if it is private, set HF_TOKEN to a token with read access to it"
    )]
    HubRepoNotFound {
        /// The repository id (`org/name`).
        repo: String,
        /// The Hub endpoint asked (`HF_ENDPOINT`).
        endpoint: String,
    },

    /// The Hub refused access (HTTP 401 or 403): the repository is gated or private.
    #[error(
        "access to {repo} (file {file}) was refused (HTTP {status}): the repository is gated or private; \
         accept its license on its Hub page while logged in, then set HF_TOKEN to a read token of that \
         account (or log in with `hf auth login`, which writes the cached token file)"
    )]
    HubUnauthorized {
        /// The repository id.
        repo: String,
        /// The file being fetched.
        file: String,
        /// The HTTP status (401 or 403).
        status: u16,
    },

    /// The repository has no branch, tag or commit by this name.
    #[error("revision {revision:?} not found in {repo}: check the branch, tag or commit hash")]
    HubRevisionNotFound {
        /// The repository id.
        repo: String,
        /// The revision asked for.
        revision: String,
    },

    /// A file the model needs is not in the repository at this revision.
    #[error("{file} not found in {repo} at revision {revision}: {hint}")]
    HubFileNotFound {
        /// The repository id.
        repo: String,
        /// The revision (as asked, or the commit it resolved to).
        revision: String,
        /// The file, relative to the repository root.
        file: String,
        /// Why it is needed and what to do.
        hint: String,
    },

    /// Offline mode (`HF_HUB_OFFLINE=1`) and the cache lacks files the model needs.
    #[error(
        "offline mode (HF_HUB_OFFLINE=1) and {repo} at revision {revision} is not fully cached in {}: \
         missing {}; run once online (unset HF_HUB_OFFLINE) to download them",
        cache.display(), missing.join(", ")
    )]
    HubOfflineNotCached {
        /// The repository id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The cache folder searched (`models--org--name` in the hub cache).
        cache: PathBuf,
        /// What is missing, relative to the snapshot (or `refs/<revision>`).
        missing: Vec<String>,
    },

    /// The Hub could not be reached, or kept failing, after the bounded retries.
    #[error(
        "network error fetching {file} from {repo} after {attempts} attempt(s): {reason}; \
         check the connection and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache only"
    )]
    HubNetwork {
        /// The repository id.
        repo: String,
        /// The file being fetched.
        file: String,
        /// How many attempts were made.
        attempts: u32,
        /// The last failure.
        reason: String,
    },

    /// The Hub (or whatever `HF_ENDPOINT` points at) answered something that is not the Hub protocol:
    /// a missing `X-Repo-Commit`, an unsafe ETag, a size that does not match.
    #[error("unexpected answer from {endpoint} for {file} of {repo}: {reason}")]
    HubProtocol {
        /// The repository id.
        repo: String,
        /// The file being fetched.
        file: String,
        /// The endpoint asked.
        endpoint: String,
        /// What was wrong with the answer.
        reason: String,
    },

    /// A downloaded file's bytes do not hash to the sha256 the Hub announced for it (the
    /// `X-Linked-Etag` of an LFS file). Nothing of the download is kept in the cache.
    #[error(
        "{file} of {repo} is corrupt: its sha256 is {actual}, the Hub announced {expected}; \
         the download was discarded: retry, and if it persists check HF_ENDPOINT (a proxy or mirror \
         may be serving other bytes)"
    )]
    HubChecksumMismatch {
        /// The repository id.
        repo: String,
        /// The file, relative to the repository root.
        file: String,
        /// The sha256 the Hub announced (hex).
        expected: String,
        /// The sha256 of the bytes received (hex).
        actual: String,
    },

    /// A request was redirected more times than nibble follows (a redirect loop, or a
    /// misconfigured proxy or mirror).
    #[error(
        "fetching {file} of {repo} was redirected more than {redirects} times (last to {last}): \
         a redirect loop; check HF_ENDPOINT and any proxy in between"
    )]
    HubTooManyRedirects {
        /// The repository id.
        repo: String,
        /// The file being fetched.
        file: String,
        /// How many redirects were followed before giving up.
        redirects: usize,
        /// The last redirect target, without its query (CDN URLs carry signatures there).
        last: String,
    },

    /// Writing a file failed: the disk is full, a quota or file-size limit was reached, or
    /// another write error. What was being written is removed, so no partial file is left.
    #[error("writing {} failed: {source}{}", path.display(), write_failed_hint(source))]
    WriteFailed {
        /// The file being written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A prompt plus the tokens asked for does not fit the context the model was planned for.
    #[error(
        "the prompt has {prompt_tokens} tokens and {max_new_tokens} more were asked for: {} in all, \
         beyond the context of {context} tokens the KV cache is planned for; shorten the prompt, \
         lower max_tokens or plan a longer context (max_seq_len, up to max_position_embeddings)",
        prompt_tokens.saturating_add(*max_new_tokens)
    )]
    ContextLengthExceeded {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// New tokens asked for.
        max_new_tokens: usize,
        /// The context length (positions the KV cache is planned for).
        context: usize,
    },

    /// The engine's queue of waiting requests is full.
    #[error("the server is busy: {waiting} requests are waiting (the most it queues); retry later")]
    QueueFull {
        /// Requests waiting.
        waiting: usize,
    },

    /// A request was cancelled before it finished (the engine is shutting down).
    #[error("the request was cancelled: {reason}")]
    Cancelled {
        /// Why.
        reason: String,
    },

    /// The model has only pickle weights (`pytorch_model.bin`), which nibble refuses to load.
    #[error(
        "{source_name} has only pickle weights ({file}); nibble loads safetensors only, for safety \
         (unpickling can run arbitrary code): use a revision or repository with model.safetensors, or \
         convert it with transformers' save_pretrained(safe_serialization=True)"
    )]
    PickleOnly {
        /// The repository id or folder.
        source_name: String,
        /// The pickle file found.
        file: String,
    },
}

/// Whether a write error means the disk (or a quota, or the process's file-size limit) is full.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    if e.kind() == std::io::ErrorKind::StorageFull || e.kind() == std::io::ErrorKind::FileTooLarge {
        return true;
    }
    // ENOSPC 28, EFBIG 27, EDQUOT (122 on Linux, 69 on macOS and the BSDs).
    #[cfg(unix)]
    {
        #[cfg(target_os = "linux")]
        const EDQUOT: i32 = 122;
        #[cfg(not(target_os = "linux"))]
        const EDQUOT: i32 = 69;
        matches!(e.raw_os_error(), Some(28 | 27) | Some(EDQUOT))
    }
    #[cfg(not(unix))]
    {
        false
    }
}

fn write_failed_hint(e: &std::io::Error) -> &'static str {
    if is_disk_full(e) {
        "; the disk is full (or a quota or file-size limit was reached): free some space, or point \
         HF_HUB_CACHE (or HF_HOME) at a disk with room for the model"
    } else {
        ""
    }
}

/// When an out-of-memory condition was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OomPhase {
    /// By the planner, before loading.
    Planned,
    /// By the device, while running.
    RunTime,
}

impl Error {
    /// Maps a candle error raised on `device` to [`Error::OutOfMemory`] when it is the device running
    /// out of memory, and to [`Error::Candle`] otherwise.
    pub fn from_device(device: impl std::fmt::Display, e: candle_core::Error) -> Self {
        let msg = e.to_string();
        if msg.contains("OUT_OF_MEMORY") || msg.to_ascii_lowercase().contains("out of memory") {
            Error::OutOfMemory {
                device: device.to_string(),
                needed: 0,
                available: 0,
                hint: format!("raised at run time ({msg}); plan with a shorter max_seq_len or more devices"),
                max_seq_len_that_fits: None,
                phase: OomPhase::RunTime,
            }
        } else {
            Error::Candle(e)
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_out_of_memory_is_typed() {
        let e = Error::from_device("cuda:1", candle_core::Error::Msg("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into()));
        assert!(matches!(e, Error::OutOfMemory { ref device, phase: OomPhase::RunTime, .. } if device == "cuda:1"));
        let other = Error::from_device("cuda:1", candle_core::Error::Msg("shape mismatch".into()));
        assert!(matches!(other, Error::Candle(_)));
    }
}

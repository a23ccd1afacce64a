//! `nibble-load`: everything read from disk before a model exists.
//!
//! - [`source`]: resolving what the caller named (a folder) into the files of a model.
//! - [`config`]: `config.json` into a checked [`ModelConfig`] (transformers 4.x and 5.x layouts).
//! - [`weights`]: memory-mapped safetensors (one file or shards), with typed errors naming the file
//!   and tensor.
//! - [`tokenizer`]: the tokenizer, its special tokens and the chat template.
//! - [`generation`]: `generation_config.json` (eos ids, sampling defaults).
//! - [`hub`]: fetching a model from the Hugging Face Hub into the cache shared with Python.
//! - [`gguf`]: a llama.cpp GGUF file: its config, its weights dequantized under Hugging Face names.
//! - [`gguf_tokenizer`]: a GGUF file's vocabulary and merges rebuilt as a `tokenizer.json`.
//! - [`adapter`]: PEFT LoRA adapters: `adapter_config.json` and which modules it changes.

pub mod adapter;
pub mod arch;
pub mod config;
pub mod generation;
pub mod hub;
pub mod gguf;
pub mod gguf_header;
pub mod gguf_tokenizer;
pub mod limits;
pub mod source;
pub mod tokenizer;
pub mod weights;

pub use arch::{Arch, Role};
pub use config::{LinearSpec, ModelConfig, NormSpec, RopeScaling};
pub use generation::GenerationConfig;
pub use gguf::GgufFile;
pub use gguf_tokenizer::GgufTokenizer;
pub use source::ModelFiles;
pub use tokenizer::{ChatMessage, ChatTemplate, TextTokenizer};
pub use weights::{RawTensor, Weights};

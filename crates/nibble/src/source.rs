//! What the caller named, resolved into something loadable: a local folder in Hugging Face
//! layout, a GGUF file, or a hub id.

use std::path::{Path, PathBuf};

use nibble_core::{Error, Result};
use nibble_load::ModelFiles;

/// Where a model's files come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A folder in Hugging Face layout (a local folder or a snapshot in the HF cache).
    Folder(ModelFiles),
    /// A single GGUF file.
    Gguf(PathBuf),
}

/// Whether `id` looks like a hub repository id (`org/name`), not a path.
pub(crate) fn looks_like_hub_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !p.starts_with('.')
        })
}

/// Resolves `id`: an existing path wins; otherwise a hub id; otherwise an error.
pub(crate) fn resolve(id: &str) -> Result<Source> {
    let path = Path::new(id);
    if path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return Ok(Source::Gguf(path.to_path_buf()));
    }
    if path.is_dir() {
        return Ok(Source::Folder(ModelFiles::from_dir(path)?));
    }
    if path.is_file() {
        return Err(Error::InvalidSource {
            source_name: id.to_string(),
            reason: "a single file must be a .gguf; for safetensors pass the folder holding config.json".into(),
        });
    }
    if looks_like_hub_id(id) {
        return Err(Error::InvalidSource {
            source_name: id.to_string(),
            reason: "not a local folder, and loading from the Hugging Face Hub is not available yet; \
                     download the repository and pass its folder"
                .into(),
        });
    }
    Err(Error::InvalidSource {
        source_name: id.to_string(),
        reason: "no such folder or file; pass a folder in Hugging Face layout (config.json, \
                 model.safetensors, tokenizer.json), a .gguf file, or a hub id org/name"
            .into(),
    })
}

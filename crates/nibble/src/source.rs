//! What the caller named, resolved into something loadable: a local folder in Hugging Face
//! layout, a GGUF file, or a hub id.

use std::path::{Path, PathBuf};

use nibble_core::{Error, Result};
use nibble_load::hub::{self, HubConfig};
use nibble_load::ModelFiles;

use crate::LoadOptions;

/// Where a model's files come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A folder in Hugging Face layout (a local folder or a snapshot in the HF cache).
    Folder(ModelFiles),
    /// A single GGUF file.
    Gguf(PathBuf),
}

/// The Hub settings of `opts`, or the environment's when the caller gave none (read only then:
/// tests and embedders give one, since environment variables are process-global).
pub(crate) fn hub_config(opts: &LoadOptions) -> std::borrow::Cow<'_, HubConfig> {
    match &opts.hub {
        Some(cfg) => std::borrow::Cow::Borrowed(cfg),
        None => std::borrow::Cow::Owned(HubConfig::from_env()),
    }
}

/// Whether `id` looks like a hub repository id (`org/name`), not a path.
pub(crate) fn looks_like_hub_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !p.starts_with('.')
        })
}

/// Resolves `id`: an existing path wins (a `models--org--name` folder of the hub cache is read
/// through its `refs/`); otherwise a hub id, fetched into the cache (or found there) at
/// `opts.revision`; otherwise an error.
pub(crate) fn resolve(id: &str, opts: &LoadOptions) -> Result<Source> {
    let revision = opts.revision.as_deref().unwrap_or(hub::DEFAULT_REVISION);
    let path = Path::new(id);
    if path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return Ok(Source::Gguf(path.to_path_buf()));
    }
    if path.is_dir() {
        if hub::is_cache_repo_dir(path) {
            let snapshot = hub::snapshot_in_cache_dir(path, revision)?;
            return Ok(Source::Folder(ModelFiles::from_dir(snapshot)?));
        }
        return Ok(Source::Folder(ModelFiles::from_dir(path)?));
    }
    if path.is_file() {
        return Err(Error::InvalidSource {
            source_name: id.to_string(),
            reason: "a single file must be a .gguf; for safetensors pass the folder holding config.json".into(),
        });
    }
    if looks_like_hub_id(id) {
        let cfg = hub_config(opts);
        let cfg = cfg.as_ref();
        let snapshot = hub::snapshot(cfg, id, revision)?;
        return Ok(Source::Folder(ModelFiles::from_dir(snapshot)?));
    }
    Err(Error::InvalidSource {
        source_name: id.to_string(),
        reason: "no such folder or file; pass a folder in Hugging Face layout (config.json, \
                 model.safetensors, tokenizer.json), a .gguf file, or a hub id org/name"
            .into(),
    })
}

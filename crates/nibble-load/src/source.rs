//! Resolving a model source into its files.

use std::path::{Path, PathBuf};

use nibble_core::{Error, Result};

/// The files of one model in Hugging Face layout.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The folder holding them.
    pub dir: PathBuf,
    /// `config.json`.
    pub config: PathBuf,
    /// The safetensors files: `model.safetensors`, or the shards named by the index, in order.
    pub weights: Vec<PathBuf>,
    /// `model.safetensors.index.json`, when sharded.
    pub index: Option<PathBuf>,
    /// `tokenizer.json`, when present.
    pub tokenizer: Option<PathBuf>,
    /// `tokenizer_config.json`, when present.
    pub tokenizer_config: Option<PathBuf>,
    /// `chat_template.jinja` (or `chat_template.json`), when present.
    pub chat_template: Option<PathBuf>,
    /// `generation_config.json`, when present.
    pub generation_config: Option<PathBuf>,
}

fn optional(dir: &Path, name: &str) -> Option<PathBuf> {
    let p = dir.join(name);
    p.is_file().then_some(p)
}

impl ModelFiles {
    /// Finds the model files in a local folder.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::InvalidSource {
                source_name: dir.display().to_string(),
                reason: "not a folder".into(),
            });
        }
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(Error::MissingFile {
                path: config,
                hint: "a Hugging Face model folder needs config.json; pass the folder that holds it".into(),
            });
        }
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let (weights, index) = if single.is_file() {
            (vec![single], None)
        } else if index_path.is_file() {
            (shards_from_index(&dir, &index_path)?, Some(index_path))
        } else if dir.join("pytorch_model.bin").is_file() || dir.join("pytorch_model.bin.index.json").is_file() {
            return Err(Error::MissingFile {
                path: single,
                hint: "this folder has only pickle weights (pytorch_model.bin); nibble loads safetensors only, \
                       for safety: convert them with transformers' save_pretrained(safe_serialization=True)"
                    .into(),
            });
        } else {
            return Err(Error::MissingFile {
                path: single,
                hint: "no model.safetensors nor model.safetensors.index.json in the folder".into(),
            });
        };
        Ok(Self {
            tokenizer: optional(&dir, "tokenizer.json"),
            tokenizer_config: optional(&dir, "tokenizer_config.json"),
            chat_template: optional(&dir, "chat_template.jinja").or_else(|| optional(&dir, "chat_template.json")),
            generation_config: optional(&dir, "generation_config.json"),
            dir,
            config,
            weights,
            index,
        })
    }
}

/// Reads a shard index and returns the distinct shard files in first-seen order. A shard path
/// that would leave the folder, or a shard that is missing, is an error.
fn shards_from_index(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::CorruptCheckpoint {
        path: index.to_path_buf(),
        reason: format!("index is not valid JSON: {e}"),
    })?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::CorruptCheckpoint {
        path: index.to_path_buf(),
        reason: "index has no `weight_map` object".into(),
    })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let name = file.as_str().ok_or_else(|| Error::CorruptCheckpoint {
            path: index.to_path_buf(),
            reason: format!("weight_map entry for `{tensor}` is not a file name"),
        })?;
        let rel = Path::new(name);
        let escapes = rel.is_absolute()
            || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_)));
        if escapes || name.is_empty() {
            return Err(Error::CorruptCheckpoint {
                path: index.to_path_buf(),
                reason: format!("shard path {name:?} (for `{tensor}`) leaves the model folder"),
            });
        }
        let p = dir.join(rel);
        if !files.contains(&p) {
            if !p.is_file() {
                return Err(Error::MissingFile {
                    path: p,
                    hint: format!("the index names this shard (for `{tensor}`) but it is not in the folder"),
                });
            }
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

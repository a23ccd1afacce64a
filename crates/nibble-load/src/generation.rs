//! `generation_config.json`: the model's own stop tokens and sampling defaults.

use std::path::Path;

use nibble_core::{Error, Result};
use serde_json::Value;

use crate::config::read_token_ids;

/// What `generation_config.json` says about generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Every id that ends generation (`eos_token_id`, an int or a list).
    pub eos_token_ids: Vec<u32>,
    /// The bos id, when given.
    pub bos_token_id: Option<u32>,
    /// Whether the model's authors sample by default.
    pub do_sample: Option<bool>,
    /// Default temperature.
    pub temperature: Option<f64>,
    /// Default nucleus mass.
    pub top_p: Option<f64>,
    /// Default top-k.
    pub top_k: Option<usize>,
    /// Default repetition penalty.
    pub repetition_penalty: Option<f32>,
}

impl GenerationConfig {
    /// Reads the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::InvalidConfig {
            path: path.to_path_buf(),
            field: "<root>".into(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let obj = v.as_object().ok_or_else(|| Error::InvalidConfig {
            path: path.to_path_buf(),
            field: "<root>".into(),
            reason: "must be a JSON object".into(),
        })?;
        Ok(Self {
            eos_token_ids: read_token_ids(obj, path, "eos_token_id")?,
            bos_token_id: read_token_ids(obj, path, "bos_token_id")?.first().copied(),
            do_sample: obj.get("do_sample").and_then(Value::as_bool),
            temperature: obj.get("temperature").and_then(Value::as_f64),
            top_p: obj.get("top_p").and_then(Value::as_f64),
            top_k: obj.get("top_k").and_then(Value::as_u64).and_then(|k| usize::try_from(k).ok()),
            repetition_penalty: obj.get("repetition_penalty").and_then(Value::as_f64).map(|r| r as f32),
        })
    }
}

//! PEFT LoRA adapters: `adapter_config.json` into a checked [`AdapterConfig`] that says, for each
//! linear module of the base, whether the adapter targets it and with which rank and scale, by
//! PEFT 0.21's matching rules; and the adapter's files in a folder ([`AdapterFiles`]).
//!
//! Fields that change the math and that nibble does not implement (DoRA, other PEFT types, a
//! LoRA bias, replicated layers, ...) are typed errors naming the field, never silently ignored.

use std::path::{Path, PathBuf};

use nibble_core::{Error, Result};
use regex::Regex;
use serde_json::{Map, Value};

/// The most bytes `adapter_config.json` may have (PEFT writes about 1.5 KiB).
pub const MAX_ADAPTER_CONFIG_BYTES: u64 = 1 << 20;
/// The largest rank accepted (a rank is a matrix dimension: bounded before anything is sized).
pub const MAX_RANK: usize = 1 << 16;

/// The files of one PEFT adapter, as `PeftModel.save_pretrained` writes them.
#[derive(Debug, Clone)]
pub struct AdapterFiles {
    /// The folder.
    pub dir: PathBuf,
    /// `adapter_config.json`.
    pub config: PathBuf,
    /// `adapter_model.safetensors`.
    pub weights: PathBuf,
}

impl AdapterFiles {
    /// Finds the adapter files in `dir`; a folder with only `adapter_model.bin` (pickle) is
    /// refused, as for models.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::InvalidSource { source_name: dir.display().to_string(), reason: "not a folder".into() });
        }
        let config = dir.join("adapter_config.json");
        if !config.is_file() {
            return Err(Error::MissingFile {
                path: config,
                hint: "a PEFT adapter folder needs adapter_config.json (what PeftModel.save_pretrained writes)".into(),
            });
        }
        let weights = dir.join("adapter_model.safetensors");
        if !weights.is_file() {
            if dir.join("adapter_model.bin").is_file() {
                return Err(Error::PickleOnly { source_name: dir.display().to_string(), file: "adapter_model.bin".into() });
            }
            return Err(Error::MissingFile {
                path: weights,
                hint: "a PEFT adapter folder needs adapter_model.safetensors next to adapter_config.json".into(),
            });
        }
        Ok(Self { dir, config, weights })
    }
}

/// Which modules an adapter targets (`target_modules`, or `exclude_modules`).
#[derive(Debug, Clone)]
enum Modules {
    /// Names: a module matches when its name is one of them or ends with `.name`.
    List(Vec<String>),
    /// A regular expression the whole module name must match.
    Regex(Regex),
    /// PEFT's `"all-linear"`: every linear layer but the output head.
    AllLinear,
}

impl Modules {
    fn parse(path: &Path, field: &str, v: &Value) -> Result<Option<Self>> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) if s == "all-linear" => Ok(Some(Self::AllLinear)),
            Value::String(s) => Ok(Some(Self::Regex(full_regex(path, field, s)?))),
            Value::Array(items) => {
                let names = items
                    .iter()
                    .map(|i| i.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| invalid(path, field, "must be a list of module names or a regular expression"))?;
                Ok(Some(Self::List(names)))
            }
            _ => Err(invalid(path, field, "must be a list of module names or a regular expression")),
        }
    }

    /// Whether `module` matches, and whether it matched through the list rule (PEFT applies
    /// `layers_to_transform` only then).
    fn matches(&self, module: &str) -> (bool, bool) {
        match self {
            Self::List(names) => {
                let hit = names.iter().any(|n| module == n || module.strip_suffix(n.as_str()).is_some_and(|p| p.ends_with('.')));
                (hit, true)
            }
            Self::Regex(re) => (re.is_match(module), false),
            Self::AllLinear => (module != "lm_head" && !module.ends_with(".lm_head"), false),
        }
    }
}

/// `s` as a regex the whole name must match (Python's `re.fullmatch`).
fn full_regex(path: &Path, field: &str, s: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{s})$")).map_err(|e| invalid(path, field, format!("not a regular expression nibble can use: {e}")))
}

/// Rank and scale of the adapter on one module.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraTarget {
    /// The rank `r` (rows of `lora_A`, columns of `lora_B`).
    pub r: usize,
    /// `lora_alpha` for this module.
    pub alpha: f64,
    /// The factor on `B(A x)`: `alpha / r`, or `alpha / sqrt(r)` with `use_rslora`.
    pub scale: f64,
}

/// A checked `adapter_config.json` of `peft_type` LORA.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// The file it was read from.
    pub path: PathBuf,
    /// The default rank.
    pub r: usize,
    /// The default `lora_alpha`.
    pub lora_alpha: f64,
    /// Rank-stabilized scaling (`alpha / sqrt(r)`).
    pub use_rslora: bool,
    /// What the adapter was trained on (a warning when it is not the model loaded).
    pub base_model_name_or_path: Option<String>,
    targets: Modules,
    exclude: Option<Modules>,
    rank_pattern: Vec<(Regex, usize)>,
    alpha_pattern: Vec<(Regex, f64)>,
    layers_to_transform: Option<Vec<usize>>,
    layer_index: Vec<Regex>,
}

/// Fields PEFT writes that do not change what inference computes, whatever their value
/// (dropout, initialization, bookkeeping).
const IRRELEVANT: &[&str] = &[
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "inference_mode",
    "peft_version",
    "lora_dropout",
    "init_lora_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "megatron_core",
    "ensure_weight_tying",
];

/// Fields that change the math unless off (null, false, empty): nibble implements none of them.
const MUST_BE_OFF: &[&str] = &[
    "modules_to_save",
    "use_dora",
    "lora_bias",
    "layer_replication",
    "use_qalora",
    "alora_invocation_tokens",
    "trainable_token_indices",
    "target_parameters",
    "megatron_config",
    "arrow_config",
    "monteclora_config",
    "kasa_config",
    "velora_config",
    "use_bdlora",
];

/// Fields nibble reads.
const READ: &[&str] = &[
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
    "bias",
];

fn invalid(path: &Path, field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidConfig { path: path.to_path_buf(), field: field.into(), reason: reason.into() }
}

fn unsupported(path: &Path, field: &str, value: &Value, hint: &str) -> Error {
    Error::UnsupportedConfig { path: path.to_path_buf(), field: field.into(), value: value.to_string(), hint: hint.into() }
}

/// An empty value: null, false, an empty list or object (PEFT's "off" for optional fields).
fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

impl AdapterConfig {
    /// Reads and checks `adapter_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
        if len > MAX_ADAPTER_CONFIG_BYTES {
            return Err(invalid(path, "<root>", format!("{len} bytes is past the bound of {MAX_ADAPTER_CONFIG_BYTES}")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| invalid(path, "<root>", format!("not valid JSON: {e}")))?;
        Self::from_json(&v, path)
    }

    /// Checks a parsed `adapter_config.json` (`path` names it in errors).
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| invalid(path, "<root>", "must be a JSON object"))?;
        check_fields(obj, path)?;
        let get = |k: &str| obj.get(k).unwrap_or(&Value::Null);
        let r = rank(path, "r", get("r"))?;
        let lora_alpha = match get("lora_alpha") {
            Value::Null => 8.0,
            a => a.as_f64().filter(|a| a.is_finite()).ok_or_else(|| invalid(path, "lora_alpha", "must be a number"))?,
        };
        let use_rslora = get("use_rslora").as_bool().unwrap_or(false);
        let targets = Modules::parse(path, "target_modules", get("target_modules"))?
            .ok_or_else(|| invalid(path, "target_modules", "is missing: nibble cannot tell which modules the adapter changes"))?;
        let exclude = Modules::parse(path, "exclude_modules", get("exclude_modules"))?;
        let mut rank_pattern = Vec::new();
        for (k, val) in patterns(path, "rank_pattern", get("rank_pattern"))? {
            rank_pattern.push((pattern_regex(path, "rank_pattern", k)?, rank(path, &format!("rank_pattern.{k}"), val)?));
        }
        let mut alpha_pattern = Vec::new();
        for (k, val) in patterns(path, "alpha_pattern", get("alpha_pattern"))? {
            let a = val
                .as_f64()
                .filter(|a| a.is_finite())
                .ok_or_else(|| invalid(path, &format!("alpha_pattern.{k}"), "must be a number"))?;
            alpha_pattern.push((pattern_regex(path, "alpha_pattern", k)?, a));
        }
        let layers_to_transform = match get("layers_to_transform") {
            Value::Null => None,
            Value::Array(a) if a.is_empty() => None,
            v => Some(layer_list(path, v)?),
        };
        let layer_index = match get("layers_pattern") {
            Value::Null => vec![layer_regex(path, r"[^.]*")?],
            Value::String(s) => vec![layer_regex(path, s)?],
            Value::Array(a) if a.is_empty() => vec![layer_regex(path, r"[^.]*")?],
            Value::Array(a) => a
                .iter()
                .map(|p| {
                    p.as_str().ok_or_else(|| invalid(path, "layers_pattern", "must be a name or a list of names"))
                })
                .map(|p| p.and_then(|p| layer_regex(path, p)))
                .collect::<Result<_>>()?,
            _ => return Err(invalid(path, "layers_pattern", "must be a name or a list of names")),
        };
        let base_model_name_or_path = get("base_model_name_or_path").as_str().map(str::to_string);
        Ok(Self {
            path: path.to_path_buf(),
            r,
            lora_alpha,
            use_rslora,
            base_model_name_or_path,
            targets,
            exclude,
            rank_pattern,
            alpha_pattern,
            layers_to_transform,
            layer_index,
        })
    }

    /// The rank and scale of the adapter on the linear module `module` (a name such as
    /// `model.layers.3.self_attn.q_proj`), or `None` when the adapter leaves it alone: PEFT's
    /// `check_target_module_exists` (`exclude_modules` first; a list matches a name or a `.name`
    /// suffix, then `layers_to_transform`; a string must match the whole name), then the first
    /// `rank_pattern` / `alpha_pattern` key matching the end of the name.
    pub fn target(&self, module: &str) -> Option<LoraTarget> {
        if self.exclude.as_ref().is_some_and(|e| e.matches(module).0) {
            return None;
        }
        let (hit, by_list) = self.targets.matches(module);
        if !hit {
            return None;
        }
        if let (Some(layers), true) = (&self.layers_to_transform, by_list) {
            let index = self.layer_index.iter().find_map(|re| re.captures(module)?.get(1)?.as_str().parse::<usize>().ok())?;
            if !layers.contains(&index) {
                return None;
            }
        }
        let r = self.rank_pattern.iter().find(|(re, _)| re.is_match(module)).map_or(self.r, |&(_, r)| r);
        let alpha = self.alpha_pattern.iter().find(|(re, _)| re.is_match(module)).map_or(self.lora_alpha, |&(_, a)| a);
        // r >= 1 is checked when parsed.
        let rf = r as f64;
        let scale = if self.use_rslora { alpha / rf.sqrt() } else { alpha / rf };
        Some(LoraTarget { r, alpha, scale })
    }
}

/// PEFT's layer index rule: `re.match(rf".*\.{pattern}\.(\d+)\.", name)`.
fn layer_regex(path: &Path, pattern: &str) -> Result<Regex> {
    Regex::new(&format!(r"^.*\.(?:{pattern})\.(\d+)\.")).map_err(|e| invalid(path, "layers_pattern", format!("not a regular expression: {e}")))
}

/// A `rank_pattern` / `alpha_pattern` key: `re.match(rf"(.*\.)?({key})$", name)`.
fn pattern_regex(path: &Path, field: &str, key: &str) -> Result<Regex> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| invalid(path, &format!("{field}.{key}"), format!("not a regular expression: {e}")))
}

fn patterns<'a>(path: &Path, field: &str, v: &'a Value) -> Result<Vec<(&'a str, &'a Value)>> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Object(o) => Ok(o.iter().map(|(k, v)| (k.as_str(), v)).collect()),
        _ => Err(invalid(path, field, "must be an object of module pattern to value")),
    }
}

fn rank(path: &Path, field: &str, v: &Value) -> Result<usize> {
    let r = v.as_u64().ok_or_else(|| invalid(path, field, "must be a positive integer"))?;
    if r == 0 || r > MAX_RANK as u64 {
        return Err(invalid(path, field, format!("{r} is outside 1..={MAX_RANK} (the bound on a rank)")));
    }
    Ok(r as usize)
}

fn layer_list(path: &Path, v: &Value) -> Result<Vec<usize>> {
    let one = |x: &Value| {
        x.as_u64()
            .filter(|&i| i < 1 << 20)
            .map(|i| i as usize)
            .ok_or_else(|| invalid(path, "layers_to_transform", "must be a layer index or a list of them"))
    };
    match v {
        Value::Array(a) => a.iter().map(one).collect(),
        x => Ok(vec![one(x)?]),
    }
}

/// The unsupported and unknown fields: a field that changes the math at a value nibble does not
/// implement is an error naming it; an unknown one (a newer PEFT) is a warning.
fn check_fields(obj: &Map<String, Value>, path: &Path) -> Result<()> {
    match obj.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        _ => {
            let v = obj.get("peft_type").unwrap_or(&Value::Null);
            return Err(unsupported(path, "peft_type", v, "nibble runs LORA adapters only"));
        }
    }
    for (k, v) in obj {
        if READ.contains(&k.as_str()) {
            continue;
        }
        if IRRELEVANT.contains(&k.as_str()) || (MUST_BE_OFF.contains(&k.as_str()) && is_off(v)) {
            continue;
        }
        if MUST_BE_OFF.contains(&k.as_str()) {
            let hint = match k.as_str() {
                "use_dora" => "DoRA (weight-decomposed LoRA) is not implemented; merge it with PEFT's merge_and_unload and load the merged model",
                "modules_to_save" => "adapters that replace whole modules are not implemented; merge it with PEFT's merge_and_unload",
                "lora_bias" => "a bias on lora_B is not implemented",
                _ => "this changes what the adapter computes and nibble does not implement it",
            };
            return Err(unsupported(path, k, v, hint));
        }
        tracing::warn!("{}: unknown adapter field `{k}` ignored", path.display());
    }
    let fan = obj.get("fan_in_fan_out").unwrap_or(&Value::Null);
    if fan.as_bool() == Some(true) {
        // PEFT does the same for nn.Linear targets (fan_in_fan_out is for GPT-2's Conv1D).
        tracing::warn!("{}: fan_in_fan_out is true but the targets are linear layers; setting it to false, as PEFT does", path.display());
    }
    match obj.get("bias") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(v) => return Err(unsupported(path, "bias", v, "only bias \"none\" is implemented (no trained biases)")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> Result<AdapterConfig> {
        let mut base = json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]});
        if let (Some(b), Some(o)) = (base.as_object_mut(), v.as_object()) {
            for (k, v) in o {
                b.insert(k.clone(), v.clone());
            }
        }
        AdapterConfig::from_json(&base, Path::new("adapter_config.json"))
    }

    #[test]
    fn list_targets_match_names_and_suffixes() -> Result<()> {
        let c = cfg(json!({}))?;
        assert_eq!(c.target("model.layers.0.self_attn.q_proj").map(|t| t.scale), Some(2.0));
        assert!(c.target("model.layers.0.self_attn.k_proj").is_none());
        assert!(c.target("model.layers.0.self_attn.xq_proj").is_none());
        assert!(c.target("q_proj").is_some());
        Ok(())
    }

    #[test]
    fn regex_targets_match_the_whole_name() -> Result<()> {
        let c = cfg(json!({"target_modules": r".*\.(q|v)_proj"}))?;
        assert!(c.target("model.layers.1.self_attn.v_proj").is_some());
        assert!(c.target("model.layers.1.self_attn.v_proj2").is_none());
        let c = cfg(json!({"target_modules": "q_proj"}))?;
        assert!(c.target("model.layers.1.self_attn.q_proj").is_none(), "fullmatch, not search");
        Ok(())
    }

    #[test]
    fn layers_patterns_and_rslora() -> Result<()> {
        let c = cfg(json!({"layers_to_transform": [1], "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"layers.1.self_attn.q_proj": 4},
                           "use_rslora": true}))?;
        assert!(c.target("model.layers.0.self_attn.q_proj").is_none());
        let q = c.target("model.layers.1.self_attn.q_proj").ok_or(Error::invalid_argument("q", "none"))?;
        assert_eq!((q.r, q.alpha), (8, 4.0));
        assert!((q.scale - 4.0 / 8f64.sqrt()).abs() < 1e-12);
        let v = c.target("model.layers.1.self_attn.v_proj").ok_or(Error::invalid_argument("v", "none"))?;
        assert_eq!((v.r, v.scale), (4, 8.0));
        let c = cfg(json!({"layers_to_transform": 2, "layers_pattern": "blocks"}))?;
        assert!(c.target("model.layers.2.self_attn.q_proj").is_none(), "the pattern names the list of layers");
        assert!(c.target("model.blocks.2.self_attn.q_proj").is_some());
        Ok(())
    }

    #[test]
    fn exclusions_and_all_linear() -> Result<()> {
        let c = cfg(json!({"target_modules": "all-linear", "exclude_modules": ["down_proj"]}))?;
        assert!(c.target("model.layers.0.mlp.up_proj").is_some());
        assert!(c.target("model.layers.0.mlp.down_proj").is_none());
        assert!(c.target("lm_head").is_none());
        Ok(())
    }

    #[test]
    fn fields_that_change_the_math_are_named() {
        for (field, value) in [
            ("use_dora", json!(true)),
            ("peft_type", json!("IA3")),
            ("modules_to_save", json!(["lm_head"])),
            ("bias", json!("all")),
            ("lora_bias", json!(true)),
            ("layer_replication", json!([[0, 2]])),
            ("use_qalora", json!(true)),
        ] {
            match cfg(json!({ field: value })) {
                Err(Error::UnsupportedConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        for (field, value) in [("r", json!(0)), ("r", json!(1u64 << 40)), ("target_modules", json!(7)), ("target_modules", json!("(("))] {
            assert!(matches!(cfg(json!({ field: value })), Err(Error::InvalidConfig { .. })), "{field} = {value}");
        }
    }
}

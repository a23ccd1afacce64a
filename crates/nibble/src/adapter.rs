//! PEFT LoRA adapters over a model of any format: opened before the plan (so that the planner
//! counts their bytes), put on each linear layer as the loader builds it ([`AdapterProvider`]),
//! unmerged ([`LoraLinear`]) or merged into the weight as PEFT's `merge_and_unload` does.

use std::collections::HashSet;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use nibble_core::{Error, Result};
use nibble_llama::{LinearShape, WeightProvider};
use nibble_load::adapter::{AdapterConfig, AdapterFiles, LoraTarget};
use nibble_load::hub;
use nibble_load::{ModelConfig, Weights};
use nibble_quant::{BitsAndBytesConfig, LoraLinear, LoraWeights, QuantLinear, QuantMethod};

use crate::provider::quantize_or_dense;
use crate::source::{hub_config, looks_like_hub_id};
use crate::LoadOptions;

/// An adapter to load: the name requests choose it by, and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSpec {
    /// The name (`"model": "<base>:<name>"` in the server).
    pub name: String,
    /// A folder holding `adapter_config.json` and `adapter_model.safetensors`, or a Hub id.
    pub source: String,
}

impl AdapterSpec {
    /// Parses `NAME=PATH_OR_HUB_ID`, or `PATH_OR_HUB_ID` alone (named after its last path
    /// component).
    ///
    /// Errors: an empty name or source, or a name with characters other than letters, digits
    /// and `-_.`.
    pub fn parse(s: &str) -> Result<Self> {
        let (name, source) = match s.split_once('=') {
            Some((n, src)) => (n.to_string(), src.to_string()),
            None => {
                let last = s.trim_end_matches('/').rsplit('/').next().unwrap_or(s);
                (last.to_string(), s.to_string())
            }
        };
        let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok || source.is_empty() {
            return Err(Error::invalid_argument(
                "adapter",
                format!("{s:?}: expected NAME=PATH_OR_HUB_ID or PATH_OR_HUB_ID, the name of letters, digits and -_."),
            ));
        }
        Ok(Self { name, source })
    }
}

impl std::str::FromStr for AdapterSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// An opened adapter: its checked config and memory-mapped tensors.
#[derive(Debug)]
pub(crate) struct Adapter {
    pub name: String,
    pub files: AdapterFiles,
    pub config: AdapterConfig,
    pub weights: Weights,
}

/// PEFT's tensor names: `base_model.model.<module>.lora_A.weight` and `.lora_B.weight`.
fn tensor_names(module: &str) -> (String, String) {
    (format!("base_model.model.{module}.lora_A.weight"), format!("base_model.model.{module}.lora_B.weight"))
}

/// Opens every adapter of `opts` (a folder, or a Hub id fetched into the cache at
/// `opts.revision`'s default, `main`), checking that names are unique.
pub(crate) fn open_all(opts: &LoadOptions) -> Result<Vec<Adapter>> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(opts.adapters.len());
    for spec in &opts.adapters {
        if !seen.insert(spec.name.clone()) {
            return Err(Error::invalid_argument("adapter", format!("two adapters are named {:?}; name them NAME=PATH", spec.name)));
        }
        let path = Path::new(&spec.source);
        let files = if path.is_dir() {
            AdapterFiles::from_dir(path)?
        } else if looks_like_hub_id(&spec.source) {
            let cfg = hub_config(opts);
            AdapterFiles::from_dir(hub::fetch_adapter(&cfg, &spec.source, hub::DEFAULT_REVISION)?)?
        } else {
            return Err(Error::InvalidSource {
                source_name: spec.source.clone(),
                reason: "no such folder; an adapter is a folder with adapter_config.json and adapter_model.safetensors, \
                         or a hub id org/name"
                    .into(),
            });
        };
        let config = AdapterConfig::from_file(&files.config)?;
        let weights = Weights::open(std::slice::from_ref(&files.weights))?;
        out.push(Adapter { name: spec.name.clone(), files, config, weights });
    }
    Ok(out)
}

/// Warns when an adapter says it was trained on another model than `model_id` (PEFT loads it
/// anyway; its shapes are checked as each layer is built).
pub(crate) fn check_base(adapters: &[Adapter], model_id: &str) {
    let last = |s: &str| s.trim_end_matches('/').rsplit('/').next().unwrap_or(s).to_string();
    for a in adapters {
        if let Some(base) = &a.config.base_model_name_or_path {
            if base != model_id && last(base) != last(model_id) {
                tracing::warn!(
                    "adapter {:?} was trained on {base:?}, not on {model_id:?}: its outputs may mean nothing on this model",
                    a.name
                );
            }
        }
    }
}

/// The dtype an adapter's matrices are held and run in over a base of `method`: PEFT casts
/// them to a float base weight's dtype (the model dtype) and leaves them in f32 over a quantized
/// one (whose weight is not a float tensor).
fn adapter_dtype(method: QuantMethod, dtype: DType) -> DType {
    match method {
        QuantMethod::None => dtype,
        _ => DType::F32,
    }
}

/// The bytes the adapters add to each decoder layer and to the head, for the planner: each
/// adapter on a module of shape `[out, in]` holds `r · (in + out)` values on that module's
/// device, f32 on the CPU (where the host kernels read them), the adapter dtype elsewhere; the
/// plan is made before the devices are known, so it counts f32 (exact on the CPU, an upper bound
/// on a GPU). Merged adapters add nothing.
pub(crate) fn planned_bytes(adapters: &[Adapter], merge: bool, cfg: &ModelConfig) -> Result<(Vec<u64>, u64)> {
    if adapters.is_empty() || merge {
        return Ok((Vec::new(), 0));
    }
    let bytes = |module: &str, out: usize, inp: usize| -> Result<u64> {
        let mut sum = 0u64;
        for a in adapters {
            if let Some(t) = a.config.target(module) {
                let b = (t.r as u64)
                    .checked_mul((out as u64).saturating_add(inp as u64))
                    .and_then(|v| v.checked_mul(4))
                    .and_then(|v| v.checked_add(sum));
                sum = b.ok_or_else(|| Error::SizeOverflow { what: "an adapter's matrices".into() })?;
            }
        }
        Ok(sum)
    };
    let specs = cfg.layer_linears();
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let mut sum = 0u64;
        for s in &specs {
            let b = bytes(&format!("model.layers.{i}.{}", s.name), s.out_features, s.in_features)?;
            sum = sum.checked_add(b).ok_or_else(|| Error::SizeOverflow { what: "a layer's adapters".into() })?;
        }
        layers.push(sum);
    }
    Ok((layers, bytes("lm_head", cfg.vocab_size, cfg.hidden_size)?))
}

/// Wraps the provider of a source format: every linear layer it builds gets the adapters that
/// target it, unmerged or merged.
pub(crate) struct AdapterProvider<'a, P> {
    pub inner: P,
    pub adapters: &'a [Adapter],
    pub merge: bool,
    pub quant: &'a BitsAndBytesConfig,
    /// The model dtype and the 4-bit compute dtype.
    pub dtypes: (DType, DType),
    /// Modules an adapter was applied to, per adapter (the rest of its tensors are reported).
    pub applied: Vec<HashSet<String>>,
    pub warned_rounding: bool,
}

impl<'a, P: WeightProvider> AdapterProvider<'a, P> {
    pub(crate) fn new(inner: P, adapters: &'a [Adapter], merge: bool, quant: &'a BitsAndBytesConfig, dtypes: (DType, DType)) -> Self {
        Self { inner, adapters, merge, quant, dtypes, applied: vec![HashSet::new(); adapters.len()], warned_rounding: false }
    }

    /// Adapter `a`'s matrices for `module`, checked against the base's shape.
    fn matrices(a: &Adapter, module: &str, t: LoraTarget, shape: LinearShape) -> Result<(Tensor, Tensor)> {
        let (an, bn) = tensor_names(module);
        let path = &a.files.weights;
        let get = |name: &str, expected: [usize; 2]| -> Result<Tensor> {
            let found = a.weights.shape(name).ok_or_else(|| Error::MissingTensor { path: path.clone(), tensor: name.into() })?;
            if found != expected {
                return Err(Error::AdapterShapeMismatch {
                    path: path.clone(),
                    tensor: name.into(),
                    expected: expected.to_vec(),
                    found: found.to_vec(),
                });
            }
            a.weights.tensor(name, &Device::Cpu)
        };
        Ok((get(&an, [t.r, shape.in_features])?, get(&bn, [shape.out_features, t.r])?))
    }

    /// `base` merged with `deltas` (`[out, in]`, f32) as PEFT merges: a dense weight gets
    /// `W + ΔW` in the model dtype; a quantized one is dequantized, added to and quantized again
    /// in its format (PEFT warns that this rounds).
    fn merged(&mut self, name: &str, base: Box<dyn QuantLinear>, deltas: &[Tensor], device: &Device) -> Result<Box<dyn QuantLinear>> {
        let (dtype, compute) = self.dtypes;
        let quantized = base.format() != "dense";
        if quantized && !self.warned_rounding {
            tracing::warn!(
                "merging a LoRA adapter into a {}-quantized layer: dequantized, added and quantized again, which may \
                 change generations through rounding (PEFT warns the same)",
                base.format()
            );
            self.warned_rounding = true;
        }
        let bias = base.bias().cloned();
        let mut w = base.dequantized_weight(dtype)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        drop(base);
        for d in deltas {
            w = (w + d)?;
        }
        // A dense layer stays dense (and a quantized one quantized) whatever `quant` says of it.
        let merged = if quantized { self.quant.clone() } else { BitsAndBytesConfig::default() };
        quantize_or_dense(name, &w, bias, &merged, (dtype, compute), device)
    }
}

impl<P: WeightProvider> WeightProvider for AdapterProvider<'_, P> {
    fn linear(&mut self, name: &str, weight_name: &str, shape: LinearShape, device: &Device) -> Result<Box<dyn QuantLinear>> {
        let base = self.inner.linear(name, weight_name, shape, device)?;
        let targets: Vec<(usize, LoraTarget)> =
            self.adapters.iter().enumerate().filter_map(|(i, a)| Some((i, a.config.target(name)?))).collect();
        if targets.is_empty() {
            return Ok(base);
        }
        let method = if base.format() == "dense" { QuantMethod::None } else { self.quant.method() };
        let ad = adapter_dtype(method, self.dtypes.0);
        let mut per_adapter: Vec<Option<LoraWeights>> = (0..self.adapters.len()).map(|_| None).collect();
        let mut deltas = Vec::new();
        for (i, t) in targets {
            let a = &self.adapters[i];
            let (ma, mb) = Self::matrices(a, name, t, shape)?;
            let w = LoraWeights::new(&ma, &mb, t.scale, ad, device)?;
            if self.merge {
                deltas.push(w.delta_weight()?);
            } else if let Some(slot) = per_adapter.get_mut(i) {
                *slot = Some(w);
            }
            if let Some(set) = self.applied.get_mut(i) {
                set.insert(name.to_string());
            }
        }
        if self.merge {
            return self.merged(name, base, &deltas, device);
        }
        Ok(Box::new(LoraLinear::new(base, per_adapter, self.dtypes.0)?))
    }

    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.inner.tensor(name, shape, device)
    }

    fn quantizes(&self, name: &str) -> bool {
        // A tied head an adapter targets cannot be the embedding's own storage: it is built as a
        // layer of its own so that the adapter has somewhere to sit.
        self.inner.quantizes(name) || self.adapters.iter().any(|a| a.config.target(name).is_some())
    }
}

impl<P> AdapterProvider<'_, P> {
    /// Warns about adapter tensors no layer used (modules the model does not have).
    pub(crate) fn report_unused(&self) {
        for (a, applied) in self.adapters.iter().zip(&self.applied) {
            let unused: Vec<&str> = a
                .weights
                .names()
                .into_iter()
                .filter(|n| {
                    let module = n.strip_prefix("base_model.model.").and_then(|m| m.rsplit_once(".lora_")).map(|(m, _)| m);
                    module.is_none_or(|m| !applied.contains(m))
                })
                .collect();
            if !unused.is_empty() {
                tracing::warn!(
                    "adapter {:?}: {} tensor(s) fit no module of this model and were not used (first: {})",
                    a.name,
                    unused.len(),
                    unused.first().copied().unwrap_or_default()
                );
            }
        }
    }
}

//! [`DeviceMap`]: what the user asks for (accelerate's strategy names, a single device, or an
//! explicit module-to-device map), and [`LayerPlan`], the device of every module.

use std::collections::BTreeMap;
use std::fmt;

use nibble_core::{Error, Result};

/// A device a module can live on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceSpec {
    /// Host memory.
    Cpu,
    /// A logical CPU device `cpu:N` (N >= 1): host memory, but a device boundary of its own, so
    /// multi-device placement can be exercised and tested without GPUs.
    LogicalCpu(usize),
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl DeviceSpec {
    /// Whether this is host memory (the CPU or a logical CPU device).
    pub fn is_host(self) -> bool {
        matches!(self, Self::Cpu | Self::LogicalCpu(_))
    }

    /// Parses `cpu`, `cpu:N`, `cuda`, `cuda:N`, or a bare ordinal `N` (accelerate's spelling of a GPU).
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        if t == "cpu" {
            return Ok(Self::Cpu);
        }
        if let Some(n) = t.strip_prefix("cpu:") {
            return match n.parse::<usize>() {
                Ok(0) => Ok(Self::Cpu),
                Ok(n) => Ok(Self::LogicalCpu(n)),
                Err(_) => Err(Error::InvalidDeviceMap { reason: format!("unknown device {s:?}; cpu:N needs a number") }),
            };
        }
        if t == "cuda" || t == "gpu" {
            return Ok(Self::Cuda(0));
        }
        let ordinal = t.strip_prefix("cuda:").or_else(|| t.strip_prefix("gpu:")).unwrap_or(&t);
        ordinal.parse::<usize>().map(Self::Cuda).map_err(|_| Error::InvalidDeviceMap {
            reason: format!("unknown device {s:?}; use \"cpu\", \"cuda:N\" or a GPU ordinal N"),
        })
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::LogicalCpu(i) => write!(f, "cpu:{i}"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// How to spread the model over devices (accelerate's `device_map`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceMap {
    /// The default: `balanced` over the GPUs there are, the CPU when there are none.
    #[default]
    Auto,
    /// Layers split evenly across GPUs.
    Balanced,
    /// Like balanced, keeping GPU 0 light for generation.
    BalancedLow0,
    /// Fill GPUs in order.
    Sequential,
    /// Everything on the CPU.
    Cpu,
    /// Everything on one device.
    Device(DeviceSpec),
    /// Module name (`model.embed_tokens`, `model.layers.N`, `model.norm`, `lm_head`, or a prefix
    /// such as `model` or `""` for everything) to device.
    Explicit(BTreeMap<String, DeviceSpec>),
}

impl DeviceMap {
    /// Parses `auto`, `balanced`, `balanced_low_0`, `sequential`, `cpu`, a device (`cuda:1`), or
    /// an explicit map written `module=device,module=device`.
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim();
        match t.to_ascii_lowercase().as_str() {
            "auto" => return Ok(Self::Auto),
            "balanced" => return Ok(Self::Balanced),
            "balanced_low_0" => return Ok(Self::BalancedLow0),
            "sequential" => return Ok(Self::Sequential),
            "cpu" => return Ok(Self::Cpu),
            _ => {}
        }
        if t.contains('=') {
            let mut map = BTreeMap::new();
            for part in t.split(',').filter(|p| !p.trim().is_empty()) {
                let (module, dev) = part.split_once('=').ok_or_else(|| Error::InvalidDeviceMap {
                    reason: format!("{part:?} is not `module=device`"),
                })?;
                if map.insert(module.trim().to_string(), DeviceSpec::parse(dev)?).is_some() {
                    return Err(Error::InvalidDeviceMap { reason: format!("module {:?} is given twice", module.trim()) });
                }
            }
            return Ok(Self::Explicit(map));
        }
        DeviceSpec::parse(t).map(Self::Device).map_err(|_| Error::InvalidDeviceMap {
            reason: format!(
                "{s:?} is not a device map; use auto, balanced, balanced_low_0, sequential, cpu, cuda:N, \
                 or module=device pairs"
            ),
        })
    }

    /// Whether this is one of the memory-driven strategies (auto, balanced, ...).
    pub fn is_strategy(&self) -> bool {
        matches!(self, Self::Auto | Self::Balanced | Self::BalancedLow0 | Self::Sequential)
    }
}

impl std::str::FromStr for DeviceMap {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// The device of every module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerPlan {
    /// `model.embed_tokens`.
    pub embed: DeviceSpec,
    /// `model.layers.N`.
    pub layers: Vec<DeviceSpec>,
    /// `model.norm` and `lm_head`.
    pub head: DeviceSpec,
}

impl LayerPlan {
    /// Everything on `d`.
    pub fn single(d: DeviceSpec, num_layers: usize) -> Self {
        Self { embed: d, layers: vec![d; num_layers], head: d }
    }

    /// Every distinct device used.
    pub fn devices(&self) -> Vec<DeviceSpec> {
        let mut v: Vec<DeviceSpec> = std::iter::once(self.embed).chain(self.layers.iter().copied()).chain([self.head]).collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Resolves an explicit map: each module takes the device of the longest key that names it or a
/// parent of it (accelerate's rule); every module must be covered, and a key naming no module is
/// an error, as is splitting `model.norm` from `lm_head`.
pub(crate) fn resolve_explicit(map: &BTreeMap<String, DeviceSpec>, num_layers: usize) -> Result<LayerPlan> {
    let modules: Vec<String> = std::iter::once("model.embed_tokens".to_string())
        .chain((0..num_layers).map(|i| format!("model.layers.{i}")))
        .chain(["model.norm".to_string(), "lm_head".to_string()])
        .collect();
    let covers = |key: &str, module: &str| {
        key.is_empty() || module == key || module.starts_with(&format!("{key}."))
    };
    for key in map.keys() {
        if !modules.iter().any(|m| covers(key, m)) {
            // A key inside a layer (`model.layers.0.mlp`) would split a decoder layer.
            let reason = if modules.iter().any(|m| key.starts_with(&format!("{m}."))) {
                format!("{key:?} splits a module; decoder layers are placed whole")
            } else {
                format!("{key:?} names no module of this model (it has {num_layers} layers)")
            };
            return Err(Error::InvalidDeviceMap { reason });
        }
    }
    let device_of = |module: &str| -> Result<DeviceSpec> {
        map.iter()
            .filter(|(k, _)| covers(k, module))
            .max_by_key(|(k, _)| k.len())
            .map(|(_, d)| *d)
            .ok_or_else(|| Error::InvalidDeviceMap { reason: format!("no device given for module {module:?}") })
    };
    let plan = LayerPlan {
        embed: device_of("model.embed_tokens")?,
        layers: (0..num_layers).map(|i| device_of(&format!("model.layers.{i}"))).collect::<Result<_>>()?,
        head: device_of("lm_head")?,
    };
    if device_of("model.norm")? != plan.head {
        return Err(Error::InvalidDeviceMap { reason: "model.norm and lm_head must be on the same device".into() });
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explicit(m: &DeviceMap) -> BTreeMap<String, DeviceSpec> {
        match m {
            DeviceMap::Explicit(map) => map.clone(),
            other => panic!("not explicit: {other:?}"),
        }
    }

    #[test]
    fn parses_user_spellings() {
        assert_eq!(DeviceSpec::parse("cpu:2").unwrap(), DeviceSpec::LogicalCpu(2));
        assert_eq!(DeviceMap::parse("auto").unwrap(), DeviceMap::Auto);
        assert_eq!(DeviceMap::parse("balanced_low_0").unwrap(), DeviceMap::BalancedLow0);
        assert_eq!(DeviceMap::parse("cuda:1").unwrap(), DeviceMap::Device(DeviceSpec::Cuda(1)));
        assert_eq!(DeviceMap::parse("cpu").unwrap(), DeviceMap::Cpu);
        assert!(matches!(DeviceMap::parse("tpu:0"), Err(Error::InvalidDeviceMap { .. })));
        assert!(matches!(DeviceMap::parse("lm_head=cpu,lm_head=0"), Err(Error::InvalidDeviceMap { .. })));
    }

    #[test]
    fn explicit_map_uses_longest_prefix_and_checks_coverage() {
        let m = DeviceMap::parse("model=cpu,model.layers.2=cuda:1,model.norm=cuda:1,lm_head=cuda:1").unwrap();
        let p = resolve_explicit(&explicit(&m), 3).unwrap();
        assert_eq!(p.layers, vec![DeviceSpec::Cpu, DeviceSpec::Cpu, DeviceSpec::Cuda(1)]);
        assert_eq!(p.head, DeviceSpec::Cuda(1));
        let missing = DeviceMap::parse("model.embed_tokens=cpu,model.layers.0=cpu,model.norm=cpu,lm_head=cpu").unwrap();
        assert!(matches!(resolve_explicit(&explicit(&missing), 2), Err(Error::InvalidDeviceMap { .. })));
        let unknown = DeviceMap::parse("=cpu,model.layers.9=cpu").unwrap();
        assert!(matches!(resolve_explicit(&explicit(&unknown), 2), Err(Error::InvalidDeviceMap { .. })));
        let split = DeviceMap::parse("=cpu,model.layers.0.mlp=cpu").unwrap();
        assert!(matches!(resolve_explicit(&explicit(&split), 2), Err(Error::InvalidDeviceMap { .. })));
    }
}

//! Byte sizes and `max_memory`, spelled as accelerate spells them.

use std::collections::BTreeMap;

use nibble_core::{Error, Result};

use crate::DeviceSpec;

/// Parses `10GiB`, `10GB` (= 10^9), `512MiB`, `1.5GiB`, `100KB`, or plain bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.trim().parse().map_err(|_| Error::InvalidArgument {
        name: "max_memory".into(),
        reason: format!("{s:?} is not a size; write e.g. 10GiB, 10GB, 512MiB or a byte count"),
    })?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        other => {
            return Err(Error::InvalidArgument {
                name: "max_memory".into(),
                reason: format!("unknown unit {other:?} in {s:?}; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"),
            })
        }
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(Error::InvalidArgument { name: "max_memory".into(), reason: format!("{s:?} is out of range") });
    }
    Ok(bytes as u64)
}

/// Formats bytes for people: `1.50 GiB`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    let units = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (name, shift) in units {
        let unit = (1u64 << shift) as f64;
        if b >= unit {
            return format!("{:.2} {name}", b / unit);
        }
    }
    format!("{bytes} B")
}

/// Per-device memory budgets given by the user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaxMemory(pub BTreeMap<DeviceSpec, u64>);

impl MaxMemory {
    /// Parses `0=6GiB,1=8GiB,cpu=32GiB` (keys `N`, `cuda:N`, `cpu`, `cpu:N`).
    pub fn parse(s: &str) -> Result<Self> {
        let mut map = BTreeMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, size) = part.split_once('=').ok_or_else(|| {
                Error::InvalidArgument {
                    name: "max_memory".into(),
                    reason: format!("{part:?} is not `device=size` (e.g. 0=10GiB or cpu=32GiB)"),
                }
            })?;
            let device = DeviceSpec::parse(key).map_err(|_| Error::InvalidArgument {
                name: "max_memory".into(),
                reason: format!("unknown device key {key:?}; use 0, cuda:0, cpu"),
            })?;
            if map.insert(device, parse_size(size)?).is_some() {
                return Err(Error::InvalidArgument { name: "max_memory".into(), reason: format!("device {key:?} given twice") });
            }
        }
        Ok(Self(map))
    }

    /// The budget for `device`, if the user gave one.
    pub fn get(&self, device: DeviceSpec) -> Option<u64> {
        self.0.get(&device).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10GiB").unwrap(), 10 * (1 << 30));
        assert_eq!(parse_size("10GB").unwrap(), 10_000_000_000);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1234").unwrap(), 1234);
        assert_eq!(parse_size("1.5 GiB").unwrap(), 3 << 29);
        assert!(matches!(parse_size("ten GB"), Err(Error::InvalidArgument { .. })));
        assert!(matches!(parse_size("10XB"), Err(Error::InvalidArgument { .. })));
        assert!(matches!(parse_size("-1GB"), Err(Error::InvalidArgument { .. })));
    }

    #[test]
    fn max_memory() {
        let m = MaxMemory::parse("0=6GiB, cuda:1=8GiB,cpu=32GiB").unwrap();
        assert_eq!(m.get(DeviceSpec::Cuda(0)), Some(6 << 30));
        assert_eq!(m.get(DeviceSpec::Cuda(1)), Some(8 << 30));
        assert_eq!(m.get(DeviceSpec::Cpu), Some(32 << 30));
        assert!(matches!(MaxMemory::parse("tpu=1GB"), Err(Error::InvalidArgument { .. })));
        assert!(matches!(MaxMemory::parse("0=lots"), Err(Error::InvalidArgument { .. })));
        assert!(matches!(MaxMemory::parse("0=1GB,cuda:0=2GB"), Err(Error::InvalidArgument { .. })));
    }
}

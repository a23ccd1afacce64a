//! What memory there is: the host, and CUDA devices queried through the driver at run time.
//!
//! The CUDA query loads the driver library dynamically (behind the `cuda` feature), so nibble
//! builds and tests without a GPU, and a machine without a driver gets a typed answer instead of a
//! link error.

use crate::DeviceSpec;

/// One CUDA device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDevice {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name.
    pub name: String,
    /// Total memory in bytes.
    pub total_bytes: u64,
    /// Free memory in bytes when queried.
    pub free_bytes: u64,
    /// Compute capability (major, minor).
    pub compute_capability: (u32, u32),
}

/// Why CUDA devices are or are not listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaStatus {
    /// This build has no `cuda` feature.
    NotCompiled,
    /// The driver library could not be loaded or initialized.
    NoDriver {
        /// What failed.
        reason: String,
    },
    /// The driver answered.
    Available {
        /// Driver version as CUDA encodes it (12040 = 12.4).
        driver_version: u32,
    },
    /// A simulated inventory (tests, `nibble plan --simulate`).
    Simulated,
}

/// Host memory and CPU facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuInfo {
    /// Memory available to new allocations, in bytes.
    pub available_bytes: u64,
    /// Total memory in bytes.
    pub total_bytes: u64,
    /// Hardware threads.
    pub threads: usize,
    /// SIMD features nibble's kernels can use.
    pub features: Vec<&'static str>,
}

/// Every device nibble could place a module on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    /// The host.
    pub cpu: CpuInfo,
    /// CUDA devices, by ordinal.
    pub cuda: Vec<CudaDevice>,
    /// How the CUDA list was obtained.
    pub cuda_status: CudaStatus,
}

/// The oldest driver nibble's CUDA build runs on (CUDA 12.0): candle's kernels target CUDA 12.
pub const MIN_CUDA_DRIVER: u32 = 12000;

fn cpu_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            f.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("fma") {
            f.push("fma");
        }
        if std::arch::is_x86_feature_detected!("f16c") {
            f.push("f16c");
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            f.push("avx512f");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            f.push("neon");
        }
    }
    f
}

/// Reads `/proc/meminfo` (Linux); `None` elsewhere.
fn meminfo() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("MemAvailable:")?, field("MemTotal:")?))
}

impl CpuInfo {
    /// Queries this machine.
    pub fn detect() -> Self {
        let (available_bytes, total_bytes) = meminfo().unwrap_or_else(|| {
            tracing::warn!("cannot read available memory; assuming 16 GiB");
            (16 << 30, 16 << 30)
        });
        Self {
            available_bytes,
            total_bytes,
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            features: cpu_features(),
        }
    }
}

impl Inventory {
    /// Queries this machine: host memory and, in a `cuda` build, the CUDA driver.
    pub fn detect() -> Self {
        let (cuda, cuda_status) = crate::cuda_driver::query();
        Self { cpu: CpuInfo::detect(), cuda, cuda_status }
    }

    /// A made-up inventory: GPUs with the given free bytes (each reported with compute capability
    /// 8.0 and total = free), and a host with `cpu_bytes` available.
    pub fn simulated(gpu_free: &[u64], cpu_bytes: u64) -> Self {
        let cuda = gpu_free
            .iter()
            .enumerate()
            .map(|(ordinal, &free)| CudaDevice {
                ordinal,
                name: "simulated GPU".into(),
                total_bytes: free,
                free_bytes: free,
                compute_capability: (8, 0),
            })
            .collect();
        Self {
            cpu: CpuInfo { available_bytes: cpu_bytes, total_bytes: cpu_bytes, threads: 1, features: Vec::new() },
            cuda,
            cuda_status: CudaStatus::Simulated,
        }
    }

    /// The CUDA device `ordinal`, if present.
    pub fn gpu(&self, ordinal: usize) -> Option<&CudaDevice> {
        self.cuda.iter().find(|d| d.ordinal == ordinal)
    }

    /// Free bytes the inventory reports for `device`, before any safety margin.
    pub fn free_bytes(&self, device: DeviceSpec) -> Option<u64> {
        match device {
            DeviceSpec::Cpu | DeviceSpec::LogicalCpu(_) => Some(self.cpu.available_bytes),
            DeviceSpec::Cuda(i) => self.gpu(i).map(|d| d.free_bytes),
        }
    }
}

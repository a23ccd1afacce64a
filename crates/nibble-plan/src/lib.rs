//! `nibble-plan`: where each module of the model goes, decided before any weight is read.
//!
//! - [`DeviceMap`]: accelerate's strategies (auto, balanced, balanced_low_0, sequential), cpu, one
//!   device, or an explicit module → device map.
//! - [`Inventory`]: host memory and CUDA devices (queried through the driver at run time in a
//!   `cuda` build), or a simulated list for tests and `nibble plan --simulate`.
//! - [`Estimate`]: bytes per module from config.json alone, plus the KV cache and a reserve, in
//!   the model dtype ([`auto_dtype`] resolves transformers' `auto`).
//! - [`plan`]: a [`Plan`] that fits every budget, or `Error::OutOfMemory` with a computed hint.

mod cuda_driver;
pub mod device_map;
pub mod estimate;
pub mod inventory;
pub mod planner;
pub mod size;

pub use device_map::{DeviceMap, DeviceSpec, LayerPlan};
pub use estimate::{auto_dtype, bias_bytes, linear_bytes, Estimate, PREFILL_CHUNK};
pub use inventory::{CpuInfo, CudaDevice, CudaStatus, Inventory, MIN_CUDA_DRIVER};
pub use planner::{plan, safety_margin, DeviceUsage, Plan, PlanRequest};
pub use size::{human, parse_size, MaxMemory};

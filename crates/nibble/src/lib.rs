//! # nibble
//!
//! Load Hugging Face Llama-family models with bitsandbytes-style quantization applied on load,
//! in Rust, on candle:
//!
//! ```no_run
//! use nibble::{BitsAndBytesConfig, DeviceMap, GenerateOptions};
//!
//! # fn main() -> Result<(), nibble::Error> {
//! let model = nibble::from_pretrained("models/tiny-llama", BitsAndBytesConfig::nf4(), DeviceMap::Auto)?;
//! let out = model.generate_text("Hello", &GenerateOptions::greedy(16), |piece| print!("{piece}"))?;
//! println!("\n{} tokens", out.tokens.len());
//! # Ok(()) }
//! ```
//!
//! Data flows one way: source ([`ModelFiles`]) → config ([`LlamaConfig`]) → plan ([`DeviceMap`])
//! → quantize ([`BitsAndBytesConfig`], tensor by tensor) → place → run ([`Model`]). Every error
//! is a [`nibble::Error`](Error) variant a program can match on.

mod generate;
mod model;
mod prequant;
mod provider;
mod save;
mod source;

use candle_core::Device;

pub use generate::{GenerateOptions, Generation, StopReason};
pub use model::Model;
pub use source::Source;
pub use nibble_core::{Error, Result};
pub use nibble_llama::{KvCache, Placement};
pub use nibble_load::{ChatMessage, GenerationConfig, LlamaConfig, ModelFiles, RopeScaling};
pub use nibble_plan::{DeviceMap, DeviceSpec, LayerPlan};
pub use nibble_quant::{BitsAndBytesConfig, ComputeDtype, QuantMethod, QuantType};

/// Options of a load beyond the three arguments of [`from_pretrained`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Quantization to apply (ignored, with a warning, when the checkpoint is pre-quantized and
    /// says otherwise).
    pub quant: BitsAndBytesConfig,
    /// Where modules go.
    pub device_map: DeviceMap,
    /// Show a progress bar while quantizing (only drawn on a terminal).
    pub progress: bool,
}

/// Loads the model at `id` (a local folder in Hugging Face layout), quantized as `quant` says,
/// placed as `device_map` says.
pub fn from_pretrained(id: &str, quant: BitsAndBytesConfig, device_map: DeviceMap) -> Result<Model> {
    Model::load(id, &LoadOptions { quant, device_map, progress: false })
}

/// Number of CUDA devices usable by this build.
pub fn cuda_device_count() -> usize {
    if candle_core::utils::cuda_is_available() {
        (0..64).take_while(|&i| Device::new_cuda(i).is_ok()).count()
    } else {
        0
    }
}

/// The candle device for a planned device, or a typed error when this build or machine lacks it.
pub fn device_for(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(i) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::DeviceUnavailable {
                    device: spec.to_string(),
                    reason: "this build of nibble has no CUDA support; rebuild with `--features cuda`, or use --device-map cpu".into(),
                });
            }
            Device::new_cuda(i).map_err(|e| Error::DeviceUnavailable { device: spec.to_string(), reason: e.to_string() })
        }
    }
}

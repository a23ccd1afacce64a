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
//! Data flows one way: source ([`ModelFiles`]) → config ([`ModelConfig`]) → plan ([`DeviceMap`])
//! → quantize ([`BitsAndBytesConfig`], tensor by tensor) → place → run ([`Model`]). Every error
//! is a [`nibble::Error`](Error) variant a program can match on.

mod adapter;
pub mod engine;
mod generate;
mod gguf;
mod model;
mod prequant;
mod provider;
mod save;
mod source;
mod staged;

use candle_core::Device;

/// candle's dtype, as the model dtype and the compute dtype resolve to.
pub use candle_core::DType;

pub use adapter::AdapterSpec;
pub use engine::{Completion, Engine, EngineOptions, Event, FinishReason, Request};
pub use generate::{GenerateOptions, Generation, StopReason};
pub use gguf::import_gguf;
pub use model::{Model, Session};
pub use source::Source;
pub use nibble_core::{Error, Result};
pub use nibble_llama::{KvCache, Placement};
pub use nibble_load::hub::{HubConfig, HubToken, RetryPolicy};
pub use nibble_load::{Arch, ChatMessage, GenerationConfig, GgufFile, ModelConfig, ModelFiles, RopeScaling};
pub use nibble_plan::{plan, CudaStatus, DeviceMap, DeviceSpec, Inventory, LayerPlan, MaxMemory, Plan, PlanRequest};
pub use nibble_quant::{BitsAndBytesConfig, ComputeDtype, ModelDtype, QuantMethod, QuantType};

/// Options of a load beyond the three arguments of [`from_pretrained`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Quantization to apply (ignored, with a warning, when the checkpoint is pre-quantized and
    /// says otherwise).
    pub quant: BitsAndBytesConfig,
    /// transformers' `dtype`: the dtype of activations, the KV cache and every weight left
    /// unquantized; `Auto` (the default) is the checkpoint's. The 4-bit products compute in
    /// `quant.bnb_4bit_compute_dtype` instead.
    pub dtype: ModelDtype,
    /// Where modules go.
    pub device_map: DeviceMap,
    /// Show a progress bar while quantizing (only drawn on a terminal).
    pub progress: bool,
    /// The revision (branch, tag or commit) of a hub id, or of a `models--org--name` cache folder;
    /// `None` is `main`. Ignored for plain local folders.
    pub revision: Option<String>,
    /// How to reach the Hub and where its cache is; `None` reads the environment
    /// ([`HubConfig::from_env`]: `HF_ENDPOINT`, `HF_HUB_CACHE`, `HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`).
    pub hub: Option<HubConfig>,
    /// Per-device budgets overriding the free memory the inventory reports.
    pub max_memory: MaxMemory,
    /// Context length the KV cache is planned for; `None` is min(max_position_embeddings, 4096).
    pub max_seq_len: Option<usize>,
    /// Sequences run at once (KV cache and activations scale with it); 0 is taken as 1.
    pub batch: usize,
    /// Refuse to put layers on the CPU when the GPUs are full (CPU offload is on by default, with
    /// a warning, unlike transformers for 4-bit models).
    pub no_cpu_offload: bool,
    /// The devices to plan for; `None` queries this machine.
    pub inventory: Option<Inventory>,
    /// PEFT LoRA adapters to put on the model (folders or Hub ids). The first is the active
    /// one (what [`Model::generate`] and the other single-sequence calls run with); the engine
    /// and the server pick one per request.
    pub adapters: Vec<AdapterSpec>,
    /// Merge the adapters into the weights as PEFT's `merge_and_unload` does (a quantized
    /// layer is dequantized, added to and quantized again) instead of running them unmerged.
    pub merge_adapters: bool,
}

impl LoadOptions {
    /// The planner's request for `cfg`.
    pub fn plan_request(&self, cfg: &ModelConfig) -> PlanRequest {
        let mut req = PlanRequest::new(cfg);
        req.device_map = self.device_map.clone();
        req.max_memory = self.max_memory.clone();
        if let Some(n) = self.max_seq_len {
            req.max_seq_len = n;
        }
        req.batch = self.batch.max(1);
        req.allow_cpu_offload = !self.no_cpu_offload;
        req
    }

    /// [`LoadOptions::plan_request`] with the bytes of [`LoadOptions::adapters`] counted on the
    /// layers they target (each adapter's config and tensor header are read, no weight).
    ///
    /// Errors: an adapter that cannot be opened or whose config is not supported.
    pub fn plan_request_with_adapters(&self, cfg: &ModelConfig) -> Result<PlanRequest> {
        self.plan_request_for(cfg, &adapter::open_all(self)?)
    }

    /// [`LoadOptions::plan_request`] with the bytes of the opened `adapters` counted.
    pub(crate) fn plan_request_for(&self, cfg: &ModelConfig, adapters: &[adapter::Adapter]) -> Result<PlanRequest> {
        let mut req = self.plan_request(cfg);
        (req.adapter_layer_bytes, req.adapter_head_bytes) = adapter::planned_bytes(adapters, self.merge_adapters, cfg)?;
        Ok(req)
    }
}

/// Loads the model at `id` (a local folder in Hugging Face layout, or a llama.cpp `.gguf` file of
/// the `llama` architecture, dequantized to bf16 and then quantized like any checkpoint, a
/// `models--org--name` folder of the hub cache, or a hub id `org/name` fetched at `main` into the
/// cache shared with Python), quantized as `quant` says, placed as `device_map` says.
pub fn from_pretrained(id: &str, quant: BitsAndBytesConfig, device_map: DeviceMap) -> Result<Model> {
    Model::load(id, &LoadOptions { quant, device_map, ..LoadOptions::default() })
}

/// Fetches only the config.json of hub repository `repo_id` (main revision, settings from the
/// environment) and returns its path in the cache: enough to plan before downloading weights.
pub fn fetch_config(repo_id: &str) -> Result<std::path::PathBuf> {
    nibble_load::hub::fetch_config(&HubConfig::from_env(), repo_id, nibble_load::hub::DEFAULT_REVISION)
}

/// The candle device for a planned device, or a typed error when this build or machine lacks it.
pub fn device_for(spec: DeviceSpec) -> Result<Device> {
    match spec {
        // Logical CPU devices share host memory; they exist to exercise device boundaries.
        DeviceSpec::Cpu | DeviceSpec::LogicalCpu(_) => Ok(Device::Cpu),
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

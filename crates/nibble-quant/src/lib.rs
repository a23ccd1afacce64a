//! `nibble-quant`: quantization formats, exactly as bitsandbytes defines them.
//!
//! - [`BitsAndBytesConfig`]: transformers' quantization settings, with their names, defaults,
//!   validation and JSON form.
//! - [`functional`]: the counterpart of `bitsandbytes.functional`: NF4/FP4 blockwise quantization with
//!   double quantization, and LLM.int8() vector-wise quantization, bit-exact with bitsandbytes.
//! - [`linear`]: one [`QuantLinear`] trait for every linear layer (dense, 4-bit, 8-bit), so the
//!   model never branches on the format, and [`LoraLinear`] puts PEFT LoRA adapters on any of them.
//! - [`kernels`]: the CPU kernels behind them: fused 4-bit and int8 matrix products and the
//!   vectorized quantizers, with AVX2, NEON and portable versions chosen at run time.

pub mod config;
pub mod functional;
pub mod kernels;
pub mod linear;
pub mod quant_state;

pub use config::{BitsAndBytesConfig, ComputeDtype, ModelDtype, QuantMethod};
pub use functional::QuantType;
pub use linear::{convert_dtype, AdapterSel, BlockQ8Linear, DenseLinear, Linear4bit, Linear8bit, LoraLinear, LoraWeights, QuantLinear};

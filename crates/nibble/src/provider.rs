//! Builds each layer from the checkpoint as the model asks for it: the streaming
//! quantize-on-load step. A weight is read from the memory map, quantized (or kept dense), and its
//! full-precision copy dropped before the next one is read.

use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use nibble_core::Result;
use nibble_llama::{LinearShape, WeightProvider};
use nibble_load::Weights;
use nibble_quant::{convert_dtype, BitsAndBytesConfig, DenseLinear, Linear4bit, Linear8bit, QuantLinear, QuantMethod};

use crate::prequant::{self, Stored};

/// Supplies layers from a checkpoint, quantizing per `quant`.
pub(crate) struct CheckpointProvider<'a> {
    pub weights: &'a Weights,
    pub quant: &'a BitsAndBytesConfig,
    /// The model dtype (transformers' `dtype`).
    pub dtype: DType,
    /// The 4-bit compute dtype (`bnb_4bit_compute_dtype`).
    pub compute: DType,
    pub progress: ProgressBar,
}

/// Builds the linear layer `name` from its dense weight `w` (`[out, in]`, on the CPU, in the dtype
/// the checkpoint holds) and its bias `bias` (already in `dtype`, on `device`) as transformers
/// does under `from_pretrained(dtype)`: the weight is cast to the model dtype `dtype`, then
/// quantized as `quant` says (4-bit products in `compute`), or kept dense in `dtype` when `quant`
/// is off or skips `name`; the bias stays unquantized, as bitsandbytes keeps it. Every source
/// format (safetensors, GGUF) goes through here, so a weight is quantized the same way whatever
/// file it came from.
pub(crate) fn quantize_or_dense(
    name: &str,
    w: &Tensor,
    bias: Option<Tensor>,
    quant: &BitsAndBytesConfig,
    (dtype, compute): (DType, DType),
    device: &Device,
) -> Result<Box<dyn QuantLinear>> {
    let method = if quant.skips(name) { QuantMethod::None } else { quant.method() };
    // Exact for a widening cast (a bf16 checkpoint in f32); a narrowing one rounds each value
    // before quantization, as transformers' cast does.
    let w = convert_dtype(w, dtype)?;
    Ok(match method {
        QuantMethod::None => Box::new(DenseLinear::new(w.to_device(device)?, bias)?),
        QuantMethod::FourBit(qt) => Box::new(
            Linear4bit::quantize(&w, qt, quant.bnb_4bit_blocksize, quant.bnb_4bit_use_double_quant, compute, device)?
                .with_act_dtype(dtype)
                .with_bias(bias)?,
        ),
        QuantMethod::Int8 => Box::new(Linear8bit::quantize(&w, quant.llm_int8_threshold, dtype, device)?.with_bias(bias)?),
    })
}

/// Whether `quant` quantizes the linear layer `name`.
pub(crate) fn quantizes(quant: &BitsAndBytesConfig, name: &str) -> bool {
    quant.is_quantized() && !quant.skips(name)
}

/// `t` in `dtype` on `device`, converted on the host's cores first.
pub(crate) fn place(t: &Tensor, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(convert_dtype(t, dtype)?.to_device(device)?)
}

impl WeightProvider for CheckpointProvider<'_> {
    fn linear(&mut self, name: &str, weight_name: &str, shape: LinearShape, device: &Device) -> Result<Box<dyn QuantLinear>> {
        self.progress.set_message(name.to_string());
        let LinearShape { out_features, in_features, .. } = shape;
        let dims = (out_features, in_features);
        let bias = self.bias(name, shape, device)?;
        let layer: Box<dyn QuantLinear> = match prequant::detect(self.weights, weight_name) {
            Stored::FourBit(state, qt) => Box::new(
                prequant::load_4bit(self.weights, weight_name, &state, qt, dims, self.compute, device)?
                    .with_act_dtype(self.dtype)
                    .with_bias(bias)?,
            ),
            Stored::Int8 => Box::new(
                prequant::load_int8(self.weights, weight_name, dims, self.quant.llm_int8_threshold, self.dtype, device)?
                    .with_bias(bias)?,
            ),
            Stored::Dense => {
                // Quantization runs on the host; only the result moves to the device.
                let w = self.weights.tensor_shaped(weight_name, &[out_features, in_features], &Device::Cpu)?;
                quantize_or_dense(name, &w, bias, self.quant, (self.dtype, self.compute), device)?
            }
        };
        self.progress.inc(1);
        Ok(layer)
    }

    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        place(&self.weights.tensor_shaped(name, shape, &Device::Cpu)?, self.dtype, device)
    }

    fn quantizes(&self, name: &str) -> bool {
        quantizes(self.quant, name)
    }
}

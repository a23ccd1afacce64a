//! Builds each layer from the checkpoint as the model asks for it: the streaming
//! quantize-on-load step. A weight is read from the memory map, quantized (or kept dense), and its
//! full-precision copy dropped before the next one is read.

use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use nibble_core::Result;
use nibble_llama::WeightProvider;
use nibble_load::Weights;
use nibble_quant::{convert_dtype, dense_storage_dtype, BitsAndBytesConfig, DenseLinear, Linear4bit, Linear8bit, QuantLinear, QuantMethod};

use crate::prequant::{self, Stored};

/// Supplies layers from a checkpoint, quantizing per `quant`.
pub(crate) struct CheckpointProvider<'a> {
    pub weights: &'a Weights,
    pub quant: &'a BitsAndBytesConfig,
    pub compute: DType,
    pub progress: ProgressBar,
}

/// The dtype an unquantized weight stored as `stored` is held in on `device`: on the CPU a
/// 16-bit weight under f32 compute stays 16-bit (exact, half the memory and bandwidth; see
/// [`dense_storage_dtype`]); accelerators hold the compute dtype, where their matmuls want it.
fn host_storage_dtype(stored: DType, compute: DType, device: &Device) -> DType {
    if device.is_cpu() {
        dense_storage_dtype(stored, compute)
    } else {
        compute
    }
}

/// Builds the linear layer `name` from its dense weight `w` (`[out, in]`, on the CPU, in the dtype
/// the checkpoint holds): quantized as `quant` says, or kept dense in `compute` when `quant` is
/// off or skips `name`. Every source format (safetensors, GGUF) goes through here, so a weight
/// is quantized the same way whatever file it came from.
pub(crate) fn quantize_or_dense(
    name: &str,
    w: &Tensor,
    quant: &BitsAndBytesConfig,
    compute: DType,
    device: &Device,
) -> Result<Box<dyn QuantLinear>> {
    let method = if quant.skips(name) { QuantMethod::None } else { quant.method() };
    Ok(match method {
        QuantMethod::None => {
            // Only the modules a quantization config skips (the lm_head, typically) stay 16-bit:
            // decode uses them one row at a time, where the kernel widens as it reads. In an
            // unquantized model every linear serves prefill, whose f32 GEMM would have to
            // widen the whole weight per call.
            let stored = if quant.is_quantized() { host_storage_dtype(w.dtype(), compute, device) } else { compute };
            Box::new(DenseLinear::with_compute_dtype(convert_dtype(w, stored)?.to_device(device)?, None, compute)?)
        }
        QuantMethod::FourBit(qt) => Box::new(Linear4bit::quantize(
            w,
            qt,
            quant.bnb_4bit_blocksize,
            quant.bnb_4bit_use_double_quant,
            compute,
            device,
        )?),
        QuantMethod::Int8 => Box::new(Linear8bit::quantize(w, quant.llm_int8_threshold, compute, device)?),
    })
}

impl WeightProvider for CheckpointProvider<'_> {
    fn linear(
        &mut self,
        name: &str,
        weight_name: &str,
        out_features: usize,
        in_features: usize,
        device: &Device,
    ) -> Result<Box<dyn QuantLinear>> {
        self.progress.set_message(name.to_string());
        let shape = (out_features, in_features);
        let layer: Box<dyn QuantLinear> = match prequant::detect(self.weights, weight_name) {
            Stored::FourBit(state, qt) => {
                prequant::load_4bit(self.weights, weight_name, &state, qt, shape, self.compute, device)?
            }
            Stored::Int8 => prequant::load_int8(
                self.weights,
                weight_name,
                shape,
                self.quant.llm_int8_threshold,
                self.compute,
                device,
            )?,
            Stored::Dense => {
                // Quantization runs on the host; only the result moves to the device.
                let w = self.weights.tensor_shaped(weight_name, &[out_features, in_features], &Device::Cpu)?;
                quantize_or_dense(name, &w, self.quant, self.compute, device)?
            }
        };
        self.progress.inc(1);
        Ok(layer)
    }

    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        Ok(self.weights.tensor_shaped(name, shape, device)?.to_dtype(self.compute)?)
    }

    fn embedding(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = self.weights.tensor_shaped(name, shape, device)?;
        let stored = host_storage_dtype(t.dtype(), self.compute, device);
        convert_dtype(&t, stored)
    }
}

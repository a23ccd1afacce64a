//! Linear layers: one trait, three formats (dense, 4-bit, LLM.int8()), each with or without
//! LoRA adapters ([`LoraLinear`]).
//!
//! The model holds `Box<dyn QuantLinear>` for every projection and never asks which format it is.

use candle_core::{DType, Device, Tensor, D};
use half::{bf16, f16};
use nibble_core::{Error, Result};

use crate::functional::{self, Element, Packed4bit, QuantType};
use crate::kernels::{self, Matrix4bit, Precision, Rounding};

mod int8;
mod lora;
mod q8;

pub use int8::Linear8bit;
pub use lora::{AdapterSel, LoraLinear, LoraWeights};
pub use q8::BlockQ8Linear;

/// A linear layer `y = x W^T (+ b)` whatever the weight's storage.
pub trait QuantLinear: std::fmt::Debug + Send + Sync {
    /// Applies the layer to `x` of shape `[..., in_features]`, in the model dtype (transformers'
    /// `dtype`: the dtype of activations); returns `[..., out_features]` in that dtype, computed
    /// as transformers + bitsandbytes compute it (each format documents its roundings).
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// Input width.
    fn in_features(&self) -> usize;
    /// Output width.
    fn out_features(&self) -> usize;
    /// Bytes the layer keeps resident: weights plus quantization state.
    fn resident_bytes(&self) -> usize;
    /// A short name of the storage format (`dense`, `nf4`, `fp4`, `int8`).
    fn format(&self) -> &'static str;
    /// The layer's weight as a dense `[out, in]` tensor in `dtype` (dequantized when quantized).
    fn dequantized_weight(&self, dtype: DType) -> Result<Tensor>;
    /// The underlying storage, for saving in the bitsandbytes layout.
    fn storage(&self) -> LinearStorage<'_>;
    /// The bias `[out_features]` in the model dtype, when the layer has one (bitsandbytes keeps
    /// biases unquantized, so every format saves it as a plain tensor).
    fn bias(&self) -> Option<&Tensor>;
    /// [`QuantLinear::forward`] on host memory: `rows` rows of `in_features` f32 values in (each
    /// exactly representable in the model dtype), `rows x out_features` values out, rounded to
    /// the model dtype as `forward` rounds them. The model's decode step calls this a few
    /// hundred times per token, so the formats that can skip making tensors override it; the
    /// results are the same as `forward`'s.
    fn forward_f32(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        forward_f32_via_tensor(self, x, rows)
    }
    /// [`QuantLinear::forward`] with the LoRA adapters `sel` picks for each group of rows (a
    /// layer without adapters ignores it).
    fn forward_sel(&self, x: &Tensor, sel: AdapterSel<'_>) -> Result<Tensor> {
        let _ = sel;
        self.forward(x)
    }
    /// [`QuantLinear::forward_f32`] with the LoRA adapters `sel` picks.
    fn forward_f32_sel(&self, x: &[f32], rows: usize, sel: AdapterSel<'_>) -> Result<Vec<f32>> {
        let _ = sel;
        self.forward_f32(x, rows)
    }
    /// Bytes of LoRA adapter weights the layer holds (part of [`QuantLinear::resident_bytes`]).
    fn adapter_bytes(&self) -> usize {
        0
    }
}

/// [`QuantLinear::forward_f32`] through [`QuantLinear::forward`]: the default, and the fallback
/// of the formats that override it.
fn forward_f32_via_tensor<L: QuantLinear + ?Sized>(layer: &L, x: &[f32], rows: usize) -> Result<Vec<f32>> {
    let t = Tensor::from_slice(x, (rows, layer.in_features()), &Device::Cpu)?;
    Ok(layer.forward(&t)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// Calls `f` with the values of a contiguous f32/f16/bf16 tensor on the CPU, borrowed in place
/// (`None` for any other tensor).
fn with_host_values<R>(t: &Tensor, f: impl FnOnce(kernels::DenseWeight<'_>) -> R) -> Option<R> {
    if !t.device().is_cpu() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (Some((start, end)), candle_core::Storage::Cpu(cpu)) = (layout.contiguous_offsets(), &*storage) else {
        return None;
    };
    let values = match cpu {
        candle_core::CpuStorage::F32(v) => kernels::DenseWeight::F32(v.get(start..end)?),
        candle_core::CpuStorage::F16(v) => kernels::DenseWeight::F16(v.get(start..end)?),
        candle_core::CpuStorage::BF16(v) => kernels::DenseWeight::Bf16(v.get(start..end)?),
        _ => return None,
    };
    Some(f(values))
}

/// A layer's bias: the tensor in the model dtype (for saving and other devices) and its values
/// widened to f32 once (for the host kernels).
#[derive(Debug, Clone)]
pub(crate) struct Bias {
    tensor: Tensor,
    host: Vec<f32>,
}

impl Bias {
    /// Checks that `bias` is `[out]` and keeps its f32 values.
    pub(crate) fn new(bias: Option<Tensor>, out: usize) -> Result<Option<Self>> {
        let Some(tensor) = bias else { return Ok(None) };
        if tensor.dims() != [out] {
            return Err(Error::invalid_argument(
                "bias",
                format!("shape {:?} does not match a layer with {out} outputs", tensor.dims()),
            ));
        }
        let host = tensor.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1()?;
        Ok(Some(Self { tensor, host }))
    }

    /// Adds the bias, each value first rounded to `p` (the dtype the product runs in), to every
    /// row of `y`, in f32.
    pub(crate) fn add_rounded(&self, y: &mut [f32], p: Precision) {
        let n = self.host.len().max(1);
        for row in y.chunks_exact_mut(n) {
            row.iter_mut().zip(&self.host).for_each(|(y, &b)| *y += p.round(b));
        }
    }

    /// Adds the bias, cast to `dtype`, to a tensor `[..., out]` of `dtype`.
    pub(crate) fn add_tensor(&self, y: &Tensor, dtype: DType) -> Result<Tensor> {
        Ok(y.broadcast_add(&self.tensor.to_dtype(dtype)?.to_device(y.device())?)?)
    }

    /// Bytes held on the layer's device.
    pub(crate) fn bytes(&self) -> usize {
        self.tensor.elem_count() * self.tensor.dtype().size_in_bytes()
    }
}

/// Borrowed view of a layer's storage, for serialization.
#[derive(Debug)]
pub enum LinearStorage<'a> {
    /// A dense weight `[out, in]`.
    Dense(&'a Tensor),
    /// Packed 4-bit weight, with the dtype of the weight it was made from.
    FourBit(&'a Packed4bit, DType),
    /// Int8 codes `[out, in]` and per-row scales.
    Int8 {
        /// Row-major codes.
        cb: &'a [i8],
        /// Row absmax (SCB).
        scb: &'a [f32],
    },
    /// GGUF `Q8_0` blocks of an unquantized f32 layer: weight `i` is `scales[i / 32] * codes[i]`.
    Q8Blocks {
        /// One scale a 32-value block (an f16's exact value).
        scales: &'a [f32],
        /// Row-major codes `[out, in]`.
        codes: &'a [i8],
    },
}

/// Multiplies `x [..., in]` by `w^T` where `w` is `[out, in]`, flattening leading dims.
fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let (lead, inner) = dims.split_at(dims.len().saturating_sub(1));
    let in_f = inner.first().copied().unwrap_or(0);
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, in_f))?.matmul(&w.t()?)?;
    let mut out_shape = lead.to_vec();
    out_shape.push(w.dim(0)?);
    Ok(y.reshape(out_shape)?)
}

pub(crate) fn check_input(x: &Tensor, in_features: usize) -> Result<()> {
    let last = x.dim(D::Minus1)?;
    if last != in_features {
        return Err(Error::invalid_argument(
            "x",
            format!("linear layer expects {in_features} input features, got shape {:?}", x.dims()),
        ));
    }
    Ok(())
}

/// An unquantized layer, as `nn.Linear` under transformers' `from_pretrained(dtype=D)`: weight,
/// bias, activations and output all in the model dtype `D` (the weight's dtype). Products
/// accumulate in f32 and the output is rounded to `D` once, bias included, as torch's CPU
/// kernels do for 16-bit dtypes (oneDNN); for f32 that is plain f32 arithmetic.
#[derive(Debug, Clone)]
pub struct DenseLinear {
    weight: Tensor,
    bias: Option<Bias>,
}

impl DenseLinear {
    /// Wraps a weight `[out, in]` and an optional bias `[out]`, both in the model dtype.
    ///
    /// Errors: a weight that is not 2-D, or a bias whose shape is not `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        if weight.rank() != 2 {
            return Err(Error::invalid_argument("weight", format!("must be 2-D, got {:?}", weight.dims())));
        }
        let bias = Bias::new(bias, weight.dim(0)?)?;
        Ok(Self { weight, bias })
    }

    /// The weight tensor (for a tied head, the embedding's own storage).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    fn precision(&self) -> Precision {
        Precision::from_dtype(self.weight.dtype()).unwrap_or(Precision::F32)
    }

}

/// Activation rows up to which a dense layer on the CPU uses the streaming matrix-vector kernel
/// (decode, and a batched decode step: it reads each weight row once for all rows); more rows go
/// to candle's blocked matmul (prefill).
const DENSE_GEMV_MAX_ROWS: usize = 16;

impl DenseLinear {
    /// The host path: [`kernels::matmul_dense`] streams the weight once per row at memory speed,
    /// widening 16-bit weights in registers (exact), then the bias and one rounding to the model
    /// dtype. `None` where it does not apply (many rows, another device, a non-float weight).
    fn host_gemv(&self, x: &[f32], rows: usize) -> Result<Option<Vec<f32>>> {
        if rows > DENSE_GEMV_MAX_ROWS || !self.weight.device().is_cpu() {
            return Ok(None);
        }
        let (n_out, n_in) = (self.out_features(), self.in_features());
        let Some(y) = with_host_values(&self.weight, |w| kernels::matmul_dense(w, n_out, n_in, x, rows)) else {
            return Ok(None);
        };
        let mut y = y?;
        if let Some(b) = &self.bias {
            // The bias is already of the model dtype: rounding it to that dtype is exact.
            b.add_rounded(&mut y, self.precision());
        }
        self.precision().round_slice(&mut y);
        Ok(Some(y))
    }
}

impl QuantLinear for DenseLinear {
    fn forward_f32(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        match self.host_gemv(x, rows)? {
            Some(y) => Ok(y),
            None => forward_f32_via_tensor(self, x, rows),
        }
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_input(x, self.in_features())?;
        let dtype = self.weight.dtype();
        let dims = x.dims();
        let lead = &dims[..dims.len().saturating_sub(1)];
        let rows: usize = lead.iter().product();
        if x.device().is_cpu() {
            // Widening 16-bit activations to f32 is exact.
            let xf: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            if let Some(y) = self.host_gemv(&xf, rows)? {
                let mut out_shape = lead.to_vec();
                out_shape.push(self.out_features());
                return Ok(Tensor::from_vec(y, out_shape, &Device::Cpu)?.to_dtype(dtype)?);
            }
        }
        // f32 products of the widened weight (per call: prefill and logits), bias, one rounding.
        let y = matmul_t(&x.to_dtype(DType::F32)?, &convert_dtype(&self.weight, DType::F32)?)?;
        let y = match &self.bias {
            Some(b) => b.add_tensor(&y, DType::F32)?,
            None => y,
        };
        Ok(y.to_dtype(dtype)?)
    }
    fn in_features(&self) -> usize {
        self.weight.dims().get(1).copied().unwrap_or(0)
    }
    fn out_features(&self) -> usize {
        self.weight.dims().first().copied().unwrap_or(0)
    }
    fn resident_bytes(&self) -> usize {
        let b = self.bias.as_ref().map_or(0, Bias::bytes);
        self.weight.elem_count() * self.weight.dtype().size_in_bytes() + b
    }
    fn format(&self) -> &'static str {
        "dense"
    }
    fn dequantized_weight(&self, dtype: DType) -> Result<Tensor> {
        Ok(self.weight.to_dtype(dtype)?)
    }
    fn storage(&self) -> LinearStorage<'_> {
        LinearStorage::Dense(&self.weight)
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref().map(|b| &b.tensor)
    }
}

/// Calls `f` with a tensor's values as `T`: borrowed in place when the tensor already is a
/// contiguous CPU tensor of `T` (quantize-on-load then reads the checkpoint's buffer without a
/// copy), else converted.
pub(crate) fn with_values<T: Element + candle_core::WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    if t.device().is_cpu() && t.dtype() == T::DTYPE {
        let (storage, layout) = t.storage_and_layout();
        if let (Some((start, end)), candle_core::Storage::Cpu(cpu)) = (layout.contiguous_offsets(), &*storage) {
            if let Some(values) = cpu.as_slice::<T>()?.get(start..end) {
                return Ok(f(values));
            }
        }
    }
    if let Some(values) = convert_host::<T>(t) {
        return Ok(f(&values));
    }
    let values = t.to_dtype(T::DTYPE)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<T>()?;
    Ok(f(&values))
}

/// The values of a contiguous f32/f16/bf16 tensor on the CPU converted to `T`, in parallel
/// (`None` for other tensors). Each value goes through f32, as candle's `to_dtype` does, so the
/// results are the same; this only runs on every core instead of one, which matters when a
/// loader converts every weight of a model.
fn convert_host<T: Element>(t: &Tensor) -> Option<Vec<T>> {
    fn run<S: Element, T: Element>(src: &[S]) -> Vec<T> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        let mut out = vec![T::from_f32(0.0); src.len()];
        out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(o, s)| {
            for (o, s) in o.iter_mut().zip(s) {
                *o = T::from_f32(s.to_f32());
            }
        });
        out
    }
    with_host_values(t, |v| match v {
        kernels::DenseWeight::F32(v) => run::<f32, T>(v),
        kernels::DenseWeight::F16(v) => run::<f16, T>(v),
        kernels::DenseWeight::Bf16(v) => run::<bf16, T>(v),
    })
}

/// `t.to_dtype(dtype)`, converted on every core for f32/f16/bf16 tensors on the CPU (the same
/// values; a loader widening a whole model otherwise spends seconds in one thread).
///
/// Errors: candle's, for a conversion it cannot do.
pub fn convert_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        return Ok(t.clone());
    }
    let shape = t.dims().to_vec();
    let converted = match dtype {
        DType::F32 => convert_host::<f32>(t).map(|v| Tensor::from_vec(v, shape, &Device::Cpu)),
        DType::F16 => convert_host::<f16>(t).map(|v| Tensor::from_vec(v, shape, &Device::Cpu)),
        DType::BF16 => convert_host::<bf16>(t).map(|v| Tensor::from_vec(v, shape, &Device::Cpu)),
        _ => None,
    };
    match converted {
        Some(t) => Ok(t?),
        None => Ok(t.to_dtype(dtype)?),
    }
}

/// A 4-bit (NF4/FP4) layer in the bitsandbytes format.
///
/// bitsandbytes 0.50.2's CPU forward pass (`Linear4bit.forward` → `matmul_4bit` → `gemm_4bit`)
/// casts the activations to the compute dtype `C` (`bnb_4bit_compute_dtype`), dequantizes the
/// weight straight into `C` (`code * absmax` in f32, one rounding to `C`: the dtype the weight was
/// quantized from, `quant_state.dtype`, plays no part), multiplies in `C` and casts the output
/// back to the activations' dtype (the model dtype `D`). On the CPU this layer computes the same
/// weight values inside the fused [`kernels`] without materializing the weight; on other devices
/// it dequantizes and lets candle multiply.
#[derive(Debug)]
pub struct Linear4bit {
    q: Packed4bit,
    /// Dequantized per-block absmax, computed once (double quant makes it two lookups away).
    absmax: Vec<f32>,
    out_features: usize,
    in_features: usize,
    /// The dtype of the original weight (bitsandbytes' `quant_state.dtype`).
    weight_dtype: DType,
    compute_dtype: DType,
    /// The model dtype: activations come in and go out in it.
    act_dtype: DType,
    bias: Option<Bias>,
    device: Device,
}

impl Linear4bit {
    /// Quantizes a dense weight `[out, in]` (f32, f16 or bf16) for use on `device`.
    pub fn quantize(
        weight: &Tensor,
        quant_type: QuantType,
        blocksize: usize,
        double_quant: bool,
        compute_dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let q = match weight.dtype() {
            DType::F32 => with_values(weight, |v: &[f32]| functional::quantize_4bit(v, blocksize, quant_type, double_quant))??,
            DType::F16 => with_values(weight, |v: &[f16]| functional::quantize_4bit(v, blocksize, quant_type, double_quant))??,
            DType::BF16 => {
                with_values(weight, |v: &[bf16]| functional::quantize_4bit(v, blocksize, quant_type, double_quant))??
            }
            other => {
                return Err(Error::invalid_argument("weight", format!("cannot quantize a {other:?} tensor to 4 bits")))
            }
        };
        Self::from_packed(q, out_features, in_features, weight.dtype(), compute_dtype, device.clone())
    }

    /// Wraps already-packed data (a pre-quantized checkpoint).
    pub fn from_packed(
        q: Packed4bit,
        out_features: usize,
        in_features: usize,
        weight_dtype: DType,
        compute_dtype: DType,
        device: Device,
    ) -> Result<Self> {
        let numel = out_features.saturating_mul(in_features);
        if q.numel != numel || q.packed.len() != numel.div_ceil(2) {
            return Err(Error::quant_state(
                "weight",
                format!(
                    "{} packed bytes for {} values cannot hold a [{out_features}, {in_features}] weight",
                    q.packed.len(),
                    q.numel
                ),
            ));
        }
        if q.absmax.n_blocks() != numel.div_ceil(q.blocksize.max(1)) {
            return Err(Error::quant_state(
                "weight.absmax",
                format!("{} blocks of absmax, expected {}", q.absmax.n_blocks(), numel.div_ceil(q.blocksize.max(1))),
            ));
        }
        if !matches!(weight_dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::quant_state("weight", format!("quant_state dtype {weight_dtype:?} is not a float type")));
        }
        q.validate()?;
        let absmax = q.absmax.try_to_f32()?;
        let act_dtype = compute_dtype;
        Ok(Self { q, absmax, out_features, in_features, weight_dtype, compute_dtype, act_dtype, bias: None, device })
    }

    /// The model dtype the layer takes activations in and returns them in (transformers'
    /// `dtype`); by default the compute dtype.
    pub fn with_act_dtype(mut self, act_dtype: DType) -> Self {
        self.act_dtype = act_dtype;
        self
    }

    /// Gives the layer a bias `[out_features]` in the model dtype. As in bitsandbytes'
    /// `Linear4bit`, it is cast to the compute dtype and added to the product before the
    /// product's rounding to it (`linear(x, W, bias)`).
    pub fn with_bias(mut self, bias: Option<Tensor>) -> Result<Self> {
        self.bias = Bias::new(bias, self.out_features)?;
        Ok(self)
    }

    /// The packed data.
    pub fn packed(&self) -> &Packed4bit {
        &self.q
    }

    fn dequant_as<T: Element + candle_core::WithDType>(&self) -> Result<Tensor> {
        let mut out = vec![T::from_f32(0.0); self.q.numel];
        functional::dequantize_4bit_into(&self.q, &self.absmax, &mut out)?;
        Ok(Tensor::from_vec(out, (self.out_features, self.in_features), &Device::Cpu)?)
    }

    /// The weight dequantized into `dtype` (one rounding of `code * absmax`).
    fn dequant_into(&self, dtype: DType) -> Result<Tensor> {
        match dtype {
            DType::F16 => self.dequant_as::<f16>(),
            DType::BF16 => self.dequant_as::<bf16>(),
            _ => self.dequant_as::<f32>(),
        }
    }
}

impl Linear4bit {
    /// The rounding bitsandbytes applies to each weight (`dequantize_4bit` straight into the
    /// compute dtype), or `None` for a compute dtype the fused kernels do not produce (then the
    /// layer dequantizes and lets candle multiply).
    fn rounding(&self) -> Option<Rounding> {
        Some(Rounding { weight: Precision::F32, compute: Precision::from_dtype(self.compute_dtype)? })
    }

    /// The fused product on host values: activations rounded to the compute dtype, f32
    /// accumulation, the output rounded to the compute dtype and then to the model dtype.
    fn host_product(&self, x: &[f32], rows: usize, rounding: Rounding) -> Result<Vec<f32>> {
        let m = self.matrix(rounding)?;
        let mut y = if rounding.compute == Precision::F32 {
            kernels::matmul_4bit(&m, x, rows)?
        } else {
            let mut xc = x.to_vec();
            rounding.compute.round_slice(&mut xc);
            kernels::matmul_4bit(&m, &xc, rows)?
        };
        if let Some(b) = &self.bias {
            b.add_rounded(&mut y, rounding.compute);
        }
        rounding.compute.round_slice(&mut y);
        Precision::from_dtype(self.act_dtype).unwrap_or(Precision::F32).round_slice(&mut y);
        Ok(y)
    }

    /// The packed weight as the fused kernels read it, with the roundings `rounding`.
    fn matrix(&self, rounding: Rounding) -> Result<Matrix4bit<'_>> {
        Matrix4bit::new(
            &self.q.packed,
            &self.absmax,
            self.out_features,
            self.in_features,
            self.q.blocksize,
            self.q.quant_type,
            rounding,
        )
    }

    /// The CPU forward pass: the fused kernels read the packed weight directly
    /// ([`Linear4bit::host_product`]); f32 activations are read in place.
    fn forward_fused(&self, x: &Tensor, rounding: Rounding) -> Result<Tensor> {
        let dims = x.dims();
        let lead = &dims[..dims.len().saturating_sub(1)];
        let rows: usize = lead.iter().product();
        let y = with_values(x, |xf: &[f32]| self.host_product(xf, rows, rounding))??;
        let mut out_shape = lead.to_vec();
        out_shape.push(self.out_features);
        Ok(Tensor::from_vec(y, out_shape, &Device::Cpu)?.to_dtype(self.act_dtype)?)
    }
}

impl QuantLinear for Linear4bit {
    fn forward_f32(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        match self.rounding() {
            Some(r) if self.device.is_cpu() => self.host_product(x, rows, r),
            _ => forward_f32_via_tensor(self, x, rows),
        }
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_input(x, self.in_features)?;
        match self.rounding() {
            Some(r) if self.device.is_cpu() && x.device().is_cpu() => self.forward_fused(x, r),
            _ => {
                let w = self.dequant_into(self.compute_dtype)?.to_device(&self.device)?;
                let y = matmul_t(&x.to_dtype(self.compute_dtype)?, &w)?;
                let y = match &self.bias {
                    Some(b) => b.add_tensor(&y, self.compute_dtype)?,
                    None => y,
                };
                Ok(y.to_dtype(self.act_dtype)?)
            }
        }
    }
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn resident_bytes(&self) -> usize {
        let absmax = match &self.q.absmax {
            functional::Absmax::F32(v) => v.len() * 4,
            functional::Absmax::Double(d) => d.codes.len() + d.nested_absmax.len() * 4 + 4,
        };
        self.q.packed.len() + absmax + self.bias.as_ref().map_or(0, Bias::bytes)
    }
    fn format(&self) -> &'static str {
        match self.q.quant_type {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }
    fn dequantized_weight(&self, dtype: DType) -> Result<Tensor> {
        // bitsandbytes' `dequantize_4bit(W, quant_state)`: into `quant_state.dtype`.
        Ok(self.dequant_into(self.weight_dtype)?.to_dtype(dtype)?)
    }
    fn storage(&self) -> LinearStorage<'_> {
        LinearStorage::FourBit(&self.q, self.weight_dtype)
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref().map(|b| &b.tensor)
    }
}


//! The LLM.int8() layer.

use candle_core::{DType, Device, Tensor};
use half::f16;
use nibble_core::{Error, Result};

use super::{check_input, with_values, Bias, LinearStorage, QuantLinear};
use crate::functional;
use crate::kernels::{self, Precision};

/// bitsandbytes' `1 / (127 * 127)`, the int32 accumulator's scale in `int8_mm_dequant`.
const INT8_MM_SCALE: f32 = 6.200_124e-5;

/// An LLM.int8() layer: int8 row-quantized weights; at run time the activations are quantized
/// row-wise too, except the columns holding outliers (|x| >= threshold), which are multiplied in
/// the activations' own dtype against the dequantized weight columns, as bitsandbytes'
/// mixed-precision decomposition does.
///
/// The results are those of bitsandbytes 0.50.2's CPU `MatMul8bitLt.forward` for activations
/// `A` of dtype D (f32, bf16 or f16): `A` is quantized from its f16 copy; the int32 product is
/// scaled in f32 as `(acc * (row_stats * col_stats)) * 6.200124e-05` and rounded to D once; the
/// outlier columns of the original `A` are multiplied against the weight columns
/// `int8_vectorwise_dequant(CB[:, cols], SCB).to(D)`, summed in f32 with fused multiply-adds,
/// added to the rounded main product in f32 and rounded to D once more. That last step is how
/// torch's CPU `addmm` (oneDNN for bf16/f16, MKL for f32) turned out to compute it for the
/// SmolLM2 references in `tests/fixtures/int8-layer`: bit-equal there for all three dtypes.
/// One exception, seen on real SmolLM2 activations (`tests/fixtures/int8-model`): in f32 with a
/// single outlier column, MKL computes `fma(x, b, main)`, one rounding, not `main + x * b`.
/// Known residual, on the 210 layers of a 256-token SmolLM2 run: with many outlier columns the
/// libraries' blocked sums differ from this order in the last bit of a few values (f16: one layer
/// with 527 columns, 52 of 147,456 values; bf16: the layers with 10 or more columns, up to 29
/// values; f32: one layer with 531 columns, most values).
#[derive(Debug)]
pub struct Linear8bit {
    cb: Vec<i8>,
    scb: Vec<f32>,
    out_features: usize,
    in_features: usize,
    threshold: f32,
    /// The activation dtype D the layer was built for (the model's dtype): what
    /// [`QuantLinear::forward_f32`] rounds to. [`QuantLinear::forward`] follows its input's dtype.
    act_dtype: DType,
    bias: Option<Bias>,
    device: Device,
}

impl Linear8bit {
    /// Quantizes a dense weight `[out, in]` row-wise from its f16 copy, as bitsandbytes'
    /// `Int8Params` does (weights are quantized with no outlier threshold; `threshold` applies to
    /// activations). `act_dtype` is the activations' dtype D (f32, bf16 or f16).
    ///
    /// Errors: `weight` not 2-D, or `act_dtype` not one of f32 / bf16 / f16.
    pub fn quantize(weight: &Tensor, threshold: f32, act_dtype: DType, device: &Device) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let q =
            with_values(weight, |w16: &[f16]| functional::int8_vectorwise_quant(w16, out_features, in_features, 0.0))??;
        Self::from_parts(q.cb, q.scb, out_features, in_features, threshold, act_dtype, device.clone())
    }

    /// Wraps pre-quantized codes and row scales (a bitsandbytes 8-bit checkpoint's `weight` and
    /// `SCB`); `act_dtype` as for [`Linear8bit::quantize`].
    ///
    /// Errors: sizes that do not match `[out_features, in_features]`, or an unsupported `act_dtype`.
    pub fn from_parts(
        cb: Vec<i8>,
        scb: Vec<f32>,
        out_features: usize,
        in_features: usize,
        threshold: f32,
        act_dtype: DType,
        device: Device,
    ) -> Result<Self> {
        if cb.len() != out_features.saturating_mul(in_features) {
            return Err(Error::quant_state(
                "weight",
                format!("{} int8 values cannot hold a [{out_features}, {in_features}] weight", cb.len()),
            ));
        }
        if scb.len() != out_features {
            return Err(Error::quant_state("SCB", format!("{} row scales for {out_features} rows", scb.len())));
        }
        check_act_dtype(act_dtype)?;
        Ok(Self { cb, scb, out_features, in_features, threshold, act_dtype, bias: None, device })
    }

    /// Gives the layer a bias `[out_features]` in the model dtype. bitsandbytes'
    /// `int8_mm_dequant` adds it in f32 to the scaled int32 product, before the rounding to the
    /// activations' dtype (and before the outlier columns are added).
    pub fn with_bias(mut self, bias: Option<Tensor>) -> Result<Self> {
        self.bias = Bias::new(bias, self.out_features)?;
        Ok(self)
    }

    /// The activation dtype D the layer was built for.
    pub fn act_dtype(&self) -> DType {
        self.act_dtype
    }

    /// The forward pass on host memory for activations of dtype `dt`: `x` holds `rows` rows of
    /// D-representable values; returns `[rows, out]` values rounded to `dt`, in f32.
    fn forward_host(&self, x: &[f32], rows: usize, dt: DType) -> Result<Vec<f32>> {
        use rayon::prelude::*;
        let (n_in, n_out) = (self.in_features, self.out_features);
        if rows.checked_mul(n_in) != Some(x.len()) {
            return Err(Error::invalid_argument("x", format!("has {} values, which is not {rows} x {n_in}", x.len())));
        }
        let p = precision(dt)?;
        let round = |v: f32| p.round(v);
        // bitsandbytes quantizes `A.to(float16)`; f32 -> f16 of the exact value is that cast.
        let x16: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let qa = functional::int8_vectorwise_quant(&x16, rows, n_in, self.threshold)?;
        let cols: Vec<usize> = qa.outlier_cols.unwrap_or_default();
        // Weight columns holding outliers, dequantized as bitsandbytes' int8_vectorwise_dequant
        // does (same operation order) and rounded to D (`.to(A.dtype)`).
        let sub_b: Vec<f32> = (0..n_out)
            .flat_map(|o| {
                let row = self.cb.get(o * n_in..(o + 1) * n_in).unwrap_or(&[]);
                let s = self.scb.get(o).copied().unwrap_or(0.0);
                cols.iter().map(move |&c| round(f32::from(row.get(c).copied().unwrap_or(0)) * s * functional::INV_127))
            })
            .collect();
        // Integer accumulation is exact, so the SIMD kernel's sums equal the scalar definition.
        let acc_all = kernels::int8_matmul_i32(&qa.cb, rows, &self.cb, n_out, n_in)?;
        // torch's f32 addmm of a single column (k = 1) rounds once, unlike its k > 1 sums.
        let single_f32 = dt == DType::F32 && cols.len() == 1;
        let bias = self.bias.as_ref().map(|b| b.host.as_slice());
        let mut out = vec![0.0f32; rows * n_out];
        out.par_chunks_mut(n_out)
            .zip(acc_all.par_chunks(n_out))
            .zip(x.par_chunks(n_in))
            .zip(qa.scb.par_iter())
            .for_each(|(((out_row, acc_row), xa), &sa)| {
                for (o, ((y, &acc), &sb)) in out_row.iter_mut().zip(acc_row).zip(&self.scb).enumerate() {
                    // int8_mm_dequant: f32, this association, then `.to(A.dtype)`.
                    let scaled = acc as f32 * (sa * sb) * INT8_MM_SCALE;
                    let main = round(bias.and_then(|b| b.get(o)).map_or(scaled, |b| scaled + b));
                    *y = if cols.is_empty() {
                        main
                    } else if single_f32 {
                        // f32 with one outlier column: MKL's addmm fuses the one product into
                        // the main product, `fma(x, b, main)` (a single rounding).
                        let (c, b) = (cols[0], sub_b.get(o).copied().unwrap_or(0.0));
                        xa.get(c).copied().unwrap_or(0.0).mul_add(b, main)
                    } else {
                        // addmm: the outlier products summed in f32 (fused multiply-adds, column
                        // order), added to the main product, one rounding to D.
                        let sb_cols = sub_b.get(o * cols.len()..(o + 1) * cols.len()).unwrap_or(&[]);
                        let extra = cols
                            .iter()
                            .zip(sb_cols)
                            .fold(0.0f32, |s, (&c, &b)| xa.get(c).copied().unwrap_or(0.0).mul_add(b, s));
                        round(main + extra)
                    };
                }
            });
        Ok(out)
    }
}

/// The activation dtypes bitsandbytes' int8 layer is used with.
fn check_act_dtype(dt: DType) -> Result<()> {
    precision(dt).map(|_| ())
}

/// The rounding to `dt` (nearest even, as torch's `.to(dtype)`) the layer's outputs go through.
fn precision(dt: DType) -> Result<Precision> {
    Precision::from_dtype(dt).ok_or_else(|| {
        Error::invalid_argument("dtype", format!("LLM.int8() activations must be f32, bf16 or f16, not {dt:?}"))
    })
}

impl QuantLinear for Linear8bit {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_input(x, self.in_features)?;
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        // bitsandbytes computes in the input's dtype (`A.dtype`); f32 holds its values exactly.
        let dt = x.dtype();
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        let y = self.forward_host(&xs, rows, dt)?;
        let mut out_shape = dims[..dims.len() - 1].to_vec();
        out_shape.push(self.out_features);
        // The values are already rounded to `dt`, so this cast is exact.
        Ok(Tensor::from_vec(y, out_shape, &Device::Cpu)?.to_dtype(dt)?.to_device(&self.device)?)
    }
    fn forward_f32(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.forward_host(x, rows, self.act_dtype)
    }
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn resident_bytes(&self) -> usize {
        self.cb.len() + self.scb.len() * 4 + self.bias.as_ref().map_or(0, Bias::bytes)
    }
    fn format(&self) -> &'static str {
        "int8"
    }
    fn dequantized_weight(&self, dtype: DType) -> Result<Tensor> {
        let w = functional::int8_vectorwise_dequant(&self.cb, &self.scb, self.out_features, self.in_features)?;
        Ok(Tensor::from_vec(w, (self.out_features, self.in_features), &Device::Cpu)?.to_dtype(dtype)?)
    }
    fn storage(&self) -> LinearStorage<'_> {
        LinearStorage::Int8 { cb: &self.cb, scb: &self.scb }
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref().map(|b| &b.tensor)
    }
}

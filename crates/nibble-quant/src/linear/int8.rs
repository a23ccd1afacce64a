//! The LLM.int8() layer.

use candle_core::{DType, Device, Tensor};
use half::f16;
use nibble_core::{Error, Result};

use super::{check_input, with_values, LinearStorage, QuantLinear};
use crate::functional;
use crate::kernels;

/// bitsandbytes' `1 / (127 * 127)`, the int32 accumulator's scale in `int8_mm_dequant`.
const INT8_MM_SCALE: f32 = 6.200_124e-5;

/// An LLM.int8() layer: int8 row-quantized weights; at run time the activations are quantized
/// row-wise too, except the columns holding outliers (|x| >= threshold), which are multiplied in
/// 16-bit against the dequantized weight columns, as bitsandbytes' mixed-precision decomposition does.
#[derive(Debug)]
pub struct Linear8bit {
    cb: Vec<i8>,
    scb: Vec<f32>,
    out_features: usize,
    in_features: usize,
    threshold: f32,
    compute_dtype: DType,
    device: Device,
}

impl Linear8bit {
    /// Quantizes a dense weight `[out, in]` row-wise (bitsandbytes quantizes weights with no
    /// outlier threshold; the threshold applies to activations).
    pub fn quantize(weight: &Tensor, threshold: f32, compute_dtype: DType, device: &Device) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let q = with_values(weight, |w16: &[f16]| functional::int8_vectorwise_quant(w16, out_features, in_features, 0.0))??;
        Self::from_parts(q.cb, q.scb, out_features, in_features, threshold, compute_dtype, device.clone())
    }

    /// Wraps pre-quantized codes and row scales (a bitsandbytes 8-bit checkpoint's `weight` and `SCB`).
    pub fn from_parts(
        cb: Vec<i8>,
        scb: Vec<f32>,
        out_features: usize,
        in_features: usize,
        threshold: f32,
        compute_dtype: DType,
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
        Ok(Self { cb, scb, out_features, in_features, threshold, compute_dtype, device })
    }

    /// The forward pass on host memory; returns `[rows, out]` as f16 values, as bitsandbytes does.
    fn forward_host(&self, x16: &[f16], rows: usize) -> Result<Vec<f16>> {
        use rayon::prelude::*;
        let (n_in, n_out) = (self.in_features, self.out_features);
        let qa = functional::int8_vectorwise_quant(x16, rows, n_in, self.threshold)?;
        let cols: Vec<usize> = qa.outlier_cols.clone().unwrap_or_default();
        // Weight columns holding outliers, dequantized and rounded to f16 as bitsandbytes does.
        let sub_b: Vec<f32> = (0..n_out)
            .flat_map(|o| {
                let row = &self.cb[o * n_in..(o + 1) * n_in];
                let s = self.scb[o];
                // Same operation order as bitsandbytes' int8_vectorwise_dequant.
                cols.iter().map(move |&c| f16::from_f32((f32::from(row[c]) * s) * functional::INV_127).to_f32())
            })
            .collect();
        // Integer accumulation is exact, so the SIMD kernel's sums equal the scalar definition.
        let acc_all = kernels::int8_matmul_i32(&qa.cb, rows, &self.cb, n_out, n_in)?;
        let mut out = vec![f16::ZERO; rows * n_out];
        out.par_chunks_mut(n_out).zip(acc_all.par_chunks(n_out)).enumerate().for_each(|(r, (out_row, acc_row))| {
            let sa = qa.scb[r];
            let xa = &x16[r * n_in..(r + 1) * n_in];
            for (o, (y, &acc)) in out_row.iter_mut().zip(acc_row).enumerate() {
                let main = f16::from_f32(acc as f32 * (sa * self.scb[o]) * INT8_MM_SCALE);
                if cols.is_empty() {
                    *y = main;
                } else {
                    let sb = &sub_b[o * cols.len()..(o + 1) * cols.len()];
                    let extra: f32 = cols.iter().zip(sb).map(|(&c, &b)| xa[c].to_f32() * b).sum();
                    *y = f16::from_f32(main.to_f32() + extra);
                }
            }
        });
        Ok(out)
    }
}

impl QuantLinear for Linear8bit {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_input(x, self.in_features)?;
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x16 = x.to_dtype(DType::F16)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f16>()?;
        let y = self.forward_host(&x16, rows)?;
        let mut out_shape = dims[..dims.len() - 1].to_vec();
        out_shape.push(self.out_features);
        Ok(Tensor::from_vec(y, out_shape, &Device::Cpu)?.to_dtype(self.compute_dtype)?.to_device(&self.device)?)
    }
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn resident_bytes(&self) -> usize {
        self.cb.len() + self.scb.len() * 4
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
}


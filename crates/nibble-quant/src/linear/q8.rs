//! A linear layer whose weight stays in GGUF's `Q8_0` blocks ([`kernels::matmul_q8_blocks`]).

use candle_core::{DType, Device, Tensor};
use nibble_core::{Error, Result};

use super::{check_input, Bias, LinearStorage, QuantLinear};
use crate::kernels::{self, Q8_BLOCK};

/// `y = x W^T (+ b)` for an f32 model whose unquantized weight came from a GGUF `Q8_0` tensor:
/// the values are `scale * code` (exact in f32, as transformers' GGUF loader dequantizes them),
/// held as those codes and scales (8.5 bits a weight instead of 32) and multiplied on the fly,
/// so the products are a dense f32 layer's up to the order of the sums. CPU only: the loader
/// makes one only for a layer placed there.
#[derive(Debug)]
pub struct BlockQ8Linear {
    /// One f16 scale a block, as its exact f32 value.
    scales: Vec<f32>,
    /// `[out, in]` row-major.
    codes: Vec<i8>,
    out_features: usize,
    in_features: usize,
    bias: Option<Bias>,
}

impl BlockQ8Linear {
    /// A layer of `out_features x in_features` from its codes (row-major) and one scale per 32
    /// codes of a row, with an optional f32 bias `[out]`.
    ///
    /// Errors: `in_features` not a multiple of 32, lengths that do not match the shape, a
    /// non-finite scale, or a bias of the wrong shape.
    pub fn new(scales: Vec<f32>, codes: Vec<i8>, out_features: usize, in_features: usize, bias: Option<Tensor>) -> Result<Self> {
        let ok = in_features.is_multiple_of(Q8_BLOCK)
            && out_features.checked_mul(in_features) == Some(codes.len())
            && codes.len() / Q8_BLOCK == scales.len();
        if !ok {
            return Err(Error::invalid_argument(
                "q8_0 weight",
                format!("{} codes and {} scales for {out_features} x {in_features}", codes.len(), scales.len()),
            ));
        }
        if scales.iter().any(|s| !s.is_finite()) {
            return Err(Error::invalid_argument("q8_0 weight", "a block scale is not finite"));
        }
        let bias = Bias::new(bias, out_features)?;
        Ok(Self { scales, codes, out_features, in_features, bias })
    }
}

/// The weights `scale * code` of whole blocks (exact in f32), in order.
fn values(codes: &[i8], scales: &[f32]) -> Vec<f32> {
    codes.chunks_exact(Q8_BLOCK).zip(scales).flat_map(|(c, &s)| c.iter().map(move |&q| s * f32::from(q))).collect()
}

/// Activation rows up to which the matrix-vector kernel runs (a decode step, a batched one);
/// more rows (scoring a prompt) go through [`BlockQ8Linear::blocked`].
const MATVEC_MAX_ROWS: usize = 16;

/// Output rows dequantized at a time by [`BlockQ8Linear::blocked`] (a few MiB of f32).
const BLOCKED_ROWS: usize = 1024;

impl BlockQ8Linear {
    /// Many activation rows: [`BLOCKED_ROWS`] weight rows at a time dequantized to f32 (the exact
    /// values) and multiplied by candle's blocked matmul, so the f32 matrix never exists whole.
    fn blocked(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (n_out, n_in) = (self.out_features, self.in_features);
        let xt = Tensor::from_slice(x, (rows, n_in), &Device::Cpu)?;
        let mut y = vec![0.0f32; rows * n_out];
        let per_row = n_in / Q8_BLOCK;
        for o0 in (0..n_out).step_by(BLOCKED_ROWS) {
            let n = BLOCKED_ROWS.min(n_out - o0);
            let codes = self.codes.get(o0 * n_in..(o0 + n) * n_in).unwrap_or(&[]);
            let scales = self.scales.get(o0 * per_row..(o0 + n) * per_row).unwrap_or(&[]);
            let w = Tensor::from_vec(values(codes, scales), (n, n_in), &Device::Cpu)?;
            let part: Vec<f32> = xt.matmul(&w.t()?)?.flatten_all()?.to_vec1()?;
            for (yr, pr) in y.chunks_exact_mut(n_out).zip(part.chunks_exact(n.max(1))) {
                if let Some(dst) = yr.get_mut(o0..o0 + n) {
                    dst.copy_from_slice(pr);
                }
            }
        }
        Ok(y)
    }
}

impl QuantLinear for BlockQ8Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_input(x, self.in_features)?;
        let dims = x.dims();
        let lead = &dims[..dims.len().saturating_sub(1)];
        let rows: usize = lead.iter().product();
        let xf: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let y = self.forward_f32(&xf, rows)?;
        let mut shape = lead.to_vec();
        shape.push(self.out_features);
        Ok(Tensor::from_vec(y, shape, &Device::Cpu)?.to_dtype(x.dtype())?)
    }
    fn forward_f32(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut y = if rows <= MATVEC_MAX_ROWS {
            kernels::matmul_q8_blocks(&self.scales, &self.codes, self.out_features, self.in_features, x, rows)?
        } else {
            self.blocked(x, rows)?
        };
        if let Some(b) = &self.bias {
            b.add_rounded(&mut y, kernels::Precision::F32);
        }
        Ok(y)
    }
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn resident_bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len() + self.bias.as_ref().map_or(0, Bias::bytes)
    }
    fn format(&self) -> &'static str {
        "q8_0"
    }
    fn dequantized_weight(&self, dtype: DType) -> Result<Tensor> {
        let w = values(&self.codes, &self.scales);
        Ok(Tensor::from_vec(w, (self.out_features, self.in_features), &Device::Cpu)?.to_dtype(dtype)?)
    }
    fn storage(&self) -> LinearStorage<'_> {
        LinearStorage::Q8Blocks { scales: &self.scales, codes: &self.codes }
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref().map(|b| &b.tensor)
    }
}

//! LoRA on any linear format, unmerged: `y = base(x) + scale · B(A x)`, as PEFT's `lora.Linear`
//! (and its bitsandbytes variants) compute it. The base runs as it always does (the fused 4-bit
//! and int8 kernels untouched, never dequantized for the adapter); A and B run in the adapter
//! dtype. Several adapters can sit on one layer, and each group of rows (each sequence of a
//! batch) picks its own ([`AdapterSel`]).

use std::borrow::Cow;

use candle_core::{DType, Device, Tensor};
use nibble_core::{Error, Result};

use super::{LinearStorage, QuantLinear};
use crate::kernels::{self, Precision};

/// Which adapter the rows of an activation run with.
#[derive(Debug, Clone, Copy, Default)]
pub enum AdapterSel<'a> {
    /// Every row with the first adapter loaded (PEFT's active adapter), or the base alone when
    /// none is.
    #[default]
    Active,
    /// The rows split into `groups.len()` equal runs (the sequences of a batch, in order); run
    /// `i` uses adapter `groups[i]`, `None` the base alone.
    Groups(&'a [Option<usize>]),
}

/// A matrix's values on the host: borrowed, or copied back from a device.
type Values<'a> = Cow<'a, [f32]>;

/// One adapter's matrices on one layer: `lora_A` `[r, in]`, `lora_B` `[out, r]` and the scale.
#[derive(Debug)]
pub struct LoraWeights {
    /// On the CPU: `lora_A` row-major and `lora_B` transposed (`[r, out]`: a decode row's update
    /// is `r` scaled rows of it added up), as f32 values of the adapter dtype.
    host: Option<(Vec<f32>, Vec<f32>)>,
    /// On another device: `lora_A` and `lora_B` in the adapter dtype.
    on_device: Option<(Tensor, Tensor)>,
    r: usize,
    n_in: usize,
    n_out: usize,
    scale: f32,
    dtype: DType,
}

impl LoraWeights {
    /// `a` `[r, in]` and `b` `[out, r]` (any float dtype), held in `dtype` (the adapter dtype:
    /// PEFT casts the adapter to a float base weight's dtype and leaves it in f32 over a
    /// quantized one) on `device`, with the factor `scale` (`alpha / r`, or `alpha / √r`).
    pub fn new(a: &Tensor, b: &Tensor, scale: f64, dtype: DType, device: &Device) -> Result<Self> {
        let (r, n_in) = a.dims2()?;
        let (n_out, rb) = b.dims2()?;
        if rb != r {
            return Err(Error::invalid_argument("lora_B", format!("has {rb} columns for lora_A's {r} rows")));
        }
        if Precision::from_dtype(dtype).is_none() {
            return Err(Error::invalid_argument("dtype", format!("{dtype:?} is not an adapter dtype")));
        }
        let values = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(dtype)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?)
        };
        let (host, on_device) = if device.is_cpu() {
            (Some((values(a)?, values(&b.t()?.contiguous()?)?)), None)
        } else {
            (None, Some((a.to_dtype(dtype)?.to_device(device)?, b.to_dtype(dtype)?.to_device(device)?)))
        };
        // torch multiplies by a Python float in the tensor's op math: f32.
        Ok(Self { host, on_device, r, n_in, n_out, scale: scale as f32, dtype })
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.r
    }

    /// Bytes held: on the CPU both matrices as f32, on another device in the adapter dtype.
    pub fn bytes(&self) -> usize {
        let n = self.r * (self.n_in + self.n_out);
        if self.host.is_some() {
            n * 4
        } else {
            n * self.dtype.size_in_bytes()
        }
    }

    fn precision(&self) -> Precision {
        Precision::from_dtype(self.dtype).unwrap_or(Precision::F32)
    }

    /// `lora_A` and `lora_B` transposed as host values (copied back from a device if need be).
    fn host_values(&self) -> Result<(Values<'_>, Values<'_>)> {
        match (&self.host, &self.on_device) {
            (Some((a, bt)), _) => Ok((Cow::Borrowed(a), Cow::Borrowed(bt))),
            (None, Some((a, b))) => {
                let v = |t: &Tensor| -> Result<Vec<f32>> {
                    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?.flatten_all()?.to_vec1()?)
                };
                Ok((Cow::Owned(v(a)?), Cow::Owned(v(&b.t()?)?)))
            }
            (None, None) => Err(Error::invalid_argument("adapter", "holds no matrices")),
        }
    }

    /// Adds `(scale · B(A x)).to(act)` to `y` (`rows x out`, values of the model dtype `act`)
    /// for `rows` rows of `x`, rounding each sum to `act` (`result + output`). Each of `A x`,
    /// `B (A x)` and the product with the scale is rounded to the adapter dtype, as torch's
    /// `nn.Linear` and multiply return it. The work is split across the kernel team: `A x` by
    /// rows, the update by runs of outputs (a decode row) or of rows (a prefill).
    fn add_into(&self, x: &[f32], y: &mut [f32], rows: usize, act: Precision) -> Result<()> {
        let (a, bt) = self.host_values()?;
        let (n_in, n_out, r) = (self.n_in, self.n_out, self.r);
        if x.len() != rows * n_in || y.len() != rows * n_out || n_in == 0 || n_out == 0 || r == 0 {
            return Err(Error::invalid_argument("x", format!("{} values in, {} out, for {rows} rows", x.len(), y.len())));
        }
        let p = self.precision();
        let mut h = vec![0f32; rows * r];
        kernels::for_each_chunk_mut(&mut h, r * H_ROWS_PER_TASK, |t, hc| {
            let mut xr = Vec::new();
            for (j, hr) in hc.chunks_exact_mut(r).enumerate() {
                let row = t * H_ROWS_PER_TASK + j;
                let xs = &x[row * n_in..(row + 1) * n_in];
                // The activations are of the model dtype, never wider than the adapter's: the
                // cast to the adapter dtype is exact except for a narrower adapter.
                let xs = if p == Precision::F32 {
                    xs
                } else {
                    xr.clear();
                    xr.extend(xs.iter().map(|&v| p.round(v)));
                    &xr
                };
                for (hk, ak) in hr.iter_mut().zip(a.chunks_exact(n_in)) {
                    *hk = kernels::dot_f32(xs, ak);
                }
                p.round_slice(hr);
            }
        });
        // A decode row's update is a few thousand multiply-adds: below one task of the team
        // it runs inline (a hand-off would cost more than it saves).
        let per_task = if rows == 1 {
            kernels::chunk_len(n_out, kernels::min_macs_per_matvec_task().div_ceil(r))
        } else {
            n_out * UPDATE_ROWS_PER_TASK
        };
        kernels::for_each_chunk_mut(y, per_task, |t, yc| {
            let mut start = t * per_task;
            let mut acc = Vec::new();
            let mut rest = yc;
            while !rest.is_empty() {
                let (row, o0) = (start / n_out, start % n_out);
                let len = (n_out - o0).min(rest.len());
                let (seg, tail) = rest.split_at_mut(len);
                acc.clear();
                acc.resize(len, 0f32);
                // `B h` as r passes over B's columns, vectorized along the outputs.
                for (&hk, bk) in h[row * r..(row + 1) * r].iter().zip(bt.chunks_exact(n_out)) {
                    acc.iter_mut().zip(&bk[o0..o0 + len]).for_each(|(d, &b)| *d += hk * b);
                }
                finish(seg, &acc, self.scale, p, act);
                start += len;
                rest = tail;
            }
        });
        Ok(())
    }

    /// The dense update `scale · B A` (`[out, in]`, f32), as PEFT's `get_delta_weight` computes
    /// it: the product in f32, scaled, rounded to the adapter dtype.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let (a, bt) = self.host_values()?;
        let p = self.precision();
        let b = Tensor::from_slice(&bt, (self.r, self.n_out), &Device::Cpu)?.t()?;
        let a = Tensor::from_slice(&a, (self.r, self.n_in), &Device::Cpu)?;
        let mut d: Vec<f32> = b.matmul(&a)?.flatten_all()?.to_vec1()?;
        d.iter_mut().for_each(|v| *v = p.round(*v * self.scale));
        Ok(Tensor::from_vec(d, (self.n_out, self.n_in), &Device::Cpu)?)
    }
}

/// `y += (scale · d).to(act)`, rounded to `act` (`result + output`), with `d` and the product
/// with the scale rounded to the adapter precision `p` first. Each pair of precisions gets its own
/// loop with the roundings inlined, so that every one vectorizes (this runs over every output of
/// every adapted layer).
fn finish(y: &mut [f32], d: &[f32], scale: f32, p: Precision, act: Precision) {
    #[inline(always)]
    fn run(y: &mut [f32], d: &[f32], scale: f32, p: impl Fn(f32) -> f32, a: impl Fn(f32) -> f32) {
        y.iter_mut().zip(d).for_each(|(y, &d)| *y = a(*y + a(p(p(d) * scale))));
    }
    let keep = |v: f32| v;
    let bf16 = kernels::round_bf16;
    let f16 = |v: f32| Precision::F16.round(v);
    match (p, act) {
        (Precision::F32, Precision::F32) => run(y, d, scale, keep, keep),
        (Precision::F32, Precision::Bf16) => run(y, d, scale, keep, bf16),
        (Precision::F32, Precision::F16) => run(y, d, scale, keep, f16),
        (Precision::Bf16, Precision::F32) => run(y, d, scale, bf16, keep),
        (Precision::Bf16, Precision::Bf16) => run(y, d, scale, bf16, bf16),
        (Precision::Bf16, Precision::F16) => run(y, d, scale, bf16, f16),
        (Precision::F16, Precision::F32) => run(y, d, scale, f16, keep),
        (Precision::F16, Precision::Bf16) => run(y, d, scale, f16, bf16),
        (Precision::F16, Precision::F16) => run(y, d, scale, f16, f16),
    }
}

/// Rows of `A x` per task of the kernel team.
const H_ROWS_PER_TASK: usize = 16;
/// Rows per task of a prefill's update.
const UPDATE_ROWS_PER_TASK: usize = 8;

/// A linear layer with LoRA adapters on it, unmerged.
#[derive(Debug)]
pub struct LoraLinear {
    base: Box<dyn QuantLinear>,
    /// By adapter index; `None` where that adapter leaves this layer alone.
    adapters: Vec<Option<LoraWeights>>,
    /// The model dtype: the base's output and the sum are of it.
    act: Precision,
}

impl LoraLinear {
    /// Puts `adapters` (by adapter index) on `base`, whose activations are of `act_dtype`.
    ///
    /// Errors: an adapter whose matrices do not fit the base's shape.
    pub fn new(base: Box<dyn QuantLinear>, adapters: Vec<Option<LoraWeights>>, act_dtype: DType) -> Result<Self> {
        for w in adapters.iter().flatten() {
            if w.n_in != base.in_features() || w.n_out != base.out_features() {
                return Err(Error::invalid_argument(
                    "adapter",
                    format!("rank-{} matrices do not fit a [{}, {}] layer", w.r, base.out_features(), base.in_features()),
                ));
            }
        }
        Ok(Self { base, adapters, act: Precision::from_dtype(act_dtype).unwrap_or(Precision::F32) })
    }

    /// The base layer.
    pub fn base(&self) -> &dyn QuantLinear {
        self.base.as_ref()
    }

    /// The adapter with index `i` on this layer, if it targets it.
    pub fn adapter(&self, i: usize) -> Option<&LoraWeights> {
        self.adapters.get(i).and_then(Option::as_ref)
    }

    /// The adapter each of `groups` runs of rows uses.
    fn groups<'s>(&'s self, sel: AdapterSel<'_>, rows: usize) -> Result<Vec<(usize, Option<&'s LoraWeights>)>> {
        let pick = |i: Option<usize>| i.and_then(|i| self.adapter(i));
        match sel {
            AdapterSel::Active => Ok(vec![(rows, pick(Some(0)))]),
            AdapterSel::Groups(g) => {
                if g.is_empty() || !rows.is_multiple_of(g.len()) {
                    return Err(Error::invalid_argument(
                        "adapters",
                        format!("{} adapter choices for {rows} rows", g.len()),
                    ));
                }
                Ok(g.iter().map(|&i| (rows / g.len(), pick(i))).collect())
            }
        }
    }

    /// Adds each group's update to the base output `y` (`rows x out`, values of the model
    /// dtype): the update cast to the model dtype, then the sum rounded to it (`result + output`).
    fn add_deltas(&self, x: &[f32], y: &mut [f32], rows: usize, sel: AdapterSel<'_>) -> Result<()> {
        let (n_in, n_out) = (self.base.in_features(), self.base.out_features());
        let mut row = 0;
        for (n, w) in self.groups(sel, rows)? {
            if let Some(w) = w {
                let xs = x.get(row * n_in..(row + n) * n_in).ok_or_else(|| Error::invalid_argument("x", "too few values"))?;
                let ys = y.get_mut(row * n_out..(row + n) * n_out).ok_or_else(|| Error::invalid_argument("y", "too few values"))?;
                w.add_into(xs, ys, n, self.act)?;
            }
            row += n;
        }
        Ok(())
    }
}

impl QuantLinear for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_sel(x, AdapterSel::Active)
    }
    fn forward_sel(&self, x: &Tensor, sel: AdapterSel<'_>) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        let dims = y.dims().to_vec();
        let rows: usize = dims.iter().rev().skip(1).product();
        if x.device().is_cpu() {
            let xf: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let mut yf: Vec<f32> = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            self.add_deltas(&xf, &mut yf, rows, sel)?;
            return Ok(Tensor::from_vec(yf, dims, &Device::Cpu)?.to_dtype(y.dtype())?);
        }
        // On a GPU: the same steps with candle's ops, group by group along the rows.
        let (n_in, n_out) = (self.base.in_features(), self.base.out_features());
        let x2 = x.reshape((rows, n_in))?;
        let y2 = y.reshape((rows, n_out))?;
        let mut parts = Vec::new();
        let mut row = 0;
        for (n, w) in self.groups(sel, rows)? {
            let yg = y2.narrow(0, row, n)?;
            parts.push(match w {
                Some(w) => {
                    let (a, b) = w.on_device.as_ref().ok_or_else(|| Error::invalid_argument("adapter", "not on the layer's device"))?;
                    let xg = x2.narrow(0, row, n)?.to_dtype(w.dtype)?;
                    let d = (xg.matmul(&a.t()?)?.matmul(&b.t()?)? * f64::from(w.scale))?;
                    (yg + d.to_dtype(y.dtype())?)?
                }
                None => yg,
            });
            row += n;
        }
        Ok(Tensor::cat(&parts, 0)?.reshape(dims)?)
    }
    fn forward_f32(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.forward_f32_sel(x, rows, AdapterSel::Active)
    }
    fn forward_f32_sel(&self, x: &[f32], rows: usize, sel: AdapterSel<'_>) -> Result<Vec<f32>> {
        let mut y = self.base.forward_f32(x, rows)?;
        self.add_deltas(x, &mut y, rows, sel)?;
        Ok(y)
    }
    fn in_features(&self) -> usize {
        self.base.in_features()
    }
    fn out_features(&self) -> usize {
        self.base.out_features()
    }
    fn resident_bytes(&self) -> usize {
        self.base.resident_bytes() + self.adapter_bytes()
    }
    fn adapter_bytes(&self) -> usize {
        self.adapters.iter().flatten().map(LoraWeights::bytes).sum()
    }
    fn format(&self) -> &'static str {
        self.base.format()
    }
    fn dequantized_weight(&self, dtype: DType) -> Result<Tensor> {
        self.base.dequantized_weight(dtype)
    }
    fn storage(&self) -> LinearStorage<'_> {
        self.base.storage()
    }
    fn bias(&self) -> Option<&Tensor> {
        self.base.bias()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DenseLinear;

    #[test]
    fn the_update_is_scale_b_a_x_and_each_group_picks_its_adapter() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::from_vec((0..12).map(|i| i as f32 * 0.1).collect::<Vec<_>>(), (3, 4), &dev)?;
        let a = Tensor::from_vec(vec![1f32, 0., 0., 1., 0., 1., 1., 0.], (2, 4), &dev)?;
        let b = Tensor::from_vec(vec![1f32, 2., 0., 1., -1., 0.], (3, 2), &dev)?;
        let lora = LoraWeights::new(&a, &b, 0.5, DType::F32, &dev)?;
        let layer = LoraLinear::new(Box::new(DenseLinear::new(w.clone(), None)?), vec![None, Some(lora)], DType::F32)?;
        let x = Tensor::from_vec(vec![1f32, 2., 3., 4., -1., 0., 1., 2.], (2, 4), &dev)?;
        let base = x.matmul(&w.t()?)?;
        let expect = (&base + ((x.matmul(&a.t()?)?.matmul(&b.t()?))? * 0.5)?)?;
        let close = |t: &Tensor, u: &Tensor| -> Result<f32> { Ok((t - u)?.abs()?.max_all()?.to_scalar::<f32>()?) };
        // Adapter 0 is not on this layer: the active adapter leaves it as the base.
        assert!(close(&layer.forward(&x)?, &base)? < 1e-6);
        let both = layer.forward_sel(&x, AdapterSel::Groups(&[Some(1)]))?;
        assert!(close(&both, &expect)? < 1e-5);
        let mixed = layer.forward_f32_sel(&x.flatten_all()?.to_vec1()?, 2, AdapterSel::Groups(&[None, Some(1)]))?;
        let mixed = Tensor::from_vec(mixed, (2, 3), &dev)?;
        assert!(close(&mixed.narrow(0, 0, 1)?, &base.narrow(0, 0, 1)?)? < 1e-6);
        assert!(close(&mixed.narrow(0, 1, 1)?, &expect.narrow(0, 1, 1)?)? < 1e-5);
        assert!(layer.forward_f32_sel(&[0.0; 12], 3, AdapterSel::Groups(&[None, None])).is_err());
        assert_eq!(layer.adapter_bytes(), (8 + 6) * 4);
        Ok(())
    }

    /// The vectorized finishing loop rounds as torch does, step by step, for every pair of
    /// adapter and model precisions.
    #[test]
    fn the_update_is_rounded_as_torch_rounds_it() {
        use half::{bf16, f16};
        let r = |p: Precision, v: f32| match p {
            Precision::F32 => v,
            Precision::F16 => f16::from_f32(v).to_f32(),
            Precision::Bf16 => bf16::from_f32(v).to_f32(),
        };
        let d: Vec<f32> = (0..97).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013_7).collect();
        let y0: Vec<f32> = (0..97).map(|i| ((i * 53 % 89) as f32 - 44.0) * 0.021_3).collect();
        let all = [Precision::F32, Precision::F16, Precision::Bf16];
        for p in all {
            for act in all {
                let mut y = y0.clone();
                finish(&mut y, &d, 0.37, p, act);
                let want: Vec<f32> = y0.iter().zip(&d).map(|(&y, &d)| r(act, y + r(act, r(p, r(p, d) * 0.37)))).collect();
                assert_eq!(y, want, "adapter {p:?}, model {act:?}");
            }
        }
    }

    #[test]
    fn a_rank_that_does_not_fit_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::zeros((3, 4), DType::F32, &dev)?;
        let lora = LoraWeights::new(&Tensor::zeros((2, 5), DType::F32, &dev)?, &Tensor::zeros((3, 2), DType::F32, &dev)?, 1.0, DType::F32, &dev)?;
        assert!(LoraLinear::new(Box::new(DenseLinear::new(w, None)?), vec![Some(lora)], DType::F32).is_err());
        Ok(())
    }
}

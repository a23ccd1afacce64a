//! Matrix-vector products with a dense weight (f32, f16 or bf16) and f32 activations, for the
//! unquantized layers of a quantized model (bitsandbytes keeps `lm_head` dense) when decoding.
//!
//! A decode step reads such a weight once per token, so what matters is streaming it at memory
//! speed on every core; 16-bit weights are widened to f32 in registers (exactly), so a bf16
//! weight costs half the bytes of its f32 copy and gives the same products.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use nibble_core::{Error, Result};
use super::{chunk_len, for_each_chunk_mut, min_macs_per_matvec_task, Isa};

/// A borrowed dense weight `[out, in]`, row-major.
#[derive(Debug, Clone, Copy)]
pub enum DenseWeight<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// IEEE half values.
    F16(&'a [f16]),
    /// bfloat16 values.
    Bf16(&'a [bf16]),
}

impl DenseWeight<'_> {
    fn len(&self) -> usize {
        match self {
            DenseWeight::F32(w) => w.len(),
            DenseWeight::F16(w) => w.len(),
            DenseWeight::Bf16(w) => w.len(),
        }
    }
}

/// `y = x W^T` for `rows` rows of `x` (`[rows, in_features]`, f32) and a dense weight
/// `[out_features, in_features]`; returns `[rows, out_features]` f32, accumulated in f32. Meant for
/// few rows (each row streams the whole weight). Uses [`Isa::detect`].
///
/// Errors: `w` or `x` not of the stated sizes.
pub fn matmul_dense(w: DenseWeight<'_>, out_features: usize, in_features: usize, x: &[f32], rows: usize) -> Result<Vec<f32>> {
    matmul_dense_with(Isa::detect(), w, out_features, in_features, x, rows)
}

/// [`matmul_dense`] with an explicit instruction set.
///
/// Errors: `isa` not supported by this CPU, or the size mismatches of [`matmul_dense`].
pub fn matmul_dense_with(
    isa: Isa,
    w: DenseWeight<'_>,
    out_features: usize,
    in_features: usize,
    x: &[f32],
    rows: usize,
) -> Result<Vec<f32>> {
    isa.check()?;
    if out_features.checked_mul(in_features) != Some(w.len()) {
        return Err(Error::invalid_argument(
            "w",
            format!("has {} values, which is not {out_features} x {in_features}", w.len()),
        ));
    }
    if rows.checked_mul(in_features) != Some(x.len()) {
        return Err(Error::invalid_argument("x", format!("has {} values, which is not {rows} x {in_features}", x.len())));
    }
    let mut y = vec![0.0f32; rows * out_features];
    if in_features == 0 || rows == 0 {
        return Ok(y);
    }
    let per_task = chunk_len(out_features, min_macs_per_matvec_task().div_ceil(in_features * rows));
    if rows == 1 {
        for_each_chunk_mut(&mut y, per_task, |t, yc| {
            for (i, yo) in yc.iter_mut().enumerate() {
                *yo = dots(isa, w, t * per_task + i, in_features, &[x])[0];
            }
        });
        return Ok(y);
    }
    // Several rows: each weight row is read once for every activation row (16-bit weights are
    // widened once for up to `rows_at_once` rows; a row's result is the same dot as alone, so it
    // does not depend on the batch), into `[out, rows]`, then transposed.
    let group = rows_at_once(isa);
    let xs: Vec<&[f32]> = x.chunks_exact(in_features).collect();
    let mut yt = vec![0.0f32; rows * out_features];
    for_each_chunk_mut(&mut yt, per_task * rows, |t, yc| {
        for (i, ys) in yc.chunks_exact_mut(rows).enumerate() {
            let o = t * per_task + i;
            let mut r0 = 0;
            while r0 < rows {
                let r = (rows - r0).min(group);
                let got = dots(isa, w, o, in_features, &xs[r0..r0 + r]);
                ys[r0..r0 + r].copy_from_slice(&got[..r]);
                r0 += r;
            }
        }
    });
    for (o, ys) in yt.chunks_exact(rows).enumerate() {
        for (r, &v) in ys.iter().enumerate() {
            y[r * out_features + o] = v;
        }
    }
    Ok(y)
}

/// Activation rows [`dots`] takes at once: the AVX-512 16-bit kernel has room for 8
/// accumulators, the AVX2 one for 4 (in its 16 registers).
fn rows_at_once(isa: Isa) -> usize {
    if isa == Isa::Avx512 { 8 } else { 4 }
}

/// Weight row `o` dotted with each of the 1..=[`rows_at_once`] rows `xs` (the first
/// `xs.len()` values).
fn dots(isa: Isa, w: DenseWeight<'_>, o: usize, in_features: usize, xs: &[&[f32]]) -> [f32; 8] {
    let (a, b) = (o * in_features, (o + 1) * in_features);
    let mut out = [0.0f32; 8];
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        let (bits, f16): (&[u16], bool) = match w {
            DenseWeight::Bf16(w) => (w[a..b].reinterpret_cast(), false),
            DenseWeight::F16(w) => (w[a..b].reinterpret_cast(), true),
            DenseWeight::F32(_) => (&[], false),
        };
        if !bits.is_empty() {
            macro_rules! rows {
                ($kernel:ident, $f16:expr, $r:expr) => {{
                    let xr: [&[f32]; $r] = std::array::from_fn(|j| xs[j]);
                    // SAFETY: `isa` passed `Isa::check` (avx2+fma+f16c detected, and avx512f for
                    // the AVX-512 kernel); `bits` holds the row's `in_features` values.
                    let got = unsafe { super::$kernel::dot_16bit_rows::<$f16, $r>(bits.as_ptr(), xr, bits.len()) };
                    out[..$r].copy_from_slice(&got);
                }};
            }
            macro_rules! by_rows {
                ($kernel:ident, $f16:expr, [$($r:expr),*], $last:expr) => {
                    match xs.len() {
                        $($r => rows!($kernel, $f16, $r),)*
                        _ => rows!($kernel, $f16, $last),
                    }
                };
            }
            match (isa == Isa::Avx512, f16) {
                (true, false) => by_rows!(avx512, false, [1, 2, 3, 4, 5, 6, 7], 8),
                (true, true) => by_rows!(avx512, true, [1, 2, 3, 4, 5, 6, 7], 8),
                (false, false) => by_rows!(avx2, false, [1, 2, 3], 4),
                (false, true) => by_rows!(avx2, true, [1, 2, 3], 4),
            }
            return out;
        }
    }
    // f32 weights, or no SIMD kernel for 16-bit ones.
    for (o, xr) in out.iter_mut().zip(xs) {
        *o = match w {
            DenseWeight::F32(w) => dot_f32(isa, &w[a..b], xr),
            DenseWeight::F16(w) => dot_widened(&w[a..b], xr, f16::to_f32),
            DenseWeight::Bf16(w) => dot_widened(&w[a..b], xr, bf16::to_f32),
        };
    }
    out
}

fn dot_f32(isa: Isa, w: &[f32], x: &[f32]) -> f32 {
    super::four_bit::dot(isa, w, x)
}

/// Portable dot product of a 16-bit row with f32 activations, eight partial sums.
pub(super) fn dot_widened<T: Copy>(w: &[T], x: &[f32], widen: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut cw = w.chunks_exact(8);
    let mut cx = x.chunks_exact(8);
    for (a, b) in (&mut cw).zip(&mut cx) {
        for l in 0..8 {
            acc[l] += widen(a[l]) * b[l];
        }
    }
    let tail: f32 = cw.remainder().iter().zip(cx.remainder()).map(|(&a, b)| widen(a) * b).sum();
    acc.iter().sum::<f32>() + tail
}

//! The vectorized inner loops of the quantizers in [`crate::functional`], dispatched by [`Isa`].
//!
//! The portable versions are written in fixed-width chunks so the compiler vectorizes them for
//! the build target (SSE2 on x86-64, NEON on aarch64); the AVX2 versions use intrinsics. All of
//! them compute exactly what the scalar definitions do: max and comparisons are exact, scaling
//! uses the same single f32 operation, and rounding is the same IEEE round-half-even.

use std::any::TypeId;

use half::{bf16, f16};
use nibble_core::Result;

use super::Isa;
use crate::functional::{Element, Int8Quantized, Packed4bit, Quant4Tables, QuantType};

/// How a block's values are scaled before encoding: bnb multiplies full blocks by a reciprocal
/// and divides the trailing partial block.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scale {
    /// `x * s`.
    Mul(f32),
    /// `x / s`.
    Div(f32),
}

impl Scale {
    #[inline(always)]
    pub(crate) fn apply(self, v: f32) -> f32 {
        match self {
            Scale::Mul(s) => v * s,
            Scale::Div(s) => v / s,
        }
    }
}

/// Which of f32 / f16 / bf16 `T` is, so SIMD code can load it directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    F32,
    F16,
    Bf16,
}

fn kind_of<T: Element>() -> Option<Kind> {
    let id = TypeId::of::<T>();
    if id == TypeId::of::<f32>() {
        Some(Kind::F32)
    } else if id == TypeId::of::<f16>() {
        Some(Kind::F16)
    } else if id == TypeId::of::<bf16>() {
        Some(Kind::Bf16)
    } else {
        None
    }
}

/// [`crate::functional::quantize_4bit`] with an explicit instruction set (for tests and
/// benchmarks; every instruction set gives the same bytes).
///
/// Errors: those of `quantize_4bit`, or `isa` not supported by this CPU.
pub fn quantize_4bit_with<T: Element>(
    isa: Isa,
    input: &[T],
    blocksize: usize,
    quant_type: QuantType,
    double_quant: bool,
) -> Result<Packed4bit> {
    isa.check()?;
    crate::functional::quantize_4bit_impl(isa, input, blocksize, quant_type, double_quant)
}

/// [`crate::functional::int8_vectorwise_quant`] with an explicit instruction set (for tests and
/// benchmarks; every instruction set gives the same result).
///
/// Errors: those of `int8_vectorwise_quant`, or `isa` not supported by this CPU.
pub fn int8_vectorwise_quant_with(
    isa: Isa,
    input: &[f16],
    rows: usize,
    cols: usize,
    threshold: f32,
) -> Result<Int8Quantized> {
    isa.check()?;
    crate::functional::int8_vectorwise_quant_impl(isa, input, rows, cols, threshold)
}

/// `(max |x| over non-NaN values, whether any value is NaN)`.
pub(crate) fn abs_max<T: Element>(isa: Isa, x: &[T]) -> (f32, bool) {
    let (mut m, mut nan, done) = match (isa, kind_of::<T>()) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is only ever Avx2 or Avx512 (which includes the AVX2 set) after `Isa::check` (avx2+fma+f16c detected); the
        // pointer and length come from the slice `x` of the matching element type.
        (Isa::Avx2 | Isa::Avx512, Some(k)) => unsafe {
            let p = x.as_ptr().cast::<u8>();
            match k {
                Kind::F32 => super::avx2::abs_max::<{ super::avx2::KIND_F32 }>(p, x.len()),
                Kind::F16 => super::avx2::abs_max::<{ super::avx2::KIND_F16 }>(p, x.len()),
                Kind::Bf16 => super::avx2::abs_max::<{ super::avx2::KIND_BF16 }>(p, x.len()),
            }
        },
        _ => abs_max_portable(x),
    };
    for &v in &x[done.min(x.len())..] {
        let a = v.to_f32().abs();
        m = m.max(a);
        nan |= a.is_nan();
    }
    (m, nan)
}

/// Chunks of 16 with independent lanes, which the compiler turns into vector max/compare.
fn abs_max_portable<T: Element>(x: &[T]) -> (f32, bool, usize) {
    let mut acc = [0.0f32; 16];
    let mut nan = [false; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for l in 0..16 {
            let a = c[l].to_f32().abs();
            nan[l] |= a.is_nan();
            // `if a > m` skips NaN, like f32::max, and vectorizes to a compare + blend.
            if a > acc[l] {
                acc[l] = a;
            }
        }
    }
    let m = acc.iter().fold(0.0f32, |m, &a| m.max(a));
    (m, nan.iter().any(|&n| n), x.len() - chunks.remainder().len())
}

/// Encodes a prefix of `x` (a multiple of 32 values) into `out` (half as many bytes); returns how
/// many values it encoded. The caller encodes the rest with `Quant4Tables::encode`.
pub(crate) fn encode_4bit<T: Element>(isa: Isa, x: &[T], scale: Scale, t: &Quant4Tables, out: &mut [u8]) -> usize {
    let n = (x.len() / 32 * 32).min(out.len() / 16 * 32);
    match (isa, kind_of::<T>()) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is only ever Avx2 or Avx512 (which includes the AVX2 set) after `Isa::check` (avx2+fma+f16c detected); `x` holds
        // at least `n` values of the matching type and `out` at least `n / 2` bytes.
        (Isa::Avx2 | Isa::Avx512, Some(k)) => unsafe {
            let p = x.as_ptr().cast::<u8>();
            match k {
                Kind::F32 => super::avx2::encode_4bit::<{ super::avx2::KIND_F32 }>(p, n, scale, &t.bounds, &t.order, out),
                Kind::F16 => super::avx2::encode_4bit::<{ super::avx2::KIND_F16 }>(p, n, scale, &t.bounds, &t.order, out),
                Kind::Bf16 => {
                    super::avx2::encode_4bit::<{ super::avx2::KIND_BF16 }>(p, n, scale, &t.bounds, &t.order, out)
                }
            }
        },
        _ => encode_portable(&x[..n], scale, t, out),
    }
    n
}

/// 32 values at a time: 15 compares per value, counted in independent lanes.
// `!(b >= s)` is deliberate: it is true for NaN, which is how bucketize treats NaN.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn encode_portable<T: Element>(x: &[T], scale: Scale, t: &Quant4Tables, out: &mut [u8]) {
    for (xc, oc) in x.chunks_exact(32).zip(out.chunks_exact_mut(16)) {
        let mut s = [0.0f32; 32];
        for (s, v) in s.iter_mut().zip(xc) {
            *s = scale.apply(v.to_f32());
        }
        // 32-bit counters, as wide as the compared floats, so the compare-and-count loop
        // vectorizes lane for lane (narrower counters make the compiler shuffle every step).
        let mut lt = [0u32; 32];
        for &b in &t.bounds {
            for (c, &s) in lt.iter_mut().zip(&s) {
                // The count of midpoints with !(b >= s) is 15 - `encode`'s count of b >= s.
                *c += u32::from(!(b >= s));
            }
        }
        for (o, pair) in oc.iter_mut().zip(lt.chunks_exact(2)) {
            *o = (t.order[pair[0] as usize & 15] << 4) | t.order[pair[1] as usize & 15];
        }
    }
}

/// Pass one of LLM.int8() row quantization: `(absmax of the non-outlier values, whether one of
/// them is NaN)`; outliers are `|x| >= threshold` when `threshold` is set.
pub(crate) fn int8_row_absmax(isa: Isa, row: &[f16], threshold: Option<f32>) -> (f32, bool) {
    let (mut m, mut nan, done): (f32, bool, usize) = match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx2 or Avx512 (which includes the AVX2 set) only after `Isa::check` (avx2+fma+f16c detected); pointer and length
        // come from `row`.
        Isa::Avx2 | Isa::Avx512 => unsafe { super::avx2::int8_row_absmax(row.as_ptr().cast(), row.len(), threshold) },
        _ => (0.0, false, 0),
    };
    for &x in &row[done.min(row.len())..] {
        let x = x.to_f32();
        if !threshold.is_some_and(|th| x.abs() >= th) {
            m = m.max(x.abs());
            nan |= x.is_nan();
        }
    }
    (m, nan)
}

/// Pass two: `q[i] = round_half_even(x * k) as i8`, outliers as 0.
pub(crate) fn int8_row_encode(isa: Isa, row: &[f16], threshold: Option<f32>, k: f32, q: &mut [i8]) {
    let done = match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx2 or Avx512 (which includes the AVX2 set) only after `Isa::check`; reads `row.len()` f16 values from `row` and writes
        // at most that many bytes, within `q` (checked here).
        Isa::Avx2 | Isa::Avx512 if q.len() >= row.len() => unsafe {
            super::avx2::int8_row_encode(row.as_ptr().cast(), row.len(), threshold, k, q)
        },
        _ => 0,
    };
    for (q, &x) in q.iter_mut().zip(row).skip(done) {
        let x = x.to_f32();
        let v = if threshold.is_some_and(|th| x.abs() >= th) { 0.0 } else { x };
        // `as i8` saturates and maps NaN (0 * inf for an all-zero row) to 0.
        *q = (v * k).round_ties_even() as i8;
    }
}

/// Sets `mask[c]` for every column `c` of `row` with `|x| >= threshold`.
pub(crate) fn outlier_mask_row(isa: Isa, row: &[f16], threshold: f32, mask: &mut [bool]) {
    let done = match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx2 or Avx512 (which includes the AVX2 set) only after `Isa::check`; reads `row.len()` values, writes `mask` below that
        // length (checked here).
        Isa::Avx2 | Isa::Avx512 if mask.len() >= row.len() => unsafe {
            super::avx2::outlier_mask_row(row.as_ptr().cast(), row.len(), threshold, mask)
        },
        _ => 0,
    };
    for (m, &x) in mask.iter_mut().zip(row).skip(done) {
        *m |= x.to_f32().abs() >= threshold;
    }
}

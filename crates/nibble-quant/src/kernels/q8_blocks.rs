//! Matrix products of a weight held as GGUF `Q8_0` blocks: 32 signed 8-bit codes and one f16
//! scale a block, along each row.
//!
//! transformers' GGUF loader dequantizes such a tensor to float32 as `scale * code` (an f16 times
//! a 7-bit integer: exact in f32), so a model loaded with `dtype` float32 multiplies by those
//! products. These kernels form each product the same way (exact) and multiply-add it in f32, so
//! they compute what a dense f32 matrix of the dequantized values computes, up to the order of
//! the f32 sums, while reading 8.5 bits a weight instead of 32 (a decode step reads the whole
//! `lm_head`). Each activation row runs alone through one fixed order (per output: four 8-lane
//! accumulators over the blocks, then one reduction), so a row's result does not depend on the
//! batch.

use nibble_core::{Error, Result};

use super::{chunk_len, for_each_chunk_mut, min_macs_per_matvec_task, transpose_into, Isa};

/// Values per block.
pub const Q8_BLOCK: usize = 32;

/// `y = x W^T` for `rows` rows of `x` (`in_features` each), `W` `[out_features, in_features]` as
/// `codes` (row-major) with one `scales` value (an f16's exact f32 value) per 32 codes of a row.
/// Returns `[rows, out_features]`.
///
/// Errors: `in_features` not a multiple of 32, or slices of the wrong lengths.
pub fn matmul_q8_blocks(scales: &[f32], codes: &[i8], out_features: usize, in_features: usize, x: &[f32], rows: usize) -> Result<Vec<f32>> {
    let n = out_features.checked_mul(in_features);
    if !in_features.is_multiple_of(Q8_BLOCK) || n != Some(codes.len()) || codes.len() / Q8_BLOCK != scales.len() {
        return Err(Error::invalid_argument(
            "q8_0 weight",
            format!(
                "{} codes and {} scales for a {out_features} x {in_features} matrix of 32-value blocks",
                codes.len(),
                scales.len()
            ),
        ));
    }
    if rows.checked_mul(in_features) != Some(x.len()) {
        return Err(Error::invalid_argument("x", format!("has {} values, which is not {rows} rows of {in_features}", x.len())));
    }
    let mut y = vec![0.0f32; rows * out_features];
    if rows == 0 || out_features == 0 {
        return Ok(y);
    }
    let blocks = in_features / Q8_BLOCK;
    let isa = Isa::detect();
    // Output rows `o0..` into `out` (`[n, rows]`, transposed below when rows > 1): a task's
    // weight rows stay in cache from one activation row to the next.
    let run = |o0: usize, out: &mut [f32]| {
        for (i, ys) in out.chunks_mut(rows).enumerate() {
            let o = o0 + i;
            let (Some(sc), Some(cs)) = (scales.get(o * blocks..(o + 1) * blocks), codes.get(o * in_features..(o + 1) * in_features)) else {
                continue;
            };
            for (r, yo) in ys.iter_mut().enumerate() {
                let xr = x.get(r * in_features..(r + 1) * in_features).unwrap_or(&[]);
                *yo = row_dot(isa, sc, cs, xr);
            }
        }
    };
    let per_task = chunk_len(out_features, min_macs_per_matvec_task().div_ceil(in_features * rows));
    if rows == 1 {
        for_each_chunk_mut(&mut y, per_task, |t, yc| run(t * per_task, yc));
        return Ok(y);
    }
    let mut yt = vec![0.0f32; rows * out_features];
    for_each_chunk_mut(&mut yt, per_task * rows, |t, yc| run(t * per_task, yc));
    transpose_into(&yt, rows, out_features, &mut y);
    Ok(y)
}

/// One output: `sum_k (scale_b * code_k) * x_k` over the row's blocks, in the order the module
/// docs give, the same bits on every instruction set (the lanes and the reduction are fixed).
fn row_dot(isa: Isa, scales: &[f32], codes: &[i8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() && x.len() >= codes.len() && codes.len() >= scales.len() * Q8_BLOCK {
        // SAFETY: `isa` came from `Isa::detect` or `Isa::supported` (its features detected:
        // avx2+fma, and avx512f for `Avx512`); the kernels read `scales.len()` blocks of `codes`
        // and of `x`, which the condition bounds.
        return unsafe {
            if isa == Isa::Avx512 {
                row_dot_avx512(scales, codes, x)
            } else {
                row_dot_avx2(scales, codes, x)
            }
        };
    }
    let _ = isa;
    let mut acc = [[0.0f32; 8]; 4];
    for ((&s, c), xb) in scales.iter().zip(codes.chunks_exact(Q8_BLOCK)).zip(x.chunks_exact(Q8_BLOCK)) {
        for (j, a) in acc.iter_mut().enumerate() {
            for (l, v) in a.iter_mut().enumerate() {
                let k = 8 * j + l;
                let (Some(&q), Some(&xv)) = (c.get(k), xb.get(k)) else { continue };
                *v = (s * f32::from(q)).mul_add(xv, *v);
            }
        }
    }
    let mut lanes = [0.0f32; 8];
    for (l, v) in lanes.iter_mut().enumerate() {
        *v = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    }
    // `hsum`'s order: halves, then pairs, then the last two.
    let h: [f32; 4] = std::array::from_fn(|i| lanes[i] + lanes[i + 4]);
    let (a, b) = (h[0] + h[2], h[1] + h[3]);
    a + b
}

/// [`row_dot`] with AVX2 and FMA.
///
/// # Safety
/// The CPU must support avx2 and fma; `codes` and `x` must hold `scales.len() * 32` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_dot_avx2(scales: &[f32], codes: &[i8], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 4];
    let (cp, xp) = (codes.as_ptr(), x.as_ptr());
    for (b, &s) in scales.iter().enumerate() {
        let sv = _mm256_set1_ps(s);
        let base = b * Q8_BLOCK;
        for (j, a) in acc.iter_mut().enumerate() {
            let q = _mm_loadl_epi64(cp.add(base + 8 * j).cast());
            let w = _mm256_mul_ps(sv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
            *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(base + 8 * j)), *a);
        }
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    super::avx2::hsum(v)
}

/// [`row_dot`] with AVX-512: the AVX2 kernel's four 8-lane accumulators as the halves of two
/// 16-lane ones, added in the same pairs before the same final reduction.
///
/// # Safety
/// The CPU must support avx512f, avx2 and fma; `codes` and `x` must hold `scales.len() * 32`
/// values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn row_dot_avx512(scales: &[f32], codes: &[i8], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let (cp, xp) = (codes.as_ptr(), x.as_ptr());
    for (b, &s) in scales.iter().enumerate() {
        let sv = _mm512_set1_ps(s);
        let base = b * Q8_BLOCK;
        let w = |at: usize| _mm512_mul_ps(sv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(cp.add(at).cast()))));
        lo = _mm512_fmadd_ps(w(base), _mm512_loadu_ps(xp.add(base)), lo);
        hi = _mm512_fmadd_ps(w(base + 16), _mm512_loadu_ps(xp.add(base + 16)), hi);
    }
    let half = |v: __m512| {
        let a = _mm512_castps512_ps256(v);
        let b = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        _mm256_add_ps(a, b)
    };
    super::avx2::hsum(_mm256_add_ps(half(lo), half(hi)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The products equal a dense f32 matrix of `scale * code` within f32 rounding of the sums,
    /// the portable path's bits equal the AVX2 path's, and a row's result is the same alone and
    /// in a batch.
    #[test]
    fn equals_the_dequantized_matrix_and_is_batch_invariant() -> Result<()> {
        let (out, inn, rows) = (37, 96, 5);
        let codes: Vec<i8> = (0..out * inn).map(|i| ((i * 7919 % 255) as i32 - 127) as i8).collect();
        let scales: Vec<f32> = (0..out * inn / 32).map(|b| half::f16::from_f32(0.01 + (b % 7) as f32 * 1e-3).to_f32()).collect();
        let x: Vec<f32> = (0..rows * inn).map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.37).collect();
        let y = matmul_q8_blocks(&scales, &codes, out, inn, &x, rows)?;
        for r in 0..rows {
            let alone = matmul_q8_blocks(&scales, &codes, out, inn, &x[r * inn..(r + 1) * inn], 1)?;
            assert_eq!(&y[r * out..(r + 1) * out], &alone[..], "row {r}");
            for o in 0..out {
                let (mut want, mut mag) = (0.0f64, 0.0f64);
                for k in 0..inn {
                    let w = f64::from(scales[(o * inn + k) / 32] * f32::from(codes[o * inn + k]));
                    want += w * f64::from(x[r * inn + k]);
                    mag += (w * f64::from(x[r * inn + k])).abs();
                }
                let got = f64::from(y[r * out + o]);
                assert!((got - want).abs() <= mag * inn as f64 * f64::from(f32::EPSILON), "({r}, {o}): {got} vs {want}");
                let xr = &x[r * inn..(r + 1) * inn];
                let (sc, cs) = (&scales[o * 3..(o + 1) * 3], &codes[o * inn..(o + 1) * inn]);
                let portable = row_dot(Isa::Portable, sc, cs, xr).to_bits();
                for isa in Isa::supported() {
                    assert_eq!(row_dot(isa, sc, cs, xr).to_bits(), portable, "portable vs {isa:?}");
                }
            }
        }
        assert!(matmul_q8_blocks(&scales, &codes, out, 95, &x, rows).is_err());
        Ok(())
    }
}

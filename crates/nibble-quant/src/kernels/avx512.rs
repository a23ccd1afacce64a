//! x86-64 AVX-512 kernels: the 4-bit matrix-vector product (decode and small batches) and the f32
//! micro-kernel of the matrix-matrix product (prefill).
//!
//! Every function here is `unsafe` only because it is compiled with `#[target_feature]`: callers
//! must have checked [`super::Isa::Avx512`] (run-time detection of avx512f on top of the AVX2
//! set) first, and each function states the slice bounds its raw-pointer loads rely on.
//!
//! # 4-bit lookup
//!
//! A zmm register holds all 16 values of a block's table as f32, so `vpermps` looks up 16
//! weights at once from 4-bit indices (it reads only the low 4 bits of each lane). The table of
//! each block is `code * absmax` rounded as the layer rounds, built with one multiply (and the
//! rounding's few instructions) per block: every weight is bitsandbytes' value exactly, with no
//! scale factored out, for every rounding chain. The 16 indices of 8 packed bytes come from one
//! 64-bit broadcast and one variable shift per 32-bit lane (no shuffle), which leaves the weights
//! in the order [`ORDER16`]; [`permute_x`] puts the activations in that order once per call.
//!
//! # Batch invariance
//!
//! Each activation row has its own four accumulators (16-value group `g` of a row goes to
//! accumulator `g % 4`), summed in one fixed order at the end, whether one row or four run
//! together: a row's result does not depend on the batch it is computed in.

use std::arch::x86_64::*;

use super::four_bit::{Matrix4bit, Precision, MR, NR};

/// The weight each of the 16 lanes holds after [`indices`]: lane `2k` takes bits `4k..4k + 4` of
/// the group's first four bytes, lane `2k + 1` the same bits of the last four; byte `j` holds
/// weight `2j` in its high nibble and `2j + 1` in its low one.
pub(super) const ORDER16: [usize; 16] = [1, 9, 0, 8, 3, 11, 2, 10, 5, 13, 4, 12, 7, 15, 6, 14];

/// Activations in the order the kernel produces weights ([`ORDER16`] per 16 values); `x`'s
/// length is a multiple of 16 where the kernel is used (a shorter tail is copied as it is).
pub(super) fn permute_x(x: &[f32]) -> Vec<f32> {
    super::permute_chunks(x, &ORDER16)
}

/// Whether the kernel applies to `w`: rows a multiple of 16 wide (block sizes are powers of two
/// from 32 up), so every 16-value group of a row starts on a byte and lies in one block.
pub(super) fn applies(w: &Matrix4bit<'_>) -> bool {
    w.in_features.is_multiple_of(16) && w.blocksize >= 16
}

/// The 4-bit indices of 16 weights from the 8 packed bytes at `p`, in the order [`ORDER16`]
/// (garbage above bit 3 of each lane, which `vpermps` ignores).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn indices(p: *const u8, shifts: __m512i) -> __m512i {
    let q = std::ptr::read_unaligned(p.cast::<i64>());
    _mm512_srlv_epi32(_mm512_set1_epi64(q), shifts)
}

/// Rounds 16 finite f32 to bf16 and back (nearest even, as `half` does; overflow to infinity).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn round_bf16(v: __m512) -> __m512 {
    let b = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    let up = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb);
    _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(-65536)))
}

/// Rounds 16 f32 to f16 and back (nearest even, as `half` does).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn round_f16(v: __m512) -> __m512 {
    _mm512_cvtph_ps(_mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v))
}

/// A precision as a const-generic parameter (so a kernel's roundings are fixed at compile time).
const P_F32: u8 = 0;
/// See [`P_F32`].
const P_F16: u8 = 1;
/// See [`P_F32`].
const P_BF16: u8 = 2;

/// Rounds 16 finite values to the precision `P`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn round<const P: u8>(v: __m512) -> __m512 {
    match P {
        P_F16 => round_f16(v),
        P_BF16 => round_bf16(v),
        _ => v,
    }
}

/// The table of block `b` (scale `s`): `code * s` rounded to `WP`, then `CP` (the layer's
/// rounding chain). Non-finite scales go through the scalar rounding, which handles NaN payloads
/// and infinities exactly as `half`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn table<const WP: u8, const CP: u8>(w: &Matrix4bit<'_>, code: __m512, b: usize) -> __m512 {
    // `b` is a block of the weight (callers pass blocks of values they read).
    let s = w.absmax.get(b).copied().unwrap_or(f32::NAN);
    if !s.is_finite() {
        let t = w.block_table(b);
        return _mm512_loadu_ps(t.as_ptr());
    }
    // |code| <= 1, so the product of a finite scale is finite and the vector roundings apply.
    round::<CP>(round::<WP>(_mm512_mul_ps(code, _mm512_set1_ps(s))))
}

/// `R` activation rows against weight rows `row0 .. row0 + n`:
/// `out[i * stride + off + j] = W[row0 + i, :] . x_j` for `j < R`, where `xp` holds the `R` rows
/// of x, each [`permute_x`]-ed. Each weight is looked up once for all `R` rows.
///
/// # Safety
/// The CPU must support avx512f. [`applies`] holds for `w`, `1 <= R <= 4`,
/// `xp.len() == R * w.in_features`, `row0 + n <= w.out_features` (outputs are written through
/// checked indexing).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn gemv_rows<const R: usize>(
    w: &Matrix4bit<'_>,
    xp: &[f32],
    out: &mut [f32],
    stride: usize,
    off: usize,
    row0: usize,
    n: usize,
) {
    use Precision::{Bf16, F16, F32};
    let args = (w, xp, out, stride, off, row0, n);
    match (w.rounding.weight, w.rounding.compute) {
        (F32, F32) => gemv_rows_impl::<R, P_F32, P_F32>(args),
        (F32, F16) => gemv_rows_impl::<R, P_F32, P_F16>(args),
        (F32, Bf16) => gemv_rows_impl::<R, P_F32, P_BF16>(args),
        (F16, F32) => gemv_rows_impl::<R, P_F16, P_F32>(args),
        (F16, F16) => gemv_rows_impl::<R, P_F16, P_F16>(args),
        (F16, Bf16) => gemv_rows_impl::<R, P_F16, P_BF16>(args),
        (Bf16, F32) => gemv_rows_impl::<R, P_BF16, P_F32>(args),
        (Bf16, F16) => gemv_rows_impl::<R, P_BF16, P_F16>(args),
        (Bf16, Bf16) => gemv_rows_impl::<R, P_BF16, P_BF16>(args),
    }
}

/// [`gemv_rows`]' arguments, in its order.
type RowsArgs<'a, 'w> = (&'a Matrix4bit<'w>, &'a [f32], &'a mut [f32], usize, usize, usize, usize);

#[target_feature(enable = "avx512f")]
unsafe fn gemv_rows_impl<const R: usize, const WP: u8, const CP: u8>(
    (w, xp, out, stride, off, row0, n): RowsArgs<'_, '_>,
) {
    let n_in = w.in_features;
    let bs = w.blocksize;
    let bs_shift = bs.trailing_zeros();
    let code = _mm512_loadu_ps(w.lut.as_ptr());
    let shifts = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    let xs: [*const f32; R] = std::array::from_fn(|j| xp.as_ptr().add(j * n_in));
    let packed = w.packed.as_ptr();
    let groups = n_in / 16;
    let whole = n_in.is_multiple_of(bs) && bs.is_multiple_of(64);
    for i in 0..n {
        let start = (row0 + i) * n_in;
        let row = packed.add(start / 2);
        // Group `g` of the row (values 16g .. 16g + 16) goes to accumulator `g % 4` of each
        // activation row. The row is walked block by block (one table each); within a block,
        // groups up to the next multiple of 4, then fours, then the rest, so that every
        // accumulator index is a constant and the accumulators stay in registers.
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        macro_rules! group {
            ($t:expr, $g:expr, $k:expr) => {{
                // The group's 8 bytes lie in the row: 8 g + 8 <= n_in / 2.
                let f = _mm512_permutexvar_ps(indices(row.add(8 * $g), shifts), $t);
                for (a, &x) in acc.iter_mut().zip(&xs) {
                    // Each x row has n_in values: 16 g + 16 <= n_in.
                    a[$k] = _mm512_fmadd_ps(f, _mm512_loadu_ps(x.add(16 * $g)), a[$k]);
                }
            }};
        }
        let b0 = start >> bs_shift;
        let scales = if whole { w.absmax.get(b0..b0 + n_in / bs).unwrap_or(&[]) } else { &[] };
        if whole && !scales.is_empty() && scales.iter().fold(true, |ok, s| ok & s.is_finite()) {
            // Rows of whole blocks with finite scales (nearly every real model): each block is
            // whole fours of groups, so the walk needs no per-block bookkeeping; the same
            // groups go to the same accumulators as below.
            let cpb = bs / 64;
            for (j, &sc) in scales.iter().enumerate() {
                // |code| <= 1: the product of a finite scale is finite, the roundings apply.
                let t = round::<CP>(round::<WP>(_mm512_mul_ps(code, _mm512_set1_ps(sc))));
                for c in 0..cpb {
                    let g = 4 * (j * cpb + c);
                    // 1 KiB ahead: the hardware prefetcher alone leaves a decode step's stream
                    // of small matrices short of memory speed. A prefetch never faults.
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(8 * g + 1024).cast());
                    group!(t, g, 0);
                    group!(t, g + 1, 1);
                    group!(t, g + 2, 2);
                    group!(t, g + 3, 3);
                }
            }
        } else {
            let mut g = 0;
            while g < groups {
                let b = (start + 16 * g) >> bs_shift;
                // The groups of block `b` in this row: up to the block's end or the row's.
                let g_end = groups.min((((b + 1) << bs_shift) - start) / 16);
                let t = table::<WP, CP>(w, code, b);
                if g % 4 == 1 && g < g_end {
                    group!(t, g, 1);
                    g += 1;
                }
                if g % 4 == 2 && g < g_end {
                    group!(t, g, 2);
                    g += 1;
                }
                if g % 4 == 3 && g < g_end {
                    group!(t, g, 3);
                    g += 1;
                }
                while g + 4 <= g_end {
                    // 1 KiB ahead: the hardware prefetcher alone leaves a decode step's stream of
                    // small matrices short of memory speed. A prefetch never faults.
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(8 * g + 1024).cast());
                    group!(t, g, 0);
                    group!(t, g + 1, 1);
                    group!(t, g + 2, 2);
                    group!(t, g + 3, 3);
                    g += 4;
                }
                if g < g_end {
                    group!(t, g, 0);
                    g += 1;
                }
                if g < g_end {
                    group!(t, g, 1);
                    g += 1;
                }
                if g < g_end {
                    group!(t, g, 2);
                    g += 1;
                }
            }
        }
        for (j, a) in acc.iter().enumerate() {
            let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            if let Some(o) = out.get_mut(i * stride + off + j) {
                *o = _mm512_reduce_add_ps(s);
            }
        }
    }
}

/// The f32 micro-kernel of the matrix-matrix product (see [`super::four_bit::tile`] for the
/// operands): `M` rows x 16 outputs, one zmm accumulator per row, the activation broadcast into
/// the FMA. The same sums in the same order as the AVX2 kernel (each output over `k` in turn),
/// at half the instructions.
///
/// # Safety
/// The CPU must support avx512f; `1 <= mr <= MR`, `a.len() >= (mr - 1) * lda + kc`,
/// `b.len() >= kc * 16`, `c.len() >= (mr - 1) * ldc + 16`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile(mr: usize, kc: usize, a: &[f32], lda: usize, b: &[f32], c: &mut [f32], ldc: usize, first: bool) {
    match mr {
        1 => tile_m::<1>(kc, a, lda, b, c, ldc, first),
        2 => tile_m::<2>(kc, a, lda, b, c, ldc, first),
        3 => tile_m::<3>(kc, a, lda, b, c, ldc, first),
        4 => tile_m::<4>(kc, a, lda, b, c, ldc, first),
        5 => tile_m::<5>(kc, a, lda, b, c, ldc, first),
        _ => tile_m::<MR>(kc, a, lda, b, c, ldc, first),
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn tile_m<const M: usize>(kc: usize, a: &[f32], lda: usize, b: &[f32], c: &mut [f32], ldc: usize, first: bool) {
    let mut acc = [_mm512_setzero_ps(); M];
    let cp = c.as_mut_ptr();
    if !first {
        for (r, v) in acc.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(cp.add(r * ldc));
        }
    }
    let ap = a.as_ptr();
    let bp = b.as_ptr();
    for k in 0..kc {
        let bv = _mm512_loadu_ps(bp.add(k * NR));
        for (r, v) in acc.iter_mut().enumerate() {
            *v = _mm512_fmadd_ps(_mm512_set1_ps(*ap.add(r * lda + k)), bv, *v);
        }
    }
    for (r, v) in acc.iter().enumerate() {
        _mm512_storeu_ps(cp.add(r * ldc), *v);
    }
}

/// `sum w[i] x_j[i]` for `R` (up to 8) activation rows over `n.min(len)` 16-bit weights (f16
/// when `F16`, else bf16), each weight widened once for all rows. The same sums in the same
/// order as [`super::avx2::dot_16bit_rows`]: its two 8-lane accumulators over 16 values a step
/// are the two halves of one zmm here, the last 8 values go into the lower half, and the halves
/// are added and reduced as there. So a row's result does not depend on the instruction set or
/// on the rows beside it.
///
/// # Safety
/// The CPU must support avx512f, avx2, fma and f16c; `w` must be valid for `n` 16-bit values.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn dot_16bit_rows<const F16: bool, const R: usize>(w: *const u16, xs: [&[f32]; R], n: usize) -> [f32; R] {
    let n = xs.iter().fold(n, |n, x| n.min(x.len()));
    let xp: [*const f32; R] = std::array::from_fn(|j| xs[j].as_ptr());
    let widen = |h: __m256i| {
        if F16 {
            _mm512_cvtph_ps(h)
        } else {
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
        }
    };
    let mut acc = [_mm512_setzero_ps(); R];
    let mut i = 0;
    // Loads read `i .. i + 16 <= n` of each.
    while i + 16 <= n {
        // 1 KiB ahead, as the AVX2 kernel (a decode's `lm_head` streams tens of MiB).
        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(i + 512).cast());
        let wv = widen(_mm256_loadu_si256(w.add(i).cast()));
        for (a, x) in acc.iter_mut().zip(&xp) {
            *a = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x.add(i)), *a);
        }
        i += 16;
    }
    if i + 8 <= n {
        // The lower 8 lanes only; the loads read `i .. i + 8 <= n`.
        let wv = widen(_mm256_zextsi128_si256(_mm_loadu_si128(w.add(i).cast())));
        for (a, x) in acc.iter_mut().zip(&xp) {
            *a = _mm512_mask3_fmadd_ps(wv, _mm512_maskz_loadu_ps(0xff, x.add(i)), *a, 0xff);
        }
        i += 8;
    }
    let mut out = [0.0f32; R];
    for ((o, a), x) in out.iter_mut().zip(&acc).zip(&xs) {
        let lo = _mm512_castps512_ps256(*a);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*a)));
        let mut s = super::avx2::hsum(_mm256_add_ps(lo, hi));
        for (k, &xv) in x.iter().enumerate().take(n).skip(i) {
            let bits = *w.add(k);
            let v = if F16 { half::f16::from_bits(bits).to_f32() } else { half::bf16::from_bits(bits).to_f32() };
            s += v * xv;
        }
        *o = s;
    }
    out
}

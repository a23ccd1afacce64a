//! x86-64 AVX2 + FMA + F16C kernels.
//!
//! Every function here is `unsafe` only because it is compiled with `#[target_feature]`: callers
//! must have checked [`super::Isa::Avx2`] (run-time detection of avx2, fma and f16c) first, and
//! each function states the slice bounds its raw-pointer loads rely on.
//!
//! # 4-bit lookup
//!
//! Per block, the 16 rounded weight values are split into byte planes (byte 0..3 of each f32;
//! only bytes 2 and 3 when the values are bf16) and each plane sits in both 128-bit lanes of a
//! register, so one `vpshufb` looks up one byte of 32 weights at once. Unpacking the planes
//! back into f32 leaves the 32 weights of a group in the order `0 2 4 6 1 3 5 7` within each 8
//! (even nibbles are the high ones); [`permute_x`] puts the activations in the same order once per
//! call, so no per-weight shuffle is needed.

use std::arch::x86_64::*;

use super::four_bit::{Matrix4bit, Precision, Rounding, MR, NR};
use super::quant::Scale;

/// Activations in the order the 4-bit kernel produces weights: `0 2 4 6 1 3 5 7` per 8 values.
pub(super) fn permute_x(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        out.extend_from_slice(&[c[0], c[2], c[4], c[6], c[1], c[3], c[5], c[7]]);
    }
    out.extend_from_slice(chunks.remainder());
    out
}

/// Horizontal sum of 8 lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Rounds 8 f32 to `p`, nearest even, exactly as `half` does for finite values.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn round_ps(v: __m256, p: Precision) -> __m256 {
    match p {
        Precision::F32 => v,
        Precision::F16 => _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)),
        Precision::Bf16 => {
            // bits + 0x7fff + lsb, truncated: round half to even on the upper 16 bits.
            let b = _mm256_castps_si256(v);
            let lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
            let r = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb);
            _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(-65536)))
        }
    }
}

/// The byte-plane tables of one block (see the module docs). With `P4` all four planes, else only
/// planes 2 and 3 (entries 0 and 1 are then unused).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_tables<const P4: bool>(
    lut0: __m256,
    lut1: __m256,
    scale: f32,
    rounding: Rounding,
    lut: &[f32; 16],
) -> [__m256i; 4] {
    let (m0, m1) = if scale.is_finite() {
        // No closure here: closures do not inherit `target_feature`, so the calls would not inline.
        let s = _mm256_set1_ps(scale);
        let m0 = round_ps(round_ps(_mm256_mul_ps(lut0, s), rounding.weight), rounding.compute);
        let m1 = round_ps(round_ps(_mm256_mul_ps(lut1, s), rounding.weight), rounding.compute);
        (m0, m1)
    } else {
        // NaN or infinite scales are rare; let the scalar rounding handle their special cases.
        let t: [f32; 16] = lut.map(|c| rounding.apply(c * scale));
        (_mm256_loadu_ps(t.as_ptr()), _mm256_loadu_ps(t.as_ptr().add(8)))
    };
    // Per lane: bytes 0 of the lane's 4 values, then bytes 1, 2, 3.
    let shuf = _mm256_setr_epi8(
        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
    );
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    // s0 qwords: plane 0, 1, 2, 3 of values 0..8; s1 the same for values 8..16.
    let s0 = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(_mm256_castps_si256(m0), shuf), perm);
    let s1 = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(_mm256_castps_si256(m1), shuf), perm);
    let lo = _mm256_unpacklo_epi64(s0, s1); // lane 0: plane 0, lane 1: plane 2
    let hi = _mm256_unpackhi_epi64(s0, s1); // lane 0: plane 1, lane 1: plane 3
    let p2 = _mm256_permute2x128_si256(lo, lo, 0x11);
    let p3 = _mm256_permute2x128_si256(hi, hi, 0x11);
    if P4 {
        [_mm256_permute2x128_si256(lo, lo, 0x00), _mm256_permute2x128_si256(hi, hi, 0x00), p2, p3]
    } else {
        let z = _mm256_setzero_si256();
        [z, z, p2, p3]
    }
}

/// Looks up 32 weights: `idx` lane 0 holds the 16 high nibbles (even values), lane 1 the low
/// ones (odd values). Returns them as f32 in the order of [`permute_x`].
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn lookup32<const P4: bool>(t: &[__m256i; 4], idx: __m256i) -> [__m256; 4] {
    let b2 = _mm256_shuffle_epi8(t[2], idx);
    let b3 = _mm256_shuffle_epi8(t[3], idx);
    let ha = _mm256_unpacklo_epi8(b2, b3);
    let hb = _mm256_unpackhi_epi8(b2, b3);
    let (la, lb) = if P4 {
        let b0 = _mm256_shuffle_epi8(t[0], idx);
        let b1 = _mm256_shuffle_epi8(t[1], idx);
        (_mm256_unpacklo_epi8(b0, b1), _mm256_unpackhi_epi8(b0, b1))
    } else {
        (_mm256_setzero_si256(), _mm256_setzero_si256())
    };
    [
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(la, ha)),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(la, ha)),
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(lb, hb)),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(lb, hb)),
    ]
}

/// `y[i] = W[row0 + i, :] . x` for rows whose width is a multiple of 32; `xp` is
/// [`permute_x`] of `x`.
///
/// # Safety
/// The CPU must support avx2, fma and f16c. `w.in_features % 32 == 0`, `xp.len() ==
/// w.in_features` and `row0 + y.len() <= w.out_features` (slices are still bounds-checked per
/// segment; the loads read inside those checked slices).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemv_rows(w: &Matrix4bit<'_>, xp: &[f32], y: &mut [f32], row0: usize) {
    if w.rounding.stored() == Precision::Bf16 {
        gemv_rows_impl::<false>(w, xp, y, row0)
    } else {
        gemv_rows_impl::<true>(w, xp, y, row0)
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_rows_impl<const P4: bool>(w: &Matrix4bit<'_>, xp: &[f32], y: &mut [f32], row0: usize) {
    let n_in = w.in_features;
    let bs = w.blocksize;
    // Block sizes are powers of two from 32 up, so block and group arithmetic is shifts.
    let bs_shift = bs.trailing_zeros();
    let gpb_shift = bs_shift - 5;
    let lut0 = _mm256_loadu_ps(w.lut.as_ptr());
    let lut1 = _mm256_loadu_ps(w.lut.as_ptr().add(8));
    let low4 = _mm_set1_epi8(0x0f);
    // A row touches at most in / bs + 2 blocks (it may start and end mid-block).
    let mut tabs = vec![[_mm256_setzero_si256(); 4]; (n_in >> bs_shift) + 2];
    for (i, yo) in y.iter_mut().enumerate() {
        let start = (row0 + i) * n_in;
        let end = start + n_in;
        // Phase 1: the row's block tables. Blocks are independent, so this loop runs at
        // instruction throughput instead of stalling each group on its table's latency.
        let b0 = start >> bs_shift;
        let b1 = (end - 1) >> bs_shift;
        for (t, &scale) in tabs.iter_mut().zip(&w.absmax[b0..=b1]) {
            *t = block_tables::<P4>(lut0, lut1, scale, w.rounding, w.lut);
        }
        // Phase 2: 32 weights per step; group g of the row lies in table (g + off) >> gpb_shift.
        let off = (start & (bs - 1)) >> 5;
        let bytes = &w.packed[start / 2..end / 2];
        let mut acc = [_mm256_setzero_ps(); 4];
        for (g, (pb, xv)) in bytes.chunks_exact(16).zip(xp.chunks_exact(32)).enumerate() {
            let t = &tabs[(g + off) >> gpb_shift];
            // `pb` has 16 bytes and `xv` 32 floats (exact chunks): the loads stay inside them.
            let v = _mm_loadu_si128(pb.as_ptr().cast());
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
            let lo = _mm_and_si128(v, low4);
            let idx = _mm256_inserti128_si256(_mm256_castsi128_si256(hi), lo, 1);
            let f = lookup32::<P4>(t, idx);
            let xpp = xv.as_ptr();
            acc[0] = _mm256_fmadd_ps(f[0], _mm256_loadu_ps(xpp), acc[0]);
            acc[1] = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xpp.add(8)), acc[1]);
            acc[2] = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xpp.add(16)), acc[2]);
            acc[3] = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xpp.add(24)), acc[3]);
        }
        *yo = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    }
}

/// `sum a[i] b[i]` over the common length.
///
/// # Safety
/// The CPU must support avx2 and fma.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // Loads read `i .. i + 32 <= n`, inside both slices.
    while i + 32 <= n {
        for (j, s) in acc.iter_mut().enumerate() {
            *s = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8 * j)), _mm256_loadu_ps(pb.add(i + 8 * j)), *s);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
        i += 8;
    }
    let mut s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for k in i..n {
        s += a[k] * b[k];
    }
    s
}

/// The f32 micro-kernel (see [`super::four_bit::tile`] for the operands).
///
/// # Safety
/// The CPU must support avx2 and fma; `1 <= mr <= MR`, `a.len() >= (mr - 1) * lda + kc`,
/// `b.len() >= kc * 16`, `c.len() >= (mr - 1) * ldc + 16`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
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

/// `M` rows x 16 outputs: 2M accumulators, two loads of `b` and `M` broadcasts per step.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_m<const M: usize>(kc: usize, a: &[f32], lda: usize, b: &[f32], c: &mut [f32], ldc: usize, first: bool) {
    let mut c0 = [_mm256_setzero_ps(); M];
    let mut c1 = [_mm256_setzero_ps(); M];
    let cp = c.as_mut_ptr();
    if !first {
        for r in 0..M {
            c0[r] = _mm256_loadu_ps(cp.add(r * ldc));
            c1[r] = _mm256_loadu_ps(cp.add(r * ldc + 8));
        }
    }
    let ap = a.as_ptr();
    let bp = b.as_ptr();
    for k in 0..kc {
        let b0 = _mm256_loadu_ps(bp.add(k * NR));
        let b1 = _mm256_loadu_ps(bp.add(k * NR + 8));
        for r in 0..M {
            let av = _mm256_set1_ps(*ap.add(r * lda + k));
            c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
            c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
        }
    }
    for r in 0..M {
        _mm256_storeu_ps(cp.add(r * ldc), c0[r]);
        _mm256_storeu_ps(cp.add(r * ldc + 8), c1[r]);
    }
}

/// Horizontal wrapping sum of 8 i32 lanes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// Int8 dot products of `M` activation rows with `N` weight rows over `k` values:
/// `out[r][n] = sum a[r * lda + i] * w[n * ldw + i]` (wrapping i32).
///
/// `|w| * sign(a, w)` through `vpmaddubsw` is exact as long as no activation is -128 (then every
/// pair sum is at most 2 * 128 * 127 < 2^15); the driver sends activations holding -128 to the
/// portable kernel.
///
/// # Safety
/// The CPU must support avx2; `a.len() >= (M - 1) * lda + k`, `w.len() >= (N - 1) * ldw + k`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn int8_tile<const M: usize, const N: usize>(
    k: usize,
    a: &[i8],
    lda: usize,
    w: &[i8],
    ldw: usize,
) -> [[i32; N]; M] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_si256(); N]; M];
    let (ap, wp) = (a.as_ptr(), w.as_ptr());
    let mut i = 0;
    while i + 32 <= k {
        let mut wv = [_mm256_setzero_si256(); N];
        let mut wa = [_mm256_setzero_si256(); N];
        for n in 0..N {
            wv[n] = _mm256_loadu_si256(wp.add(n * ldw + i).cast());
            wa[n] = _mm256_abs_epi8(wv[n]);
        }
        for r in 0..M {
            let av = _mm256_loadu_si256(ap.add(r * lda + i).cast());
            for n in 0..N {
                let p = _mm256_maddubs_epi16(wa[n], _mm256_sign_epi8(av, wv[n]));
                acc[r][n] = _mm256_add_epi32(acc[r][n], _mm256_madd_epi16(p, ones));
            }
        }
        i += 32;
    }
    let mut out = [[0i32; N]; M];
    for r in 0..M {
        for n in 0..N {
            let mut s = hsum_i32(acc[r][n]);
            for j in i..k {
                s = s.wrapping_add(i32::from(a[r * lda + j]) * i32::from(w[n * ldw + j]));
            }
            out[r][n] = s;
        }
    }
    out
}

/// The float types a quantizer reads (selected at compile time so the loads are branch-free).
pub(super) const KIND_F32: u8 = 0;
/// IEEE half.
pub(super) const KIND_F16: u8 = 1;
/// bfloat16.
pub(super) const KIND_BF16: u8 = 2;

/// Loads 8 values of kind `K` at element `i` of `p` as f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<const K: u8>(p: *const u8, i: usize) -> __m256 {
    match K {
        KIND_F32 => _mm256_loadu_ps(p.cast::<f32>().add(i)),
        KIND_F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<u16>().add(i).cast())),
        _ => _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast::<u16>().add(i).cast())),
            16,
        )),
    }
}

/// `(max |x| over the non-NaN values, whether any value is NaN)` for the first `n` values of kind
/// `K` at `p`, whole vectors only; returns how many values it covered (a multiple of 8).
///
/// # Safety
/// The CPU must support avx2, fma and f16c; `p` must be valid for `n` values of kind `K`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn abs_max<const K: u8>(p: *const u8, n: usize) -> (f32, bool, usize) {
    let sign = _mm256_set1_ps(-0.0);
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut nan = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        for (j, s) in acc.iter_mut().enumerate() {
            let a = _mm256_andnot_ps(sign, load8::<K>(p, i + 8 * j));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
            // maxps returns its second operand when either is NaN, so NaN never enters `s`.
            *s = _mm256_max_ps(a, *s);
        }
        i += 16;
    }
    while i + 8 <= n {
        let a = _mm256_andnot_ps(sign, load8::<K>(p, i));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
        acc[0] = _mm256_max_ps(a, acc[0]);
        i += 8;
    }
    let m = _mm256_max_ps(acc[0], acc[1]);
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    (_mm_cvtss_f32(m), _mm256_movemask_ps(nan) != 0, i)
}

/// Encodes the first `n` values (a multiple of 32) of kind `K` at `p` into `n / 2` packed bytes:
/// code = `order[#{bounds b : !(b >= s)}]`, exactly `Quant4Tables::encode`.
///
/// # Safety
/// The CPU must support avx2, fma and f16c; `p` must be valid for `n` values of kind `K`;
/// `out.len() >= n / 2`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn encode_4bit<const K: u8>(
    p: *const u8,
    n: usize,
    scale: Scale,
    bounds: &[f32; 15],
    order: &[u8; 16],
    out: &mut [u8],
) {
    let identity = order.iter().enumerate().all(|(i, &o)| usize::from(o) == i);
    let mut ord = [0u8; 32];
    ord[..16].copy_from_slice(order);
    ord[16..].copy_from_slice(order);
    let ord = _mm256_loadu_si256(ord.as_ptr().cast());
    let mut bv = [_mm256_setzero_ps(); 15];
    for (v, &b) in bv.iter_mut().zip(bounds) {
        *v = _mm256_set1_ps(b);
    }
    let (sv, mul) = match scale {
        Scale::Mul(s) => (_mm256_set1_ps(s), true),
        Scale::Div(s) => (_mm256_set1_ps(s), false),
    };
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let lo_nib = _mm256_set1_epi16(0x00f0);
    let op = out.as_mut_ptr();
    let mut i = 0;
    while i + 32 <= n {
        let mut cnt = [_mm256_setzero_si256(); 4];
        let mut s = [_mm256_setzero_ps(); 4];
        for (j, sj) in s.iter_mut().enumerate() {
            let x = load8::<K>(p, i + 8 * j);
            *sj = if mul { _mm256_mul_ps(x, sv) } else { _mm256_div_ps(x, sv) };
        }
        for b in &bv {
            for j in 0..4 {
                // !(b >= s): true for NaN, which therefore lands past the last midpoint.
                let m = _mm256_cmp_ps(*b, s[j], _CMP_NGE_UQ);
                cnt[j] = _mm256_sub_epi32(cnt[j], _mm256_castps_si256(m));
            }
        }
        let p01 = _mm256_packs_epi32(cnt[0], cnt[1]);
        let p23 = _mm256_packs_epi32(cnt[2], cnt[3]);
        let mut codes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), perm);
        if !identity {
            codes = _mm256_shuffle_epi8(ord, codes);
        }
        // Each 16-bit lane holds (even code, odd code); the byte is even << 4 | odd.
        let pair = _mm256_or_si256(
            _mm256_and_si256(_mm256_slli_epi16(codes, 4), lo_nib),
            _mm256_srli_epi16(codes, 8),
        );
        let packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(pair, pair), 0b10_00_10_00);
        // `out.len() >= n / 2` and `i / 2 + 16 <= n / 2`.
        _mm_storeu_si128(op.add(i / 2).cast(), _mm256_castsi256_si128(packed));
        i += 32;
    }
}

/// One row of LLM.int8() quantization over whole 32-value groups of f16 at `p` (`n` values):
/// returns `(absmax over non-outliers, any non-outlier NaN, values covered)` for pass one.
///
/// # Safety
/// The CPU must support avx2, fma and f16c; `p` must be valid for `n` f16 values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn int8_row_absmax(p: *const u8, n: usize, threshold: Option<f32>) -> (f32, bool, usize) {
    let sign = _mm256_set1_ps(-0.0);
    let th = _mm256_set1_ps(threshold.unwrap_or(f32::INFINITY));
    let use_th = threshold.is_some();
    let mut acc = _mm256_setzero_ps();
    let mut nan = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        let a = _mm256_andnot_ps(sign, load8::<KIND_F16>(p, i));
        let a = if use_th { _mm256_andnot_ps(_mm256_cmp_ps(a, th, _CMP_GE_OQ), a) } else { a };
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
        acc = _mm256_max_ps(a, acc);
        i += 8;
    }
    let m = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    (_mm_cvtss_f32(m), _mm256_movemask_ps(nan) != 0, i)
}

/// Pass two of LLM.int8() row quantization over whole 32-value groups: `out[i] =
/// round_half_even(x * k) as i8` (outliers as 0, NaN as 0, saturating). Returns values covered.
///
/// # Safety
/// The CPU must support avx2, fma and f16c; `p` must be valid for `n` f16 values and
/// `out.len() >= n`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn int8_row_encode(p: *const u8, n: usize, threshold: Option<f32>, k: f32, out: &mut [i8]) -> usize {
    let sign = _mm256_set1_ps(-0.0);
    let th = _mm256_set1_ps(threshold.unwrap_or(f32::INFINITY));
    let use_th = threshold.is_some();
    let kv = _mm256_set1_ps(k);
    let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let op = out.as_mut_ptr();
    let mut i = 0;
    while i + 32 <= n {
        let mut q = [_mm256_setzero_si256(); 4];
        for (j, qj) in q.iter_mut().enumerate() {
            let x = load8::<KIND_F16>(p, i + 8 * j);
            let x = if use_th {
                _mm256_andnot_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, x), th, _CMP_GE_OQ), x)
            } else {
                x
            };
            let r = _mm256_round_ps(_mm256_mul_ps(x, kv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            // `as i8`: NaN -> 0 first (max/min would pass NaN through as an operand), then saturate.
            let r = _mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q));
            let r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
            *qj = _mm256_cvttps_epi32(r);
        }
        let p01 = _mm256_packs_epi32(q[0], q[1]);
        let p23 = _mm256_packs_epi32(q[2], q[3]);
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), perm);
        // `i + 32 <= n <= out.len()`.
        _mm256_storeu_si256(op.add(i).cast(), bytes);
        i += 32;
    }
    i
}

/// Marks in `mask` the columns of one f16 row (`n` values at `p`, whole vectors only) with
/// `|x| >= threshold`; returns values covered.
///
/// # Safety
/// The CPU must support avx2, fma and f16c; `p` must be valid for `n` f16 values and
/// `mask.len() >= n`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn outlier_mask_row(p: *const u8, n: usize, threshold: f32, mask: &mut [bool]) -> usize {
    let sign = _mm256_set1_ps(-0.0);
    let th = _mm256_set1_ps(threshold);
    let mut i = 0;
    while i + 8 <= n {
        let a = _mm256_andnot_ps(sign, load8::<KIND_F16>(p, i));
        let bits = _mm256_movemask_ps(_mm256_cmp_ps(a, th, _CMP_GE_OQ));
        if bits != 0 {
            for l in 0..8 {
                if bits & (1 << l) != 0 {
                    mask[i + l] = true;
                }
            }
        }
        i += 8;
    }
    i
}

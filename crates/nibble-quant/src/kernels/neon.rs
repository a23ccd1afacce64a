//! aarch64 NEON kernels.
//!
//! Every function here is `unsafe` only because it is compiled with `#[target_feature]`: callers
//! must have checked [`super::Isa::Neon`] (run-time detection of `neon`) first, and each function
//! states the slice bounds its raw-pointer loads rely on.
//!
//! The 4-bit lookup uses the same byte-plane idea as the AVX2 kernel with `tbl` (16-byte table
//! lookups); NEON's zips keep the values in their natural order, so activations are used as is.

use std::arch::aarch64::*;

use super::four_bit::{Matrix4bit, Precision, MR, NR};

/// The 16 rounded values of one block as byte planes: `[plane 0, 1, 2, 3]`.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn block_planes(w: &Matrix4bit<'_>, b: usize) -> [uint8x16_t; 4] {
    let scale = w.absmax[b];
    let r = w.rounding;
    let vector_ok = scale.is_finite() && r.weight != Precision::F16 && r.compute != Precision::F16;
    let mut v = [vdupq_n_u32(0); 4];
    if vector_ok {
        // Only bf16 roundings (or none): bits + 0x7fff + lsb, truncated, in integer lanes.
        let s = vdupq_n_f32(scale);
        let bf16 = r.weight == Precision::Bf16 || r.compute == Precision::Bf16;
        for (i, vi) in v.iter_mut().enumerate() {
            let m = vreinterpretq_u32_f32(vmulq_f32(vld1q_f32(w.lut.as_ptr().add(4 * i)), s));
            *vi = if bf16 {
                let lsb = vandq_u32(vshrq_n_u32::<16>(m), vdupq_n_u32(1));
                let t = vaddq_u32(vaddq_u32(m, vdupq_n_u32(0x7fff)), lsb);
                vandq_u32(t, vdupq_n_u32(0xffff_0000))
            } else {
                m
            };
        }
    } else {
        // f16 rounding (its NEON intrinsics are not stable in Rust) and non-finite scales.
        let t = w.block_table(b);
        for (i, vi) in v.iter_mut().enumerate() {
            *vi = vreinterpretq_u32_f32(vld1q_f32(t.as_ptr().add(4 * i)));
        }
    }
    let all = uint8x16x4_t(
        vreinterpretq_u8_u32(v[0]),
        vreinterpretq_u8_u32(v[1]),
        vreinterpretq_u8_u32(v[2]),
        vreinterpretq_u8_u32(v[3]),
    );
    let mut planes = [vdupq_n_u8(0); 4];
    for (p, plane) in planes.iter_mut().enumerate() {
        let idx: [u8; 16] = std::array::from_fn(|i| (4 * i + p) as u8);
        *plane = vqtbl4q_u8(all, vld1q_u8(idx.as_ptr()));
    }
    planes
}

/// 16 weights (nibble indices in `idx`, natural order) as 4 x 4 f32.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn lookup16<const P4: bool>(t: &[uint8x16_t; 4], idx: uint8x16_t) -> [float32x4_t; 4] {
    let b2 = vqtbl1q_u8(t[2], idx);
    let b3 = vqtbl1q_u8(t[3], idx);
    let h_lo = vreinterpretq_u16_u8(vzip1q_u8(b2, b3));
    let h_hi = vreinterpretq_u16_u8(vzip2q_u8(b2, b3));
    if P4 {
        let b0 = vqtbl1q_u8(t[0], idx);
        let b1 = vqtbl1q_u8(t[1], idx);
        let l_lo = vreinterpretq_u16_u8(vzip1q_u8(b0, b1));
        let l_hi = vreinterpretq_u16_u8(vzip2q_u8(b0, b1));
        [
            vreinterpretq_f32_u16(vzip1q_u16(l_lo, h_lo)),
            vreinterpretq_f32_u16(vzip2q_u16(l_lo, h_lo)),
            vreinterpretq_f32_u16(vzip1q_u16(l_hi, h_hi)),
            vreinterpretq_f32_u16(vzip2q_u16(l_hi, h_hi)),
        ]
    } else {
        [
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h_lo))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h_lo)),
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h_hi))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h_hi)),
        ]
    }
}

/// `y[i] = W[row0 + i, :] . x` for rows whose width is a multiple of 32.
///
/// # Safety
/// The CPU must support NEON. `w.in_features % 32 == 0`, `x.len() == w.in_features`,
/// `row0 + y.len() <= w.out_features` (segments are bounds-checked slices; loads stay inside).
#[target_feature(enable = "neon")]
pub(super) unsafe fn gemv_rows(w: &Matrix4bit<'_>, x: &[f32], y: &mut [f32], row0: usize) {
    if w.rounding.stored() == Precision::Bf16 {
        gemv_rows_impl::<false>(w, x, y, row0)
    } else {
        gemv_rows_impl::<true>(w, x, y, row0)
    }
}

#[target_feature(enable = "neon")]
unsafe fn gemv_rows_impl<const P4: bool>(w: &Matrix4bit<'_>, x: &[f32], y: &mut [f32], row0: usize) {
    let n_in = w.in_features;
    let bs = w.blocksize;
    let low4 = vdupq_n_u8(0x0f);
    for (i, yo) in y.iter_mut().enumerate() {
        let start = (row0 + i) * n_in;
        let end = start + n_in;
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut e = start;
        while e < end {
            let b = e / bs;
            let seg_end = end.min((b + 1) * bs);
            let t = block_planes(w, b);
            let bytes = &w.packed[e / 2..seg_end / 2];
            let xs = &x[e - start..seg_end - start];
            for (pb, xv) in bytes.chunks_exact(16).zip(xs.chunks_exact(32)) {
                let v = vld1q_u8(pb.as_ptr());
                let hi = vshrq_n_u8::<4>(v);
                let lo = vandq_u8(v, low4);
                let xp = xv.as_ptr();
                let f = lookup16::<P4>(&t, vzip1q_u8(hi, lo));
                for j in 0..4 {
                    acc[j] = vfmaq_f32(acc[j], f[j], vld1q_f32(xp.add(4 * j)));
                }
                let f = lookup16::<P4>(&t, vzip2q_u8(hi, lo));
                for j in 0..4 {
                    acc[j] = vfmaq_f32(acc[j], f[j], vld1q_f32(xp.add(16 + 4 * j)));
                }
            }
            e = seg_end;
        }
        *yo = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
    }
}

/// Decodes the values `e0 .. e0 + out.len()` of the flattened weight into `out` (natural order),
/// for filling the matrix-matrix kernel's panels. `e0` and `out.len()` are multiples of 32.
///
/// # Safety
/// The CPU must support NEON. `e0 % 32 == 0`, `out.len() % 32 == 0` and the range inside the
/// weight (the packed bytes are a checked slice).
#[target_feature(enable = "neon")]
pub(super) unsafe fn decode_aligned(w: &Matrix4bit<'_>, e0: usize, out: &mut [f32]) {
    if w.rounding.stored() == Precision::Bf16 {
        decode_aligned_impl::<false>(w, e0, out)
    } else {
        decode_aligned_impl::<true>(w, e0, out)
    }
}

#[target_feature(enable = "neon")]
unsafe fn decode_aligned_impl<const P4: bool>(w: &Matrix4bit<'_>, e0: usize, out: &mut [f32]) {
    let bs = w.blocksize;
    let low4 = vdupq_n_u8(0x0f);
    let mut cur = usize::MAX;
    let mut t = [vdupq_n_u8(0); 4];
    let bytes = &w.packed[e0 / 2..(e0 + out.len()) / 2];
    for (g, (pb, og)) in bytes.chunks_exact(16).zip(out.chunks_exact_mut(32)).enumerate() {
        let b = (e0 + 32 * g) / bs;
        if b != cur {
            t = block_planes(w, b);
            cur = b;
        }
        let v = vld1q_u8(pb.as_ptr());
        let hi = vshrq_n_u8::<4>(v);
        let lo = vandq_u8(v, low4);
        let op = og.as_mut_ptr();
        // `og` has 32 floats (exact chunk): the stores stay inside it.
        let f = lookup16::<P4>(&t, vzip1q_u8(hi, lo));
        for (j, fj) in f.iter().enumerate() {
            vst1q_f32(op.add(4 * j), *fj);
        }
        let f = lookup16::<P4>(&t, vzip2q_u8(hi, lo));
        for (j, fj) in f.iter().enumerate() {
            vst1q_f32(op.add(16 + 4 * j), *fj);
        }
    }
}

/// `sum a[i] b[i]` over the common length.
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    // Loads read `i .. i + 16 <= n`, inside both slices.
    while i + 16 <= n {
        for (j, s) in acc.iter_mut().enumerate() {
            *s = vfmaq_f32(*s, vld1q_f32(pa.add(i + 4 * j)), vld1q_f32(pb.add(i + 4 * j)));
        }
        i += 16;
    }
    let mut s = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
    for k in i..n {
        s += a[k] * b[k];
    }
    s
}

/// The f32 micro-kernel (see [`super::four_bit::tile`] for the operands).
///
/// # Safety
/// The CPU must support NEON; `1 <= mr <= MR`, `a.len() >= (mr - 1) * lda + kc`,
/// `b.len() >= kc * 16`, `c.len() >= (mr - 1) * ldc + 16`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "neon")]
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

/// `M` rows x 16 outputs: 4M accumulators (NEON has 32 registers).
#[target_feature(enable = "neon")]
unsafe fn tile_m<const M: usize>(kc: usize, a: &[f32], lda: usize, b: &[f32], c: &mut [f32], ldc: usize, first: bool) {
    let mut acc = [[vdupq_n_f32(0.0); 4]; M];
    let cp = c.as_mut_ptr();
    if !first {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            for (j, v) in acc_r.iter_mut().enumerate() {
                *v = vld1q_f32(cp.add(r * ldc + 4 * j));
            }
        }
    }
    let ap = a.as_ptr();
    let bp = b.as_ptr();
    for k in 0..kc {
        let bv = [
            vld1q_f32(bp.add(k * NR)),
            vld1q_f32(bp.add(k * NR + 4)),
            vld1q_f32(bp.add(k * NR + 8)),
            vld1q_f32(bp.add(k * NR + 12)),
        ];
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let av = *ap.add(r * lda + k);
            for (v, &bj) in acc_r.iter_mut().zip(&bv) {
                *v = vfmaq_n_f32(*v, bj, av);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (j, v) in acc_r.iter().enumerate() {
            vst1q_f32(cp.add(r * ldc + 4 * j), *v);
        }
    }
}

/// Int8 dot products of `M` activation rows with `N` weight rows over `k` values (wrapping i32):
/// widening multiplies to i16 (exact, |p| <= 2^14) and pairwise accumulation into i32.
///
/// # Safety
/// The CPU must support NEON; `a.len() >= (M - 1) * lda + k`, `w.len() >= (N - 1) * ldw + k`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn int8_tile<const M: usize, const N: usize>(
    k: usize,
    a: &[i8],
    lda: usize,
    w: &[i8],
    ldw: usize,
) -> [[i32; N]; M] {
    let mut acc = [[vdupq_n_s32(0); N]; M];
    let (ap, wp) = (a.as_ptr(), w.as_ptr());
    let mut i = 0;
    while i + 16 <= k {
        let mut wv = [vdupq_n_s8(0); N];
        for (n, v) in wv.iter_mut().enumerate() {
            *v = vld1q_s8(wp.add(n * ldw + i));
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let av = vld1q_s8(ap.add(r * lda + i));
            for (a, &wn) in acc_r.iter_mut().zip(&wv) {
                let lo = vmull_s8(vget_low_s8(av), vget_low_s8(wn));
                let hi = vmull_high_s8(av, wn);
                *a = vpadalq_s16(vpadalq_s16(*a, lo), hi);
            }
        }
        i += 16;
    }
    let mut out = [[0i32; N]; M];
    for (r, (out_r, acc_r)) in out.iter_mut().zip(&acc).enumerate() {
        for (n, (o, &v)) in out_r.iter_mut().zip(acc_r).enumerate() {
            let mut s = vaddvq_s32(v);
            for j in i..k {
                s = s.wrapping_add(i32::from(a[r * lda + j]) * i32::from(w[n * ldw + j]));
            }
            *o = s;
        }
    }
    out
}

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

/// The order in which [`lookup32`] produces the weights of a 16-value half group (the same for
/// both halves of a 32-value group).
const ORDER16: [usize; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

/// Activations in the order the 4-bit kernel produces weights ([`ORDER16`] per 16 values).
pub(super) fn permute_x(x: &[f32]) -> Vec<f32> {
    super::permute_chunks(x, &ORDER16)
}

/// The order in which [`gemv_row64`] produces the 64 weights of a 32-byte chunk: high nibbles
/// (even weights) of the chunk's 32 bytes, then low nibbles (odd weights); within each, four
/// vectors of 8 as [`lookup32`] leaves them (two 4-value halves per vector, one per 128-bit lane).
const ORDER64: [usize; 64] = {
    let mut o = [0usize; 64];
    let mut p = 0;
    while p < 64 {
        let (nib, v, lane, e) = (p / 32, (p / 8) % 4, (p / 4) % 2, p % 4);
        // Byte `j` of the chunk holds weights 2j (high nibble) and 2j + 1 (low nibble).
        let j = 16 * lane + 8 * (v / 2) + v % 2 + 2 * e;
        o[p] = 2 * j + nib;
        p += 1;
    }
    o
};

/// Activations in the order [`gemv_row64`] produces weights ([`ORDER64`] per 64 values); `x`'s
/// length is a multiple of 64 where that kernel is used (a shorter tail is copied as it is).
pub(super) fn permute_x64(x: &[f32]) -> Vec<f32> {
    super::permute_chunks(x, &ORDER64)
}

/// Horizontal sum of 8 lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// The rounding chains a 4-bit weight can go through, as kernel variants (`MODE` below): the
/// first two end in bf16, so their tables need only the upper two bytes of each value.
const MODE_BF16: u8 = 0;
/// f16, then bf16.
const MODE_F16_BF16: u8 = 1;
/// No rounding (f32 weights, f32 compute).
const MODE_F32: u8 = 2;
/// f16 (f16 weights or f16 compute).
const MODE_F16: u8 = 3;
/// bf16, then f16.
const MODE_BF16_F16: u8 = 4;

/// The kernel variant for a rounding chain (roundings that change nothing are dropped: f32 is
/// exact, and rounding to the same precision twice is rounding once).
fn mode_of(r: Rounding) -> u8 {
    match (r.weight, r.compute) {
        (Precision::F32, Precision::F32) => MODE_F32,
        (Precision::F16, Precision::Bf16) => MODE_F16_BF16,
        (Precision::Bf16, Precision::F16) => MODE_BF16_F16,
        (_, Precision::Bf16) | (Precision::Bf16, Precision::F32) => MODE_BF16,
        _ => MODE_F16,
    }
}

/// Whether tables of `MODE` hold only the upper two bytes (bf16 values).
const fn two_planes(mode: u8) -> bool {
    mode == MODE_BF16 || mode == MODE_F16_BF16
}

/// Rounds 8 f32 to f16 and back (nearest even, as `half` does).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn round_f16(v: __m256) -> __m256 {
    _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT))
}

/// Rounds 8 finite f32 to bf16 (nearest even, as `half` does), returned as the 16-bit patterns
/// in the low half of each 32-bit lane: bits + 0x7fff + lsb, shifted down.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bf16_bits(v: __m256) -> __m256i {
    let b = _mm256_castps_si256(v);
    let lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb), 16)
}

/// Two-plane tables of two blocks at once, from their 16 bf16 patterns (low 16 bits of each
/// 32-bit lane; `h[i]` holds values `4i..4i + 4`, block A in lane 0 and block B in lane 1):
/// `[low bytes, high bytes]`, each `[A's 16 | B's 16]`. Only in-lane shuffles, which are cheap
/// and short-latency (cross-lane ones are neither on AMD cores).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn planes2_pair(h: [__m256i; 4]) -> [__m256i; 2] {
    // u16 per lane: values 0..8, and 8..16.
    let p01 = _mm256_packus_epi32(h[0], h[1]);
    let p23 = _mm256_packus_epi32(h[2], h[3]);
    // Per lane: the 8 low bytes, then the 8 high bytes.
    let split = _mm256_setr_epi8(
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
    );
    let (x, y) = (_mm256_shuffle_epi8(p01, split), _mm256_shuffle_epi8(p23, split));
    [_mm256_unpacklo_epi64(x, y), _mm256_unpackhi_epi64(x, y)]
}

/// Four-plane tables of two blocks at once from their 16 f32 values (`m[i]` holds values
/// `4i..4i + 4`, block A in lane 0, B in lane 1): bytes 0, 1, 2, 3 of each value, each plane
/// `[A's 16 | B's 16]`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn planes4_pair(m: [__m256; 4]) -> [__m256i; 4] {
    // Per lane: byte 0 of the 4 values, then bytes 1, 2, 3 (dwords = planes of 4 values).
    let shuf = _mm256_setr_epi8(
        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
    );
    let s: [__m256i; 4] = [
        _mm256_shuffle_epi8(_mm256_castps_si256(m[0]), shuf),
        _mm256_shuffle_epi8(_mm256_castps_si256(m[1]), shuf),
        _mm256_shuffle_epi8(_mm256_castps_si256(m[2]), shuf),
        _mm256_shuffle_epi8(_mm256_castps_si256(m[3]), shuf),
    ];
    // A 4 x 4 dword transpose per lane.
    let a = _mm256_unpacklo_epi32(s[0], s[1]); // p0(0..4) p0(4..8) p1(0..4) p1(4..8)
    let b = _mm256_unpackhi_epi32(s[0], s[1]); // p2 .. p3 ..
    let c = _mm256_unpacklo_epi32(s[2], s[3]);
    let d = _mm256_unpackhi_epi32(s[2], s[3]);
    [
        _mm256_unpacklo_epi64(a, c),
        _mm256_unpackhi_epi64(a, c),
        _mm256_unpacklo_epi64(b, d),
        _mm256_unpackhi_epi64(b, d),
    ]
}

/// Tables of two blocks with scales `sa` (lane 0) and `sb` (lane 1), rounded as `MODE` says;
/// `lq[i]` is code book entries `4i..4i + 4` in both lanes. Returns the planes (two-plane modes
/// fill entries 0 and 1).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pair_tables<const MODE: u8>(lq: &[__m256; 4], sa: f32, sb: f32) -> [__m256i; 4] {
    let s = _mm256_setr_m128(_mm_set1_ps(sa), _mm_set1_ps(sb));
    let mut m = [_mm256_setzero_ps(); 4];
    for i in 0..4 {
        m[i] = _mm256_mul_ps(lq[i], s);
        if MODE == MODE_F16_BF16 || MODE == MODE_F16 {
            m[i] = round_f16(m[i]);
        }
    }
    if two_planes(MODE) {
        let [lo, hi] = planes2_pair([bf16_bits(m[0]), bf16_bits(m[1]), bf16_bits(m[2]), bf16_bits(m[3])]);
        let z = _mm256_setzero_si256();
        return [lo, hi, z, z];
    }
    if MODE == MODE_BF16_F16 {
        // bf16 patterns back to f32, then f16.
        for v in &mut m {
            *v = round_f16(_mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(*v), 16)));
        }
    }
    planes4_pair(m)
}

/// [`pair_tables`] for blocks `a` and `b` when a scale is NaN or infinite: the scalar rounding
/// handles the special values (NaN payloads, overflow) exactly as `half` does.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pair_tables_scalar<const MODE: u8>(w: &Matrix4bit<'_>, a: usize, b: usize) -> [__m256i; 4] {
    let (ta, tb) = (w.block_table(a), w.block_table(b));
    let mut m = [_mm256_setzero_ps(); 4];
    for (i, v) in m.iter_mut().enumerate() {
        *v = _mm256_setr_m128(_mm_loadu_ps(ta.as_ptr().add(4 * i)), _mm_loadu_ps(tb.as_ptr().add(4 * i)));
    }
    if two_planes(MODE) {
        // Already bf16 values: their patterns are the upper halves.
        let mut h = [_mm256_setzero_si256(); 4];
        for (h, v) in h.iter_mut().zip(&m) {
            *h = _mm256_srli_epi32(_mm256_castps_si256(*v), 16);
        }
        let [lo, hi] = planes2_pair(h);
        let z = _mm256_setzero_si256();
        return [lo, hi, z, z];
    }
    planes4_pair(m)
}

/// Looks up 32 weights: `idx` lane 0 holds the 16 high nibbles (even values), lane 1 the low
/// ones (odd values). Returns them as f32 in the order of [`permute_x`].
///
/// After the byte lookups, `unpack*_epi8` pairs the bytes into 16-bit lanes (lane 0: values
/// 0 2 4 .. 14, lane 1: 1 3 .. 15, and the same + 16); 16-bit lanes become f32 with a shift
/// (even lanes) or a mask (odd lanes), which run on more execution ports than 16-bit unpacks.
/// `hi16` is the mask `0xffff0000` in every lane, made by [`hi16_mask`] once per call.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn lookup32<const MODE: u8>(t: &[__m256i; 4], idx: __m256i, hi16: __m256i) -> [__m256; 4] {
    if two_planes(MODE) {
        let b2 = _mm256_shuffle_epi8(t[0], idx);
        let b3 = _mm256_shuffle_epi8(t[1], idx);
        let ha = _mm256_unpacklo_epi8(b2, b3);
        let hb = _mm256_unpackhi_epi8(b2, b3);
        return [
            _mm256_castsi256_ps(_mm256_slli_epi32(ha, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(ha, hi16)),
            _mm256_castsi256_ps(_mm256_slli_epi32(hb, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(hb, hi16)),
        ];
    }
    let lo16 = _mm256_set1_epi32(0xffff);
    let b0 = _mm256_shuffle_epi8(t[0], idx);
    let b1 = _mm256_shuffle_epi8(t[1], idx);
    let b2 = _mm256_shuffle_epi8(t[2], idx);
    let b3 = _mm256_shuffle_epi8(t[3], idx);
    let (la, lb) = (_mm256_unpacklo_epi8(b0, b1), _mm256_unpackhi_epi8(b0, b1));
    let (ha, hb) = (_mm256_unpacklo_epi8(b2, b3), _mm256_unpackhi_epi8(b2, b3));
    // Even 16-bit lanes: low half from l, high half from h shifted up; odd lanes: l shifted
    // down, h masked. (No closures: they would not inherit `target_feature`.)
    [
        _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(la, lo16), _mm256_slli_epi32(ha, 16))),
        _mm256_castsi256_ps(_mm256_or_si256(_mm256_srli_epi32(la, 16), _mm256_and_si256(ha, hi16))),
        _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(lb, lo16), _mm256_slli_epi32(hb, 16))),
        _mm256_castsi256_ps(_mm256_or_si256(_mm256_srli_epi32(lb, 16), _mm256_and_si256(hb, hi16))),
    ]
}

/// The mask `0xffff0000` in every 32-bit lane, opaque to the optimizer so that masking with it
/// stays `vpand` (which runs on every vector port) instead of becoming `vpblendw` (which
/// competes with the shuffles). Made once per call and kept in a register.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hi16_mask() -> __m256i {
    std::hint::black_box(_mm256_set1_epi32(-65536))
}

/// The code book, entries `4i..4i + 4` in both lanes of `lq[i]`, as [`pair_tables`] takes it.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn code_book_lanes(w: &Matrix4bit<'_>) -> [__m256; 4] {
    let mut lq = [_mm256_setzero_ps(); 4];
    for (i, q) in lq.iter_mut().enumerate() {
        // The code book has 16 entries: 4i + 4 <= 16.
        let l = _mm_loadu_ps(w.lut.as_ptr().add(4 * i));
        *q = _mm256_setr_m128(l, l);
    }
    lq
}

/// The tables of one weight row's blocks `b0 .. b0 + scales.len()` (with their `scales`), two
/// blocks per step (one per 128-bit lane), into `tabs`: per pair of blocks (A, B), plane k of
/// A in slot 8p + 2k and of B in slot 8p + 2k + 1, so a pair's plane is one 32-byte load
/// `[A | B]` and one block's plane a 16-byte broadcast. Blocks are independent, so this runs
/// at instruction throughput. `tabs` must hold `scales.len().div_ceil(2) * 8` slots.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn row_tables<const MODE: u8>(
    w: &Matrix4bit<'_>,
    lq: &[__m256; 4],
    b0: usize,
    scales: &[f32],
    tabs: &mut [__m128i],
) {
    let n_planes = if two_planes(MODE) { 2 } else { 4 };
    // One vectorizable pass decides whether any block needs the scalar path.
    let finite = scales.iter().fold(true, |ok, s| ok & s.is_finite());
    for (p, (pair, slots)) in scales.chunks(2).zip(tabs.chunks_exact_mut(8)).enumerate() {
        // An odd last block pairs with itself; the copy in lane B is never read.
        let (sa, sb) = (pair[0], pair[pair.len() - 1]);
        let planes = if finite {
            pair_tables::<MODE>(lq, sa, sb)
        } else {
            let a = b0 + 2 * p;
            pair_tables_scalar::<MODE>(w, a, a + pair.len() - 1)
        };
        // Slots 2k and 2k + 1 (inside this 8-slot chunk) take plane k of blocks A and B.
        let sp = slots.as_mut_ptr();
        for (k, plane) in planes.iter().take(n_planes).enumerate() {
            _mm256_storeu_si256(sp.add(2 * k).cast(), *plane);
        }
    }
}

/// One activation row against weight rows `row0 .. row0 + n` whose width is a multiple of 32:
/// `out[i * stride + off] = W[row0 + i, :] . x`, where `xp` is the row [`permute_x`]-ed. (A
/// product of several activation rows runs this for each, so that a row's result does not
/// depend on the batch.)
///
/// # Safety
/// The CPU must support avx2, fma and f16c. `w.in_features % 32 == 0`,
/// `xp.len() == w.in_features`, `row0 + n <= w.out_features` (weights and activations are
/// reached through checked slices; the loads read inside them).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemv_rows(w: &Matrix4bit<'_>, xp: &[f32], out: &mut [f32], stride: usize, off: usize, row0: usize, n: usize) {
    match mode_of(w.rounding) {
        MODE_BF16 => gemv_rows_impl::<MODE_BF16>(w, xp, out, stride, off, row0, n),
        MODE_F16_BF16 => gemv_rows_impl::<MODE_F16_BF16>(w, xp, out, stride, off, row0, n),
        MODE_F32 => gemv_rows_impl::<MODE_F32>(w, xp, out, stride, off, row0, n),
        MODE_BF16_F16 => gemv_rows_impl::<MODE_BF16_F16>(w, xp, out, stride, off, row0, n),
        _ => gemv_rows_impl::<MODE_F16>(w, xp, out, stride, off, row0, n),
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_rows_impl<const MODE: u8>(
    w: &Matrix4bit<'_>,
    xp: &[f32],
    out: &mut [f32],
    stride: usize,
    off: usize,
    row0: usize,
    n: usize,
) {
    let n_in = w.in_features;
    let bs = w.blocksize;
    // Block sizes are powers of two from 32 up, so block and group arithmetic is shifts.
    let bs_shift = bs.trailing_zeros();
    let gpb_shift = bs_shift - 5;
    let lq = code_book_lanes(w);
    let low4 = _mm256_set1_epi8(0x0f);
    let hi16 = hi16_mask();
    let nib_shift = _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0);
    let x = &xp[..n_in];
    // Table slots as `row_tables` lays them out. A row touches at most in / bs + 2 blocks (it
    // may start and end mid-block).
    let pairs = ((n_in >> bs_shift) + 2).div_ceil(2);
    let mut tabs = vec![_mm_setzero_si128(); pairs * 8];
    for i in 0..n {
        let start = (row0 + i) * n_in;
        let end = start + n_in;
        // Phase 1: the tables of the blocks the row touches.
        let b0 = start >> bs_shift;
        let b1 = (end - 1) >> bs_shift;
        let scales = &w.absmax[b0..=b1];
        row_tables::<MODE>(w, &lq, b0, scales, &mut tabs);
        // Phase 2: 32 weights per step; group g of the row lies in block (g + off) >> gpb_shift.
        // Four accumulators, so FMA latency never limits it.
        let goff = (start & (bs - 1)) >> 5;
        let bytes = &w.packed[start / 2..end / 2];
        let mut a = [_mm256_setzero_ps(); 4];
        for (g, pb) in bytes.chunks_exact(16).enumerate() {
            let j = (g + goff) >> gpb_shift;
            let slot = 8 * (j >> 1) + (j & 1);
            // Each plane is 16 bytes; broadcasting it to both lanes is a plain load.
            let t = [
                _mm256_broadcastsi128_si256(tabs[slot]),
                _mm256_broadcastsi128_si256(tabs[slot + 2]),
                if two_planes(MODE) { low4 } else { _mm256_broadcastsi128_si256(tabs[slot + 4]) },
                if two_planes(MODE) { low4 } else { _mm256_broadcastsi128_si256(tabs[slot + 6]) },
            ];
            // `pb` has 16 bytes (exact chunk): the load stays inside it. The bytes go to both
            // lanes (a plain load), lane 0 is shifted to its high nibbles.
            let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(pb.as_ptr().cast()));
            let idx = _mm256_and_si256(_mm256_srlv_epi32(v, nib_shift), low4);
            let f = lookup32::<MODE>(&t, idx, hi16);
            // `x` has `n_in` values and 32 g + 32 <= n_in.
            let xpp = x.as_ptr().add(32 * g);
            for k in 0..4 {
                a[k] = _mm256_fmadd_ps(f[k], _mm256_loadu_ps(xpp.add(8 * k)), a[k]);
            }
        }
        out[i * stride + off] = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
    }
}

/// One activation row against weight rows `row0 .. row0 + out.len()` whose width is a multiple
/// of 64 and of the block size: `out[i] = W[row0 + i, :] . x`, with `xp` the row [`permute_x64`]-ed.
///
/// The decode kernel of choice: every row starts on a block boundary, so the loop walks 32-byte
/// chunks (64 weights, one or two blocks) with no per-weight index arithmetic, splitting high and
/// low nibbles of a whole chunk with one shift and two masks.
///
/// When the weights end in bf16, blocks are 64 values or more and a row's scales are finite, the
/// block scale is factored out: `sum_b s_b * sum_(i in b) bf16(code_i) * x_i`, one fixed table
/// for the whole matrix instead of one per block (the tables were a third of the work).
/// Otherwise each block's table of exactly rounded weights is built first ([`row_tables`]).
///
/// # Safety
/// The CPU must support avx2, fma and f16c. `w.in_features % 64 == 0`,
/// `w.in_features % w.blocksize == 0`, `xp.len() == w.in_features`,
/// `row0 + out.len() <= w.out_features`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemv_row64(w: &Matrix4bit<'_>, xp: &[f32], out: &mut [f32], row0: usize) {
    match mode_of(w.rounding) {
        MODE_BF16 => gemv_row64_impl::<MODE_BF16>(w, xp, out, row0),
        MODE_F16_BF16 => gemv_row64_impl::<MODE_F16_BF16>(w, xp, out, row0),
        MODE_F32 => gemv_row64_impl::<MODE_F32>(w, xp, out, row0),
        MODE_BF16_F16 => gemv_row64_impl::<MODE_BF16_F16>(w, xp, out, row0),
        _ => gemv_row64_impl::<MODE_F16>(w, xp, out, row0),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_row64_impl<const MODE: u8>(w: &Matrix4bit<'_>, xp: &[f32], out: &mut [f32], row0: usize) {
    let n_in = w.in_features;
    let bs_shift = w.blocksize.trailing_zeros();
    let lq = code_book_lanes(w);
    let low4 = _mm256_set1_epi8(0x0f);
    let hi16 = hi16_mask();
    let blocks = n_in >> bs_shift;
    // Table slots as `row_tables` lays them out, allocated for the first row that takes the exact
    // path (scale-factored calls, many per decode step, need none).
    let mut tabs: Vec<__m128i> = Vec::new();
    // The code book rounded to bf16, as the planes of a block pair, both lanes the same.
    let mut h = [_mm256_setzero_si256(); 4];
    for (h, q) in h.iter_mut().zip(&lq) {
        *h = bf16_bits(*q);
    }
    let [lo, hi] = planes2_pair(h);
    // f32 weights (f32 compute) factor with the exact f32 code book, four planes: `s_b * sum
    // code_i x_i` differs from `sum f32(code_i s_b) x_i` only by f32 rounding, as a reordered sum.
    let code_planes = if MODE == MODE_F32 { pair_tables::<MODE_F32>(&lq, 1.0, 1.0) } else { [lo, hi, low4, low4] };
    let factored = (two_planes(MODE) || MODE == MODE_F32) && w.blocksize >= 64;
    for (i, o) in out.iter_mut().enumerate() {
        let start = (row0 + i) * n_in;
        let b0 = start >> bs_shift;
        let scales = &w.absmax[b0..b0 + blocks];
        // 32-byte chunks of this row: `start / 2 + 32 c + 32 <= (start + n_in) / 2`.
        let bytes = w.packed.as_ptr().add(start / 2);
        *o = if factored && scales.iter().fold(true, |ok, s| ok & s.is_finite()) {
            if w.blocksize == 64 {
                // The default block size gets its own copy of the loop: one chunk per block.
                row64_scaled::<MODE, 1>(bytes, scales, 1, xp, &code_planes, hi16)
            } else {
                row64_scaled::<MODE, 0>(bytes, scales, w.blocksize / 64, xp, &code_planes, hi16)
            }
        } else {
            if tabs.is_empty() {
                tabs = vec![_mm_setzero_si128(); blocks.div_ceil(2) * 8];
            }
            row_tables::<MODE>(w, &lq, b0, scales, &mut tabs);
            row64_tables::<MODE>(bytes, &tabs, w.blocksize, n_in / 64, xp, hi16)
        };
    }
}

/// Splits a 32-byte chunk of packed weights into its high nibbles (even weights) and low ones.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles64(chunk: *const u8) -> (__m256i, __m256i) {
    let low4 = _mm256_set1_epi8(0x0f);
    let v = _mm256_loadu_si256(chunk.cast());
    (_mm256_and_si256(_mm256_srli_epi16(v, 4), low4), _mm256_and_si256(v, low4))
}

/// One row of [`gemv_row64`] with per-block tables (`tabs`, as [`row_tables`] fills them for the
/// row's blocks): eight accumulators, so FMA latency never limits it. `chunks` is `n_in / 64`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn row64_tables<const MODE: u8>(
    bytes: *const u8,
    tabs: &[__m128i],
    bs: usize,
    chunks: usize,
    xp: &[f32],
    hi16: __m256i,
) -> f32 {
    let bs_shift = bs.trailing_zeros();
    let n_planes = if two_planes(MODE) { 2 } else { 4 };
    let low4 = _mm256_set1_epi8(0x0f);
    let mut acc = [_mm256_setzero_ps(); 8];
    let tp = tabs.as_ptr();
    let xpp = xp.as_ptr();
    for c in 0..chunks {
        // The chunk's planes: lane 0 for its first 32 weights, lane 1 for the last 32. With
        // blocks of 32 those are blocks 2c and 2c + 1, pair c: a plain 32-byte load. With
        // larger blocks both lanes take block j, broadcast.
        // (No closure: it would not inherit `target_feature`.)
        let mut t = [low4; 4];
        for (k, tk) in t.iter_mut().enumerate().take(n_planes) {
            *tk = if bs == 32 {
                _mm256_loadu_si256(tp.add(8 * c + 2 * k).cast())
            } else {
                let j = (64 * c) >> bs_shift;
                _mm256_broadcastsi128_si256(*tp.add(8 * (j >> 1) + (j & 1) + 2 * k))
            };
        }
        let (hi, lo) = nibbles64(bytes.add(32 * c));
        let fh = lookup32::<MODE>(&t, hi, hi16);
        let fl = lookup32::<MODE>(&t, lo, hi16);
        // `xp` has n_in values: 64 c + 64 <= n_in.
        let xc = xpp.add(64 * c);
        for k in 0..4 {
            acc[k] = _mm256_fmadd_ps(fh[k], _mm256_loadu_ps(xc.add(8 * k)), acc[k]);
            acc[4 + k] = _mm256_fmadd_ps(fl[k], _mm256_loadu_ps(xc.add(32 + 8 * k)), acc[4 + k]);
        }
    }
    let s0 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let s1 = _mm256_add_ps(_mm256_add_ps(acc[4], acc[5]), _mm256_add_ps(acc[6], acc[7]));
    hsum(_mm256_add_ps(s0, s1))
}

/// One row of [`gemv_row64`] with the block scales factored out: per block of `cpb` chunks, two
/// partial sums of `code * x` (bf16 code book `planes`), then one FMA by the block's scale into
/// one of two row accumulators. `scales` are the row's blocks; `CPB` is `cpb` when nonzero.
/// `MODE` is [`MODE_F32`] (four-plane f32 code book) or one ending in bf16 (two planes).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn row64_scaled<const MODE: u8, const CPB: usize>(
    bytes: *const u8,
    scales: &[f32],
    cpb: usize,
    xp: &[f32],
    planes: &[__m256i; 4],
    hi16: __m256i,
) -> f32 {
    // A known count (`CPB` > 0) lets the compiler drop the inner loop.
    let cpb = if CPB > 0 { CPB } else { cpb };
    // Two named accumulators, not an array indexed by block parity: a run-time index would
    // keep them in memory.
    let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let xpp = xp.as_ptr();
    let mut c = 0;
    for (j, &s) in scales.iter().enumerate() {
        let mut part = [_mm256_setzero_ps(); 2];
        for _ in 0..cpb {
            let (hi, lo) = nibbles64(bytes.add(32 * c));
            let fh = lookup32::<MODE>(planes, hi, hi16);
            let fl = lookup32::<MODE>(planes, lo, hi16);
            // `xp` has n_in = scales.len() * cpb * 64 values: 64 c + 64 <= n_in.
            let xc = xpp.add(64 * c);
            for k in 0..4 {
                part[k & 1] = _mm256_fmadd_ps(fh[k], _mm256_loadu_ps(xc.add(8 * k)), part[k & 1]);
            }
            for k in 0..4 {
                part[k & 1] = _mm256_fmadd_ps(fl[k], _mm256_loadu_ps(xc.add(32 + 8 * k)), part[k & 1]);
            }
            c += 1;
        }
        let block = _mm256_add_ps(part[0], part[1]);
        if j & 1 == 0 {
            even = _mm256_fmadd_ps(block, _mm256_set1_ps(s), even);
        } else {
            odd = _mm256_fmadd_ps(block, _mm256_set1_ps(s), odd);
        }
    }
    hsum(_mm256_add_ps(even, odd))
}

/// Decodes the values `e0 .. e0 + out.len()` of the flattened weight into `out` in natural
/// order, for filling the matrix-matrix kernel's panels. `e0` and `out.len()` are multiples of 32.
///
/// # Safety
/// The CPU must support avx2, fma and f16c. `e0 % 32 == 0`, `out.len() % 32 == 0` and
/// `e0 + out.len() <= w.out_features * w.in_features` (the packed bytes are a checked slice).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn decode_aligned(w: &Matrix4bit<'_>, e0: usize, out: &mut [f32]) {
    match mode_of(w.rounding) {
        MODE_BF16 => decode_aligned_impl::<MODE_BF16>(w, e0, out),
        MODE_F16_BF16 => decode_aligned_impl::<MODE_F16_BF16>(w, e0, out),
        MODE_F32 => decode_aligned_impl::<MODE_F32>(w, e0, out),
        MODE_BF16_F16 => decode_aligned_impl::<MODE_BF16_F16>(w, e0, out),
        _ => decode_aligned_impl::<MODE_F16>(w, e0, out),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_aligned_impl<const MODE: u8>(w: &Matrix4bit<'_>, e0: usize, out: &mut [f32]) {
    let bs_shift = w.blocksize.trailing_zeros();
    let lq = code_book_lanes(w);
    let low4 = _mm256_set1_epi8(0x0f);
    let hi16 = hi16_mask();
    let nib_shift = _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0);
    let mut cur = usize::MAX;
    let mut t = [_mm256_setzero_si256(); 4];
    let mut tmp = [0.0f32; 32];
    let bytes = &w.packed[e0 / 2..(e0 + out.len()) / 2];
    for (g, (pb, og)) in bytes.chunks_exact(16).zip(out.chunks_exact_mut(32)).enumerate() {
        let b = (e0 + 32 * g) >> bs_shift;
        if b != cur {
            // A block paired with itself: both lanes hold its table, as `lookup32` wants.
            let s = w.absmax[b];
            t = if s.is_finite() { pair_tables::<MODE>(&lq, s, s) } else { pair_tables_scalar::<MODE>(w, b, b) };
            if two_planes(MODE) {
                t[2] = low4;
                t[3] = low4;
            }
            cur = b;
        }
        // `pb` has 16 bytes (exact chunk).
        let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(pb.as_ptr().cast()));
        let idx = _mm256_and_si256(_mm256_srlv_epi32(v, nib_shift), low4);
        let f = lookup32::<MODE>(&t, idx, hi16);
        let tp = tmp.as_mut_ptr();
        for (j, fj) in f.iter().enumerate() {
            // `tmp` has 32 floats: j * 8 + 8 <= 32.
            _mm256_storeu_ps(tp.add(8 * j), *fj);
        }
        // Undo the kernel order (`ORDER16` per 16 values).
        for (src, dst) in tmp.chunks_exact(16).zip(og.chunks_exact_mut(16)) {
            for (v, &pos) in src.iter().zip(&ORDER16) {
                dst[pos] = *v;
            }
        }
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

/// 8 16-bit values at element `i` of `w` (f16 when `F16`, else bf16) as f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load16<const F16: bool>(w: *const u16, i: usize) -> __m256 {
    let h = _mm_loadu_si128(w.add(i).cast());
    if F16 {
        _mm256_cvtph_ps(h)
    } else {
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
}

/// `sum w[i] x[i]` for `n.min(x.len())` 16-bit weights at `w` (f16 when `F16`, else bf16), widened
/// to f32 exactly. [`dot_16bit_rows`] for one row.
///
/// # Safety
/// The CPU must support avx2, fma and f16c; `w` must be valid for `n` 16-bit values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_16bit<const F16: bool>(w: *const u16, x: &[f32], n: usize) -> f32 {
    let [s] = dot_16bit_rows::<F16, 1>(w, [x], n);
    s
}

/// `sum w[i] x_j[i]` for `R` activation rows at once (`n.min(len)` values of each): each
/// weight is widened once for all rows. Every row's sum is computed in the same order whatever
/// `R` is (two accumulators of 8 lanes over 16 values a step, a last 8 into the first, the
/// scalar rest), so a row's result does not depend on the rows beside it.
///
/// # Safety
/// The CPU must support avx2, fma and f16c; `w` must be valid for `n` 16-bit values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_16bit_rows<const F16: bool, const R: usize>(w: *const u16, xs: [&[f32]; R], n: usize) -> [f32; R] {
    let n = xs.iter().fold(n, |n, x| n.min(x.len()));
    let xp: [*const f32; R] = std::array::from_fn(|j| xs[j].as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut i = 0;
    // Loads read `i .. i + 16 <= n` of each.
    while i + 16 <= n {
        // 1 KiB ahead (512 values): the hardware prefetcher alone left a decode's `lm_head`
        // (57 MiB of bf16 for SmolLM2) at about 20 GB/s; this took it about 15% faster. A prefetch
        // never faults, so running past the end is harmless.
        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(i + 512).cast());
        let (w0, w1) = (load16::<F16>(w, i), load16::<F16>(w, i + 8));
        for (a, x) in acc.iter_mut().zip(&xp) {
            a[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.add(i)), a[0]);
            a[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(i + 8)), a[1]);
        }
        i += 16;
    }
    if i + 8 <= n {
        let w0 = load16::<F16>(w, i);
        for (a, x) in acc.iter_mut().zip(&xp) {
            a[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.add(i)), a[0]);
        }
        i += 8;
    }
    let mut out = [0.0f32; R];
    for ((o, a), x) in out.iter_mut().zip(&acc).zip(&xs) {
        let mut s = hsum(_mm256_add_ps(a[0], a[1]));
        for (k, &xv) in x.iter().enumerate().take(n).skip(i) {
            let bits = *w.add(k);
            let v = if F16 { half::f16::from_bits(bits).to_f32() } else { half::bf16::from_bits(bits).to_f32() };
            s += v * xv;
        }
        *o = s;
    }
    out
}

/// [`super::Rows::dots`] for 16-bit rows: `out[j]` is [`dot_16bit`] of the `d` values at `j d`.
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dots_16bit<const F16: bool>(v: &[u16], d: usize, q: &[f32], out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        let row = v.get(j * d..(j + 1) * d).unwrap_or(&[]);
        *o = dot_16bit::<F16>(row.as_ptr(), q, row.len());
    }
}

/// [`super::Rows::dots`] for f32 rows: `out[j]` is [`dot`] of the `d` values at `j d`.
///
/// # Safety
/// The CPU must support avx2 and fma.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dots_f32(v: &[f32], d: usize, q: &[f32], out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot(v.get(j * d..(j + 1) * d).unwrap_or(&[]), q);
    }
}

/// Values read as f32, exactly: f32 as they are, u16 as bf16 or (`f16`) f16 bit patterns.
pub(super) trait Lanes8: Copy {
    /// 8 values at `p`.
    ///
    /// # Safety
    /// The CPU must support avx2 and f16c; `p` must be valid for 8 values.
    unsafe fn load8(p: *const Self, f16: bool) -> __m256;
    /// One value.
    fn widen(self, f16: bool) -> f32;
}

impl Lanes8 for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32, _: bool) -> __m256 {
        _mm256_loadu_ps(p)
    }

    fn widen(self, _: bool) -> f32 {
        self
    }
}

impl Lanes8 for u16 {
    fn widen(self, f16: bool) -> f32 {
        if f16 { half::f16::from_bits(self).to_f32() } else { half::bf16::from_bits(self).to_f32() }
    }

    #[inline(always)]
    unsafe fn load8(p: *const u16, f16: bool) -> __m256 {
        if f16 { load16::<true>(p, 0) } else { load16::<false>(p, 0) }
    }
}

/// `out = sum_j e[j] v[j d .. (j + 1) d]` (16-bit values as f16 when `f16`), each term a fused
/// multiply-add onto the sum so far, positions in order, as [`axpy_f32`] / [`axpy_16bit`] add
/// them one call per position; here 64 outputs at a time stay in registers across positions.
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn weighted_sum<T: Lanes8>(v: &[T], d: usize, e: &[f32], out: &mut [f32], f16: bool) {
    out.fill(0.0);
    let n = d.min(out.len());
    // Positions whose `d` values all lie in `v`.
    let t = v.len().checked_div(d).map_or(0, |rows| e.len().min(rows));
    let (vp, op) = (v.as_ptr(), out.as_mut_ptr());
    // Columns `c0 .. c0 + 8 N` of every position; loads stay inside row `j` (c0 + 8 N <= n <= d).
    macro_rules! columns {
        ($n:expr, $c0:expr) => {{
            let mut acc = [_mm256_setzero_ps(); $n];
            for (j, &a) in e.iter().enumerate().take(t) {
                let av = _mm256_set1_ps(a);
                let row = vp.add(j * d + $c0);
                for (c, s) in acc.iter_mut().enumerate() {
                    *s = _mm256_fmadd_ps(av, T::load8(row.add(8 * c), f16), *s);
                }
            }
            for (c, s) in acc.iter().enumerate() {
                _mm256_storeu_ps(op.add($c0 + 8 * c), *s);
            }
        }};
    }
    let mut c0 = 0;
    while c0 + 64 <= n {
        columns!(8, c0);
        c0 += 64;
    }
    while c0 + 8 <= n {
        columns!(1, c0);
        c0 += 8;
    }
    for (k, o) in out.iter_mut().enumerate().take(n).skip(c0) {
        for (j, &a) in e.iter().enumerate().take(t) {
            *o = a.mul_add((*vp.add(j * d + k)).widen(f16), *o);
        }
    }
}

/// `y[i] += a * w[i]` for the common length of 16-bit `w` (f16 when `F16`, else bf16) and `y`.
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn axpy_16bit<const F16: bool>(a: f32, w: &[u16], y: &mut [f32]) {
    let n = w.len().min(y.len());
    let (wp, yp) = (w.as_ptr(), y.as_mut_ptr());
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    // Loads and stores cover `i .. i + 8 <= n` of both.
    while i + 8 <= n {
        let v = _mm256_fmadd_ps(av, load16::<F16>(wp, i), _mm256_loadu_ps(yp.add(i)));
        _mm256_storeu_ps(yp.add(i), v);
        i += 8;
    }
    for (o, &bits) in y.iter_mut().zip(w).take(n).skip(i) {
        let v = if F16 { half::f16::from_bits(bits).to_f32() } else { half::bf16::from_bits(bits).to_f32() };
        *o = a.mul_add(v, *o);
    }
}

/// `y[i] += a * w[i]` for the common length of `w` and `y`.
///
/// # Safety
/// The CPU must support avx2 and fma.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn axpy_f32(a: f32, w: &[f32], y: &mut [f32]) {
    let n = w.len().min(y.len());
    let (wp, yp) = (w.as_ptr(), y.as_mut_ptr());
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_fmadd_ps(av, _mm256_loadu_ps(wp.add(i)), _mm256_loadu_ps(yp.add(i)));
        _mm256_storeu_ps(yp.add(i), v);
        i += 8;
    }
    for (o, &v) in y.iter_mut().zip(w).take(n).skip(i) {
        *o = a.mul_add(v, *o);
    }
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
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let av = _mm256_loadu_si256(ap.add(r * lda + i).cast());
            for ((a, &wan), &wvn) in acc_r.iter_mut().zip(&wa).zip(&wv) {
                let p = _mm256_maddubs_epi16(wan, _mm256_sign_epi8(av, wvn));
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(p, ones));
            }
        }
        i += 32;
    }
    let mut out = [[0i32; N]; M];
    for (r, (out_r, acc_r)) in out.iter_mut().zip(&acc).enumerate() {
        for (n, (o, &v)) in out_r.iter_mut().zip(acc_r).enumerate() {
            let mut s = hsum_i32(v);
            for j in i..k {
                s = s.wrapping_add(i32::from(a[r * lda + j]) * i32::from(w[n * ldw + j]));
            }
            *o = s;
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

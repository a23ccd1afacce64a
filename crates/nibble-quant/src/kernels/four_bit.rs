//! Fused 4-bit matrix products: the driver (validation, tiling, threads) and the portable kernels.
//!
//! Two shapes of work:
//! - **Matrix-vector** (decode, a few activation rows): every weight is read once and used for one
//!   row, so the kernel decodes nibbles straight into registers and multiplies; it runs at the
//!   speed of reading the packed weights.
//! - **Matrix-matrix** (prefill): each weight is used for every activation row, so the kernel
//!   decodes a panel of weights (16 outputs x up to [`KC`] inputs, a few KiB) into f32 once and
//!   runs a register-tiled f32 micro-kernel over all rows; decoding becomes a small fixed cost.
//!
//! Both are split across threads by output rows, on the kernel team of
//! [`super::for_each_index`]; the weight is never held in full precision beyond one panel per
//! thread.

use half::f16;
use nibble_core::{Error, Result};

use super::{chunk_len, for_each_chunk_mut, min_macs_per_matvec_task, Isa, MIN_MACS_PER_TASK};
#[cfg(target_arch = "x86_64")]
use super::transpose_into;
use crate::functional::{check_blocksize, tables, QuantType};

/// A floating-point precision a dequantized weight passes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    /// No rounding (f32 is what the kernels compute in).
    F32,
    /// IEEE half precision, round to nearest even.
    F16,
    /// bfloat16, round to nearest even.
    Bf16,
}

impl Precision {
    /// The precision of a candle float dtype; `None` for non-float dtypes and f64 (which the
    /// quantized layers never use).
    pub fn from_dtype(dtype: candle_core::DType) -> Option<Self> {
        match dtype {
            candle_core::DType::F32 => Some(Self::F32),
            candle_core::DType::F16 => Some(Self::F16),
            candle_core::DType::BF16 => Some(Self::Bf16),
            _ => None,
        }
    }

    /// Rounds `v` to this precision (nearest even, as torch's `.to(dtype)`), back as f32.
    #[inline]
    pub fn round(self, v: f32) -> f32 {
        match self {
            Self::F32 => v,
            Self::F16 => f16::from_f32(v).to_f32(),
            Self::Bf16 => round_bf16(v),
        }
    }

    /// [`Precision::round`] of every value in place. The model rounds each activation to its
    /// dtype where transformers produces a tensor of that dtype, so this runs over every
    /// intermediate of a step: the bf16 case is written so that it vectorizes.
    pub fn round_slice(self, v: &mut [f32]) {
        match self {
            Self::F32 => {}
            Self::F16 => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
            Self::Bf16 => v.iter_mut().for_each(|x| *x = round_bf16(*x)),
        }
    }
}

/// `bf16::from_f32(v).to_f32()` in branch-free arithmetic: nearest even by adding `0x7fff` plus
/// the kept part's lowest bit, then truncating. NaN is kept (quieted), as `half` does; infinities
/// and overflow to infinity come out of the same addition.
#[inline(always)]
pub(crate) fn round_bf16(v: f32) -> f32 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    f32::from_bits(if nan { (b | 0x0040_0000) & 0xffff_0000 } else { rounded })
}

/// The roundings a 4-bit weight goes through before it is multiplied, as in bitsandbytes'
/// `dequantize_4bit(W).to(compute_dtype)`: first to the dtype the weight was quantized from, then
/// to the compute dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rounding {
    /// The checkpoint's dtype (`quant_state.dtype`).
    pub weight: Precision,
    /// The layer's compute dtype.
    pub compute: Precision,
}

impl Rounding {
    /// No rounding at all (f32 weights, f32 compute).
    pub const NONE: Rounding = Rounding { weight: Precision::F32, compute: Precision::F32 };

    /// A weight value `v` after both roundings.
    #[inline]
    pub fn apply(self, v: f32) -> f32 {
        self.compute.round(self.weight.round(v))
    }

    /// The precision every rounded value is exactly representable in: the last rounding that
    /// narrows. The SIMD kernels look up 2 bytes per weight instead of 4 when it is bf16.
    pub fn stored(self) -> Precision {
        if self.compute == Precision::F32 {
            self.weight
        } else {
            self.compute
        }
    }
}

/// A borrowed, validated 4-bit weight `[out_features, in_features]` in the bitsandbytes layout:
/// the flattened row-major weight in blocks of `blocksize` values (a block may run across the end
/// of a row), two codes per byte with the first in the high nibble, and one f32 scale per block
/// (double quantization already undone, see [`crate::functional::Absmax::try_to_f32`]).
#[derive(Debug, Clone, Copy)]
pub struct Matrix4bit<'a> {
    pub(crate) packed: &'a [u8],
    pub(crate) absmax: &'a [f32],
    pub(crate) out_features: usize,
    pub(crate) in_features: usize,
    pub(crate) blocksize: usize,
    pub(crate) rounding: Rounding,
    /// Code book as bnb's CPU dequantization uses it (FP4 code 8 is -0.0 there; the sign of a zero
    /// weight cannot change a sum that has any other term).
    pub(crate) lut: &'static [f32; 16],
}

impl<'a> Matrix4bit<'a> {
    /// Checks the sizes against each other and wraps the parts.
    ///
    /// Errors: a zero dimension, `out * in` overflowing, a block size bitsandbytes rejects,
    /// `packed.len() != ceil(out * in / 2)` or `absmax.len() != ceil(out * in / blocksize)`.
    pub fn new(
        packed: &'a [u8],
        absmax: &'a [f32],
        out_features: usize,
        in_features: usize,
        blocksize: usize,
        quant_type: QuantType,
        rounding: Rounding,
    ) -> Result<Self> {
        check_blocksize("blocksize", blocksize)?;
        if out_features == 0 || in_features == 0 {
            return Err(Error::invalid_argument(
                "weight",
                format!("a [{out_features}, {in_features}] weight has no values"),
            ));
        }
        let numel = out_features
            .checked_mul(in_features)
            .ok_or_else(|| Error::invalid_argument("weight", "out_features * in_features overflows"))?;
        if packed.len() != numel.div_ceil(2) {
            return Err(Error::quant_state(
                "weight",
                format!("{} packed bytes cannot hold a [{out_features}, {in_features}] weight", packed.len()),
            ));
        }
        if absmax.len() != numel.div_ceil(blocksize) {
            return Err(Error::quant_state(
                "weight.absmax",
                format!("{} scales, but {numel} values in blocks of {blocksize} need {}", absmax.len(), numel.div_ceil(blocksize)),
            ));
        }
        let t = tables(quant_type);
        // Same table choice as `dequantize_4bit_into`, so a fused product sees the values it would.
        let lut = if numel % 2 == 1 { &t.code } else { &t.dequant_native };
        Ok(Self { packed, absmax, out_features, in_features, blocksize, rounding, lut })
    }

    /// Output rows.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input columns.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The 16 weight values of block `b`, rounded as the layer rounds them.
    #[inline]
    pub(crate) fn block_table(&self, b: usize) -> [f32; 16] {
        let scale = self.absmax.get(b).copied().unwrap_or(f32::NAN);
        self.lut.map(|c| self.rounding.apply(c * scale))
    }

    /// Whether the SIMD matrix-vector kernels' layout applies: every row starts on a multiple of
    /// 32 values, so 32-value groups never straddle a block and start on a whole byte.
    #[inline]
    pub(crate) fn rows_aligned(&self) -> bool {
        self.in_features.is_multiple_of(32)
    }

    /// Decodes the values `e0 .. e0 + out.len()` of the flattened weight into `out`.
    pub(crate) fn decode_range(&self, e0: usize, out: &mut [f32]) {
        let end = e0 + out.len();
        let mut e = e0;
        let mut pos = 0;
        while e < end {
            let b = e / self.blocksize;
            let seg_end = end.min((b + 1) * self.blocksize);
            let table = self.block_table(b);
            decode_segment(self.packed, e, &table, &mut out[pos..pos + (seg_end - e)]);
            pos += seg_end - e;
            e = seg_end;
        }
    }
}

/// Decodes values `e0 ..` (all in one block, whose table is `t`) into `out`; `e0` may be odd
/// (a row of odd width starts mid-byte).
#[inline]
fn decode_segment(packed: &[u8], e0: usize, t: &[f32; 16], out: &mut [f32]) {
    let mut skip = 0;
    if e0 % 2 == 1 {
        if let (Some(first), Some(&b)) = (out.first_mut(), packed.get(e0 / 2)) {
            *first = t[usize::from(b & 0x0f)];
            skip = 1;
        }
    }
    let out = &mut out[skip..];
    let bytes = packed.get((e0 + skip) / 2..).unwrap_or(&[]);
    let done = (out.len() / 2).min(bytes.len());
    let mut pairs = out.chunks_exact_mut(2);
    for (pair, &b) in (&mut pairs).zip(bytes) {
        pair[0] = t[usize::from(b >> 4)];
        pair[1] = t[usize::from(b & 0x0f)];
    }
    if let ([last], Some(&b)) = (pairs.into_remainder(), bytes.get(done)) {
        *last = t[usize::from(b >> 4)];
    }
}

/// Activation rows up to which the matrix-vector kernels are used (a batched decode step; the
/// AVX-512 one looks each weight up once per four rows); beyond, decoding weight panels once for
/// the matrix-matrix kernel is cheaper.
const GEMV_MAX_ROWS: usize = 16;

/// Inputs per weight panel of the matrix-matrix kernel: 16 outputs x 256 inputs x 4 bytes = 16 KiB,
/// which stays in L1 next to the activation tile.
pub(crate) const KC: usize = 256;

/// Activation rows per micro-kernel tile (6 rows x 16 outputs = 12 AVX2 accumulators).
pub(crate) const MR: usize = 6;

/// Outputs per micro-panel.
pub(crate) const NR: usize = 16;

/// Most 16-output panels one task covers: the task's decoded panels (`8 * 16 KiB`) then stay in L2.
const MAX_PANELS_PER_TASK: usize = 8;

/// `y = x W^T` for `x` of `rows` rows of `w.in_features()` f32 values (row-major); returns
/// `[rows, w.out_features()]` in f32, using [`Isa::detect`]'s kernels.
///
/// Errors: `x.len() != rows * in_features`.
pub fn matmul_4bit(w: &Matrix4bit<'_>, x: &[f32], rows: usize) -> Result<Vec<f32>> {
    matmul_4bit_with(Isa::detect(), w, x, rows)
}

/// [`matmul_4bit`] with an explicit instruction set.
///
/// Errors: `isa` not supported by this CPU, or `x.len() != rows * in_features`.
pub fn matmul_4bit_with(isa: Isa, w: &Matrix4bit<'_>, x: &[f32], rows: usize) -> Result<Vec<f32>> {
    isa.check()?;
    let (n_in, n_out) = (w.in_features, w.out_features);
    if rows.checked_mul(n_in) != Some(x.len()) {
        return Err(Error::invalid_argument(
            "x",
            format!("has {} values, which is not {rows} rows of {n_in}", x.len()),
        ));
    }
    let mut y = vec![0.0f32; rows * n_out];
    if rows == 0 {
        return Ok(y);
    }
    if rows <= GEMV_MAX_ROWS {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 && super::avx512::applies(w) {
            gemv_avx512(w, x, rows, &mut y);
            return Ok(y);
        }
        #[cfg(target_arch = "x86_64")]
        if isa.avx2() && w.rows_aligned() {
            gemv_avx2(w, x, rows, &mut y);
            return Ok(y);
        }
        for (xr, yr) in x.chunks_exact(n_in).zip(y.chunks_exact_mut(n_out)) {
            gemv(isa, w, xr, yr);
        }
    } else {
        gemm(isa, w, x, rows, &mut y);
    }
    Ok(y)
}

/// The AVX-512 matrix-vector path for `rows` activation rows ([`super::avx512::applies`]):
/// weight rows split across the kernel team's threads, each
/// weight looked up once per four activation rows.
#[cfg(target_arch = "x86_64")]
fn gemv_avx512(w: &Matrix4bit<'_>, x: &[f32], rows: usize, y: &mut [f32]) {
    let (n_in, n_out) = (w.in_features, w.out_features);
    let xp = super::avx512::permute_x(x);
    // Weight rows `o0 .. o0 + n` for every activation row, into `out` as `[n, stride]` at
    // column `off`.
    let run = |o0: usize, n: usize, out: &mut [f32], stride: usize| {
        let mut r0 = 0;
        while r0 < rows {
            let r = (rows - r0).min(4);
            let xr = &xp[r0 * n_in..(r0 + r) * n_in];
            // SAFETY: `matmul_4bit_with` checked `Isa::Avx512` (avx512f detected); `applies`
            // holds, `xr` holds `r` rows of `n_in`, and the weight rows `o0 .. o0 + n` exist.
            unsafe {
                match r {
                    1 => super::avx512::gemv_rows::<1>(w, xr, out, stride, r0, o0, n),
                    2 => super::avx512::gemv_rows::<2>(w, xr, out, stride, r0, o0, n),
                    3 => super::avx512::gemv_rows::<3>(w, xr, out, stride, r0, o0, n),
                    _ => super::avx512::gemv_rows::<4>(w, xr, out, stride, r0, o0, n),
                }
            }
            r0 += r;
        }
    };
    // Every row count on the kernel team (the caller's thread and its helper): a decode step's
    // products are small, and handing them to rayon left the team's helper spinning beside
    // rayon's threads on the same cores.
    let per_task = chunk_len(n_out, min_macs_per_matvec_task().div_ceil(n_in * rows));
    if rows == 1 {
        for_each_chunk_mut(y, per_task, |t, yc| run(t * per_task, yc.len(), yc, 1));
        return;
    }
    // `[n_out, rows]`, each task's weight rows contiguous, then transposed.
    let mut yt = vec![0.0f32; rows * n_out];
    for_each_chunk_mut(&mut yt, per_task * rows, |t, yc| run(t * per_task, yc.len() / rows, yc, rows));
    transpose_into(&yt, rows, n_out, y);
}


/// The AVX2 matrix-vector path for `rows` activation rows (rows of `W` a multiple of 32 wide):
/// weight rows split across threads, each activation row through the one-row kernels.
#[cfg(target_arch = "x86_64")]
fn gemv_avx2(w: &Matrix4bit<'_>, x: &[f32], rows: usize, y: &mut [f32]) {
    let (n_in, n_out) = (w.in_features, w.out_features);
    // Rows made of whole blocks (nearly every real model) take the 64-value kernel.
    let whole = n_in.is_multiple_of(64) && n_in.is_multiple_of(w.blocksize);
    // The kernels decode weights in an interleaved order; permuting x once per call to match is
    // cheaper than un-permuting every decoded weight.
    let permute = if whole { super::avx2::permute_x64 } else { super::avx2::permute_x };
    let xp: Vec<f32> = x.chunks_exact(n_in).flat_map(permute).collect();
    // Every activation row runs the one-row kernel, so that a row's result does not depend on
    // how many rows are computed together (a batched decode step gives each sequence what it
    // gets alone); a task's weight rows stay in cache from one activation row to the next.
    let one_row = |xr: &[f32], o0: usize, out: &mut [f32]| {
        // SAFETY: `matmul_4bit_with` checked `Isa::Avx2` (avx2+fma+f16c detected); rows are a
        // multiple of 32 wide (`rows_aligned`), of 64 and of the block size for `gemv_row64`;
        // `xr` holds one permuted row of `n_in`, and the weight rows `o0 .. o0 + out.len()` exist.
        unsafe {
            if whole {
                super::avx2::gemv_row64(w, xr, out, o0);
            } else {
                super::avx2::gemv_rows(w, xr, out, 1, 0, o0, out.len());
            }
        }
    };
    // On the kernel team, as the AVX-512 path.
    let per_task = chunk_len(n_out, min_macs_per_matvec_task().div_ceil(n_in * rows));
    if rows == 1 {
        for_each_chunk_mut(y, per_task, |t, yc| one_row(&xp, t * per_task, yc));
        return;
    }
    // `[n_out, rows]`, each task's weight rows contiguous, then transposed.
    let mut yt = vec![0.0f32; rows * n_out];
    for_each_chunk_mut(&mut yt, per_task * rows, |t, out| {
        let n = out.len() / rows;
        let mut part = vec![0.0f32; n];
        for (r, xr) in xp.chunks_exact(n_in).enumerate() {
            one_row(xr, t * per_task, &mut part);
            for (i, &v) in part.iter().enumerate() {
                out[i * rows + r] = v;
            }
        }
    });
    transpose_into(&yt, rows, n_out, y);
}

/// One activation row: `y[o] = sum_k W[o, k] x[k]`, rows split across threads (the NEON kernel
/// for rows a multiple of 32 wide, otherwise decode-then-dot).
fn gemv(isa: Isa, w: &Matrix4bit<'_>, x: &[f32], y: &mut [f32]) {
    let n_in = w.in_features;
    #[cfg(target_arch = "aarch64")]
    let aligned = w.rows_aligned();
    let rows_per_task = chunk_len(w.out_features, min_macs_per_matvec_task().div_ceil(n_in));
    let run = |ci: usize, yc: &mut [f32]| {
        let row0 = ci * rows_per_task;
        match isa {
            #[cfg(target_arch = "aarch64")]
            Isa::Neon if aligned => {
                // SAFETY: `isa.check()` detected NEON at run time; rows `row0..row0 + yc.len()`
                // exist (they index `y`).
                unsafe { super::neon::gemv_rows(w, x, yc, row0) }
            }
            _ => gemv_rows_decoded(isa, w, x, yc, row0),
        }
    };
    for_each_chunk_mut(y, rows_per_task, run);
}

/// The general matrix-vector path: decode each row into a scratch row, then a dot product.
fn gemv_rows_decoded(isa: Isa, w: &Matrix4bit<'_>, x: &[f32], y: &mut [f32], row0: usize) {
    let n_in = w.in_features;
    let mut row = vec![0.0f32; n_in];
    for (i, yo) in y.iter_mut().enumerate() {
        w.decode_range((row0 + i) * n_in, &mut row);
        *yo = dot(isa, &row, x);
    }
}

/// `sum a[i] b[i]` over the common length.
pub(crate) fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers only pass an `isa` that passed `Isa::check` (avx2+fma detected).
        Isa::Avx2 | Isa::Avx512 => unsafe { super::avx2::dot(a, b) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: callers only pass an `isa` that passed `Isa::check` (NEON detected).
        Isa::Neon => unsafe { super::neon::dot(a, b) },
        _ => dot_portable(a, b),
    }
}

/// Eight independent partial sums, so the compiler can vectorize and pipeline the loop.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Many activation rows: per task, a range of 16-output panels; per [`KC`] inputs, decode the
/// panels, then run the micro-kernel over every [`MR`]-row tile of `x`.
fn gemm(isa: Isa, w: &Matrix4bit<'_>, x: &[f32], rows: usize, y: &mut [f32]) {
    let (n_in, n_out) = (w.in_features, w.out_features);
    let n_panels = n_out.div_ceil(NR);
    let min_panels = MIN_MACS_PER_TASK.div_ceil(rows * n_in * NR);
    let per_task = chunk_len(n_panels, min_panels).min(MAX_PANELS_PER_TASK.max(min_panels));
    let n_tasks = n_panels.div_ceil(per_task);
    // On the kernel team (the calling thread and its helper), as the matrix-vector paths: a
    // prompt's products run one after another from the model's thread, and handing them to
    // rayon left that thread parked and the team's helper spinning beside rayon's workers.
    let parts: Vec<std::sync::Mutex<(usize, usize, Vec<f32>)>> = (0..n_tasks).map(|_| Default::default()).collect();
    super::for_each_index(n_tasks, &|t| {
        let p0 = t * per_task;
        let p1 = n_panels.min(p0 + per_task);
        let o0 = p0 * NR;
        let o1 = n_out.min(p1 * NR);
        let c = gemm_task(isa, w, x, rows, o0, o1, p1 - p0);
        if let Some(Ok(mut part)) = parts.get(t).map(|m| m.lock()) {
            *part = (o0, o1, c);
        }
    });
    let parts: Vec<(usize, usize, Vec<f32>)> =
        parts.into_iter().map(|m| m.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner)).collect();
    // Each task filled `[rows, its panels * 16]`; copy the real columns into place.
    let rows_per_task = chunk_len(rows, 16);
    for_each_chunk_mut(y, rows_per_task * n_out, |ci, yc| {
        for (i, yr) in yc.chunks_exact_mut(n_out).enumerate() {
            let r = ci * rows_per_task + i;
            for (o0, o1, c) in &parts {
                let ldc = c.len() / rows;
                if let (Some(dst), Some(src)) = (yr.get_mut(*o0..*o1), c.get(r * ldc..r * ldc + (o1 - o0))) {
                    dst.copy_from_slice(src);
                }
            }
        }
    });
}

/// Outputs `o0..o1` (covering `panels` 16-wide panels, the last possibly partial) for all rows.
fn gemm_task(isa: Isa, w: &Matrix4bit<'_>, x: &[f32], rows: usize, o0: usize, o1: usize, panels: usize) -> Vec<f32> {
    let n_in = w.in_features;
    let ldc = panels * NR;
    let mut c = vec![0.0f32; rows * ldc];
    // Panel layout: [panel][k][16 outputs]; columns past `o1` stay zero and are never copied out.
    let mut bp = vec![0.0f32; ldc * KC];
    let mut row = vec![0.0f32; KC];
    let mut k0 = 0;
    while k0 < n_in {
        let kc = KC.min(n_in - k0);
        for o in o0..o1 {
            let (pj, lane) = ((o - o0) / NR, (o - o0) % NR);
            let r = &mut row[..kc];
            decode_range(isa, w, o * n_in + k0, r);
            let panel = &mut bp[pj * kc * NR..(pj + 1) * kc * NR];
            for (dst, &v) in panel.chunks_exact_mut(NR).zip(r.iter()) {
                dst[lane] = v;
            }
        }
        let mut r0 = 0;
        while r0 < rows {
            let mr = MR.min(rows - r0);
            let a = &x[r0 * n_in + k0..];
            for pj in 0..panels {
                let panel = &bp[pj * kc * NR..(pj + 1) * kc * NR];
                let ct = &mut c[r0 * ldc + pj * NR..];
                tile(isa, mr, kc, a, n_in, panel, ct, ldc, k0 == 0);
            }
            r0 += mr;
        }
        k0 += kc;
    }
    c
}

/// [`Matrix4bit::decode_range`] with the SIMD decoders where the range is made of whole 32-value
/// groups (rows a multiple of 32 wide and panel bounds on multiples of 32).
fn decode_range(isa: Isa, w: &Matrix4bit<'_>, e0: usize, out: &mut [f32]) {
    let aligned = w.rows_aligned() && e0.is_multiple_of(32) && out.len().is_multiple_of(32);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` passed `Isa::check` (avx2+fma+f16c detected); `aligned` is the layout the
        // kernel needs and the range lies inside the weight (callers decode rows they own).
        Isa::Avx2 | Isa::Avx512 if aligned => unsafe { super::avx2::decode_aligned(w, e0, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: `isa` passed `Isa::check` (NEON detected); layout and range as above.
        Isa::Neon if aligned => unsafe { super::neon::decode_aligned(w, e0, out) },
        _ => w.decode_range(e0, out),
    }
}

/// `C[r, 0..16] (+)= sum_k A[r, k] B[k, 0..16]` for `r < mr`; `A` rows are `lda` apart, `C`
/// rows `ldc` apart, `B` is `kc x 16`. `first` starts from zero instead of loading `C`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile(isa: Isa, mr: usize, kc: usize, a: &[f32], lda: usize, b: &[f32], c: &mut [f32], ldc: usize, first: bool) {
    // The SIMD kernels index with raw pointers; these bounds are what makes that sound.
    let fits = (1..=MR).contains(&mr)
        && a.len() >= (mr - 1) * lda + kc
        && b.len() >= kc * NR
        && c.len() >= (mr - 1) * ldc + NR;
    if !fits {
        // Unreachable from the drivers; stay correct (and panic-free) rather than fast.
        tile_portable_dyn(mr.min(MR), kc, a, lda, b, c, ldc, first);
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` passed `Isa::check` (avx2+fma detected); `fits` bounds every access.
        Isa::Avx2 => unsafe { super::avx2::tile(mr, kc, a, lda, b, c, ldc, first) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` passed `Isa::check` (avx512f detected); `fits` bounds every access.
        Isa::Avx512 => unsafe { super::avx512::tile(mr, kc, a, lda, b, c, ldc, first) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: `isa` passed `Isa::check` (NEON detected); `fits` bounds every access.
        Isa::Neon => unsafe { super::neon::tile(mr, kc, a, lda, b, c, ldc, first) },
        _ => match mr {
            1 => tile_portable::<1>(kc, a, lda, b, c, ldc, first),
            2 => tile_portable::<2>(kc, a, lda, b, c, ldc, first),
            3 => tile_portable::<3>(kc, a, lda, b, c, ldc, first),
            4 => tile_portable::<4>(kc, a, lda, b, c, ldc, first),
            5 => tile_portable::<5>(kc, a, lda, b, c, ldc, first),
            _ => tile_portable::<6>(kc, a, lda, b, c, ldc, first),
        },
    }
}

#[allow(clippy::too_many_arguments)]
fn tile_portable_dyn(mr: usize, kc: usize, a: &[f32], lda: usize, b: &[f32], c: &mut [f32], ldc: usize, first: bool) {
    for r in 0..mr {
        for l in 0..NR {
            let mut s = if first { 0.0 } else { c.get(r * ldc + l).copied().unwrap_or(0.0) };
            for k in 0..kc {
                s += a.get(r * lda + k).copied().unwrap_or(0.0) * b.get(k * NR + l).copied().unwrap_or(0.0);
            }
            if let Some(v) = c.get_mut(r * ldc + l) {
                *v = s;
            }
        }
    }
}

/// The portable micro-kernel: `M` rows x 16 outputs of accumulators the compiler keeps in vector
/// registers.
fn tile_portable<const M: usize>(kc: usize, a: &[f32], lda: usize, b: &[f32], c: &mut [f32], ldc: usize, first: bool) {
    let mut acc = [[0.0f32; NR]; M];
    if !first {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            acc_r.copy_from_slice(&c[r * ldc..r * ldc + NR]);
        }
    }
    let a_rows: [&[f32]; M] = std::array::from_fn(|r| &a[r * lda..r * lda + kc]);
    for (k, bk) in b[..kc * NR].chunks_exact(NR).enumerate() {
        for (acc_r, a_r) in acc.iter_mut().zip(&a_rows) {
            let av = a_r[k];
            for (s, &bv) in acc_r.iter_mut().zip(bk) {
                *s += av * bv;
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        c[r * ldc..r * ldc + NR].copy_from_slice(acc_r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::functional::{dequantize_4bit, quantize_4bit};

    #[test]
    fn decode_range_matches_dequantize() {
        let x: Vec<f32> = (0..7 * 37).map(|i| ((i as f32) * 0.37).sin()).collect();
        let q = quantize_4bit(&x, 32, QuantType::Fp4, false).unwrap();
        let am = q.absmax.to_f32();
        let m = Matrix4bit::new(&q.packed, &am, 7, 37, 32, QuantType::Fp4, Rounding::NONE).unwrap();
        let full: Vec<f32> = dequantize_4bit(&q).unwrap();
        for start in [0usize, 1, 31, 32, 33, 100] {
            for len in [0usize, 1, 2, 3, 40, 64] {
                if start + len > full.len() {
                    continue;
                }
                let mut out = vec![0.0f32; len];
                m.decode_range(start, &mut out);
                assert_eq!(out, full[start..start + len], "start {start} len {len}");
            }
        }
    }

    #[test]
    fn validation() {
        let p = vec![0u8; 32];
        let a = vec![1.0f32; 1];
        assert!(Matrix4bit::new(&p, &a, 1, 64, 64, QuantType::Nf4, Rounding::NONE).is_ok());
        assert!(Matrix4bit::new(&p, &a, 1, 64, 48, QuantType::Nf4, Rounding::NONE).is_err());
        assert!(Matrix4bit::new(&p, &a, 2, 64, 64, QuantType::Nf4, Rounding::NONE).is_err());
        assert!(Matrix4bit::new(&p, &a, 0, 64, 64, QuantType::Nf4, Rounding::NONE).is_err());
        assert!(Matrix4bit::new(&p, &a, usize::MAX, 64, 64, QuantType::Nf4, Rounding::NONE).is_err());
        let m = Matrix4bit::new(&p, &a, 1, 64, 64, QuantType::Nf4, Rounding::NONE).unwrap();
        assert!(matmul_4bit(&m, &[0.0; 63], 1).is_err());
        assert!(matmul_4bit(&m, &[], 0).unwrap().is_empty());
    }

    /// The vectorizable bf16 rounding is `half`'s, bit for bit: ties, subnormals, overflow to
    /// infinity, infinities and NaN payloads.
    #[test]
    fn round_slice_matches_half() {
        let mut bits: Vec<u32> = (0..200_000u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        bits.extend([0, 0x8000_0000, 0x7f80_0000, 0xff80_0000, 0x7fc0_0001, 0x7f80_0001, 0xff81_2345]);
        // Exact ties, with even and odd kept parts, and the largest finite values.
        bits.extend([0x3f80_8000, 0x3f81_8000, 0x7f7f_ffff, 0x7f7f_8000, 0x0000_8000, 0x0001_8000]);
        let mut v: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let want: Vec<u32> = v.iter().map(|&x| half::bf16::from_f32(x).to_f32().to_bits()).collect();
        Precision::Bf16.round_slice(&mut v);
        let got: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want);
        let mut h = vec![1.0f32 + f32::EPSILON, 65520.0, -3.1e-5];
        Precision::F16.round_slice(&mut h);
        assert_eq!(h, vec![1.0, f32::INFINITY, f16::from_f32(-3.1e-5).to_f32()]);
    }
}

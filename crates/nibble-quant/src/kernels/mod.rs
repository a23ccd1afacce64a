//! CPU kernels for quantized matrix products: fused 4-bit (NF4/FP4) matrix-vector and
//! matrix-matrix products that read the packed nibbles and per-block scales directly, an int8
//! matrix product for LLM.int8(), and the SIMD parts of the quantizers.
//!
//! Every kernel has a portable implementation and, where the CPU has them, an x86-64
//! AVX2+FMA+F16C one and an aarch64 NEON one; on CPUs with AVX-512 the 4-bit matrix-vector
//! product has its own kernel (the rest runs the AVX2 ones). [`Isa::detect`] picks the best
//! supported set once per process (the environment variable
//! `NIBBLE_KERNELS=portable|avx2|avx512|neon` can force a supported one, for comparisons); the `*_with` functions take an explicit [`Isa`] so tests can
//! compare every path on the same input.
//!
//! # 4-bit semantics
//!
//! bitsandbytes 0.50.2 computes a 4-bit layer on the CPU as "dequantize straight into the compute
//! dtype, multiply" (`gemm_4bit`). The fused kernels reproduce the weight values exactly: each
//! weight is `code[nibble] * absmax[block]` in f32, rounded to the precisions of a [`Rounding`]
//! (the layers use no rounding before the compute precision; the `weight` step serves callers
//! that want a chain). Because a block has only 16 distinct values, the kernels build that
//! 16-entry table once per block and look weights up in it, so the rounding costs nothing per
//! weight. Products are accumulated in f32; only the order of the additions differs from a
//! reference matmul, so results agree within f32 rounding of the sum (`~in * 2^-24 * sum |w x|`).
//!
//! The AVX-512 matrix-vector kernel holds a block's whole table in one register, so it builds
//! one per block at the cost of a multiply and looks weights up exactly (no factoring, below),
//! with a summation order that does not depend on how many activation rows run together.
//!
//! The AVX2 matrix-vector kernel (every activation row runs it on its own, so that a row's
//! result never depends on the batch), in blocks of 64 or more, factors the block scale out
//! instead: `sum_b absmax_b * sum_(i in b) code_i * x_i`, one code table per matrix instead of
//! one per block (building a table per block was a third of its work). With f32 weights the
//! table is the exact f32 code book, so this differs from the per-weight product by f32 rounding
//! only (`2^-24` relative per weight), like any reordered sum. For weights whose last rounding is
//! bf16 (bf16 compute) the table is the bf16 code book: each weight then differs from
//! bitsandbytes' `bf16(code * absmax)` by at most `2^-8` relative (two bf16 roundings; `2^-11`
//! more for an f16-then-bf16 chain), so a product differs by at most about `2^-8 * sum |w x|`
//! more: the size of the bf16 rounding the reference applies itself. f16 weights, prefill and
//! the other kernels stay exact as above.
//!
//! # Int8 semantics
//!
//! Integer products and sums are exact, so [`int8_matmul_i32`] equals the scalar definition bit for
//! bit whatever the order (sums wrap on i32 overflow like bitsandbytes' int32 accumulator).

mod dense;
mod four_bit;
mod int8;
mod q8_blocks;
pub(crate) mod quant;
mod rows;
mod team;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

use std::sync::OnceLock;

pub use dense::{matmul_dense, matmul_dense_with, DenseWeight};

/// `sum a[i] b[i]` over the common length, with the best SIMD this CPU has (the model's
/// attention uses it on the host).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    four_bit::dot(Isa::detect(), a, b)
}
pub use four_bit::{matmul_4bit, matmul_4bit_with, Matrix4bit, Precision, Rounding};
pub(crate) use four_bit::round_bf16;
pub use int8::{int8_matmul_i32, int8_matmul_i32_with};
pub use q8_blocks::{matmul_q8_blocks, Q8_BLOCK};
pub use quant::{int8_vectorwise_quant_with, quantize_4bit_with};
pub use rows::Rows;
pub use team::{for_each_chunk_mut, for_each_index};

use nibble_core::{Error, Result};

/// An instruction set a kernel can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust, no intrinsics (what the compiler auto-vectorizes for the build target).
    Portable,
    /// x86-64 with AVX2, FMA and F16C (Haswell / Zen and later).
    Avx2,
    /// x86-64 with AVX-512F on top of [`Isa::Avx2`]'s set (Skylake-SP / Zen 4 and later): the
    /// 4-bit matrix-vector kernel has its own code, everything else runs the AVX2 kernels.
    Avx512,
    /// aarch64 Advanced SIMD (every aarch64 CPU has it).
    Neon,
}

impl Isa {
    /// Every variant, best last.
    pub const ALL: [Isa; 4] = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Neon];

    /// Whether this CPU can run the kernels of `self` (checked at run time).
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Avx2 => avx2_supported(),
            Isa::Avx512 => avx512_supported(),
            Isa::Neon => neon_supported(),
        }
    }

    /// The instruction sets this CPU supports, portable first.
    pub fn supported() -> Vec<Isa> {
        Self::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }

    /// The instruction set the kernels use by default: the best one this CPU supports, unless
    /// `NIBBLE_KERNELS` names another supported one. Detected once per process.
    pub fn detect() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let best = if Isa::Avx512.is_supported() {
                Isa::Avx512
            } else if Isa::Avx2.is_supported() {
                Isa::Avx2
            } else if Isa::Neon.is_supported() {
                Isa::Neon
            } else {
                Isa::Portable
            };
            match std::env::var("NIBBLE_KERNELS") {
                Ok(name) => match Isa::parse(&name) {
                    Some(isa) if isa.is_supported() => isa,
                    _ => {
                        tracing::warn!("NIBBLE_KERNELS={name} is not a kernel set this CPU supports; using {best:?}");
                        best
                    }
                },
                Err(_) => best,
            }
        })
    }

    /// Parses `portable`, `avx2`, `avx512` or `neon` (any case).
    pub fn parse(name: &str) -> Option<Isa> {
        match name.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" => Some(Isa::Portable),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            "neon" => Some(Isa::Neon),
            _ => None,
        }
    }

    /// Lower-case name, as [`Isa::parse`] reads it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// Whether `self` runs the AVX2 kernels (AVX-512 CPUs run them too, for everything that has
    /// no AVX-512 kernel); true only where the AVX2 set was detected.
    #[inline]
    pub(crate) fn avx2(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Avx512)
    }

    /// An error unless this CPU supports `self`; every `*_with` entry point checks this, which is
    /// what makes their `unsafe` SIMD calls sound.
    pub(crate) fn check(self) -> Result<()> {
        if self.is_supported() {
            Ok(())
        } else {
            Err(Error::invalid_argument("isa", format!("this CPU cannot run the {} kernels", self.name())))
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_supported() -> bool {
    // The AVX2 kernels also use FMA (every product) and F16C (f16 rounding and conversion).
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_supported() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512_supported() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| avx2_supported() && is_x86_feature_detected!("avx512f"))
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_supported() -> bool {
    false
}

#[cfg(target_arch = "aarch64")]
fn neon_supported() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}

#[cfg(not(target_arch = "aarch64"))]
fn neon_supported() -> bool {
    false
}

/// `x` reordered in chunks of `N`: chunk value `k` of the result is chunk value `order[k]` of `x`
/// (the order in which a kernel produces decoded weights); a shorter tail is copied as it is.
#[cfg(target_arch = "x86_64")]
pub(crate) fn permute_chunks<const N: usize>(x: &[f32], order: &[usize; N]) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let mut src = x.chunks_exact(N);
    let mut dst = out.chunks_exact_mut(N);
    // Fixed-size arrays and indices below N: no bounds checks, no per-value iterator steps (this
    // runs for every product of a decode step).
    for (c, o) in (&mut src).zip(&mut dst) {
        if let (Ok(c), Ok(o)) = (<&[f32; N]>::try_from(c), <&mut [f32; N]>::try_from(o)) {
            for (d, &i) in o.iter_mut().zip(order) {
                *d = c[i % N];
            }
        }
    }
    dst.into_remainder().copy_from_slice(src.remainder());
    out
}

/// Rayon tasks should each get at least this many multiply-adds, so that scheduling stays a small
/// fraction of the work even for the small matrices of a 100M-parameter model.
pub(crate) const MIN_MACS_PER_TASK: usize = 64 * 1024;

/// The same for matrix-vector products that neither the kernel team nor the pool's own threads
/// run: each such call wakes the pool's threads and sleeps until they are done, which costs tens
/// of microseconds, about as long as 256 Ki multiply-adds on one core.
pub(crate) const MIN_MACS_PER_TASK_COLD: usize = 256 * 1024;

/// The same for matrix-vector products the kernel team runs: a hand-off there is a cache-line
/// round trip, so pieces of a few microseconds are worth it (they even out the finishing times
/// of the small matrices of a 100M-parameter model).
pub(crate) const MIN_MACS_PER_TASK_TEAM: usize = 16 * 1024;

/// For work split with [`for_each_chunk_mut`]: [`MIN_MACS_PER_TASK_TEAM`] when the kernel team is
/// free, else as [`min_macs_per_pool_task`] (a busy team hands the work to rayon).
pub(crate) fn min_macs_per_matvec_task() -> usize {
    if team::available() {
        MIN_MACS_PER_TASK_TEAM
    } else {
        min_macs_per_pool_task()
    }
}

/// For work split on rayon's pool: [`MIN_MACS_PER_TASK`] on a thread of the pool,
/// [`MIN_MACS_PER_TASK_COLD`] outside it.
pub(crate) fn min_macs_per_pool_task() -> usize {
    if rayon::current_thread_index().is_some() {
        MIN_MACS_PER_TASK
    } else {
        MIN_MACS_PER_TASK_COLD
    }
}

/// `y` (`[rows, n_out]`) from `yt` (`[n_out, rows]`): the matrix-vector drivers fill each task's
/// weight rows for every activation row contiguously, then put them in row order.
pub(crate) fn transpose_into(yt: &[f32], rows: usize, n_out: usize, y: &mut [f32]) {
    for (o, ys) in yt.chunks_exact(rows.max(1)).enumerate() {
        for (r, &v) in ys.iter().enumerate() {
            if let Some(d) = y.get_mut(r * n_out + o) {
                *d = v;
            }
        }
    }
}

/// How many pieces to split `n` units of work into: about four per thread (so uneven finishing
/// times even out), but no piece under `min_unit` units.
pub(crate) fn chunk_len(n: usize, min_unit: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    n.div_ceil(threads * 4).max(min_unit).max(1)
}

//! Int8 x int8 -> i32 matrix products for LLM.int8(): the driver and the portable kernel.

use nibble_core::{Error, Result};
use rayon::prelude::*;

use super::{chunk_len, for_each_chunk_mut, min_macs_per_matvec_task, Isa, MIN_MACS_PER_TASK};

/// Activation rows per tile.
const MR8: usize = 4;
/// Weight rows per tile: each loaded weight vector is used for `MR8` rows, each activation vector
/// for `NR8` outputs.
const NR8: usize = 2;

/// `acc[r, o] = sum_i a[r, i] * w[o, i]` in wrapping i32, for `a` `[rows, k]` and `w`
/// `[out_features, k]` (both row-major); returns `[rows, out_features]`. Uses [`Isa::detect`].
///
/// Errors: `a.len() != rows * k` or `w.len() != out_features * k`.
pub fn int8_matmul_i32(a: &[i8], rows: usize, w: &[i8], out_features: usize, k: usize) -> Result<Vec<i32>> {
    int8_matmul_i32_with(Isa::detect(), a, rows, w, out_features, k)
}

/// [`int8_matmul_i32`] with an explicit instruction set; every instruction set gives the same
/// result bit for bit.
///
/// Errors: `isa` not supported by this CPU, or the size mismatches of [`int8_matmul_i32`].
pub fn int8_matmul_i32_with(
    isa: Isa,
    a: &[i8],
    rows: usize,
    w: &[i8],
    out_features: usize,
    k: usize,
) -> Result<Vec<i32>> {
    isa.check()?;
    if rows.checked_mul(k) != Some(a.len()) {
        return Err(Error::invalid_argument("a", format!("has {} values, which is not {rows} x {k}", a.len())));
    }
    if out_features.checked_mul(k) != Some(w.len()) {
        return Err(Error::invalid_argument("w", format!("has {} values, which is not {out_features} x {k}", w.len())));
    }
    let mut y = vec![0i32; rows * out_features];
    if rows == 0 || out_features == 0 || k == 0 {
        return Ok(y);
    }
    // The AVX2 kernel's `vpmaddubsw` is exact only without -128 activations (see `avx2::int8_tile`);
    // LLM.int8() activations never hold it, arbitrary callers might.
    let isa = if isa.avx2() && a.contains(&i8::MIN) { Isa::Portable } else { isa };
    if rows == 1 {
        // Decode: outputs are contiguous, tasks write in place.
        let per_task = chunk_len(out_features, min_macs_per_matvec_task().div_ceil(k)).next_multiple_of(NR8);
        for_each_chunk_mut(&mut y, per_task, |t, yc| {
            let o0 = t * per_task;
            task(isa, a, 1, w, k, o0, o0 + yc.len(), yc);
        });
        return Ok(y);
    }
    let per_task = chunk_len(out_features, MIN_MACS_PER_TASK.div_ceil(rows * k)).next_multiple_of(NR8);
    let n_tasks = out_features.div_ceil(per_task);
    let parts: Vec<(usize, Vec<i32>)> = (0..n_tasks)
        .into_par_iter()
        .map(|t| {
            let o0 = t * per_task;
            let o1 = out_features.min(o0 + per_task);
            let mut c = vec![0i32; rows * (o1 - o0)];
            task(isa, a, rows, w, k, o0, o1, &mut c);
            (o0, c)
        })
        .collect();
    y.par_chunks_mut(out_features).enumerate().with_min_len(16).for_each(|(r, yr)| {
        for (o0, c) in &parts {
            let n = c.len() / rows;
            yr[*o0..*o0 + n].copy_from_slice(&c[r * n..(r + 1) * n]);
        }
    });
    Ok(y)
}

/// Outputs `o0..o1` for all rows into `c` (`[rows, o1 - o0]`).
#[allow(clippy::too_many_arguments)]
fn task(isa: Isa, a: &[i8], rows: usize, w: &[i8], k: usize, o0: usize, o1: usize, c: &mut [i32]) {
    let ldc = o1 - o0;
    let mut r0 = 0;
    while r0 < rows {
        let mr = MR8.min(rows - r0);
        let at = &a[r0 * k..(r0 + mr) * k];
        let mut o = o0;
        while o < o1 {
            let nr = NR8.min(o1 - o);
            let wt = &w[o * k..(o + nr) * k];
            let out = tile(isa, mr, nr, k, at, wt);
            for r in 0..mr {
                for n in 0..nr {
                    c[(r0 + r) * ldc + (o - o0) + n] = out[r][n];
                }
            }
            o += nr;
        }
        r0 += mr;
    }
}

/// One `mr x nr` tile; `a` holds exactly `mr` rows of `k`, `w` exactly `nr` rows of `k`.
fn tile(isa: Isa, mr: usize, nr: usize, k: usize, a: &[i8], w: &[i8]) -> [[i32; NR8]; MR8] {
    macro_rules! dispatch {
        ($($m:literal, $n:literal);*) => {
            match (mr, nr) {
                $(($m, $n) => widen::<$m, $n>(tile_mn::<$m, $n>(isa, k, a, w)),)*
                _ => [[0; NR8]; MR8],
            }
        };
    }
    dispatch!(1, 1; 1, 2; 2, 1; 2, 2; 3, 1; 3, 2; 4, 1; 4, 2)
}

fn widen<const M: usize, const N: usize>(t: [[i32; N]; M]) -> [[i32; NR8]; MR8] {
    let mut out = [[0; NR8]; MR8];
    for (o, t) in out.iter_mut().zip(t) {
        o[..N].copy_from_slice(&t);
    }
    out
}

fn tile_mn<const M: usize, const N: usize>(isa: Isa, k: usize, a: &[i8], w: &[i8]) -> [[i32; N]; M] {
    // The SIMD kernels load through raw pointers; these lengths are what they rely on.
    let fits = a.len() >= M * k && w.len() >= N * k;
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` passed `Isa::check` (avx2 detected at run time); `fits` bounds the loads.
        Isa::Avx2 | Isa::Avx512 if fits => unsafe { super::avx2::int8_tile::<M, N>(k, a, k, w, k) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: `isa` passed `Isa::check` (NEON detected at run time); `fits` bounds the loads.
        Isa::Neon if fits => unsafe { super::neon::int8_tile::<M, N>(k, a, k, w, k) },
        _ => tile_portable::<M, N>(k, a, w),
    }
}

fn tile_portable<const M: usize, const N: usize>(k: usize, a: &[i8], w: &[i8]) -> [[i32; N]; M] {
    let mut out = [[0i32; N]; M];
    for (r, out_r) in out.iter_mut().enumerate() {
        let ar = a.get(r * k..(r + 1) * k).unwrap_or(&[]);
        for (n, o) in out_r.iter_mut().enumerate() {
            let wr = w.get(n * k..(n + 1) * k).unwrap_or(&[]);
            *o = ar.iter().zip(wr).fold(0i32, |s, (&p, &q)| s.wrapping_add(i32::from(p) * i32::from(q)));
        }
    }
    out
}

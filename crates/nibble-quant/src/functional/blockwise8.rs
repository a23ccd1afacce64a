//! 8-bit blockwise quantization against a 256-entry code book (`bitsandbytes.functional.
//! quantize_blockwise` / `dequantize_blockwise`), as bnb's native CPU kernel computes it. Double
//! quantization runs the 4-bit absmax through these with the dynamic map and blocks of 256.

use std::sync::OnceLock;

use nibble_core::{Error, Result};
use rayon::prelude::*;

use super::{check_blocksize, dynamic_map, n_blocks, MIN_ELEMS_PER_TASK};

/// Bins of bnb's quantization lookup table over [-1, 1].
const LUT_SIZE: usize = 65536;

/// Quantizes `input` in blocks of `blocksize` values to indices into `code` (sorted ascending),
/// returning the codes and the per-block absmax.
///
/// Bit-exact with bnb's CPU kernel (`quantize_cpu_impl`): per block `absmax = max |x|`, each value
/// is scaled by `1 / absmax` and looked up in a 65536-bin table of nearest codes; this is not
/// always the exact nearest code, and bnb's stored codes depend on that. An all-zero block gets
/// absmax 0 and code 0. NaN inputs are ignored by the absmax and get code 0.
///
/// Errors: `blocksize` not a power of two in 32..=4096, empty `input`, or a `code` that is not
/// sorted ascending and finite.
pub fn quantize_blockwise_8bit(input: &[f32], code: &[f32; 256], blocksize: usize) -> Result<(Vec<u8>, Vec<f32>)> {
    check_blocksize("blocksize", blocksize)?;
    if input.is_empty() {
        return Err(Error::invalid_argument("input", "is empty; there is nothing to quantize"));
    }
    check_sorted(code)?;
    let owned_lut;
    let lut: &[u8] = if is_dynamic_map(code) {
        dynamic_lut()
    } else {
        owned_lut = build_lut(code);
        &owned_lut
    };

    let mut out = vec![0u8; input.len()];
    let mut absmax = vec![0.0f32; n_blocks(input.len(), blocksize)];
    out.par_chunks_mut(blocksize)
        .zip(input.par_chunks(blocksize))
        .zip(absmax.par_iter_mut())
        .with_min_len(MIN_ELEMS_PER_TASK.div_ceil(blocksize))
        .for_each(|((q, x), am)| *am = quantize_block(x, q, lut));
    Ok((out, absmax))
}

/// Dequantizes 8-bit `codes`: `code[c] * absmax[block]` in f32, as bnb's CPU kernel does.
///
/// Errors: invalid `blocksize`, or `absmax.len()` is not `ceil(codes.len() / blocksize)`.
pub fn dequantize_blockwise_8bit(
    codes: &[u8],
    absmax: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> Result<Vec<f32>> {
    check_blocksize("blocksize", blocksize)?;
    let expected = n_blocks(codes.len(), blocksize);
    if absmax.len() != expected {
        return Err(Error::invalid_argument(
            "absmax",
            format!("has {} values, but {} codes in blocks of {blocksize} need {expected}", absmax.len(), codes.len()),
        ));
    }
    let mut out = vec![0.0f32; codes.len()];
    out.par_chunks_mut(blocksize)
        .zip(codes.par_chunks(blocksize))
        .zip(absmax.par_iter())
        .with_min_len(MIN_ELEMS_PER_TASK.div_ceil(blocksize))
        .for_each(|((o, c), &scale)| {
            for (o, &c) in o.iter_mut().zip(c) {
                *o = code[usize::from(c)] * scale;
            }
        });
    Ok(out)
}

/// One block of `quantize_cpu_impl`; returns the block's absmax.
fn quantize_block(x: &[f32], q: &mut [u8], lut: &[u8]) -> f32 {
    // `std::max(acc, fabs(v))` keeps `acc` when `v` is NaN; `if acc < a` does the same.
    let mut absmax = 0.0f32;
    for &v in x {
        let a = v.abs();
        if absmax < a {
            absmax = a;
        }
    }
    if absmax == 0.0 {
        q.fill(0);
        return absmax;
    }
    let inv = 1.0 / absmax;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = lut.get(lut_index(v * inv)).copied().unwrap_or(0);
    }
    absmax
}

/// `norm_to_lut_index`: `(uint16)((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)`.
///
/// The compiled kernel fuses the last multiply-add into one FMA (GCC contracts C++ expressions by
/// default). `t * 65535` of an f32 `t` is exact in f64, and so is adding 0.5 whenever the result
/// can reach 1, so rounding the f64 result to f32 once is the FMA's result, without needing FMA
/// hardware.
#[inline(always)]
fn lut_index(v: f32) -> usize {
    let v = v.clamp(-1.0, 1.0);
    let t = (v + 1.0) * 0.5;
    let fused = (f64::from(t) * 65535.0 + 0.5) as f32;
    // `as u16` truncates like the C++ cast for in-range values and maps NaN to 0, as x86 does.
    usize::from(fused as u16)
}

/// `build_quantize_lut`: for each of the 65536 bins over [-1, 1], the number of code midpoints
/// below the bin's value, i.e. the nearest code to that value.
fn build_lut(code: &[f32; 256]) -> Vec<u8> {
    let mids: [f32; 255] = std::array::from_fn(|i| 0.5 * (code[i] + code[i + 1]));
    let mut lut = vec![0u8; LUT_SIZE];
    let mut idx = 0usize;
    for (i, slot) in lut.iter_mut().enumerate() {
        let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
        while idx < mids.len() && mids[idx] < val {
            idx += 1;
        }
        // idx <= 255.
        *slot = idx as u8;
    }
    lut
}

fn dynamic_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| build_lut(dynamic_map()))
}

fn is_dynamic_map(code: &[f32; 256]) -> bool {
    std::ptr::eq(code, dynamic_map()) || code.iter().zip(dynamic_map()).all(|(a, b)| a.to_bits() == b.to_bits())
}

/// bnb assumes a sorted code book (its table is built from consecutive midpoints); say so rather
/// than return meaningless codes.
fn check_sorted(code: &[f32; 256]) -> Result<()> {
    let finite = code.iter().all(|v| v.is_finite());
    let sorted = code.windows(2).all(|w| w[0] <= w[1]);
    if finite && sorted {
        Ok(())
    } else {
        Err(Error::invalid_argument("code", "must be finite and sorted ascending (like bnb's dynamic map)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_dynamic_map() {
        let x: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let (q, am) = quantize_blockwise_8bit(&x, dynamic_map(), 256).unwrap();
        assert_eq!(am.len(), 4);
        let y = dequantize_blockwise_8bit(&q, &am, dynamic_map(), 256).unwrap();
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= 3.0 * 0.02, "{a} vs {b}");
        }
    }

    #[test]
    fn zero_block() {
        let x = vec![0.0f32; 300];
        let (q, am) = quantize_blockwise_8bit(&x, dynamic_map(), 256).unwrap();
        assert!(q.iter().all(|&c| c == 0));
        assert_eq!(am, vec![0.0, 0.0]);
    }

    #[test]
    fn lut_ends() {
        let lut = dynamic_lut();
        assert_eq!(lut[0], 0);
        assert_eq!(lut[LUT_SIZE - 1], 255);
        assert_eq!(lut_index(1.0), LUT_SIZE - 1);
        assert_eq!(lut_index(-1.0), 0);
        assert_eq!(lut_index(f32::NAN), 0);
    }

    #[test]
    fn custom_code() {
        // A copy of the dynamic map takes the cached table and gives the same codes.
        let copy = *dynamic_map();
        let x = [0.3, -0.7, 0.01, 1.5];
        assert_eq!(
            quantize_blockwise_8bit(&x, &copy, 64).unwrap(),
            quantize_blockwise_8bit(&x, dynamic_map(), 64).unwrap()
        );
        // A linear code book builds its own table.
        let linear: [f32; 256] = std::array::from_fn(|i| -1.0 + 2.0 * i as f32 / 255.0);
        let (q, am) = quantize_blockwise_8bit(&[1.0, -1.0, 0.5], &linear, 64).unwrap();
        assert_eq!(q, vec![255, 0, 191]);
        assert_eq!(am, vec![1.0]);
    }

    #[test]
    fn errors() {
        assert!(quantize_blockwise_8bit(&[1.0], dynamic_map(), 0).is_err());
        assert!(quantize_blockwise_8bit(&[1.0], dynamic_map(), 100).is_err());
        assert!(quantize_blockwise_8bit(&[1.0], dynamic_map(), 8192).is_err());
        assert!(quantize_blockwise_8bit(&[], dynamic_map(), 64).is_err());
        let mut bad = *dynamic_map();
        bad.swap(0, 255);
        assert!(quantize_blockwise_8bit(&[1.0], &bad, 64).is_err());
        assert!(dequantize_blockwise_8bit(&[1, 2, 3], &[1.0, 2.0], dynamic_map(), 64).is_err());
        assert!(dequantize_blockwise_8bit(&[1, 2, 3], &[1.0], dynamic_map(), 48).is_err());
        assert_eq!(dequantize_blockwise_8bit(&[], &[], dynamic_map(), 64).unwrap(), Vec::<f32>::new());
    }
}

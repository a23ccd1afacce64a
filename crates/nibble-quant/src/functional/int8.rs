//! LLM.int8() row-wise quantization (`bitsandbytes.functional.int8_vectorwise_quant` /
//! `int8_vectorwise_dequant`), as bnb's default (PyTorch) kernels compute it.

use half::f16;
use nibble_core::{Error, Result};
use rayon::prelude::*;

use crate::kernels::{quant, Isa};

/// bnb's dequantization constant, `7.874015718698502e-3` (~1/127), as the f32 torch multiplies by.
pub const INV_127: f32 = 7.874_015_718_698_502e-3_f64 as f32;

/// Rows per rayon task: rows are short for activations, so batch them.
const MIN_ROWS_PER_TASK: usize = 16;

/// A row-wise int8 quantized matrix `[rows, cols]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Quantized {
    /// Row-major int8 codes (bnb's `CB`).
    pub cb: Vec<i8>,
    /// Per-row absmax in f32 (bnb's `SCB`), outliers excluded.
    pub scb: Vec<f32>,
    /// With `threshold > 0`: the sorted, distinct columns holding an outlier (possibly none).
    /// `None` when no threshold was applied.
    pub outlier_cols: Option<Vec<usize>>,
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
}

/// Quantizes the f16 matrix `input` (`[rows, cols]`, row-major) row by row to int8, bit-exact with
/// bnb's `int8_vectorwise_quant`.
///
/// With `threshold > 0`, values with `|x| >= threshold` (compared in f16, as torch compares an f16
/// tensor with a Python float) are outliers: they are left out of their row's absmax, their
/// columns are reported, and when `rows > 1` those columns are zeroed in `cb` (bnb computes them
/// in 16-bit instead). Then `scb = max |x|` per row and
/// `cb = round_half_even(x * ((1 / scb) * 127))`, all in f32 (the factor rounded twice, as torch
/// computes `127.0 / scb`). A row whose every value is zero (or an
/// outlier) gets `scb = 0` and codes 0.
///
/// Errors: `input.len() != rows * cols`, `cols == 0`, or a negative or NaN `threshold`.
pub fn int8_vectorwise_quant(input: &[f16], rows: usize, cols: usize, threshold: f32) -> Result<Int8Quantized> {
    int8_vectorwise_quant_impl(Isa::detect(), input, rows, cols, threshold)
}

/// [`int8_vectorwise_quant`] on the kernels of `isa` (already checked to be supported).
pub(crate) fn int8_vectorwise_quant_impl(
    isa: Isa,
    input: &[f16],
    rows: usize,
    cols: usize,
    threshold: f32,
) -> Result<Int8Quantized> {
    check_shape("input", input.len(), rows, cols)?;
    if threshold.is_nan() || threshold < 0.0 {
        return Err(Error::invalid_argument(
            "threshold",
            format!("{threshold} is not allowed; use 0 for no outlier handling or a positive value"),
        ));
    }
    // Outliers are `|x| >= threshold` compared in f16, as torch compares an f16 tensor with a
    // Python float.
    let th = (threshold > 0.0).then(|| f16::from_f32(threshold).to_f32());

    let outlier_cols = th.map(|th| {
        let mask = input
            .par_chunks(cols)
            .with_min_len(MIN_ROWS_PER_TASK)
            .fold(
                || vec![false; cols],
                |mut m, row| {
                    quant::outlier_mask_row(isa, row, th, &mut m);
                    m
                },
            )
            .reduce(
                || vec![false; cols],
                |mut a, b| {
                    for (a, b) in a.iter_mut().zip(b) {
                        *a |= b;
                    }
                    a
                },
            );
        mask.iter().enumerate().filter_map(|(c, &m)| m.then_some(c)).collect::<Vec<_>>()
    });

    let mut cb = vec![0i8; input.len()];
    let mut scb = vec![0.0f32; rows];
    cb.par_chunks_mut(cols)
        .zip(input.par_chunks(cols))
        .zip(scb.par_iter_mut())
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|((q, row), s)| {
            // Outliers are zeroed before the absmax; torch's max propagates NaN.
            let (mut absmax, nan) = quant::int8_row_absmax(isa, row, th);
            if nan {
                absmax = f32::NAN;
            }
            *s = absmax;
            // torch evaluates `127.0 / row_stats` as `row_stats.reciprocal() * 127` (Tensor.__rdiv__),
            // two f32 roundings; the single-rounding quotient differs in the last bit for some rows
            // and then flips codes whose scaled value lies within that bit of .5.
            quant::int8_row_encode(isa, row, th, (1.0 / absmax) * 127.0, q);
        });

    if rows > 1 {
        if let Some(cols_out) = &outlier_cols {
            for row in cb.chunks_exact_mut(cols) {
                for &c in cols_out {
                    if let Some(q) = row.get_mut(c) {
                        *q = 0;
                    }
                }
            }
        }
    }

    Ok(Int8Quantized { cb, scb, outlier_cols, rows, cols })
}

/// Dequantizes int8 row-wise codes to f32 as bnb does: `(cb * scb[row]) * 7.874015718698502e-3`,
/// two f32 roundings.
///
/// Errors: `cb.len() != rows * cols`, `cols == 0`, or `scb.len() != rows`.
pub fn int8_vectorwise_dequant(cb: &[i8], scb: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>> {
    check_shape("cb", cb.len(), rows, cols)?;
    if scb.len() != rows {
        return Err(Error::invalid_argument("scb", format!("has {} values for {rows} rows", scb.len())));
    }
    let mut out = vec![0.0f32; cb.len()];
    out.par_chunks_mut(cols).zip(cb.par_chunks(cols)).zip(scb.par_iter()).with_min_len(MIN_ROWS_PER_TASK).for_each(
        |((o, q), &s)| {
            for (o, &q) in o.iter_mut().zip(q) {
                *o = f32::from(q) * s * INV_127;
            }
        },
    );
    Ok(out)
}

fn check_shape(name: &str, len: usize, rows: usize, cols: usize) -> Result<()> {
    if cols == 0 {
        return Err(Error::invalid_argument("cols", "must be at least 1"));
    }
    match rows.checked_mul(cols) {
        Some(n) if n == len => Ok(()),
        _ => Err(Error::invalid_argument(name, format!("has {len} values, which is not {rows} x {cols}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &[f32]) -> Vec<f16> {
        v.iter().map(|&x| f16::from_f32(x)).collect()
    }

    #[test]
    fn basic() {
        let x = h(&[1.0, -2.0, 0.5, 0.0, 0.0, 0.0]);
        let q = int8_vectorwise_quant(&x, 2, 3, 0.0).unwrap();
        assert_eq!(q.cb, vec![64, -127, 32, 0, 0, 0]);
        assert_eq!(q.scb, vec![2.0, 0.0]);
        assert_eq!(q.outlier_cols, None);
        let y = int8_vectorwise_dequant(&q.cb, &q.scb, 2, 3).unwrap();
        assert!((y[0] - 1.0079).abs() < 1e-3);
        assert_eq!(y[1], -127.0 * 2.0 * INV_127);
    }

    #[test]
    fn outliers() {
        let x = h(&[1.0, 7.0, 0.5, 2.0, 1.0, -6.0]);
        let q = int8_vectorwise_quant(&x, 2, 3, 6.0).unwrap();
        assert_eq!(q.outlier_cols, Some(vec![1, 2]));
        assert_eq!(q.scb, vec![1.0, 2.0]);
        assert_eq!(q.cb, vec![127, 0, 0, 127, 0, 0]);
        // A single row keeps the non-outlier values of outlier columns.
        let q1 = int8_vectorwise_quant(&h(&[1.0, 7.0, 0.5]), 1, 3, 6.0).unwrap();
        assert_eq!(q1.cb, vec![127, 0, 64]);
        assert_eq!(q1.outlier_cols, Some(vec![1]));
        // A threshold that finds nothing reports an empty list, like bnb's empty tensor.
        let q2 = int8_vectorwise_quant(&h(&[1.0, 2.0]), 1, 2, 6.0).unwrap();
        assert_eq!(q2.outlier_cols, Some(vec![]));
    }

    #[test]
    fn errors() {
        let x = h(&[1.0; 6]);
        assert!(int8_vectorwise_quant(&x, 2, 2, 0.0).is_err());
        assert!(int8_vectorwise_quant(&x, 6, 0, 0.0).is_err());
        assert!(int8_vectorwise_quant(&x, usize::MAX, 2, 0.0).is_err());
        assert!(int8_vectorwise_quant(&x, 2, 3, -1.0).is_err());
        assert!(int8_vectorwise_quant(&x, 2, 3, f32::NAN).is_err());
        assert!(int8_vectorwise_dequant(&[1, 2, 3], &[1.0], 1, 2).is_err());
        assert!(int8_vectorwise_dequant(&[1, 2, 3, 4], &[1.0], 2, 2).is_err());
        assert!(int8_vectorwise_dequant(&[1, 2], &[1.0], 1, 0).is_err());
        let empty = int8_vectorwise_quant(&[], 0, 4, 6.0).unwrap();
        assert!(empty.cb.is_empty() && empty.scb.is_empty());
    }
}

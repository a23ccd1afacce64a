//! The CPU kernels against their definitions.
//!
//! - Fused 4-bit products equal "dequantize with `functional::dequantize_4bit`, round to the
//!   compute dtype, multiply in f64" within float rounding. Tolerance, per output:
//!   `|y - y_ref| <= in * 2^-24 * sum_k |w_k x_k| + u_out * |y_ref|`, the standard bound for
//!   f32 summation of `in` products in any order (each product and partial sum rounded once),
//!   plus one rounding of the output to the compute dtype (`u_out` = 2^-8 for bf16, 2^-11 for
//!   f16, 0 for f32).
//!   The one exception is the AVX2 one-row kernel for weights whose last rounding is bf16
//!   ([`scale_factored`]): it rounds the code book to bf16 instead of each `code * absmax`, so
//!   each weight may differ from the reference by bf16 rounding twice over (the code's and the
//!   reference's own, `2^-9` relative each, `2^-11` more for the f16-then-bf16 chain), which
//!   adds `u_w * sum_k |w_k x_k|` with `u_w = 2^-8 + 2^-10`. For f32 weights (f32 compute) that
//!   kernel factors the scale out too, with the exact f32 code book: `s * sum code_k x_k` differs
//!   from `sum f32(code_k s) x_k` by the f32 rounding of each weight, `u_w = 2^-23`. The AVX-512
//!   kernel looks up every weight exactly (`u_w = 0`).
//! - Every SIMD path the CPU supports equals the portable path: within the same bound for the
//!   fused f32 products (their summation orders differ), bit for bit for int8 products and for
//!   the quantizers.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use nibble_quant::functional::{dequantize_4bit, int8_vectorwise_quant, quantize_4bit, Element, Packed4bit, QuantType};
use nibble_quant::kernels::{
    int8_matmul_i32_with, int8_vectorwise_quant_with, matmul_4bit_with, quantize_4bit_with, Isa, Matrix4bit,
    Precision, Rounding,
};
use nibble_quant::linear::LinearStorage;
use nibble_quant::{Linear4bit, Linear8bit, QuantLinear};

/// splitmix64: small, seeded, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
    /// Uniform in [-1, 1), times a per-call scale so blocks have different absmax.
    fn f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
}

const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
const PRECISIONS: [Precision; 3] = [Precision::F32, Precision::F16, Precision::Bf16];

fn out_unit(p: Precision) -> f64 {
    match p {
        Precision::F32 => 0.0,
        Precision::F16 => 2f64.powi(-11),
        Precision::Bf16 => 2f64.powi(-8),
    }
}

fn quantize_as(w: &[f32], p: Precision, bs: usize, qt: QuantType, dq: bool) -> Packed4bit {
    match p {
        Precision::F32 => quantize_4bit(w, bs, qt, dq).unwrap(),
        Precision::F16 => quantize_4bit(&w.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(), bs, qt, dq).unwrap(),
        Precision::Bf16 => quantize_4bit(&w.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), bs, qt, dq).unwrap(),
    }
}

/// bnb's reference weight: `dequantize_4bit` into the weight dtype, then cast to the compute dtype.
fn reference_weight(q: &Packed4bit, r: Rounding) -> Vec<f64> {
    let w: Vec<f32> = match r.weight {
        Precision::F32 => dequantize_4bit::<f32>(q).unwrap(),
        Precision::F16 => dequantize_4bit::<f16>(q).unwrap().iter().map(|v| v.to_f32()).collect(),
        Precision::Bf16 => dequantize_4bit::<bf16>(q).unwrap().iter().map(|v| v.to_f32()).collect(),
    };
    w.iter().map(|&v| f64::from(r.compute.round(v))).collect()
}

/// Whether `isa`'s product of this shape factors block scales out (the AVX2 one-row kernel, which
/// every matrix-vector row runs, for rows of whole 64-value chunks and whole blocks of 64 or
/// more, weights ending in bf16 or f32 weights with f32 compute).
fn scale_factored(isa: Isa, r: Rounding, n_in: usize, bs: usize, rows: usize) -> Option<Precision> {
    let f32_weights = r.weight == Precision::F32 && r.compute == Precision::F32;
    let factored = isa == Isa::Avx2
        && rows <= 16
        && (r.stored() == Precision::Bf16 || f32_weights)
        && bs >= 64
        && n_in.is_multiple_of(64)
        && n_in.is_multiple_of(bs);
    factored.then(|| r.stored())
}

/// The weight term of the tolerance: `u_w` of the module docs for a scale-factored product
/// whose weights end in the given precision.
fn weight_unit(factored: Option<Precision>) -> f64 {
    match factored {
        Some(Precision::F32) => 2f64.powi(-23),
        Some(_) => 2f64.powi(-8) + 2f64.powi(-10),
        None => 0.0,
    }
}

/// Checks `y` (`[rows, out]`) against the f64 product, with the tolerance of the module docs
/// (`w_unit` is `u_w`).
#[allow(clippy::too_many_arguments)]
fn check_close(
    what: &str,
    y: &[f32],
    w: &[f64],
    x: &[f32],
    rows: usize,
    n_out: usize,
    n_in: usize,
    out_p: Precision,
    w_unit: f64,
) {
    let gamma = n_in as f64 * 2f64.powi(-24) + w_unit;
    let mut worst = 0.0f64;
    for r in 0..rows {
        for o in 0..n_out {
            let (mut s, mut abs) = (0.0f64, 0.0f64);
            for k in 0..n_in {
                let p = w[o * n_in + k] * f64::from(x[r * n_in + k]);
                s += p;
                abs += p.abs();
            }
            let got = f64::from(y[r * n_out + o]);
            let tol = gamma * abs + out_unit(out_p) * s.abs() + 1e-30;
            let err = (got - s).abs();
            assert!(err <= tol, "{what}: row {r} out {o}: got {got}, want {s} (err {err:e} > tol {tol:e})");
            worst = worst.max(err / tol);
        }
    }
    assert!(worst.is_finite(), "{what}");
}

struct Case {
    n_out: usize,
    n_in: usize,
    bs: usize,
    qt: QuantType,
    dq: bool,
    rounding: Rounding,
    rows: usize,
}

fn random_case(rng: &mut Rng) -> Case {
    // Widths around the block, SIMD (8, 16, 32) and model sizes, plus odd ones where rows start
    // mid-byte and blocks straddle rows.
    let ins = [1, 3, 7, 8, 15, 31, 32, 33, 48, 63, 64, 65, 96, 100, 127, 160, 200, 256, 320, 576, 1000, 1536];
    let outs = [1, 2, 3, 5, 8, 16, 17, 31, 33, 48, 64, 100];
    let rows = [1, 1, 2, 3, 4, 5, 7, 13, 32];
    Case {
        n_out: rng.pick(&outs),
        n_in: rng.pick(&ins),
        bs: rng.pick(&BLOCKSIZES),
        qt: rng.pick(&[QuantType::Nf4, QuantType::Fp4]),
        dq: rng.below(2) == 1,
        rounding: Rounding { weight: rng.pick(&PRECISIONS), compute: rng.pick(&PRECISIONS) },
        rows: rng.pick(&rows),
    }
}

#[test]
fn fused_4bit_matches_dequantize_then_matmul() {
    let mut rng = Rng(7);
    for i in 0..400 {
        let c = random_case(&mut rng);
        let scale = 0.05 + rng.f32().abs();
        let w = rng.vec(c.n_out * c.n_in, scale);
        let q = quantize_as(&w, c.rounding.weight, c.bs, c.qt, c.dq);
        let absmax = q.absmax.try_to_f32().unwrap();
        let m = Matrix4bit::new(&q.packed, &absmax, c.n_out, c.n_in, c.bs, c.qt, c.rounding).unwrap();
        let x: Vec<f32> = rng.vec(c.rows * c.n_in, 2.0).into_iter().map(|v| c.rounding.compute.round(v)).collect();
        let w_ref = reference_weight(&q, c.rounding);
        for isa in Isa::supported() {
            let y = matmul_4bit_with(isa, &m, &x, c.rows).unwrap();
            let what = format!(
                "case {i} {isa:?} [{}, {}] bs {} {:?} dq {} {:?} rows {}",
                c.n_out, c.n_in, c.bs, c.qt, c.dq, c.rounding, c.rows
            );
            let w_unit = weight_unit(scale_factored(isa, c.rounding, c.n_in, c.bs, c.rows));
            check_close(&what, &y, &w_ref, &x, c.rows, c.n_out, c.n_in, Precision::F32, w_unit);
        }
    }
}

#[test]
fn simd_4bit_paths_match_portable() {
    let simd: Vec<Isa> = Isa::supported().into_iter().filter(|&i| i != Isa::Portable).collect();
    if simd.is_empty() {
        eprintln!("no SIMD kernels on this CPU; nothing to compare");
        return;
    }
    let mut rng = Rng(11);
    // Model-like shapes (rows a multiple of 32: the fast SIMD layout) and a few odd ones.
    let shapes = [(64, 576), (192, 576), (96, 1536), (40, 2048), (33, 100), (17, 65), (8, 4096)];
    for (n_out, n_in) in shapes {
        for bs in [32, 64, 128, 4096] {
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                for rounding in [
                    Rounding::NONE,
                    Rounding { weight: Precision::Bf16, compute: Precision::F32 },
                    Rounding { weight: Precision::F16, compute: Precision::F32 },
                    Rounding { weight: Precision::Bf16, compute: Precision::F16 },
                    Rounding { weight: Precision::F32, compute: Precision::Bf16 },
                ] {
                    let w = rng.vec(n_out * n_in, 0.3);
                    let q = quantize_as(&w, rounding.weight, bs, qt, bs == 64);
                    let absmax = q.absmax.try_to_f32().unwrap();
                    let m = Matrix4bit::new(&q.packed, &absmax, n_out, n_in, bs, qt, rounding).unwrap();
                    let w_port = reference_weight(&q, rounding);
                    for rows in [1, 2, 9] {
                        let x = rng.vec(rows * n_in, 1.0);
                        let want = matmul_4bit_with(Isa::Portable, &m, &x, rows).unwrap();
                        for &isa in &simd {
                            let got = matmul_4bit_with(isa, &m, &x, rows).unwrap();
                            // Both within the rounding bound of the exact product; compare them
                            // to each other through it (twice the bound).
                            let gamma = 2.0 * n_in as f64 * 2f64.powi(-24)
                                + weight_unit(scale_factored(isa, rounding, n_in, bs, rows));
                            for r in 0..rows {
                                for o in 0..n_out {
                                    let abs: f64 = (0..n_in)
                                        .map(|k| (w_port[o * n_in + k] * f64::from(x[r * n_in + k])).abs())
                                        .sum();
                                    let (g, p) = (got[r * n_out + o], want[r * n_out + o]);
                                    assert!(
                                        f64::from((g - p).abs()) <= gamma * abs + 1e-30,
                                        "{isa:?} vs portable [{n_out}, {n_in}] bs {bs} {qt:?} {rounding:?} rows {rows}: {g} vs {p}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn avx512_4bit_rows_do_not_depend_on_the_batch() {
    // A row's product, computed alone or among up to 16 rows, is the same bits (what a server's
    // batched decode step needs for "the same tokens alone or batched").
    if !Isa::Avx512.is_supported() {
        eprintln!("no AVX-512 on this CPU; nothing to check");
        return;
    }
    let mut rng = Rng(29);
    for (n_out, n_in, bs) in [(96, 576, 64), (40, 1536, 128), (24, 256, 256)] {
        for rounding in [Rounding::NONE, Rounding { weight: Precision::Bf16, compute: Precision::F32 }] {
            let w = rng.vec(n_out * n_in, 0.3);
            let q = quantize_as(&w, rounding.weight, bs, QuantType::Nf4, false);
            let absmax = q.absmax.try_to_f32().unwrap();
            let m = Matrix4bit::new(&q.packed, &absmax, n_out, n_in, bs, QuantType::Nf4, rounding).unwrap();
            for rows in [2, 3, 5, 16] {
                let x = rng.vec(rows * n_in, 1.0);
                let batch = matmul_4bit_with(Isa::Avx512, &m, &x, rows).unwrap();
                for r in 0..rows {
                    let alone = matmul_4bit_with(Isa::Avx512, &m, &x[r * n_in..(r + 1) * n_in], 1).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&alone),
                        bits(&batch[r * n_out..(r + 1) * n_out]),
                        "[{n_out}, {n_in}] bs {bs} {rounding:?}: row {r} of {rows}"
                    );
                }
            }
        }
    }
}

#[test]
fn avx512_matrix_matrix_equals_avx2_bit_for_bit() {
    // The AVX-512 micro-kernel sums each output over k in the AVX2 kernel's order.
    if !Isa::Avx512.is_supported() {
        eprintln!("no AVX-512 on this CPU; nothing to check");
        return;
    }
    let mut rng = Rng(37);
    let (n_out, n_in, rows) = (96, 576, 40);
    let w = rng.vec(n_out * n_in, 0.3);
    let q = quantize_as(&w, Precision::F32, 64, QuantType::Nf4, false);
    let absmax = q.absmax.try_to_f32().unwrap();
    let m = Matrix4bit::new(&q.packed, &absmax, n_out, n_in, 64, QuantType::Nf4, Rounding::NONE).unwrap();
    let x = rng.vec(rows * n_in, 1.0);
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    assert_eq!(
        bits(matmul_4bit_with(Isa::Avx512, &m, &x, rows).unwrap()),
        bits(matmul_4bit_with(Isa::Avx2, &m, &x, rows).unwrap())
    );
}

#[test]
fn fused_4bit_handles_special_scales() {
    // A NaN block and an all-zero block: the fused product sees what dequantize sees. The NaN
    // goes first in one matrix and last in the other, so rows of both kernels (per-block tables
    // and scale-factored) come before and after it within one call.
    let (n_out, n_in) = (4, 64);
    for nan_row in [0, 3] {
        let mut w = Rng(3).vec(n_out * n_in, 1.0);
        w[nan_row * n_in + 5] = f32::NAN;
        w[64..128].fill(0.0);
        let q = quantize_4bit(&w, 64, QuantType::Nf4, false).unwrap();
        let absmax = q.absmax.try_to_f32().unwrap();
        let x = vec![1.0f32; n_in];
        // f32 weights take the per-block tables everywhere; bf16 ones the scale-factored AVX2
        // kernel for finite rows.
        for rounding in [Rounding::NONE, Rounding { weight: Precision::Bf16, compute: Precision::F32 }] {
            for isa in Isa::supported() {
                let m = Matrix4bit::new(&q.packed, &absmax, n_out, n_in, 64, QuantType::Nf4, rounding).unwrap();
                let y = matmul_4bit_with(isa, &m, &x, 1).unwrap();
                let what = format!("{isa:?} {rounding:?} NaN in row {nan_row}");
                for (o, v) in y.iter().enumerate() {
                    match o {
                        _ if o == nan_row => assert!(v.is_nan(), "{what}: row {o} is {v}"),
                        1 => assert_eq!(*v, 0.0, "{what}"),
                        _ => assert!(v.is_finite(), "{what}: row {o} is {v}"),
                    }
                }
            }
        }
    }
}

fn tensor_of(v: &[f32], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

#[test]
fn linear4bit_forward_all_activation_dtypes() {
    let mut rng = Rng(5);
    for (n_out, n_in, bs) in [(48, 576, 64), (30, 200, 128), (7, 33, 32), (64, 256, 4096)] {
        for wdt in [DType::F32, DType::F16, DType::BF16] {
            for cdt in [DType::F32, DType::F16, DType::BF16] {
                for (qt, dq) in [(QuantType::Nf4, false), (QuantType::Nf4, true), (QuantType::Fp4, true)] {
                    let wv = rng.vec(n_out * n_in, 0.2);
                    let weight = tensor_of(&wv, &[n_out, n_in], wdt);
                    let layer = Linear4bit::quantize(&weight, qt, bs, dq, cdt, &Device::Cpu).unwrap();
                    // bitsandbytes 0.50.2 dequantizes straight into the compute dtype, whatever
                    // the weight's own dtype.
                    let r = Rounding { weight: Precision::F32, compute: Precision::from_dtype(cdt).unwrap() };
                    let LinearStorage::FourBit(q, _) = layer.storage() else { panic!("4-bit storage") };
                    let w_ref = reference_weight(q, r);
                    for lead in [vec![1, 1], vec![2, 5], vec![1, 19]] {
                        let rows: usize = lead.iter().product();
                        let xv = rng.vec(rows * n_in, 1.0);
                        let mut shape = lead.clone();
                        shape.push(n_in);
                        let x = tensor_of(&xv, &shape, cdt);
                        let y = layer.forward(&x).unwrap();
                        let mut want_shape = lead.clone();
                        want_shape.push(n_out);
                        assert_eq!(y.dims(), want_shape.as_slice());
                        assert_eq!(y.dtype(), cdt);
                        let yv: Vec<f32> = y.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                        let xr: Vec<f32> = x.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                        let what = format!("[{n_out}, {n_in}] bs {bs} {wdt:?}->{cdt:?} {qt:?} dq {dq} lead {lead:?}");
                        let w_unit = weight_unit(scale_factored(Isa::detect(), r, n_in, bs, rows));
                        check_close(&what, &yv, &w_ref, &xr, rows, n_out, n_in, r.compute, w_unit);
                    }
                }
            }
        }
    }
}

/// The LLM.int8() forward pass written out with scalar i32 dot products, for activations of dtype
/// D (`round` rounds f32 to D): main product scaled in f32 and rounded to D, outlier columns summed
/// in f32 by fused multiply-adds against the D-rounded dequantized weight columns, added, and
/// rounded to D; in f32 a single outlier column is fused into the main product (see `Linear8bit`;
/// checked against bitsandbytes in `tests/int8_layer.rs` and `tests/int8_model.rs`).
#[allow(clippy::too_many_arguments)]
fn int8_forward_scalar(
    cb: &[i8],
    scb: &[f32],
    n_out: usize,
    n_in: usize,
    x: &[f32],
    rows: usize,
    threshold: f32,
    round: fn(f32) -> f32,
    f32_model: bool,
) -> Vec<f32> {
    const INT8_MM_SCALE: f32 = 6.200_124e-5;
    let inv127 = nibble_quant::functional::INV_127;
    let x16: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let qa = int8_vectorwise_quant(&x16, rows, n_in, threshold).unwrap();
    let cols = qa.outlier_cols.clone().unwrap_or_default();
    let mut out = vec![0.0f32; rows * n_out];
    for r in 0..rows {
        for o in 0..n_out {
            let a = &qa.cb[r * n_in..(r + 1) * n_in];
            let w = &cb[o * n_in..(o + 1) * n_in];
            let acc: i32 = a.iter().zip(w).fold(0i32, |s, (&p, &q)| s.wrapping_add(i32::from(p) * i32::from(q)));
            let main = round(acc as f32 * (qa.scb[r] * scb[o]) * INT8_MM_SCALE);
            out[r * n_out + o] = if cols.is_empty() {
                main
            } else if f32_model && cols.len() == 1 {
                // f32 with one outlier column: MKL's addmm fuses the product, one rounding.
                let b = (f32::from(w[cols[0]]) * scb[o]) * inv127;
                x[r * n_in + cols[0]].mul_add(b, main)
            } else {
                let mut extra = 0.0f32;
                for &c in &cols {
                    let b = round((f32::from(w[c]) * scb[o]) * inv127);
                    extra = x[r * n_in + c].mul_add(b, extra);
                }
                round(main + extra)
            };
        }
    }
    out
}

#[test]
fn linear8bit_forward_is_unchanged() {
    let mut rng = Rng(9);
    type Round = fn(f32) -> f32;
    let rounds: [(DType, Round); 3] = [
        (DType::F32, |v| v),
        (DType::BF16, |v| half::bf16::from_f32(v).to_f32()),
        (DType::F16, |v| f16::from_f32(v).to_f32()),
    ];
    for (n_out, n_in) in [(40, 576), (17, 33), (64, 100), (5, 1536)] {
        let wv = rng.vec(n_out * n_in, 0.1);
        let weight = tensor_of(&wv, &[n_out, n_in], DType::BF16);
        for threshold in [0.0f32, 6.0] {
            for (dt, round) in rounds {
                let layer = Linear8bit::quantize(&weight, threshold, dt, &Device::Cpu).unwrap();
                let LinearStorage::Int8 { cb, scb } = layer.storage() else { panic!("int8 storage") };
                for rows in [1usize, 3, 12] {
                    let mut xv = rng.vec(rows * n_in, 3.0);
                    // A few outliers in two columns.
                    xv[n_in / 2] = 9.0;
                    if rows > 1 {
                        xv[n_in + n_in / 3] = -12.0;
                    }
                    let xv: Vec<f32> = xv.into_iter().map(round).collect();
                    let want = int8_forward_scalar(cb, scb, n_out, n_in, &xv, rows, threshold, round, dt == DType::F32);
                    let x = tensor_of(&xv, &[rows, n_in], dt);
                    let y = layer.forward(&x).unwrap();
                    assert_eq!(y.dtype(), dt);
                    let got: Vec<f32> = y.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                    let what = format!("[{n_out}, {n_in}] {dt:?} threshold {threshold} rows {rows}");
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "forward {what}");
                    assert_eq!(bits(&layer.forward_f32(&xv, rows).unwrap()), bits(&want), "forward_f32 {what}");
                }
            }
        }
    }
}

#[test]
fn int8_matmul_paths_are_bit_identical() {
    let mut rng = Rng(13);
    for (rows, n_out, k) in [(1, 64, 576), (1, 33, 31), (3, 17, 100), (12, 40, 1536), (5, 9, 7), (1, 1, 1)] {
        for with_min in [false, true] {
            let mut a: Vec<i8> = (0..rows * k).map(|_| (rng.below(255) as i32 - 127) as i8).collect();
            let w: Vec<i8> = (0..n_out * k).map(|_| (rng.below(256) as i32 - 128) as i8).collect();
            if with_min {
                a[0] = i8::MIN;
            }
            let want: Vec<i32> = (0..rows)
                .flat_map(|r| {
                    let (a, w) = (&a, &w);
                    (0..n_out).map(move |o| {
                        (0..k).fold(0i32, |s, i| s.wrapping_add(i32::from(a[r * k + i]) * i32::from(w[o * k + i])))
                    })
                })
                .collect();
            for isa in Isa::supported() {
                let got = int8_matmul_i32_with(isa, &a, rows, &w, n_out, k).unwrap();
                assert_eq!(got, want, "{isa:?} rows {rows} out {n_out} k {k} min {with_min}");
            }
        }
    }
    assert!(int8_matmul_i32_with(Isa::Portable, &[1, 2, 3], 2, &[1, 2], 1, 2).is_err());
}

fn special_values(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    let mut v = rng.vec(n, scale);
    // Exact zeros, a zero run, huge and tiny values; NaN only sometimes (it poisons a block).
    for i in (0..n).step_by(37) {
        v[i] = 0.0;
    }
    if n > 300 {
        v[200..300].fill(0.0);
        v[17] = 3.0e30;
        v[18] = -1.0e-30;
    }
    if rng.below(3) == 0 && n > 0 {
        let i = rng.below(n);
        v[i] = f32::NAN;
    }
    v
}

fn assert_same_quant4<T: Element>(x: &[T], what: &str) {
    for bs in BLOCKSIZES {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for dq in [false, true] {
                let want = quantize_4bit_with(Isa::Portable, x, bs, qt, dq).unwrap();
                for isa in Isa::supported() {
                    let got = quantize_4bit_with(isa, x, bs, qt, dq).unwrap();
                    assert!(got.packed == want.packed, "{what} {isa:?} bs {bs} {qt:?} dq {dq}: codes differ");
                    // NaN != NaN, so compare scales bit for bit.
                    let bits = |q: &Packed4bit| q.absmax.to_f32().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{what} {isa:?} bs {bs} {qt:?} dq {dq}: absmax differs");
                }
            }
        }
    }
}

#[test]
fn quantize_4bit_paths_are_bit_identical() {
    let mut rng = Rng(17);
    for n in [1usize, 31, 32, 33, 64, 65, 127, 1000, 4097, 20_000] {
        let scale = 1.0 + rng.f32().abs() * 10.0;
        let v = special_values(&mut rng, n, scale);
        assert_same_quant4(&v, &format!("f32 n={n}"));
        assert_same_quant4(&v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>(), &format!("f16 n={n}"));
        assert_same_quant4(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(), &format!("bf16 n={n}"));
    }
    // Values exactly on the midpoints of the code book (times the block absmax of 1), where
    // bucketize takes the lower code.
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        let book = nibble_quant::functional::code_book(qt);
        let mut sorted = book.to_vec();
        sorted.sort_by(f32::total_cmp);
        let mut v: Vec<f32> = sorted.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        v.push(1.0);
        v.resize(64, 0.25);
        assert_same_quant4(&v, &format!("{qt:?} midpoints"));
    }
}

#[test]
fn int8_quant_paths_are_bit_identical() {
    let mut rng = Rng(19);
    for (rows, cols) in [(1, 576), (3, 33), (7, 100), (16, 2048), (2, 7)] {
        for threshold in [0.0f32, 6.0, 0.5] {
            let mut v = special_values(&mut rng, rows * cols, 8.0);
            if rows > 2 {
                // An all-zero row and an infinite value.
                v[cols..2 * cols].fill(0.0);
                v[2 * cols + 1] = f32::INFINITY;
            }
            let x: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            let want = int8_vectorwise_quant_with(Isa::Portable, &x, rows, cols, threshold).unwrap();
            for isa in Isa::supported() {
                let got = int8_vectorwise_quant_with(isa, &x, rows, cols, threshold).unwrap();
                assert_eq!(got.cb, want.cb, "{isa:?} [{rows}, {cols}] th {threshold}");
                assert_eq!(got.outlier_cols, want.outlier_cols, "{isa:?} [{rows}, {cols}] th {threshold}");
                let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got.scb), bits(&want.scb), "{isa:?} [{rows}, {cols}] th {threshold}");
            }
        }
    }
}

#[test]
fn dense_matvec_matches_f64() {
    use nibble_quant::kernels::{matmul_dense_with, DenseWeight};
    let mut rng = Rng(23);
    for (n_out, n_in) in [(1, 1), (7, 33), (64, 576), (100, 1000), (3, 4099)] {
        let w = rng.vec(n_out * n_in, 0.5);
        let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        for rows in [1usize, 2, 3] {
            let x = rng.vec(rows * n_in, 1.0);
            for isa in Isa::supported() {
                for (name, dw, wv) in [
                    ("f32", DenseWeight::F32(&w), w.clone()),
                    ("f16", DenseWeight::F16(&wh), wh.iter().map(|v| v.to_f32()).collect()),
                    ("bf16", DenseWeight::Bf16(&wb), wb.iter().map(|v| v.to_f32()).collect::<Vec<f32>>()),
                ] {
                    let y = matmul_dense_with(isa, dw, n_out, n_in, &x, rows).unwrap();
                    let wr: Vec<f64> = wv.iter().map(|&v| f64::from(v)).collect();
                    check_close(&format!("{isa:?} {name} [{n_out}, {n_in}] rows {rows}"), &y, &wr, &x, rows, n_out, n_in, Precision::F32, 0.0);
                }
            }
        }
    }
    assert!(matmul_dense_with(Isa::Portable, DenseWeight::F32(&[1.0; 6]), 2, 2, &[1.0; 2], 1).is_err());
}

/// A 16-bit dense product gives every row the same bits whatever the instruction set (AVX2's
/// two 8-lane sums are AVX-512's one 16-lane sum) and whatever rows it runs beside (1 to 16 at
/// once, across the kernels' 4- and 8-row groups).
#[test]
fn dense_16bit_rows_are_bit_equal_across_isas_and_batches() {
    use nibble_quant::kernels::{matmul_dense_with, DenseWeight};
    let mut rng = Rng(29);
    for (n_out, n_in) in [(5, 576), (9, 1000), (3, 4099), (4, 8), (2, 24)] {
        let w = rng.vec(n_out * n_in, 0.5);
        let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let x = rng.vec(16 * n_in, 1.0);
        for (name, dw) in [("f16", DenseWeight::F16(&wh)), ("bf16", DenseWeight::Bf16(&wb))] {
            let mut first: Option<Vec<u32>> = None;
            for isa in Isa::supported().into_iter().filter(|i| *i != Isa::Portable) {
                let alone: Vec<u32> = (0..16)
                    .flat_map(|r| matmul_dense_with(isa, dw, n_out, n_in, &x[r * n_in..(r + 1) * n_in], 1).unwrap())
                    .map(f32::to_bits)
                    .collect();
                for rows in 1..=16 {
                    let y = matmul_dense_with(isa, dw, n_out, n_in, &x[..rows * n_in], rows).unwrap();
                    let y: Vec<u32> = y.into_iter().map(f32::to_bits).collect();
                    assert_eq!(y, alone[..rows * n_out], "{isa:?} {name} [{n_out}, {n_in}] {rows} rows");
                }
                match &first {
                    None => first = Some(alone),
                    Some(f) => assert_eq!(f, &alone, "{isa:?} {name} [{n_out}, {n_in}] differs from the first SIMD set"),
                }
            }
        }
    }
}

#[test]
fn dense_linear_decode_matches_candle_matmul() {
    use nibble_quant::DenseLinear;
    let mut rng = Rng(29);
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let (n_out, n_in) = (300, 576);
        let w = tensor_of(&rng.vec(n_out * n_in, 0.3), &[n_out, n_in], dt);
        let layer = DenseLinear::new(w.clone(), None).unwrap();
        // Up to 3 rows take the streaming kernel; more go to candle's matmul (not tested here).
        for lead in [vec![1, 1], vec![3], vec![1, 2]] {
            let rows: usize = lead.iter().product();
            let mut shape = lead.clone();
            shape.push(n_in);
            let x = tensor_of(&rng.vec(rows * n_in, 1.0), &shape, dt);
            let y = layer.forward(&x).unwrap();
            assert_eq!(y.dtype(), dt);
            let want = x.reshape((rows, n_in)).unwrap().to_dtype(DType::F32).unwrap()
                .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
            let (yv, wv): (Vec<f32>, Vec<f32>) = (
                y.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap(),
                want.flatten_all().unwrap().to_vec1().unwrap(),
            );
            let unit = match dt { DType::BF16 => 2f32.powi(-8), DType::F16 => 2f32.powi(-11), _ => 0.0 };
            for (a, b) in yv.iter().zip(&wv) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()) + unit * b.abs(), "{dt:?} {lead:?}: {a} vs {b}");
            }
        }
    }
}

/// A 16-bit dense layer (the model dtype is the weight's) computes in f32 and rounds its output
/// once, bias included, as torch's CPU kernels do: every path (streaming kernel, candle's matmul,
/// the host entry point) is the widened f32 layer's output rounded to the dtype, within one
/// unit of the dtype's last place where the f32 sums differ by their order.
#[test]
fn sixteen_bit_dense_layer_rounds_once() {
    use nibble_quant::DenseLinear;
    let mut rng = Rng(31);
    let (n_out, n_in) = (200, 576);
    for dt in [DType::BF16, DType::F16] {
        let w16 = tensor_of(&rng.vec(n_out * n_in, 0.3), &[n_out, n_in], dt);
        let b16 = tensor_of(&rng.vec(n_out, 1.0), &[n_out], dt);
        let narrow = DenseLinear::new(w16.clone(), Some(b16.clone())).unwrap();
        let wide = DenseLinear::new(w16.to_dtype(DType::F32).unwrap(), Some(b16.to_dtype(DType::F32).unwrap())).unwrap();
        assert_eq!(narrow.resident_bytes() * 2, wide.resident_bytes());
        let ulp = match dt { DType::BF16 => 2f32.powi(-8), _ => 2f32.powi(-11) };
        for rows in [1, 3, 9] {
            let x16 = tensor_of(&rng.vec(rows * n_in, 1.0), &[rows, n_in], dt);
            let xv: Vec<f32> = x16.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let flat = |t: Tensor| -> Vec<f32> { t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
            let y = narrow.forward(&x16).unwrap();
            assert_eq!(y.dtype(), dt);
            let (a, want) = (flat(y), flat(wide.forward(&x16.to_dtype(DType::F32).unwrap()).unwrap()));
            let c = narrow.forward_f32(&xv, rows).unwrap();
            for ((a, w), c) in a.iter().zip(&want).zip(&c) {
                let r = flat(Tensor::new(&[*w], &Device::Cpu).unwrap().to_dtype(dt).unwrap())[0];
                // One unit in the last place of `r` is at most `2 * ulp * |r|` (`ulp` is half a
                // unit at a power of two).
                assert!((a - r).abs() <= 2.0 * ulp * r.abs().max(1e-3), "{dt:?} rows {rows}: {a} vs {r}");
                assert_eq!(a.to_bits(), c.to_bits(), "{dt:?} rows {rows}: forward and forward_f32 differ");
            }
        }
    }
}

#[test]
fn parallel_dtype_conversion_equals_candles() {
    use nibble_quant::convert_dtype;
    let mut rng = Rng(37);
    // Large enough for several parallel chunks, with values that round differently per dtype.
    let mut v = rng.vec(200_001, 70_000.0);
    v.extend([f32::NAN, f32::INFINITY, -0.0, 1e-40, 65_520.0]);
    let n = v.len();
    let dtypes = [DType::F32, DType::F16, DType::BF16];
    for from in dtypes {
        let t = Tensor::from_vec(v.clone(), n, &Device::Cpu).unwrap().to_dtype(from).unwrap();
        for to in dtypes {
            let (a, b) = (convert_dtype(&t, to).unwrap(), t.to_dtype(to).unwrap());
            assert_eq!(a.dtype(), to);
            let bits = |x: &Tensor| -> Vec<u32> {
                x.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap().iter().map(|f| f.to_bits()).collect()
            };
            assert_eq!(bits(&a), bits(&b), "{from:?} -> {to:?}");
        }
    }
}

#[test]
fn unsupported_isa_is_an_error() {
    for isa in Isa::ALL {
        if !isa.is_supported() {
            assert!(quantize_4bit_with(isa, &[1.0f32; 64], 64, QuantType::Nf4, false).is_err());
            assert!(int8_matmul_i32_with(isa, &[1], 1, &[1], 1, 1).is_err());
        }
    }
    assert_eq!(Isa::parse("AVX2"), Some(Isa::Avx2));
    assert_eq!(Isa::parse("avx512"), Some(Isa::Avx512));
    for isa in Isa::ALL {
        assert_eq!(Isa::parse(isa.name()), Some(isa));
    }
    assert_eq!(Isa::parse("portable"), Some(Isa::Portable));
    assert_eq!(Isa::parse("sse"), None);
    assert!(Isa::detect().is_supported());
}

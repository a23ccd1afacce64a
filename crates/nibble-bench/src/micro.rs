//! Single-operation measurements: quantize-on-load throughput and the matrix kernels alone.

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use nibble_quant::functional::{int8_vectorwise_quant, quantize_4bit, QuantType};
use nibble_quant::kernels::{
    int8_matmul_i32_with, matmul_4bit_with, quantize_4bit_with, Isa, Matrix4bit, Precision, Rounding,
};

/// One line of a micro table.
#[derive(Debug, Clone)]
pub struct Line {
    pub what: String,
    pub value: f64,
    pub unit: &'static str,
    pub note: String,
}

/// Best wall time of `reps` runs of `f` (after one warm-up run).
fn best<T>(reps: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    std::hint::black_box(f()?);
    let mut b = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        std::hint::black_box(f()?);
        b = b.min(t.elapsed().as_secs_f64());
    }
    Ok(b)
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

/// Quantize-on-load throughput, in GB/s of input, on a TinyLlama MLP matrix (5632 x 2048).
pub fn quantize_throughput() -> Result<Vec<Line>> {
    let n = 5632 * 2048;
    let w = random(n, 1);
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
    let gb = (n * 2) as f64 / 1e9;
    let mut out = Vec::new();
    let isa = Isa::detect();
    for (name, qt, dq) in
        [("NF4", QuantType::Nf4, false), ("NF4 + double quant", QuantType::Nf4, true), ("FP4", QuantType::Fp4, false)]
    {
        let t = best(5, || Ok(quantize_4bit(&wb, 64, qt, dq)?))?;
        out.push(Line {
            what: format!("quantize_4bit {name}, bf16 in, blocksize 64 ({})", isa.name()),
            value: gb / t,
            unit: "GB/s",
            note: String::new(),
        });
    }
    if isa != Isa::Portable {
        let t = best(2, || Ok(quantize_4bit_with(Isa::Portable, &wb, 64, QuantType::Nf4, false)?))?;
        out.push(Line {
            what: "quantize_4bit NF4, bf16 in, blocksize 64 (portable)".into(),
            value: gb / t,
            unit: "GB/s",
            note: String::new(),
        });
    }
    let t = best(5, || Ok(int8_vectorwise_quant(&wh, 5632, 2048, 0.0)?))?;
    out.push(Line {
        what: format!("int8_vectorwise_quant, f16 in ({})", isa.name()),
        value: gb / t,
        unit: "GB/s",
        note: String::new(),
    });
    Ok(out)
}

/// The matrix kernels alone on a TinyLlama MLP matrix: decode (1 row) in GB/s of weights read,
/// prefill (512 rows) in GFLOP/s, next to candle's dense f32 matmul of the same shape.
pub fn kernels() -> Result<Vec<Line>> {
    let (n_out, n_in) = (5632usize, 2048usize);
    let w = random(n_out * n_in, 2);
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let q = quantize_4bit(&wb, 64, QuantType::Nf4, false)?;
    let absmax = q.absmax.to_f32();
    let bytes = (q.packed.len() + 4 * absmax.len()) as f64;
    let mut out = Vec::new();
    let flops = |rows: usize| 2.0 * (rows * n_out * n_in) as f64;
    for isa in Isa::supported() {
        for (label, r) in [
            ("bf16 weights", Rounding { weight: Precision::Bf16, compute: Precision::F32 }),
            ("f32 weights", Rounding::NONE),
        ] {
            let m = Matrix4bit::new(&q.packed, &absmax, n_out, n_in, 64, QuantType::Nf4, r)?;
            let x1 = random(n_in, 3);
            let t = best(20, || Ok(matmul_4bit_with(isa, &m, &x1, 1)?))?;
            out.push(Line {
                what: format!("NF4 matrix-vector [5632 x 2048], {label} ({})", isa.name()),
                value: bytes / t / 1e9,
                unit: "GB/s",
                note: format!("{:.3} ms", t * 1e3),
            });
            if r == Rounding::NONE && isa == Isa::Portable {
                continue;
            }
            let x = random(512 * n_in, 4);
            let t = best(2, || Ok(matmul_4bit_with(isa, &m, &x, 512)?))?;
            out.push(Line {
                what: format!("NF4 matrix-matrix 512 x [5632 x 2048], {label} ({})", isa.name()),
                value: flops(512) / t / 1e9,
                unit: "GFLOP/s",
                note: format!("{:.1} ms", t * 1e3),
            });
        }
    }
    let wt = Tensor::from_vec(w.clone(), (n_out, n_in), &Device::Cpu)?;
    let x1 = Tensor::from_vec(random(n_in, 3), (1, n_in), &Device::Cpu)?;
    let t = best(20, || Ok(x1.matmul(&wt.t()?)?))?;
    out.push(Line {
        what: "candle f32 matmul, 1 x [5632 x 2048] (dense)".into(),
        value: (n_out * n_in * 4) as f64 / t / 1e9,
        unit: "GB/s",
        note: format!("{:.3} ms", t * 1e3),
    });
    let x = Tensor::from_vec(random(512 * n_in, 4), (512, n_in), &Device::Cpu)?;
    let t = best(2, || Ok(x.matmul(&wt.t()?)?))?;
    out.push(Line {
        what: "candle f32 matmul, 512 x [5632 x 2048] (dense)".into(),
        value: flops(512) / t / 1e9,
        unit: "GFLOP/s",
        note: format!("{:.1} ms", t * 1e3),
    });
    let cb: Vec<i8> = w.iter().map(|&v| (v * 2540.0).round().clamp(-127.0, 127.0) as i8).collect();
    for isa in Isa::supported() {
        // Activations in -127..=127, as LLM.int8() produces them.
        let a1: Vec<i8> = (0..n_in).map(|i| (((i * 37) % 255) as i32 - 127) as i8).collect();
        let t = best(20, || Ok(int8_matmul_i32_with(isa, &a1, 1, &cb, n_out, n_in)?))?;
        out.push(Line {
            what: format!("int8 matrix-vector [5632 x 2048] ({})", isa.name()),
            value: (n_out * n_in) as f64 / t / 1e9,
            unit: "GB/s",
            note: format!("{:.3} ms", t * 1e3),
        });
        let a: Vec<i8> = (0..512 * n_in).map(|i| (((i * 37) % 255) as i32 - 127) as i8).collect();
        let t = best(2, || Ok(int8_matmul_i32_with(isa, &a, 512, &cb, n_out, n_in)?))?;
        out.push(Line {
            what: format!("int8 matrix-matrix 512 x [5632 x 2048] ({})", isa.name()),
            value: flops(512) / t / 1e9,
            unit: "GOP/s",
            note: format!("{:.1} ms", t * 1e3),
        });
    }
    Ok(out)
}


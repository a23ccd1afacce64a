//! `Linear8bit` against bitsandbytes 0.50.2's `Linear8bitLt` (threshold 6.0, CPU) on a real weight,
//! SmolLM2-135M layer 0 `mlp.gate_proj` in f32, for activations in f32, bf16 and f16
//! (`tests/fixtures/int8-layer/gate_proj.safetensors`, made by `models/reference/make_int8_refs.py`).
//!
//! The outputs are compared bit for bit: nibble's result is deterministic on every CPU (an exact
//! int32 product, then scalar f32 operations and fused multiply-adds in a fixed order), and the
//! order it uses (see `Linear8bit`) reproduced all 3 x 3 reference cases exactly, so any
//! tolerance would only hide a change of formula. For scale: rounding the outlier sum to D
//! before the addition instead flips 2,195 of the 10,752 bf16 values of case `r7`.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use nibble_quant::{Linear8bit, QuantLinear};

const LAYER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/int8-layer/gate_proj.safetensors");
const WEIGHTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/smollm2/real-weights.safetensors");
const DTYPES: [(DType, &str); 3] = [(DType::F32, "float32"), (DType::BF16, "bfloat16"), (DType::F16, "float16")];

fn load(path: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// `(values that differ, largest difference in units of D's last place at the reference value)`.
fn compare(got: &[f32], want: &[f32], dt: DType) -> (usize, f32) {
    assert_eq!(got.len(), want.len());
    let mantissa = match dt {
        DType::F32 => 23,
        DType::F16 => 10,
        _ => 7,
    };
    let mut n = 0;
    let mut worst = 0.0f32;
    for (&g, &w) in got.iter().zip(want) {
        if g.to_bits() != w.to_bits() {
            n += 1;
            let ulp = (2.0f32).powi(w.abs().max(f32::MIN_POSITIVE).log2().floor() as i32 - mantissa);
            worst = worst.max((g - w).abs() / ulp);
        }
    }
    (n, worst)
}

#[test]
fn int8_layer_matches_bitsandbytes_for_every_activation_dtype() {
    let refs = load(LAYER);
    // Read with safetensors directly: the file also holds i8 tensors, which candle does not load.
    let w = {
        let bytes = std::fs::read(WEIGHTS).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("input.model.layers.0.mlp.gate_proj.float32").unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        Tensor::from_raw_buffer(t.data(), DType::F32, t.shape(), &Device::Cpu).unwrap()
    };
    let (out_f, in_f) = w.dims2().unwrap();
    let meta = {
        let bytes = std::fs::read(LAYER).unwrap();
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        m.metadata().clone().unwrap_or_default()
    };
    let mut errs = Vec::new();
    for case in ["r7", "r1", "r1n"] {
        for (dt, name) in DTYPES {
            // The cases exercise what they claim: outlier columns in r7 and r1, none in r1n.
            let cols: Vec<usize> = serde_json::from_str(&meta[&format!("outlier_cols.{case}.{name}")]).unwrap();
            assert_eq!(cols.is_empty(), case == "r1n", "{case}.{name}: outlier columns {cols:?}");
            let x = refs[&format!("x.{case}.{name}")].to_dtype(dt).unwrap();
            let want = values(&refs[&format!("y.{case}.{name}")]);
            let rows = x.dim(0).unwrap();
            let layer = Linear8bit::quantize(&w, 6.0, dt, &Device::Cpu).unwrap();
            let y = layer.forward(&x).unwrap();
            assert_eq!(y.dtype(), dt, "forward returns the activations' dtype");
            assert_eq!(y.dims(), &[rows, out_f]);
            let (n, ulps) = compare(&values(&y), &want, dt);
            if n != 0 {
                errs.push(format!("forward {case}.{name}: {n} values differ, up to {ulps} ulp"));
            }
            let got = layer.forward_f32(&values(&x), rows).unwrap();
            let (n, ulps) = compare(&got, &want, dt);
            if n != 0 {
                errs.push(format!("forward_f32 {case}.{name}: {n} values differ, up to {ulps} ulp"));
            }
            // A 3-D input is the same rows.
            let y3 = layer.forward(&x.reshape((1, rows, in_f)).unwrap()).unwrap();
            if values(&y3) != values(&y) {
                errs.push(format!("forward {case}.{name}: [1, rows, in] differs from [rows, in]"));
            }
        }
    }
    assert!(errs.is_empty(), "{} mismatches:\n{}", errs.len(), errs.join("\n"));
}

#[test]
fn int8_layer_rejects_unsupported_dtypes_and_sizes() {
    let w = Tensor::ones((4, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(Linear8bit::quantize(&w, 6.0, DType::F64, &Device::Cpu).is_err());
    let layer = Linear8bit::quantize(&w, 6.0, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(layer.act_dtype(), DType::BF16);
    assert!(layer.forward_f32(&[0.0; 7], 1).is_err());
    assert!(layer.forward_f32(&[0.0; 8], usize::MAX).is_err());
    assert!(layer.forward(&Tensor::ones((1, 8), DType::F64, &Device::Cpu).unwrap()).is_err());
    assert!(layer.forward(&Tensor::ones((1, 7), DType::BF16, &Device::Cpu).unwrap()).is_err());
}

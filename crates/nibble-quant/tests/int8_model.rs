//! `Linear8bit` against bitsandbytes 0.50.2's `Linear8bitLt` on real activations: the inputs and
//! outputs of SmolLM2-135M-Instruct's layer-12 `self_attn.k_proj` (one outlier column) and
//! layer-1 `mlp.down_proj` (seven or eight outlier columns) captured with forward hooks while
//! transformers 5.24 ran the 8-bit model (threshold 6.0, CPU, sdpa) on the 256-token perplexity
//! text, in f32, bf16 and f16 (`tests/fixtures/int8-model/layers.safetensors`, made by
//! `models/reference/make_int8_model_refs.py`; rows and output features subsampled, see there).
//!
//! Compared bit for bit, through `forward` and `forward_f32`. The f32 single-column case is the
//! one the random-activation fixture (`tests/fixtures/int8-layer`) never had: there MKL's addmm
//! computes `fma(x, b, main)`, and the earlier `main + x * b` order differed in 1 ulp of about a
//! fifth of the outputs of every such layer (55 of SmolLM2's 210 int8 layers in f32).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use nibble_quant::linear::LinearStorage;
use nibble_quant::{Linear8bit, QuantLinear};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/int8-model/layers.safetensors");
const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/smollm2-135m-instruct/model.safetensors");
const LAYERS: [&str; 2] = ["model.layers.12.self_attn.k_proj", "model.layers.1.mlp.down_proj"];
const DTYPES: [(DType, &str); 3] = [(DType::F32, "float32"), (DType::BF16, "bfloat16"), (DType::F16, "float16")];

struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn load() -> Self {
        Self { bytes: std::fs::read(FIXTURE).unwrap() }
    }
    fn st(&self) -> safetensors::SafeTensors<'_> {
        safetensors::SafeTensors::deserialize(&self.bytes).unwrap()
    }
    fn meta(&self) -> HashMap<String, String> {
        let (_, m) = safetensors::SafeTensors::read_metadata(&self.bytes).unwrap();
        m.metadata().clone().unwrap_or_default()
    }
    /// A float tensor in its stored dtype.
    fn tensor(&self, name: &str) -> Tensor {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        let dt = match t.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            other => panic!("{name}: unexpected {other:?}"),
        };
        Tensor::from_raw_buffer(t.data(), dt, t.shape(), &Device::Cpu).unwrap()
    }
    /// `(codes, scales, out_features, in_features)`.
    fn codes(&self, layer: &str) -> (Vec<i8>, Vec<f32>, usize, usize) {
        let st = self.st();
        let cb = st.tensor(&format!("cb.{layer}")).unwrap();
        assert_eq!(cb.dtype(), safetensors::Dtype::I8);
        let scb = st.tensor(&format!("scb.{layer}")).unwrap();
        assert_eq!(scb.dtype(), safetensors::Dtype::F32);
        let (out_f, in_f) = (cb.shape()[0], cb.shape()[1]);
        let codes = cb.data().iter().map(|&b| b as i8).collect();
        let scales = scb.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        (codes, scales, out_f, in_f)
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn differing(got: &[f32], want: &[f32]) -> usize {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).filter(|(g, w)| g.to_bits() != w.to_bits()).count()
}

#[test]
fn int8_layers_match_bitsandbytes_on_real_smollm2_activations() {
    let fx = Fixture::load();
    let meta = fx.meta();
    let mut errs = Vec::new();
    for layer in LAYERS {
        let (cb, scb, out_f, in_f) = fx.codes(layer);
        for (dt, name) in DTYPES {
            // The cases hold what they are for: outlier columns, one of them for k_proj.
            let cols: Vec<usize> = serde_json::from_str(&meta[&format!("outlier_cols.{layer}.{name}")]).unwrap();
            assert!(!cols.is_empty(), "{layer}.{name}: no outlier columns");
            if layer.ends_with("k_proj") {
                assert_eq!(cols.len(), 1, "{layer}.{name}: {cols:?}");
            }
            let x = fx.tensor(&format!("x.{layer}.{name}"));
            let want = values(&fx.tensor(&format!("y.{layer}.{name}")));
            assert_eq!(x.dtype(), dt);
            let rows = x.dim(0).unwrap();
            assert_eq!(x.dim(1).unwrap(), in_f);
            let l = Linear8bit::from_parts(cb.clone(), scb.clone(), out_f, in_f, 6.0, dt, Device::Cpu).unwrap();
            let y = l.forward(&x).unwrap();
            assert_eq!(y.dtype(), dt);
            assert_eq!(y.dims(), &[rows, out_f]);
            let n = differing(&values(&y), &want);
            if n != 0 {
                errs.push(format!("forward {layer}.{name}: {n} of {} values differ", want.len()));
            }
            let n = differing(&l.forward_f32(&values(&x), rows).unwrap(), &want);
            if n != 0 {
                errs.push(format!("forward_f32 {layer}.{name}: {n} of {} values differ", want.len()));
            }
        }
    }
    assert!(errs.is_empty(), "{}", errs.join("\n"));
}

/// The fixture's codes are what nibble makes of the checkpoint (bf16) weight in every model dtype,
/// so the comparison above is the one the loaded model makes. Skipped without the model folder.
#[test]
fn int8_fixture_codes_are_nibbles_quantization_of_the_checkpoint() {
    let Ok(model) = std::fs::read(MODEL) else {
        eprintln!("skipped: {MODEL} not present");
        return;
    };
    let st = safetensors::SafeTensors::deserialize(&model).unwrap();
    let fx = Fixture::load();
    for layer in LAYERS {
        let (cb, scb, out_f, in_f) = fx.codes(layer);
        let t = st.tensor(&format!("{layer}.weight")).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::BF16);
        let w = Tensor::from_raw_buffer(t.data(), DType::BF16, t.shape(), &Device::Cpu).unwrap();
        assert_eq!(w.dim(1).unwrap(), in_f);
        for (dt, name) in DTYPES {
            let l = Linear8bit::quantize(&w.to_dtype(dt).unwrap(), 6.0, dt, &Device::Cpu).unwrap();
            let LinearStorage::Int8 { cb: got_cb, scb: got_scb } = l.storage() else { panic!("not int8") };
            assert_eq!(&got_cb[..out_f * in_f], &cb[..], "{layer}.{name}: codes");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got_scb[..out_f]), bits(&scb), "{layer}.{name}: scales");
        }
    }
}

//! The Llama family's other architectures against transformers 5.24 + bitsandbytes 0.50.2
//! (`tests/fixtures/arch/`, copied from the shared reference; models in `models/tiny-<arch>/`):
//! tiny random Mistral (sliding window 32, shorter than the 52-token prompt and the 256-token
//! text), Qwen2 (q/k/v biases), Qwen3 (q/k norms, head_dim 48 != hidden / heads) and Phi-3 (fused
//! qkv_proj and gate_up_proj), bf16 weights loaded with dtype float32 as the references were.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use nibble::{BitsAndBytesConfig, LoadOptions, Model, ModelDtype};
use safetensors::SafeTensors;

const ARCHS: [&str; 4] = ["mistral", "qwen2", "qwen3", "phi3"];

fn model_dir(arch: &str) -> String {
    root().join(format!("models/tiny-{arch}")).display().to_string()
}

fn refs(arch: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(&format!("arch/tiny-{arch}/logits.safetensors")), &Device::Cpu).unwrap()
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().map(|&i| i as u32).collect()
}

fn load(dir: &str, quant: BitsAndBytesConfig) -> Model {
    let opts = LoadOptions { quant, dtype: ModelDtype::F32, ..LoadOptions::default() };
    Model::load(dir, &opts).unwrap()
}

/// The quantizations of the references, with the logits tolerance of each: 1e-4 unquantized (f32
/// sums in another order), 2e-3 for 4-bit (bitsandbytes' own bound on the tiny Llama), and 1e-4
/// for int8, whose layers are bit-equal to bitsandbytes' (as `tiny_model.rs` establishes).
fn cases() -> [(&'static str, BitsAndBytesConfig, f32); 5] {
    [
        ("f32", BitsAndBytesConfig::none(), 1e-4),
        ("nf4", BitsAndBytesConfig::nf4(), 2e-3),
        ("nf4_dq", BitsAndBytesConfig::nf4().with_double_quant(true), 2e-3),
        ("fp4", BitsAndBytesConfig::fp4(), 2e-3),
        ("int8", BitsAndBytesConfig::int8(), 1e-4),
    ]
}

/// Logits of the whole prompt at once, and fed as a prefill of `split` tokens followed by one
/// token at a time (the host decode step with its window-bounded cache), against the reference.
#[test]
fn logits_match_transformers_in_prefill_and_decode() {
    for arch in ARCHS {
        let r = refs(arch);
        let ids = ids_of(&r["input_ids"]);
        for (key, quant, tol) in cases() {
            let want = &r[&format!("logits_{key}")];
            let model = load(&model_dir(arch), quant);
            let d = max_abs_diff(&model.logits(&ids).unwrap(), want);
            eprintln!("{arch} {key}: prefill max abs diff {d:.2e}");
            assert!(d < tol, "{arch} {key}: max abs diff {d} >= {tol}");
            // LLM.int8() picks its outlier columns across all rows of a call (a column is an
            // outlier for every row if one row exceeds the threshold), so a decode step, one row,
            // legitimately computes otherwise than the 52-row reference forward.
            if key == "int8" {
                continue;
            }
            // Splits before and past Mistral's 32-token window.
            for split in [3, 40] {
                let d = max_abs_diff(&stepwise_logits(&model, &ids, split), want);
                assert!(d < tol, "{arch} {key}, prefill {split} then decode: max abs diff {d} >= {tol}");
            }
        }
    }
}

#[test]
fn greedy_tokens_equal_transformers() {
    for arch in ARCHS {
        let r = refs(arch);
        let prompt = ids_of(&r["input_ids"]);
        let expected = ids_of(&r["greedy_f32"]);
        let model = load(&model_dir(arch), BitsAndBytesConfig::none());
        let mut opts = nibble::GenerateOptions::greedy(expected.len() - prompt.len());
        opts.stop_at_eos = false;
        let out = model.generate(&prompt, &opts, |_| {}).unwrap();
        let mut got = prompt.clone();
        got.extend(&out.tokens);
        assert_eq!(got, expected, "{arch}: greedy tokens");
    }
}

/// Perplexity over the first 256 tokens of `ppl-text.txt`, within 0.1% for every quantization.
#[test]
fn perplexity_matches_transformers() {
    let text = std::fs::read_to_string(fixture("ppl-text.txt")).unwrap();
    for arch in ARCHS {
        let figures: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(&format!("arch/tiny-{arch}/ppl.json"))).unwrap())
                .unwrap();
        let n = figures["n_tokens"].as_u64().unwrap() as usize;
        for (key, quant, _) in cases() {
            let expected = figures[key].as_f64().unwrap();
            let ppl = load(&model_dir(arch), quant).perplexity(&text, n).unwrap();
            let rel = (ppl - expected).abs() / expected;
            eprintln!("{arch} {key}: perplexity {ppl:.4} vs {expected:.4} (rel {rel:.1e})");
            assert!(rel < 1e-3, "{arch} {key}: perplexity {ppl} vs {expected} (rel {rel})");
        }
    }
}

/// transformers' own NF4 + double-quant save loads as is (no requantizing), with its logits; and
/// what nibble saves for the same quantization equals it tensor for tensor, byte for byte.
#[test]
fn prequantized_checkpoints_load_and_saves_match_them() {
    for arch in ARCHS {
        let saved = fixture(&format!("arch/tiny-{arch}/hf-bnb-nf4-dq"));
        let model = load(saved.to_str().unwrap(), BitsAndBytesConfig::none());
        assert_eq!(model.quantization(), &BitsAndBytesConfig::nf4().with_double_quant(true), "{arch}");
        let r = refs(arch);
        let d = max_abs_diff(&model.logits(&ids_of(&r["input_ids"])).unwrap(), &r["logits_nf4_dq"]);
        assert!(d < 2e-3, "{arch}: pre-quantized logits max abs diff {d} >= 2e-3");

        // The reference was saved from the model loaded with dtype float32 (its lm_head is f32).
        let ours = load(&model_dir(arch), BitsAndBytesConfig::nf4().with_double_quant(true));
        let out = tempfile::tempdir().unwrap();
        ours.save_pretrained(out.path()).unwrap();
        let ours_bytes = std::fs::read(out.path().join("model.safetensors")).unwrap();
        let theirs_bytes = std::fs::read(saved.join("model.safetensors")).unwrap();
        let (a, b) = (SafeTensors::deserialize(&ours_bytes).unwrap(), SafeTensors::deserialize(&theirs_bytes).unwrap());
        let (mut na, mut nb) = (a.names(), b.names());
        na.sort();
        nb.sort();
        assert_eq!(na, nb, "{arch}: tensor names differ");
        for name in nb {
            let (x, y) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
            assert_eq!((x.dtype(), x.shape()), (y.dtype(), y.shape()), "{arch} {name}");
            if name.contains("quant_state") {
                let px: serde_json::Value = serde_json::from_slice(x.data()).unwrap();
                let py: serde_json::Value = serde_json::from_slice(y.data()).unwrap();
                assert_eq!(px, py, "{arch} {name}: quant_state");
            } else {
                assert!(x.data() == y.data(), "{arch} {name}: bytes differ");
            }
        }
    }
}

/// Configs that do not describe a model nibble can compute are typed errors naming the field.
#[test]
fn bad_configs_are_typed_errors() {
    let base = |arch: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(root().join(format!("models/tiny-{arch}/config.json"))).unwrap())
            .unwrap()
    };
    let check = |v: serde_json::Value, field: &str| {
        let err = nibble::ModelConfig::from_json(&v, std::path::Path::new("config.json")).unwrap_err();
        let named = match &err {
            nibble::Error::InvalidConfig { field: f, .. } | nibble::Error::UnsupportedConfig { field: f, .. } => f.clone(),
            other => panic!("{field}: not a config error: {other:?}"),
        };
        assert!(named.contains(field), "error names {named:?}, expected {field:?}: {err}");
    };
    // Qwen2: heads that do not divide the width, and no head_dim to say otherwise.
    let mut v = base("qwen2");
    v["num_attention_heads"] = serde_json::json!(3);
    v["num_key_value_heads"] = serde_json::json!(1);
    check(v, "head_dim");
    // Qwen2: a sliding layer without a window.
    let mut v = base("qwen2");
    v["layer_types"] = serde_json::json!(["full_attention", "sliding_attention", "full_attention"]);
    check(v, "layer_types");
    // Phi-3: longrope (the 128k models) is not implemented.
    let mut v = base("phi3");
    v["rope_parameters"]["rope_type"] = serde_json::json!("longrope");
    check(v, "rope_type");
    // Phi-3: a rotary fraction that leaves an odd number of dimensions.
    let mut v = base("phi3");
    v["rope_parameters"]["partial_rotary_factor"] = serde_json::json!(0.3);
    check(v, "partial_rotary_factor");
    // A field of another architecture.
    let mut v = base("mistral");
    v["attn_logit_softcapping"] = serde_json::json!(50.0);
    check(v, "attn_logit_softcapping");
}

/// Phi-3 with `partial_rotary_factor` 0.5 (16 of each head's 32 dimensions rotate; the tiny
/// Phi-3's weights): logits within 1e-4 of transformers', in prefill and in decode steps
/// (`tests/fixtures/arch/tiny-phi3-partial`, made by `models/reference/make_phi3_partial_refs.py`).
#[test]
fn phi3_partial_rotary_matches_transformers() {
    let dir = copy_model(&model_dir("phi3"));
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["rope_parameters"]["partial_rotary_factor"] = serde_json::json!(0.5);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let r = candle_core::safetensors::load(fixture("arch/tiny-phi3-partial/logits.safetensors"), &Device::Cpu).unwrap();
    let ids = ids_of(&r["input_ids"]);
    let model = load(dir.path().to_str().unwrap(), BitsAndBytesConfig::none());
    assert_eq!(model.config().rotary_dim, 16);
    let d = max_abs_diff(&model.logits(&ids).unwrap(), &r["logits_f32"]);
    assert!(d < 1e-4, "prefill: max abs diff {d} >= 1e-4");
    let d = max_abs_diff(&stepwise_logits(&model, &ids, 3), &r["logits_f32"]);
    assert!(d < 1e-4, "decode: max abs diff {d} >= 1e-4");
    // And the whole-head reference differs, so the test can tell the two apart.
    assert!(max_abs_diff(&model.logits(&ids).unwrap(), &refs("phi3")["logits_f32"]) > 1e-2);
}

//! PEFT LoRA adapters on the tiny Llama against what peft 0.21.2 computed
//! (tests/fixtures/lora, copied from the shared reference): unmerged over the f32 and NF4 bases,
//! merged, perplexity, several adapters served at once, and bad adapters as typed errors.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use nibble::{AdapterSpec, BitsAndBytesConfig, Engine, EngineOptions, Error, Event, GenerateOptions, LoadOptions, Model, Request};

const ADAPTERS: [&str; 2] = ["lora-qv", "lora-all-linear"];

fn lora_dir(name: &str) -> PathBuf {
    fixture("lora").join(name)
}

fn lora_ref(adapter: &str, name: &str) -> Tensor {
    let all = candle_core::safetensors::load(lora_dir(adapter).join("logits.safetensors"), &Device::Cpu).unwrap();
    all.get(name).unwrap_or_else(|| panic!("no {name} in {adapter}/logits.safetensors")).clone()
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().map(|&i| i as u32).collect()
}

fn spec(name: &str) -> AdapterSpec {
    AdapterSpec { name: name.into(), source: lora_dir(name).display().to_string() }
}

fn load(quant: BitsAndBytesConfig, adapters: &[&str], merge: bool) -> nibble::Result<Model> {
    let opts = LoadOptions {
        quant,
        adapters: adapters.iter().map(|a| spec(a)).collect(),
        merge_adapters: merge,
        ..LoadOptions::default()
    };
    Model::load(&tiny_model(), &opts)
}

#[test]
fn unmerged_over_the_f32_base_matches_peft() {
    for a in ADAPTERS {
        let model = load(BitsAndBytesConfig::none(), &[a], false).unwrap();
        assert_eq!(model.adapters(), [a.to_string()]);
        let ids = ids_of(&lora_ref(a, "input_ids"));
        let d = max_abs_diff(&model.logits(&ids).unwrap(), &lora_ref(a, "logits_f32_lora"));
        eprintln!("{a} f32 unmerged: max abs diff {d:e}");
        assert!(d < 1e-4, "{a}: max abs diff {d} >= 1e-4");
        // The adapter changes the outputs: the base alone is far from them.
        let base = nibble::from_pretrained(&tiny_model(), BitsAndBytesConfig::none(), nibble::DeviceMap::Cpu).unwrap();
        assert!(max_abs_diff(&base.logits(&ids).unwrap(), &lora_ref(a, "logits_f32_lora")) > 1e-2, "{a}");
    }
}

#[test]
fn merged_matches_merge_and_unload() {
    for a in ADAPTERS {
        let model = load(BitsAndBytesConfig::none(), &[a], true).unwrap();
        assert!(model.adapters().is_empty(), "merged adapters are part of the weights");
        let ids = ids_of(&lora_ref(a, "input_ids"));
        let d = max_abs_diff(&model.logits(&ids).unwrap(), &lora_ref(a, "logits_f32_merged"));
        eprintln!("{a} f32 merged: max abs diff {d:e}");
        assert!(d < 1e-4, "{a}: max abs diff {d} >= 1e-4");
    }
}

#[test]
fn unmerged_over_the_nf4_base_matches_qlora() {
    for a in ADAPTERS {
        let model = load(BitsAndBytesConfig::nf4(), &[a], false).unwrap();
        let ids = ids_of(&lora_ref(a, "input_ids"));
        let d = max_abs_diff(&model.logits(&ids).unwrap(), &lora_ref(a, "logits_nf4_lora"));
        eprintln!("{a} nf4 unmerged: max abs diff {d:e}");
        assert!(d < 2e-3, "{a}: max abs diff {d} >= 2e-3");
        let expected = ids_of(&lora_ref(a, "greedy_nf4_lora"));
        let mut opts = GenerateOptions::greedy(expected.len() - ids.len());
        opts.stop_at_eos = false;
        let out = model.generate(&ids, &opts, |_| {}).unwrap();
        let mut got = ids.clone();
        got.extend(&out.tokens);
        assert_eq!(got, expected, "{a}: greedy tokens (prefill, then the host decode steps)");
    }
}

#[test]
fn perplexity_with_an_adapter_matches_peft() {
    let text = std::fs::read_to_string(fixture("ppl-text.txt")).unwrap();
    for a in ADAPTERS {
        let figures: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(lora_dir(a).join("ppl.json")).unwrap()).unwrap();
        for (key, quant) in [("f32", BitsAndBytesConfig::none()), ("nf4", BitsAndBytesConfig::nf4())] {
            let expected = figures[key].as_f64().unwrap();
            let ppl = load(quant, &[a], false).unwrap().perplexity(&text, 256).unwrap();
            let rel = (ppl - expected).abs() / expected;
            eprintln!("{a} {key}: perplexity {ppl} vs {expected} (rel {rel:e})");
            assert!(rel < 1e-3, "{a} {key}: perplexity {ppl} vs {expected} (rel {rel})");
        }
    }
}

/// Greedy tokens of `prompt` through the engine for each adapter choice, all submitted at once
/// (so that they share batched steps).
fn engine_tokens(model: Arc<Model>, prompt: &[u32], choices: &[Option<usize>], n: usize) -> Vec<Vec<u32>> {
    let engine = Engine::start(model.clone(), EngineOptions::new(4, model.context_len()), None).unwrap();
    let tickets: Vec<_> = choices
        .iter()
        .map(|&adapter| {
            let mut opts = GenerateOptions::greedy(n);
            opts.stop_at_eos = false;
            engine.submit(Request { adapter, ..Request::new(prompt.to_vec(), opts) }).unwrap()
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let out = tickets
        .into_iter()
        .map(|mut t| {
            rt.block_on(async {
                loop {
                    match t.events.recv().await {
                        Some(Event::Done(c)) => return c.tokens,
                        Some(Event::Failed(e)) => panic!("{e}"),
                        Some(_) => {}
                        None => panic!("the engine dropped the request"),
                    }
                }
            })
        })
        .collect();
    engine.shutdown(true);
    out
}

#[test]
fn two_adapters_at_once_answer_as_each_alone() {
    let both = Arc::new(load(BitsAndBytesConfig::nf4(), &ADAPTERS, false).unwrap());
    assert_eq!(both.adapter_index("lora-all-linear"), Some(1));
    let prompt = ids_of(&lora_ref(ADAPTERS[0], "input_ids"));
    let n = 12;
    let mixed = engine_tokens(both.clone(), &prompt, &[Some(0), None, Some(1), Some(0)], n);
    let mut opts = GenerateOptions::greedy(n);
    opts.stop_at_eos = false;
    for (i, a) in ADAPTERS.iter().enumerate() {
        let alone = load(BitsAndBytesConfig::nf4(), &[a], false).unwrap().generate(&prompt, &opts, |_| {}).unwrap().tokens;
        let expected = ids_of(&lora_ref(a, "greedy_nf4_lora"));
        assert_eq!(alone, expected[prompt.len()..], "{a} alone");
        let row = if i == 0 { 0 } else { 2 };
        assert_eq!(mixed[row], alone, "{a} in a mixed batch");
    }
    assert_eq!(mixed[3], mixed[0], "the same adapter twice in one step");
    let base = nibble::from_pretrained(&tiny_model(), BitsAndBytesConfig::nf4(), nibble::DeviceMap::Cpu).unwrap();
    assert_eq!(mixed[1], base.generate(&prompt, &opts, |_| {}).unwrap().tokens, "the base row");
    assert!(matches!(
        Engine::start(both.clone(), EngineOptions::new(1, 64), None).unwrap().submit(Request {
            adapter: Some(2),
            ..Request::new(prompt.clone(), GenerateOptions::greedy(1))
        }),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn adapters_are_counted_and_unmerged_ones_are_not_saved() {
    let base = load(BitsAndBytesConfig::nf4(), &[], false).unwrap();
    let with = load(BitsAndBytesConfig::nf4(), &ADAPTERS, false).unwrap();
    // lora-qv: r 8 on q [256, 128] and v [128, 128]; lora-all-linear: r 4 on every linear; f32
    // over a quantized base, 3 layers.
    let (h, kv, inter) = (128, 64, 352);
    let qv = 8 * ((h + h) + (kv + h));
    let all = 4 * ((h + h) + 2 * (kv + h) + (h + h) + 2 * (inter + h) + (h + inter));
    assert_eq!(with.resident_weight_bytes() - base.resident_weight_bytes(), 3 * 4 * (qv + all));
    // The planner sized each layer with its adapters, to the byte, for every format.
    for quant in [BitsAndBytesConfig::none(), BitsAndBytesConfig::nf4(), BitsAndBytesConfig::int8()] {
        let m = load(quant.clone(), &ADAPTERS, false).unwrap();
        assert_eq!(m.plan().estimate.weight_bytes(), m.resident_weight_bytes() as u64, "{quant:?}");
    }
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("saved");
    assert!(matches!(with.save_pretrained(&target), Err(Error::InvalidArgument { .. })));
    assert!(!target.exists());
    // Merged, the NF4 checkpoint saves and loads back to the same logits.
    let merged = load(BitsAndBytesConfig::nf4(), &["lora-qv"], true).unwrap();
    merged.save_pretrained(&target).unwrap();
    let back = nibble::from_pretrained(&target.display().to_string(), BitsAndBytesConfig::none(), nibble::DeviceMap::Cpu).unwrap();
    let ids = ids_of(&lora_ref("lora-qv", "input_ids"));
    assert_eq!(max_abs_diff(&back.logits(&ids).unwrap(), &merged.logits(&ids).unwrap()), 0.0);
    // Requantized after the merge, it is as far from the f32 merge as NF4 is from f32 anyway.
    let d = max_abs_diff(&merged.logits(&ids).unwrap(), &lora_ref("lora-qv", "logits_f32_merged"));
    let nf4 = max_abs_diff(&lora_ref("lora-qv", "logits_nf4_lora"), &lora_ref("lora-qv", "logits_f32_lora"));
    eprintln!("merged NF4 vs f32 merged {d}, unmerged NF4 vs f32 {nf4}");
    assert!(d < 2.0 * nf4, "merged NF4 vs f32 merged: {d}, NF4 error otherwise {nf4}");
}

/// A copy of `lora-qv` with its config edited by `edit` and its tensors by `tensors`.
fn broken(dir: &Path, edit: impl FnOnce(&mut serde_json::Value), tensors: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let src = lora_dir("lora-qv");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut all: Vec<(String, Tensor)> =
        candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu).unwrap().into_iter().collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    tensors(&mut all);
    let map: std::collections::HashMap<String, Tensor> = all.into_iter().collect();
    candle_core::safetensors::save(&map, dir.join("adapter_model.safetensors")).unwrap();
    dir.to_path_buf()
}

fn load_from(dir: &Path) -> nibble::Result<Model> {
    let opts = LoadOptions {
        adapters: vec![AdapterSpec { name: "bad".into(), source: dir.display().to_string() }],
        ..LoadOptions::default()
    };
    Model::load(&tiny_model(), &opts)
}

#[test]
fn bad_adapters_are_typed_errors_naming_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (field, value)) in [
        ("use_dora", serde_json::json!(true)),
        ("peft_type", serde_json::json!("LOHA")),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("bias", serde_json::json!("lora_only")),
        ("layer_replication", serde_json::json!([[0, 2], [1, 3]])),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = broken(&tmp.path().join(format!("field{i}")), |c| c[field] = value.clone(), |_| {});
        match load_from(&dir) {
            Err(Error::UnsupportedConfig { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    let dir = broken(&tmp.path().join("no-b"), |_| {}, |t| t.retain(|(n, _)| !n.ends_with("layers.1.self_attn.v_proj.lora_B.weight")));
    match load_from(&dir) {
        Err(Error::MissingTensor { tensor, .. }) => assert_eq!(tensor, "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
        other => panic!("missing lora_B: {other:?}"),
    }
    let dir = broken(&tmp.path().join("rank"), |c| c["r"] = serde_json::json!(4), |_| {});
    match load_from(&dir) {
        Err(Error::AdapterShapeMismatch { tensor, expected, found, .. }) => {
            assert!(tensor.ends_with("lora_A.weight"), "{tensor}");
            assert_eq!((expected[0], found[0]), (4, 8));
        }
        other => panic!("wrong rank: {other:?}"),
    }
    let pickle = tmp.path().join("pickle");
    std::fs::create_dir_all(&pickle).unwrap();
    std::fs::copy(lora_dir("lora-qv").join("adapter_config.json"), pickle.join("adapter_config.json")).unwrap();
    std::fs::write(pickle.join("adapter_model.bin"), b"not loaded").unwrap();
    assert!(matches!(load_from(&pickle), Err(Error::PickleOnly { .. })));
    assert!(matches!(AdapterSpec::parse("bad name=x"), Err(Error::InvalidArgument { .. })));
    assert_eq!(AdapterSpec::parse("org/my-lora").unwrap().name, "my-lora");
    let twice = LoadOptions { adapters: vec![spec("lora-qv"), spec("lora-qv")], ..LoadOptions::default() };
    assert!(matches!(Model::load(&tiny_model(), &twice), Err(Error::InvalidArgument { .. })));
}

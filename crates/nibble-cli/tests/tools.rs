//! `nibble plan`, `doctor` and `quantize` as a user runs them.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn nibble(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nibble")).args(args).current_dir(root()).output().unwrap()
}

fn write_8b_config(dir: &std::path::Path) {
    let cfg = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "torch_dtype": "bfloat16"}"#;
    std::fs::write(dir.join("config.json"), cfg).unwrap();
}

#[test]
fn plan_prints_a_table_from_config_alone() {
    let dir = tempfile::tempdir().unwrap();
    write_8b_config(dir.path());
    let d = dir.path().to_str().unwrap();
    let out = nibble(&["plan", d, "--compute-dtype", "bf16", "--simulate", "24GiB,24GiB", "--max-seq-len", "8192"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("cuda:0") && text.contains("cuda:1"), "{text}");
    assert!(text.contains("model.layers.0-15") && text.contains("model.layers.16-31"), "{text}");
    assert!(text.contains("total weights 5.61 GiB (6027747328 bytes)"), "{text}");

    let out = nibble(&["plan", d, "--simulate", "24GiB", "--max-seq-len", "131072", "--offload", "none"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("out of memory on cuda:0") && err.contains("reduce max_seq_len to"), "{err}");

    let out = nibble(&["plan", d, "--max-memory", "cuda:7=1GiB", "--simulate", "24GiB"]);
    assert!(!out.status.success());
    let out = nibble(&["plan", d, "--max-memory", "0=lots"]);
    assert!(!out.status.success());
}

#[test]
fn plan_refuses_a_size_beyond_64_bits() {
    let dir = tempfile::tempdir().unwrap();
    write_8b_config(dir.path());
    let d = dir.path().to_str().unwrap();
    let out = nibble(&["plan", d, "--simulate", "24GiB,24GiB", "--max-seq-len", "18446744073709551615"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains("KV cache") && err.contains("overflows 64 bits"), "{err}");
}

#[test]
fn doctor_reports_this_machine() {
    let out = nibble(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("cpu:") && text.contains("cuda:"), "{text}");
}

#[test]
fn quantize_writes_a_loadable_bitsandbytes_checkpoint() {
    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("q");
    let tiny = root().join("models/tiny-llama");
    let out = nibble(&[
        "quantize",
        "--model",
        tiny.to_str().unwrap(),
        "--quant",
        "nf4",
        "--double-quant",
        "--out",
        target.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg = std::fs::read_to_string(target.join("config.json")).unwrap();
    assert!(cfg.contains("\"bnb_4bit_quant_type\": \"nf4\"") && cfg.contains("\"bnb_4bit_use_double_quant\": true"));
    let file = root().join("tests/fixtures/ppl-text.txt");
    let out = nibble(&["perplexity", "--model", target.to_str().unwrap(), "--file", file.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    let ppl: f64 = text.split_whitespace().last().unwrap().parse().unwrap();
    // ppl.json's nf4_dq figure, which the saved checkpoint must reproduce.
    assert!((ppl - 723.8379516601562).abs() / 723.8379516601562 < 1e-3, "{ppl}");
}

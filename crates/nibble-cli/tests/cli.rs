//! Runs the built `nibble` binary on the tiny random model in `models/tiny-llama`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// The workspace root, found from this crate's folder so tests pass from any current directory.
fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny_model() -> String {
    workspace().join("models/tiny-llama").to_string_lossy().into_owned()
}

fn ppl_text() -> String {
    workspace().join("tests/fixtures/ppl-text.txt").to_string_lossy().into_owned()
}

fn nibble(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nibble")).args(args).stdin(Stdio::null()).output().expect("run nibble")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The last number printed on stdout (the perplexity command prints its figure last).
fn last_number(out: &Output) -> f64 {
    let stdout = text(&out.stdout);
    stdout
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e'))
        .rev()
        .find_map(|w| w.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no number in stdout {stdout:?}; stderr {:?}", text(&out.stderr)))
}

fn perplexity(quant: &[&str]) -> f64 {
    let model = tiny_model();
    let file = ppl_text();
    let mut args = vec!["perplexity", "--model", &model, "--file", &file];
    args.extend_from_slice(quant);
    let out = nibble(&args);
    assert!(out.status.success(), "perplexity {quant:?} failed: {}", text(&out.stderr));
    last_number(&out)
}

fn assert_close(got: f64, want: f64, what: &str) {
    let rel = (got - want).abs() / want;
    assert!(rel <= 1e-3, "{what}: perplexity {got} is {:.4}% off the reference {want}", rel * 100.0);
}

#[test]
fn generate_greedy_exits_zero() {
    let model = tiny_model();
    let out = nibble(&[
        "generate", "--model", &model, "--quant", "none", "--temperature", "0", "--max-tokens", "5", "--prompt", "hello",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("generated tokens"), "no statistics in stderr: {stderr}");
    assert!(stderr.contains("bytes"), "no resident weight size in stderr: {stderr}");
}

/// With `--ignore-eos` (its effect on the options is tested in the crate) a run generates exactly
/// `--max-tokens`, and the statistics carry the figures a benchmark row has (prompt tokens,
/// prefill and decode speed).
#[test]
fn generate_reports_a_benchmark_row() {
    let model = tiny_model();
    let out = nibble(&[
        "generate", "--model", &model, "--temperature", "0", "--max-tokens", "40", "--ignore-eos", "--prompt", "hello there",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("generated tokens: 40"), "not exactly 40 tokens: {stderr}");
    for line in ["prompt tokens:", "prefill speed:", "decode speed:"] {
        assert!(stderr.contains(line), "no `{line}` in stderr: {stderr}");
    }
}

#[test]
fn perplexity_unquantized_matches_reference() {
    assert_close(perplexity(&["--quant", "none"]), 734.894_653_320_312_5, "none");
}

#[test]
fn perplexity_nf4_matches_reference() {
    assert_close(perplexity(&["--quant", "nf4"]), 724.470_214_843_75, "nf4");
}

#[test]
fn perplexity_int8_matches_reference() {
    assert_close(perplexity(&["--quant", "int8"]), 733.853_942_871_093_8, "int8");
}

#[test]
fn perplexity_nf4_double_quant_matches_reference() {
    assert_close(perplexity(&["--quant", "nf4", "--double-quant"]), 723.837_951_660_156_2, "nf4 + double quant");
}

#[test]
fn perplexity_fp4_matches_reference() {
    assert_close(perplexity(&["--quant", "fp4"]), 750.108_825_683_593_8, "fp4");
}

#[test]
fn perplexity_with_an_adapter_matches_peft() {
    // peft 0.21.2's figures (tests/fixtures/lora/*/ppl.json).
    let qv = workspace().join("tests/fixtures/lora/lora-qv").to_string_lossy().into_owned();
    let all = workspace().join("tests/fixtures/lora/lora-all-linear").to_string_lossy().into_owned();
    assert_close(perplexity(&["--quant", "nf4", "--adapter", &qv]), 774.784_606_933_593_8, "nf4 + lora-qv");
    assert_close(perplexity(&["--quant", "none", "--adapter", &format!("all={all}")]), 755.224_182_128_906_2, "lora-all-linear");
    // Merged into the f32 base, the figure is the unmerged one (merge_and_unload is exact there).
    assert_close(perplexity(&["--quant", "none", "--adapter", &qv, "--merge-adapter"]), 788.274_597_167_968_8, "merged lora-qv");
}

#[test]
fn plan_counts_an_adapter_on_its_layers() {
    let model = tiny_model();
    let all = workspace().join("tests/fixtures/lora/lora-all-linear").to_string_lossy().into_owned();
    let total = |extra: &[&str]| -> u64 {
        let mut args = vec!["plan", model.as_str()];
        args.extend_from_slice(extra);
        let out = nibble(&args);
        assert!(out.status.success(), "stderr: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        let line = stdout.lines().find(|l| l.starts_with("total weights")).expect("a total line");
        line.rsplit('(').next().and_then(|t| t.split(' ').next()).and_then(|n| n.parse().ok()).expect("bytes")
    };
    // lora-all-linear: r = 4 on q, k, v, o, gate, up, down of the tiny Llama's 3 layers
    // (hidden 128, kv 64, intermediate 352): r * (in + out) f32 values each.
    let per_layer: u64 = [(128, 128), (128, 64), (128, 64), (128, 128), (128, 352), (128, 352), (352, 128)].iter().map(|(i, o)| i + o).sum();
    let adapter = 3 * 4 * per_layer * 4;
    let base = total(&[]);
    assert_eq!(total(&["--adapter", &all]), base + adapter);
    assert_eq!(total(&["--adapter", &all, "--merge-adapter"]), base, "a merged adapter adds nothing");
    let out = nibble(&["plan", &model, "--adapter", "/nonexistent/adapter"]);
    assert!(!out.status.success() && text(&out.stderr).contains("/nonexistent/adapter"), "{}", text(&out.stderr));
}

#[test]
fn chat_one_shot_prints_a_reply() {
    let model = tiny_model();
    let out = nibble(&["chat", "--model", &model, "--prompt", "hi", "--max-tokens", "4", "--temperature", "0"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(!out.stdout.is_empty(), "chat printed nothing");
}

#[test]
fn chat_reads_turns_from_stdin_until_exit() {
    let model = tiny_model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nibble"))
        .args(["chat", "--model", &model, "--max-tokens", "4", "--temperature", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nibble");
    // Lines after /exit must not be answered.
    child.stdin.take().expect("stdin").write_all(b"hello\nhow are you\n/exit\nnot read\n").expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(!out.stdout.is_empty(), "chat printed nothing");
    let turns = stderr
        .lines()
        .find_map(|l| l.strip_prefix("turns answered:"))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no turn count in stderr: {stderr}"));
    assert_eq!(turns, 2, "stderr: {stderr}");
}

#[test]
fn missing_model_folder_is_an_error_naming_it() {
    let out = nibble(&["generate", "--model", "/nonexistent", "--prompt", "hi"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("error:") && stderr.contains("/nonexistent"), "stderr: {stderr}");
}

#[test]
fn unknown_quant_is_rejected_by_the_parser() {
    let out = nibble(&["generate", "--quant", "int4", "--prompt", "hi"]);
    assert_eq!(out.status.code(), Some(2), "clap exits 2 on usage errors");
    assert!(text(&out.stderr).contains("int4"));
}

/// #15: a 3,000-word prompt on a model whose context is 256 tokens is an error naming the
/// context in every command that takes a prompt or text, never a silent run past it; a config
/// with a layer count of 2^62 is a typed error, not a panic.
#[test]
fn prompts_past_the_context_and_huge_configs_are_errors() {
    let model = tiny_model();
    let words = vec!["word"; 3000].join(" ");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("long.txt");
    std::fs::write(&file, &words).unwrap();
    let file = file.to_string_lossy().into_owned();
    for args in [
        vec!["generate", "--model", &model, "--prompt", &words],
        vec!["chat", "--model", &model, "--prompt", &words],
        vec!["perplexity", "--model", &model, "--file", &file, "--max-tokens", "1000"],
    ] {
        let out = nibble(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", args[0]);
        assert!(stderr.contains("beyond the context of 256 tokens"), "{}: {stderr}", args[0]);
    }
    let cfg_dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(PathBuf::from(&model).join(f), cfg_dir.path().join(f)).unwrap();
    }
    let cfg_path = cfg_dir.path().join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    cfg["num_hidden_layers"] = serde_json::json!(4_611_686_018_427_387_904u64);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let hostile = cfg_dir.path().to_string_lossy().into_owned();
    for args in [vec!["plan", &hostile], vec!["perplexity", "--model", &hostile, "--file", &file]] {
        let out = nibble(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", args[0]);
        assert!(stderr.contains("num_hidden_layers") && !stderr.contains("panicked"), "{}: {stderr}", args[0]);
    }
}

/// Runs `args` (with `--out <out>` appended) once to time it, then again killed with SIGKILL at
/// a spread of moments through that time: after each kill, `out` either does not exist or holds
/// a model that loads (#15: nothing half-written).
fn killed_runs_leave_no_half_folder(args: &[&str], what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let run = |out: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_nibble"))
            .args(args)
            .arg("--out")
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let full = dir.path().join("full");
    let started = std::time::Instant::now();
    assert!(run(&full).wait().unwrap().success(), "{what}: the unkilled run failed");
    let took = started.elapsed();
    nibble::Model::load(full.to_str().unwrap(), &nibble::LoadOptions::default()).unwrap();
    let mut whole = 0;
    for i in 0..12u32 {
        let out = dir.path().join(format!("killed-{i}"));
        let mut child = run(&out);
        std::thread::sleep(took * i / 10);
        let _ = child.kill();
        let _ = child.wait();
        if out.exists() {
            whole += 1;
            if let Err(e) = nibble::Model::load(out.to_str().unwrap(), &nibble::LoadOptions::default()) {
                panic!("{what} killed after {:?} left {} that does not load: {e}", took * i / 10, out.display());
            }
        }
    }
    // The last kills come after the run ends; the first ones before anything is written.
    assert!(whole < 12, "{what}: no kill landed before the end ({took:?} per run)");
}

#[test]
fn killed_quantize_and_import_leave_no_half_written_folder() {
    let tiny = tiny_model();
    killed_runs_leave_no_half_folder(&["quantize", "--model", &tiny, "--quant", "nf4"], "quantize tiny");
    let gguf = workspace().join("models/smollm2-135m-instruct.Q4_1.gguf");
    if gguf.exists() {
        killed_runs_leave_no_half_folder(&["import-gguf", gguf.to_str().unwrap()], "import-gguf SmolLM2");
    } else {
        eprintln!("skipped import-gguf: {} is missing (models/fetch-smollm2.sh)", gguf.display());
    }
}

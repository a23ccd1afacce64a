//! `nibble-bench`: nibble's CPU speed side by side with unquantized models and candle's own
//! GGUF path, on SmolLM2-135M (when fetched) and on a generated ~1B-parameter Llama.
//!
//! One run measures, on this machine: memory read bandwidth (the floor of a decode step), the
//! quantizers' throughput, the matrix kernels alone, and for each model and system decode and
//! prefill tokens/s, load time to first token and peak resident memory (each load in a child
//! process of this binary). It prints a markdown report, writes it to `--out`, and with `--doc`
//! replaces the `## Speed` section of that file (e.g. `docs/benchmarks.md`).

mod child;
mod machine;
mod micro;
mod peer;
mod synth;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use clap::Parser;

use child::{Measured, Spec};
use machine::Machine;
use synth::LlamaShape;

#[derive(Parser, Debug)]
#[command(name = "nibble-bench", about = "CPU speed of nibble's quantized kernels, side by side")]
struct Args {
    /// Also write the markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace (or append) the `## Speed` section of this markdown file with the report.
    #[arg(long)]
    doc: Option<PathBuf>,
    /// The SmolLM2 folder (skipped with a note when absent).
    #[arg(long, default_value = "models/smollm2-135m-instruct")]
    model: PathBuf,
    /// The SmolLM2 Q4_1 GGUF for candle's quantized path (skipped when absent).
    #[arg(long, default_value = "models/smollm2-135m-instruct.Q4_1.gguf")]
    gguf: PathBuf,
    /// The Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF (`models/fetch-qwen2.5-coder.sh`; skipped when
    /// absent): nibble loads it directly and quantizes it on load.
    #[arg(long, default_value = "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")]
    qwen: PathBuf,
    /// nibble configurations run on Qwen2.5-Coder-0.5B.
    #[arg(long, value_delimiter = ',', default_value = "nf4,nf4-bf16")]
    qwen_configs: Vec<String>,
    /// Greedy tokens per decode measurement.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Prompt tokens per prefill measurement.
    #[arg(long, default_value_t = 512)]
    prefill_tokens: usize,
    /// nibble configurations to run (nf4, nf4-dq, fp4, int8, f32, bf16).
    #[arg(long, value_delimiter = ',', default_value = "nf4,nf4-dq,fp4,int8,f32,bf16")]
    configs: Vec<String>,
    /// Skip the generated ~1B model.
    #[arg(long)]
    skip_1b: bool,
    /// Skip candle's GGUF runs on the generated ~1B model (writing those files takes a while).
    #[arg(long)]
    skip_candle_1b: bool,
    /// Skip the model runs (machine, bandwidth, quantizers and kernels only).
    #[arg(long)]
    micro_only: bool,
    /// Where generated models go (default: a folder in the system temp dir, removed afterwards).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Keep the generated models.
    #[arg(long)]
    keep: bool,
    /// Size of the bandwidth test buffer, MiB.
    #[arg(long, default_value_t = 1024)]
    bandwidth_mib: usize,
    /// Only compare SmolLM2 NF4 decode and prefill with and without a random rank-`--lora-rank`
    /// LoRA adapter on every linear layer (issue 16's target: within 15% of the base).
    #[arg(long)]
    lora: bool,
    /// The adapter rank of `--lora`.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// Only compare nibble with llama.cpp (its `llama-bench`, built from the llama-cpp-python
    /// sdist on PyPI and cached): decode at each `--depths`, prefill, bandwidth floors
    /// (issue 17).
    #[arg(long)]
    llama_cpp: bool,
    /// Tokens already in the cache before each `--llama-cpp` decode measurement.
    #[arg(long, value_delimiter = ',', default_value = "0,512,2048")]
    depths: Vec<usize>,
    /// nibble configurations of `--llama-cpp` on SmolLM2.
    #[arg(long, value_delimiter = ',', default_value = "nf4,nf4-dq,fp4,int8")]
    peer_configs: Vec<String>,
    /// nibble configurations of `--llama-cpp` on Qwen2.5-Coder-0.5B.
    #[arg(long, value_delimiter = ',', default_value = "nf4")]
    peer_qwen_configs: Vec<String>,
    /// Internal: run one measurement (JSON `Spec`) and print its JSON result.
    #[arg(long, hide = true)]
    child: Option<String>,
}

/// One model x system measurement (or why it is missing).
struct Row {
    model: String,
    system: String,
    result: std::result::Result<Measured, String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(spec) = &args.child {
        let spec: Spec = serde_json::from_str(spec).context("bad --child spec")?;
        let m = child::run(&spec)?;
        println!("{}", serde_json::to_string(&m)?);
        return Ok(());
    }

    let machine = Machine::detect();
    eprintln!("machine: {} ({} threads, {}), kernels {}", machine.cpu, machine.threads, machine.flags, machine.kernels);
    eprintln!("load average: {}", machine.loadavg);
    if args.lora {
        return lora_report(&args, &machine);
    }
    if args.llama_cpp {
        return peer::report(&args, &machine);
    }
    let (bw1, bw_all) = machine::read_bandwidth(args.bandwidth_mib << 20, 5);
    eprintln!("read bandwidth: {:.1} GB/s (1 thread), {:.1} GB/s (all threads)", bw1 / 1e9, bw_all / 1e9);
    let quant = micro::quantize_throughput()?;
    for l in &quant {
        eprintln!("{}: {:.2} {}", l.what, l.value, l.unit);
    }
    let kernels = micro::kernels()?;
    for l in &kernels {
        eprintln!("{}: {:.2} {} {}", l.what, l.value, l.unit, l.note);
    }

    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let temp = args.workdir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("nibble-bench-{}", std::process::id())));
    if !args.micro_only {
        std::fs::create_dir_all(&temp)?;
        let res = run_models(&args, &temp, &mut rows, &mut notes);
        if !args.keep && args.workdir.is_none() {
            let _ = std::fs::remove_dir_all(&temp);
        }
        res?;
    }

    let report = render(&machine, (bw1, bw_all), &quant, &kernels, &rows, &notes, &args);
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    }
    if let Some(doc) = &args.doc {
        update_doc(doc, &report)?;
    }
    Ok(())
}

fn run_models(args: &Args, temp: &Path, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<()> {
    let smol = "SmolLM2-135M";
    if args.model.join("config.json").is_file() {
        warm_page_cache(&args.model);
        for c in &args.configs {
            rows.push(measure(smol, &format!("nibble {c}"), "nibble", &args.model, c, args));
        }
    } else {
        notes.push(format!("{} is absent (run models/fetch-smollm2.sh); SmolLM2 rows skipped.", args.model.display()));
    }
    if args.gguf.is_file() {
        warm_page_cache(&args.gguf);
        rows.push(measure(smol, "candle Q4_1 GGUF", "candle", &args.gguf, "", args));
        let q40 = temp.join("smollm2-q4_0.gguf");
        match synth::requantize_gguf(&args.gguf, &q40, GgmlDType::Q4_0) {
            Ok(()) => rows.push(measure(smol, "candle Q4_0 (re-quantized)", "candle", &q40, "", args)),
            Err(e) => rows.push(Row { model: smol.into(), system: "candle Q4_0 (re-quantized)".into(), result: Err(e.to_string()) }),
        }
    } else {
        notes.push(format!("{} is absent; candle's GGUF rows for SmolLM2 skipped.", args.gguf.display()));
    }

    let qwen = "Qwen2.5-Coder-0.5B";
    if args.qwen.is_file() {
        warm_page_cache(&args.qwen);
        for c in &args.qwen_configs {
            rows.push(measure(qwen, &format!("nibble {c} (from the Q4_K_M GGUF)"), "nibble", &args.qwen, c, args));
        }
    } else {
        notes.push(format!("{} is absent (run models/fetch-qwen2.5-coder.sh); Qwen rows skipped.", args.qwen.display()));
    }

    if args.skip_1b {
        return Ok(());
    }
    let shape = LlamaShape::TINYLLAMA;
    let name = format!("random Llama {:.2}B", shape.params() as f64 / 1e9);
    let dir = temp.join("random-llama-1b");
    eprintln!("writing {name} to {}", dir.display());
    if !dir.join("model.safetensors").is_file() {
        synth::write_random_llama(&dir, &shape)?;
    }
    // Loads are measured with a warm page cache (as the SmolLM2 target asks): writing the
    // GGUFs below, or other work, may have evicted the checkpoint.
    warm_page_cache(&dir);
    for c in &args.configs {
        rows.push(measure(&name, &format!("nibble {c}"), "nibble", &dir, c, args));
    }
    if !args.skip_candle_1b {
        for (label, dt) in [("candle Q4_1 GGUF", GgmlDType::Q4_1), ("candle Q4_0 GGUF", GgmlDType::Q4_0)] {
            let path = temp.join(format!("random-llama-1b-{dt:?}.gguf"));
            if !path.is_file() {
                eprintln!("writing {}", path.display());
                synth::write_random_gguf(&path, &shape, dt)?;
            }
            warm_page_cache(&path);
            rows.push(measure(&name, label, "candle", &path, "", args));
            if !args.keep {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(())
}

/// Reads every file at `path` (a file, or a folder's files) once, so that loads find them in the
/// page cache. Best effort: an unreadable file is left to the measurement to report.
fn warm_page_cache(path: &Path) {
    let files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path).map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect()).unwrap_or_default()
    } else {
        vec![path.to_path_buf()]
    };
    for f in files {
        if let Ok(mut file) = std::fs::File::open(&f) {
            let _ = std::io::copy(&mut file, &mut std::io::sink());
        }
    }
}

/// `--lora`: SmolLM2 NF4 with and without a random adapter on every linear layer, measured in
/// turns (base, adapter, base, adapter) so that drift in the machine's speed hits both alike;
/// the best of each is reported.
fn lora_report(args: &Args, machine: &Machine) -> Result<()> {
    if !args.model.join("config.json").is_file() {
        bail!("{} is missing; run models/fetch-smollm2.sh", args.model.display());
    }
    let temp = match &args.workdir {
        Some(w) => w.join("lora"),
        None => std::env::temp_dir().join(format!("nibble-bench-lora-{}", std::process::id())),
    };
    let cfg = nibble::ModelConfig::from_file(args.model.join("config.json"))?;
    synth::write_random_lora(&temp, &cfg, args.lora_rank)?;
    let mut best: [Option<Measured>; 2] = [None, None];
    for round in 0..4 {
        let i = round % 2;
        let label = if i == 0 { "NF4" } else { "NF4 + LoRA" };
        let adapter = (i == 1).then(|| temp.clone());
        let row = measure_with("SmolLM2-135M", label, "nibble", &args.model, "nf4", args, adapter);
        let m = row.result.map_err(anyhow::Error::msg)?;
        let keep = best[i].as_ref().is_none_or(|b| m.decode_tps > b.decode_tps);
        if keep {
            best[i] = Some(m);
        }
    }
    if !args.keep {
        let _ = std::fs::remove_dir_all(&temp);
    }
    let (Some(base), Some(lora)) = (&best[0], &best[1]) else { bail!("no measurement") };
    let mut out = String::new();
    writeln!(out, "Machine: {} ({} threads, {}), kernels {}; load average at the start {}.", machine.cpu, machine.threads, machine.flags, machine.kernels, machine.loadavg)?;
    writeln!(out, "SmolLM2-135M-Instruct NF4 (compute f32), a random rank-{} adapter on all {} linear layers of the decoder, unmerged; {} decode tokens, {} prefill tokens; best of two child runs each, alternated.\n", args.lora_rank, cfg.num_hidden_layers * cfg.layer_linears().len(), args.decode_tokens, args.prefill_tokens)?;
    writeln!(out, "| | decode tok/s | prefill tok/s | resident weights |")?;
    writeln!(out, "|---|---|---|---|")?;
    for (name, m) in [("NF4", base), ("NF4 + LoRA", lora)] {
        writeln!(out, "| {name} | {:.1} | {:.1} | {:.1} MiB |", m.decode_tps, m.prefill_tps, mib(m.resident_bytes))?;
    }
    writeln!(
        out,
        "| ratio | {:.3} | {:.3} | |",
        lora.decode_tps / base.decode_tps.max(1e-9),
        lora.prefill_tps / base.prefill_tps.max(1e-9)
    )?;
    println!("{out}");
    if let Some(p) = &args.out {
        std::fs::write(p, &out)?;
    }
    Ok(())
}

/// Runs one measurement in a child process.
fn measure(model: &str, system: &str, kind: &str, path: &Path, config: &str, args: &Args) -> Row {
    measure_with(model, system, kind, path, config, args, None)
}

/// [`measure`] with a LoRA adapter folder on top (nibble only).
fn measure_with(model: &str, system: &str, kind: &str, path: &Path, config: &str, args: &Args, adapter: Option<PathBuf>) -> Row {
    let spec = Spec {
        system: kind.into(),
        path: path.to_path_buf(),
        config: config.into(),
        decode: args.decode_tokens,
        prefill: args.prefill_tokens,
        adapter,
        depths: Vec::new(),
    };
    run_child(model, system, &spec)
}

/// Runs `spec` in a child process of this binary.
fn run_child(model: &str, system: &str, spec: &Spec) -> Row {
    eprintln!("measuring {model} / {system}");
    let result = (|| -> Result<Measured> {
        let exe = std::env::current_exe()?;
        let out = Command::new(exe).arg("--child").arg(serde_json::to_string(spec)?).output()?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            bail!("{}", err.lines().last().unwrap_or("child failed").trim());
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().rev().find(|l| l.starts_with('{')).context("no result from child")?;
        Ok(serde_json::from_str(line)?)
    })();
    match &result {
        Ok(m) => eprintln!(
            "  decode {:.1} tok/s, prefill {:.1} tok/s, load {:.2}s, first token {:.2}s, peak {:.0} MiB",
            m.decode_tps,
            m.prefill_tps,
            m.load_s,
            m.first_token_s,
            m.peak_rss as f64 / 1048576.0
        ),
        Err(e) => eprintln!("  failed: {e}"),
    }
    Row { model: model.into(), system: system.into(), result: result.map_err(|e| e.to_string()) }
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// Today's date (UTC) from the system clock, `YYYY-MM-DD`.
fn today() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Howard Hinnant's civil_from_days.
    let z = (secs / 86400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The bandwidth floor of a measured row, in tokens/s, for a read bandwidth `bw` in bytes/s.
fn floor(m: &Measured, bw: f64) -> f64 {
    bw / m.bytes_per_token.max(1) as f64
}

fn find<'a>(rows: &'a [Row], model_prefix: &str, system: &str) -> Option<&'a Measured> {
    rows.iter()
        .find(|r| r.model.starts_with(model_prefix) && r.system == system)
        .and_then(|r| r.result.as_ref().ok())
}

#[allow(clippy::too_many_arguments)]
fn render(
    machine: &Machine,
    (bw1, bw_all): (f64, f64),
    quant: &[micro::Line],
    kernels: &[micro::Line],
    rows: &[Row],
    notes: &[String],
    args: &Args,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Speed\n");
    let _ = writeln!(
        s,
        "Measured {} with `RUSTFLAGS=\"-C target-cpu=native\" CARGO_TARGET_DIR=target/native cargo run --release \
         -p nibble-bench -- --doc docs/benchmarks.md` (one run, everything side by side; CPU only).\n",
        today()
    );
    let _ = writeln!(
        s,
        "- **Machine**: {}, {} threads ({}); nibble kernels: `{}`. Load average at the start: {}.",
        machine.cpu, machine.threads, machine.flags, machine.kernels, machine.loadavg
    );
    let _ = writeln!(
        s,
        "- **Build**: {}. nibble picks its SIMD kernels at run time; candle picks its quantized kernels at compile \
         time (`cfg(target_feature)`), so a build for the baseline x86-64 target runs candle's scalar fallback.",
        if cfg!(all(target_feature = "avx2", target_feature = "fma")) {
            "AVX2 and FMA enabled at compile time (`-C target-cpu=native`), so candle runs its AVX2 kernels"
        } else {
            "baseline x86-64 target (no AVX2 at compile time): candle's quantized kernels are scalar here"
        }
    );
    let _ = writeln!(
        s,
        "- **Memory read bandwidth** (sum of a {} MiB array, best of 5): {:.1} GB/s with 1 thread, {:.1} GB/s with {} threads.",
        args.bandwidth_mib,
        bw1 / 1e9,
        bw_all / 1e9,
        machine.threads
    );
    let _ = writeln!(
        s,
        "- **Bandwidth floor**: a decode step reads every weight matrix once, so its floor is (read bandwidth) / \
         (weight bytes read per token). Issue 7 states it with the one-thread bandwidth; the all-thread one is the \
         stricter floor for a decode that runs on every thread. \"of floor\" is decode tok/s over each.\n"
    );

    let _ = writeln!(
        s,
        "### Decode ({} tokens, greedy) and prefill ({} tokens), best of three runs (one when a run takes over 5 s)\n",
        args.decode_tokens, args.prefill_tokens
    );
    let _ = writeln!(
        s,
        "| model | system | weights read / token | decode tok/s | floor tok/s (1 thread / all) | of floor (1 thread / all) | prefill tok/s | load s | load → first token s | peak RSS | peak anon. RSS |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        match &r.result {
            Ok(m) => {
                let (floor1, floor_all) = (floor(m, bw1), floor(m, bw_all));
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.1} MiB | {:.1} | {:.0} / {:.0} | {:.0}% / {:.0}% | {:.1} | {:.2} | {:.2} | {:.0} MiB | {:.0} MiB |",
                    r.model,
                    r.system,
                    mib(m.bytes_per_token),
                    m.decode_tps,
                    floor1,
                    floor_all,
                    100.0 * m.decode_tps / floor1,
                    100.0 * m.decode_tps / floor_all,
                    m.prefill_tps,
                    m.load_s,
                    m.first_token_s,
                    mib(m.peak_rss),
                    mib(m.peak_anon)
                );
            }
            Err(e) => {
                let _ = writeln!(s, "| {} | {} | failed: {} | | | | | | | | |", r.model, r.system, e.replace('|', "/"));
            }
        }
    }
    for n in notes {
        let _ = writeln!(s, "\n{n}");
    }
    let _ = writeln!(
        s,
        "\nnibble's unquantized `lm_head` (bitsandbytes skips it) is included in its bytes per token; for candle the \
         output matrix is the GGUF's (quantized). Each row runs in a fresh process; peak RSS is VmHWM right after the \
         first token (it counts the pages of the memory-mapped checkpoint), peak anon. RSS the largest RssAnon \
         sampled every 2 ms until then (heap only).\n"
    );

    memory_table(&mut s, rows);

    let _ = writeln!(s, "### Quantize-on-load throughput (one 5632 x 2048 matrix)\n");
    let _ = writeln!(s, "| quantizer | throughput |\n|---|---:|");
    for l in quant {
        let _ = writeln!(s, "| {} | {:.2} {} |", l.what, l.value, l.unit);
    }
    let _ = writeln!(s, "\n### Kernels alone (TinyLlama MLP matrix 5632 x 2048, all threads)\n");
    let _ = writeln!(s, "| kernel | throughput | time |\n|---|---:|---:|");
    for l in kernels {
        let _ = writeln!(s, "| {} | {:.1} {} | {} |", l.what, l.value, l.unit, l.note);
    }

    let _ = writeln!(s, "\n### Targets (issue 7)\n");
    let mark = |ok: bool| if ok { "met" } else { "**missed**" };
    let smol_nf4 = find(rows, "SmolLM2", "nibble nf4");
    match (smol_nf4, find(rows, "SmolLM2", "candle Q4_1 GGUF")) {
        (Some(n), Some(c)) => {
            let r = n.decode_tps / c.decode_tps;
            let _ = writeln!(s, "- SmolLM2 NF4 decode ≥ 1.0× candle Q4_1 decode: {:.2}× ({:.1} vs {:.1} tok/s): {}", r, n.decode_tps, c.decode_tps, mark(r >= 1.0));
        }
        _ => {
            let _ = writeln!(s, "- SmolLM2 NF4 decode vs candle Q4_1: not measured (model or GGUF absent).");
        }
    }
    if let Some(n) = smol_nf4 {
        let frac1 = n.decode_tps / floor(n, bw1);
        let frac_all = n.decode_tps / floor(n, bw_all);
        let _ = writeln!(
            s,
            "- SmolLM2 NF4 decode ≥ 60% of the bandwidth floor (the issue's: one-thread bandwidth): {:.0}%: {} \
             (against the all-thread bandwidth: {:.0}%)",
            100.0 * frac1,
            mark(frac1 >= 0.6),
            100.0 * frac_all
        );
        if let Some(f) = find(rows, "SmolLM2", "nibble f32") {
            let r = n.prefill_tps / f.prefill_tps;
            let _ = writeln!(s, "- SmolLM2 NF4 prefill ≥ 0.7× f32 prefill: {:.2}× ({:.1} vs {:.1} tok/s): {}", r, n.prefill_tps, f.prefill_tps, mark(r >= 0.7));
        }
        let _ = writeln!(s, "- SmolLM2 NF4 load (safetensors to ready) < 1 s: {:.2} s: {}", n.load_s, mark(n.load_s < 1.0));
        let limit = n.resident_bytes + 2 * n.largest_f32 + 100 * 1048576;
        let _ = writeln!(
            s,
            "- SmolLM2 NF4 peak resident memory ≤ resident weights ({:.0} MiB) + 2 × largest tensor in f32 ({:.0} MiB) + \
             100 MiB = {:.0} MiB: VmHWM {:.0} MiB: {}; anonymous only {:.0} MiB: {}",
            mib(n.resident_bytes),
            mib(n.largest_f32),
            mib(limit),
            mib(n.peak_rss),
            mark(n.peak_rss <= limit),
            mib(n.peak_anon),
            mark(n.peak_anon <= limit)
        );
    }
    for prefix in ["random"] {
        if let (Some(n), Some(f)) = (find(rows, prefix, "nibble nf4"), find(rows, prefix, "nibble f32")) {
            let r = n.prefill_tps / f.prefill_tps;
            let frac1 = n.decode_tps / floor(n, bw1);
            let frac_all = n.decode_tps / floor(n, bw_all);
            let _ = writeln!(
                s,
                "- (1B, for reference) NF4 prefill {:.2}× f32; NF4 decode {:.0}% of its floor (one thread), {:.0}% (all threads).",
                r,
                100.0 * frac1,
                100.0 * frac_all
            );
        }
    }
    if let Some(q) = quant.first() {
        let _ = writeln!(s, "- Quantization ≥ 1 GB/s of bf16 input on {} threads: {:.2} GB/s: {}", machine.threads, q.value, mark(q.value >= 1.0));
    }
    s
}

/// The loading-memory bound of every nibble row: peak resident memory against the resident
/// weights plus two of the largest tensor in f32 plus 100 MiB.
fn memory_table(s: &mut String, rows: &[Row]) {
    let _ = writeln!(s, "### Peak resident memory while loading\n");
    let _ = writeln!(
        s,
        "Bound: resident weights + 2 × the largest weight tensor in f32 + 100 MiB. The checkpoint is memory-mapped \
         and each tensor's pages are released (`MADV_DONTNEED`) once it is copied or quantized, so VmHWM (which counts \
         mapped file pages too) stays near the loaded model.\n"
    );
    let _ = writeln!(
        s,
        "| model | system | checkpoint | resident weights | largest tensor (f32) | bound | peak RSS (VmHWM) | peak anon. RSS | |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---|"
    );
    for r in rows {
        let Ok(m) = &r.result else { continue };
        if !r.system.starts_with("nibble") {
            continue;
        }
        let limit = m.resident_bytes + 2 * m.largest_f32 + 100 * 1048576;
        let ok = if m.peak_rss <= limit { "within" } else { "**over**" };
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.0} MiB | {} |",
            r.model,
            r.system,
            mib(m.checkpoint_bytes),
            mib(m.resident_bytes),
            mib(m.largest_f32),
            mib(limit),
            mib(m.peak_rss),
            mib(m.peak_anon),
            ok
        );
    }
    let _ = writeln!(s);
}

/// Replaces the `## Speed` section of `doc` (up to the next `## ` heading) with `report`, or
/// appends it; other sections are kept as they are.
fn update_doc(doc: &Path, report: &str) -> Result<()> {
    let old = std::fs::read_to_string(doc).unwrap_or_else(|_| "# Benchmarks\n".to_string());
    let mut out = String::new();
    let mut lines = old.lines().peekable();
    let mut replaced = false;
    while let Some(l) = lines.next() {
        if l.trim_end() == "## Speed" && !replaced {
            out.push_str(report.trim_end());
            out.push_str("\n\n");
            while lines.peek().is_some_and(|n| !n.starts_with("## ")) {
                lines.next();
            }
            replaced = true;
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    if !replaced {
        if !out.ends_with("\n\n") {
            out.push('\n');
        }
        out.push_str(report.trim_end());
        out.push('\n');
    }
    std::fs::write(doc, out.trim_end().to_string() + "\n").with_context(|| format!("writing {}", doc.display()))
}

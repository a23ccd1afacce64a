//! `--llama-cpp`: nibble beside llama.cpp in one run (issue 17). llama.cpp's `llama-bench` is
//! built from the llama-cpp-python source package on PyPI (`scripts/llama-cpp.sh`, cached) and
//! run on the GGUF file; nibble runs the same model in its child processes. Both decode 128
//! tokens at depths 0, 512 and 2048 (tokens already in the KV cache) and prefill 512 tokens, on
//! the same threads, and each row gets its bandwidth floor: the fastest a decode step can be when
//! it only streams the bytes it must read (its weights and the KV cache) at this machine's
//! measured read bandwidth.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::child::{gguf_bytes_per_token, Measured, Spec};
use crate::machine::{self, Machine};
use crate::{run_child, Args};

/// One system's figures on one model.
struct PeerRow {
    system: String,
    prefill_tps: f64,
    /// (depth, tokens/s).
    decode_at: Vec<(usize, f64)>,
    /// Weight bytes a decode step reads.
    weight_bytes: u64,
    /// KV-cache bytes per position.
    kv_bytes: u64,
}

impl PeerRow {
    fn decode(&self, depth: usize) -> Option<f64> {
        self.decode_at.iter().find(|(d, _)| *d == depth).map(|&(_, t)| t)
    }

    /// Tokens/s a decode of `n` tokens from `depth` would reach reading only its bytes at `bw`
    /// bytes/s: the weights once a step, and the cache as it stands (depth + n/2 on average).
    fn floor(&self, depth: usize, n: usize, bw: f64) -> f64 {
        let kv = self.kv_bytes as f64 * (depth as f64 + n as f64 / 2.0);
        bw / (self.weight_bytes as f64 + kv).max(1.0)
    }
}

/// A test of llama-bench's JSON output (the fields used here).
#[derive(Deserialize)]
struct BenchTest {
    n_prompt: usize,
    n_gen: usize,
    #[serde(default)]
    n_depth: usize,
    samples_ts: Vec<f64>,
    #[serde(default)]
    build_commit: String,
}

/// Builds (or finds in the cache) llama.cpp's binaries; their folder.
fn llama_cpp() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/llama-cpp.sh");
    eprintln!("building llama.cpp from the llama-cpp-python sdist (cached after the first run)");
    let out = Command::new("bash").arg(&script).output().with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(stdout.lines().last().context("the build script printed no folder")?.trim());
    if !dir.join("llama-bench").is_file() {
        bail!("no llama-bench in {}", dir.display());
    }
    Ok(dir)
}

/// Runs llama-bench on `gguf`: prefill of `prefill` tokens and decode of `decode` tokens at each
/// depth, `threads` threads, three repetitions; the best repetition of each (as nibble's rows).
fn llama_bench(bin: &Path, gguf: &Path, threads: usize, prefill: usize, decode: usize, depths: &[usize]) -> Result<(PeerRow, String)> {
    let run = |p: usize, n: usize, d: &[usize]| -> Result<Vec<BenchTest>> {
        let d: Vec<String> = d.iter().map(usize::to_string).collect();
        eprintln!("measuring llama-bench -p {p} -n {n} -d {}", d.join(","));
        let out = Command::new(bin.join("llama-bench"))
            .arg("-m")
            .arg(gguf)
            .args(["-t", &threads.to_string(), "-p", &p.to_string(), "-n", &n.to_string(), "-d", &d.join(","), "-r", "3", "-o", "json"])
            .output()
            .context("running llama-bench")?;
        if !out.status.success() {
            bail!("llama-bench failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("").trim());
        }
        serde_json::from_slice(&out.stdout).context("llama-bench's JSON")
    };
    let best = |t: &BenchTest| t.samples_ts.iter().copied().fold(0.0, f64::max);
    let pp = run(prefill, 0, &[0])?;
    let tg = run(0, decode, depths)?;
    let prefill_tps = pp.iter().find(|t| t.n_prompt == prefill).map(best).context("no prefill result")?;
    let decode_at = tg.iter().filter(|t| t.n_gen == decode).map(|t| (t.n_depth, best(t))).collect();
    let build = pp.first().map(|t| t.build_commit.clone()).unwrap_or_default();

    let mut file = std::fs::File::open(gguf)?;
    let content = gguf_file::Content::read(&mut file)?;
    let cfg = nibble::GgufFile::open(gguf)?.config()?;
    // llama.cpp's default cache: f16 keys and values.
    let kv_bytes = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2) as u64;
    let row = PeerRow { system: String::new(), prefill_tps, decode_at, weight_bytes: gguf_bytes_per_token(&content), kv_bytes };
    Ok((row, build))
}

/// nibble's row for `config` on `path`, measured in a child process.
fn nibble_row(model: &str, path: &Path, config: &str, args: &Args, depths: &[usize]) -> Result<PeerRow> {
    let spec = Spec {
        system: "nibble".into(),
        path: path.to_path_buf(),
        config: config.into(),
        decode: args.decode_tokens,
        prefill: args.prefill_tokens,
        adapter: None,
        depths: depths.to_vec(),
    };
    let m: Measured = run_child(model, &format!("nibble {config}"), &spec).result.map_err(anyhow::Error::msg)?;
    Ok(PeerRow {
        system: format!("nibble {config}"),
        prefill_tps: m.prefill_tps,
        decode_at: m.decode_at,
        weight_bytes: m.bytes_per_token,
        kv_bytes: m.kv_bytes_per_position,
    })
}

/// `--llama-cpp`: the report.
pub fn report(args: &Args, machine: &Machine) -> Result<()> {
    let bin = llama_cpp()?;
    let (_, bw) = machine::read_bandwidth(args.bandwidth_mib << 20, 5);
    eprintln!("read bandwidth, all threads: {:.1} GB/s", bw / 1e9);
    let depths = &args.depths;
    let mut models: Vec<(String, Vec<PeerRow>)> = Vec::new();
    let mut build = String::new();
    let mut notes = Vec::new();
    let smol = "SmolLM2-135M-Instruct";
    if args.gguf.is_file() && args.model.join("config.json").is_file() {
        let (mut peer, b) = llama_bench(&bin, &args.gguf, machine.threads, args.prefill_tokens, args.decode_tokens, depths)?;
        peer.system = "llama.cpp Q4_1 GGUF".into();
        build = b;
        let mut rows = vec![peer];
        for c in &args.peer_configs {
            rows.push(nibble_row(smol, &args.model, c, args, depths)?);
        }
        models.push((smol.into(), rows));
    } else {
        notes.push(format!("{} or {} is absent (models/fetch-smollm2.sh): SmolLM2 skipped.", args.model.display(), args.gguf.display()));
    }
    let qwen = "Qwen2.5-Coder-0.5B-Instruct";
    if args.qwen.is_file() {
        let (mut peer, _) = llama_bench(&bin, &args.qwen, machine.threads, args.prefill_tokens, args.decode_tokens, depths)?;
        peer.system = "llama.cpp Q4_K_M GGUF".into();
        let mut rows = vec![peer];
        for c in &args.peer_qwen_configs {
            rows.push(nibble_row(qwen, &args.qwen, c, args, depths)?);
        }
        models.push((qwen.into(), rows));
    } else {
        notes.push(format!("{} is absent (models/fetch-qwen2.5-coder.sh): Qwen skipped.", args.qwen.display()));
    }
    let report = render(machine, bw, &build, depths, args, &models, &notes)?;
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

fn render(machine: &Machine, bw: f64, build: &str, depths: &[usize], args: &Args, models: &[(String, Vec<PeerRow>)], notes: &[String]) -> Result<String> {
    let mut out = String::new();
    writeln!(out, "Measured {} by `nibble-bench --llama-cpp`. Machine: {} ({} threads, {}), nibble kernels {}; load average at the start {}; read bandwidth {:.1} GB/s (all threads). llama.cpp: llama-cpp-python 0.3.36's vendored source, build {build}, `GGML_NATIVE=ON`, CPU only, `-t {}`.\n",
        crate::today(), machine.cpu, machine.threads, machine.flags, machine.kernels, machine.loadavg, bw / 1e9, machine.threads)?;
    writeln!(out, "Decode: {} greedy tokens after `d` tokens already in the cache; prefill: {} tokens from an empty cache; best of three repetitions each. `floor`: the share of the bandwidth floor reached (weights read once a step plus the KV cache at its mean length, at the read bandwidth above).\n", args.decode_tokens, args.prefill_tokens)?;
    for (model, rows) in models {
        let Some(peer) = rows.first() else { continue };
        write!(out, "**{model}**\n\n| system | weights read / token | prefill tok/s |")?;
        for d in depths {
            write!(out, " decode d={d} tok/s (floor) |")?;
        }
        writeln!(out)?;
        writeln!(out, "|---|---|---|{}", "---|".repeat(depths.len()))?;
        for r in rows {
            write!(out, "| {} | {:.1} MiB | {:.1} |", r.system, r.weight_bytes as f64 / 1048576.0, r.prefill_tps)?;
            for &d in depths {
                match r.decode(d) {
                    Some(t) => write!(out, " {t:.1} ({:.0}%) |", 100.0 * t / r.floor(d, args.decode_tokens, bw))?,
                    None => write!(out, " - |")?,
                }
            }
            writeln!(out)?;
        }
        writeln!(out, "\nRatios to llama.cpp (above 1: nibble is faster):\n")?;
        write!(out, "| system | prefill |")?;
        for d in depths {
            write!(out, " decode d={d} |")?;
        }
        writeln!(out)?;
        writeln!(out, "|---|---|{}", "---|".repeat(depths.len()))?;
        for r in rows.iter().skip(1) {
            write!(out, "| {} | {:.2} |", r.system, r.prefill_tps / peer.prefill_tps.max(1e-9))?;
            for &d in depths {
                match (r.decode(d), peer.decode(d)) {
                    (Some(a), Some(b)) => write!(out, " {:.2} |", a / b.max(1e-9))?,
                    _ => write!(out, " - |")?,
                }
            }
            writeln!(out)?;
        }
        writeln!(out)?;
    }
    for n in notes {
        writeln!(out, "- {n}")?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama-bench's JSON (one test as its `-o json` prints it, fields trimmed) parses, and the
    /// best repetition is the one kept.
    #[test]
    fn reads_llama_bench_json() {
        let json = r#"[{"build_commit": "0c1e570", "n_prompt": 0, "n_gen": 128, "n_depth": 512,
            "avg_ts": 31.9, "samples_ns": [1, 2, 3], "samples_ts": [31.2, 32.8, 31.7]}]"#;
        let tests: Vec<BenchTest> = serde_json::from_str(json).unwrap();
        assert_eq!((tests[0].n_gen, tests[0].n_depth, tests[0].build_commit.as_str()), (128, 512, "0c1e570"));
        assert_eq!(tests[0].samples_ts.iter().copied().fold(0.0, f64::max), 32.8);
    }

    /// The floor: bandwidth over the weights plus the cache at its mean length.
    #[test]
    fn the_floor_counts_weights_and_the_cache() {
        let r = PeerRow { system: String::new(), prefill_tps: 0.0, decode_at: vec![(0, 50.0)], weight_bytes: 1000, kv_bytes: 10 };
        assert_eq!(r.floor(0, 100, 1e6), 1e6 / 1500.0);
        assert_eq!(r.floor(450, 100, 1e6), 1e6 / 6000.0);
        assert_eq!(r.decode(0), Some(50.0));
        assert_eq!(r.decode(512), None);
    }
}

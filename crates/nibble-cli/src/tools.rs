//! The subcommands that inspect or convert rather than run a model: `plan`, `doctor`, `quantize`,
//! `import-gguf`.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use nibble::{
    BitsAndBytesConfig, CudaStatus, DeviceMap, Inventory, ModelConfig, MaxMemory, ModelDtype, LoadOptions,
};
use nibble_plan::{human, parse_size, safety_margin};

use crate::args::{ModelArgs, QuantArgs};

/// What to do with layers that fit no GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Offload {
    /// Put them on the CPU (slow, but it runs).
    Cpu,
    /// Refuse: fail with the out-of-memory error.
    None,
}

/// Flags of `nibble plan`.
#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// Model folder, its config.json, or a hub id (only config.json is read).
    pub model: String,

    /// Quantization to plan for.
    #[command(flatten)]
    pub quant: QuantArgs,

    /// Where modules go: auto, balanced, balanced_low_0, sequential, cpu, cuda:N, or `module=device,...`.
    #[arg(long, default_value = "auto", value_parser = DeviceMap::parse)]
    pub device_map: DeviceMap,

    /// Per-device budgets, e.g. `0=6GiB,1=8GiB,cpu=32GiB`.
    #[arg(long, value_parser = MaxMemory::parse)]
    pub max_memory: Option<MaxMemory>,

    /// Context length the KV cache must hold [default: min(max_position_embeddings, 4096)].
    #[arg(long)]
    pub max_seq_len: Option<usize>,

    /// Sequences run at once.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,

    /// What to do with layers that fit no GPU.
    #[arg(long, value_enum, default_value_t = Offload::Cpu)]
    pub offload: Offload,

    /// Plan for made-up GPUs with these free sizes, e.g. `24GiB,24GiB` (the host's RAM stays real
    /// unless --max-memory sets cpu=...).
    #[arg(long)]
    pub simulate: Option<String>,

    /// A PEFT LoRA adapter to count, as every command that loads a model takes it (repeatable;
    /// its config and tensor header are read, no weight).
    #[arg(long = "adapter", value_name = "[NAME=]PATH|ID", value_parser = crate::args::parse_adapter)]
    pub adapters: Vec<nibble::AdapterSpec>,

    /// Plan the adapters merged into the weights (they then add no bytes).
    #[arg(long)]
    pub merge_adapter: bool,
}

/// Reads config.json for `model`: a folder, the file itself, or a hub id fetched alone; for a
/// GGUF file, its metadata (no weight is read).
fn read_config(model: &str) -> anyhow::Result<ModelConfig> {
    let p = Path::new(model);
    if p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return Ok(nibble::GgufFile::open(p)?.config()?);
    }
    let path: PathBuf = if p.is_dir() {
        p.join("config.json")
    } else if p.is_file() {
        p.to_path_buf()
    } else {
        nibble::fetch_config(model).with_context(|| format!("cannot find config.json for {model}"))?
    };
    Ok(ModelConfig::from_file(&path)?)
}

/// `nibble plan`: the placement table; fails with the out-of-memory error when nothing fits.
pub fn plan(args: &PlanArgs) -> anyhow::Result<()> {
    let cfg = read_config(&args.model)?;
    let quant = match &cfg.quantization_config {
        Some(q) => BitsAndBytesConfig::from_json(q)?.with_compute_dtype(args.quant.compute_dtype.into()),
        None => args.quant.config(),
    };
    let inventory = match &args.simulate {
        Some(list) => {
            let gpus = list.split(',').map(parse_size).collect::<Result<Vec<_>, _>>()?;
            Inventory::simulated(&gpus, Inventory::detect().cpu.available_bytes)
        }
        None => Inventory::detect(),
    };
    let opts = LoadOptions {
        device_map: args.device_map.clone(),
        max_memory: args.max_memory.clone().unwrap_or_default(),
        max_seq_len: args.max_seq_len,
        batch: args.batch,
        no_cpu_offload: args.offload != Offload::Cpu,
        adapters: args.adapters.clone(),
        merge_adapters: args.merge_adapter,
        ..LoadOptions::default()
    };
    let mut req = opts.plan_request_with_adapters(&cfg)?;
    // `PlanRequest::new` resolved transformers' `auto` from config.json.
    let auto = req.dtype;
    req.dtype = ModelDtype::from(args.quant.dtype).resolve(|| auto);
    let plan = nibble::plan(&cfg, &quant, &req, &inventory)?;
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "{}: {} layers, {:?}, dtype {}, compute {}, context {} x batch {}",
        cfg.path.display(),
        cfg.num_hidden_layers,
        quant.method(),
        req.dtype.as_str(),
        quant.bnb_4bit_compute_dtype,
        req.max_seq_len,
        req.batch
    )?;
    writeln!(out, "{:<8} {:>11} {:>11} {:>11} {:>11} {:>11}  modules", "device", "weights", "kv cache", "reserve", "budget", "free after")?;
    for u in &plan.usage {
        writeln!(
            out,
            "{:<8} {:>11} {:>11} {:>11} {:>11} {:>11}  {}",
            u.device.to_string(),
            human(u.weight_bytes),
            human(u.kv_bytes),
            human(u.reserve_bytes),
            human(u.budget),
            human(u64::try_from(u.free_after()).unwrap_or(0)),
            u.modules.join(", ")
        )?;
    }
    writeln!(out, "total weights {} ({} bytes)", human(plan.estimate.weight_bytes()), plan.estimate.weight_bytes())?;
    let adapter_bytes = req.adapter_layer_bytes.iter().sum::<u64>().saturating_add(req.adapter_head_bytes);
    if adapter_bytes > 0 {
        writeln!(out, "of which adapters {} ({adapter_bytes} bytes, unmerged, f32)", human(adapter_bytes))?;
    }
    if plan.offloaded_layers > 0 {
        writeln!(out, "warning: {} layer(s) offloaded to the CPU", plan.offloaded_layers)?;
    }
    Ok(())
}

/// `nibble doctor`: what this build and machine can run, and the fix for what they cannot.
pub fn doctor() -> anyhow::Result<()> {
    let inv = Inventory::detect();
    let mut out = io::stdout().lock();
    let cuda_feature = cfg!(feature = "cuda");
    writeln!(out, "nibble {}", env!("CARGO_PKG_VERSION"))?;
    writeln!(out, "features: cuda={}", if cuda_feature { "on" } else { "off" })?;
    writeln!(
        out,
        "cpu: {} threads, SIMD [{}], {} available of {} RAM (planning budget {})",
        inv.cpu.threads,
        inv.cpu.features.join(", "),
        human(inv.cpu.available_bytes),
        human(inv.cpu.total_bytes),
        human(inv.cpu.available_bytes - safety_margin(nibble::DeviceSpec::Cpu, &inv))
    )?;
    match &inv.cuda_status {
        CudaStatus::NotCompiled => writeln!(
            out,
            "cuda: not compiled in; GPUs cannot be used. Fix: build with `cargo build --release --features cuda` on a machine with the CUDA toolkit"
        )?,
        CudaStatus::NoDriver { reason } => writeln!(out, "cuda: no driver ({reason}). Fix: install the NVIDIA driver")?,
        CudaStatus::Simulated => writeln!(out, "cuda: simulated")?,
        CudaStatus::Available { driver_version } => {
            let v = nibble_plan::planner::format_cuda_version(*driver_version);
            let ok = *driver_version >= nibble_plan::MIN_CUDA_DRIVER;
            writeln!(out, "cuda: driver {v}{}", if ok { "" } else { " (too old: update the NVIDIA driver to CUDA 12.0+)" })?;
            for g in &inv.cuda {
                let (ma, mi) = g.compute_capability;
                let bf16 = if (ma, mi) >= (8, 0) { "bf16 ok" } else { "no bf16 (use --compute-dtype f16)" };
                writeln!(
                    out,
                    "  cuda:{} {} cc {ma}.{mi}, {} free of {}, {bf16}",
                    g.ordinal,
                    g.name,
                    human(g.free_bytes),
                    human(g.total_bytes)
                )?;
            }
        }
    }
    writeln!(out, "can run here: CPU inference (nf4, fp4, int8, none; f32/f16/bf16 compute){}",
        if inv.cuda.is_empty() { "" } else { ", CUDA placement" })?;
    Ok(())
}

/// Flags of `nibble quantize`.
#[derive(Debug, Clone, Args)]
pub struct QuantizeArgs {
    /// Source model and the quantization to apply (generation flags are ignored).
    #[command(flatten)]
    pub model: ModelArgs,

    /// Output folder (bitsandbytes checkpoint layout).
    #[arg(long)]
    pub out: PathBuf,
}

/// `nibble quantize`: load, quantize, save in the bitsandbytes layout.
pub fn quantize(args: &QuantizeArgs) -> anyhow::Result<()> {
    // A checkpoint has no place for adapters beside the weights: they are merged into them.
    let mut flags = args.model.clone();
    flags.merge_adapter |= !flags.adapters.is_empty();
    let model = flags.load()?;
    model.save_pretrained(&args.out)?;
    eprintln!(
        "wrote {} ({}, {} weight bytes)",
        args.out.display(),
        crate::report::quant_label(model.quantization()),
        model.resident_weight_bytes()
    );
    Ok(())
}

/// Flags of `nibble import-gguf`.
#[derive(Debug, Clone, Args)]
pub struct ImportGgufArgs {
    /// The GGUF file (Llama architecture).
    pub file: PathBuf,

    /// Output folder (Hugging Face layout, bf16 safetensors); must not exist or be empty.
    #[arg(long)]
    pub out: PathBuf,
}

/// `nibble import-gguf`.
pub fn import_gguf(args: &ImportGgufArgs) -> anyhow::Result<()> {
    nibble::import_gguf(&args.file, &args.out)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

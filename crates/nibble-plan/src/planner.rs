//! Placement: which device each module goes to, checked against each device's budget before any
//! weight is read.

use candle_core::DType;
use nibble_core::{Error, OomPhase, Result};
use nibble_load::ModelConfig;
use nibble_quant::{BitsAndBytesConfig, ComputeDtype, QuantMethod};

use crate::device_map::resolve_explicit;
use crate::estimate::{auto_dtype, total, Estimate};
use crate::inventory::{CudaStatus, Inventory, MIN_CUDA_DRIVER};
use crate::size::{human, MaxMemory};
use crate::{DeviceMap, DeviceSpec, LayerPlan};

/// Compute capability nibble's CUDA path needs at least (half-precision arithmetic).
pub const MIN_COMPUTE_CAPABILITY: (u32, u32) = (5, 3);
/// Compute capability bf16 needs.
pub const BF16_COMPUTE_CAPABILITY: (u32, u32) = (8, 0);

/// What to plan for.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRequest {
    /// The placement strategy or map.
    pub device_map: DeviceMap,
    /// Budgets overriding the inventory's free memory.
    pub max_memory: MaxMemory,
    /// Context length the KV cache must hold.
    pub max_seq_len: usize,
    /// Sequences run at once.
    pub batch: usize,
    /// Put layers that fit no GPU on the CPU (on by default, with a warning).
    pub allow_cpu_offload: bool,
    /// The model dtype D (resolved: transformers' `auto` is [`auto_dtype`]): everything not
    /// quantized is held, and sized, in it.
    pub dtype: DType,
    /// LoRA adapter bytes held with each decoder layer (empty: none), on that layer's device.
    pub adapter_layer_bytes: Vec<u64>,
    /// LoRA adapter bytes held with `lm_head`.
    pub adapter_head_bytes: u64,
}

impl PlanRequest {
    /// Defaults for `cfg`: auto placement, inventory budgets, context of
    /// min(max_position_embeddings, 4096), batch 1, CPU offload allowed, the dtype config.json
    /// names (transformers' `dtype="auto"`).
    pub fn new(cfg: &ModelConfig) -> Self {
        Self {
            device_map: DeviceMap::Auto,
            max_memory: MaxMemory::default(),
            max_seq_len: cfg.max_position_embeddings.min(4096),
            batch: 1,
            allow_cpu_offload: true,
            dtype: auto_dtype(cfg),
            adapter_layer_bytes: Vec::new(),
            adapter_head_bytes: 0,
        }
    }
}

/// Memory use planned on one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUsage {
    /// The device.
    pub device: DeviceSpec,
    /// Modules placed there, ranges compressed (`model.layers.0-15`).
    pub modules: Vec<String>,
    /// Weight bytes.
    pub weight_bytes: u64,
    /// KV-cache bytes.
    pub kv_bytes: u64,
    /// Activation and workspace reserve.
    pub reserve_bytes: u64,
    /// The budget: max_memory, or the free memory less the safety margin.
    pub budget: u64,
}

impl DeviceUsage {
    /// Everything planned on the device (the planner checked that this sum fits in 64 bits).
    pub fn used(&self) -> u64 {
        self.weight_bytes.saturating_add(self.kv_bytes).saturating_add(self.reserve_bytes)
    }

    /// Budget left after the plan (negative when over).
    pub fn free_after(&self) -> i128 {
        i128::from(self.budget) - i128::from(self.used())
    }
}

/// A checked placement.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The device of every module.
    pub layers: LayerPlan,
    /// Per-device use, in device order.
    pub usage: Vec<DeviceUsage>,
    /// The figures it was computed from.
    pub estimate: Estimate,
    /// Decoder layers placed on the CPU because no GPU had room.
    pub offloaded_layers: usize,
}

/// The safety margin kept free on a device, when the budget comes from the inventory: on a GPU
/// 5% of its memory, at least 256 MiB (allocator fragmentation and library workspaces, which the
/// estimate does not see); on the host 10% of what is available (the OS, the tokenizer, I/O).
pub fn safety_margin(device: DeviceSpec, inv: &Inventory) -> u64 {
    match device {
        DeviceSpec::Cuda(i) => inv.gpu(i).map_or(0, |g| (g.total_bytes / 20).max(256 << 20)),
        DeviceSpec::Cpu | DeviceSpec::LogicalCpu(_) => inv.cpu.available_bytes / 10,
    }
}

fn budget(device: DeviceSpec, req: &PlanRequest, inv: &Inventory) -> Result<u64> {
    if let Some(b) = req.max_memory.get(device) {
        return Ok(b);
    }
    let free = inv.free_bytes(device).ok_or_else(|| Error::DeviceUnavailable {
        device: device.to_string(),
        reason: format!("this machine has {} CUDA device(s)", inv.cuda.len()),
    })?;
    Ok(free.saturating_sub(safety_margin(device, inv)))
}

/// Computes the per-device use of `layers` and checks it against the budgets.
fn usage_of(layers: &LayerPlan, est: &Estimate, req: &PlanRequest, inv: &Inventory) -> Result<Vec<DeviceUsage>> {
    let mut out: Vec<DeviceUsage> = Vec::new();
    for device in layers.devices() {
        let mut u = DeviceUsage {
            device,
            modules: Vec::new(),
            weight_bytes: 0,
            kv_bytes: 0,
            reserve_bytes: 0,
            budget: budget(device, req, inv)?,
        };
        let what = format!("the plan for {device}");
        let mut weights = Vec::new();
        if layers.embed == device {
            weights.push(est.embed);
            u.modules.push("model.embed_tokens".into());
        }
        let mine: Vec<usize> = (0..layers.layers.len()).filter(|&i| layers.layers[i] == device).collect();
        weights.extend(mine.iter().map(|&i| est.layers.get(i).copied().unwrap_or(0)));
        u.kv_bytes = total(&what, &mine.iter().map(|&i| est.kv_layers.get(i).copied().unwrap_or(0)).collect::<Vec<_>>())?;
        if !mine.is_empty() {
            u.reserve_bytes = est.layer_reserve;
            u.modules.extend(compress(&mine));
        }
        if layers.head == device {
            weights.push(est.head);
            if !matches!(device, DeviceSpec::Cpu | DeviceSpec::LogicalCpu(_)) {
                weights.push(est.head_off_cpu_extra);
            }
            // A tied lm_head shares the embedding's storage only where the embedding is.
            if layers.embed != device {
                weights.push(est.tied_head_copy);
            }
            u.reserve_bytes = total(&what, &[u.reserve_bytes, est.head_reserve])?;
            u.modules.push("model.norm".into());
            u.modules.push("lm_head".into());
        }
        u.weight_bytes = total(&what, &weights)?;
        // Checked here so that used() cannot overflow.
        total(&what, &[u.weight_bytes, u.kv_bytes, u.reserve_bytes])?;
        out.push(u);
    }
    Ok(out)
}

/// `[0,1,2,5]` → `["model.layers.0-2", "model.layers.5"]`.
fn compress(idx: &[usize]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && idx[j + 1] == idx[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            format!("model.layers.{}", idx[i])
        } else {
            format!("model.layers.{}-{}", idx[i], idx[j])
        });
        i = j + 1;
    }
    out
}

fn oom(u: &DeviceUsage, hint: &str) -> Error {
    Error::OutOfMemory {
        device: u.device.to_string(),
        needed: u.used(),
        available: u.budget,
        hint: hint.to_string(),
        max_seq_len_that_fits: None,
        phase: OomPhase::Planned,
    }
}

fn check_fits(usage: &[DeviceUsage]) -> Result<()> {
    match usage.iter().find(|u| u.free_after() < 0) {
        Some(u) => Err(oom(u, "")),
        None => Ok(()),
    }
}

/// Checks the GPUs a plan uses against what the kernels and the compute dtype need.
fn check_capability(layers: &LayerPlan, quant: &BitsAndBytesConfig, inv: &Inventory) -> Result<()> {
    for d in layers.devices() {
        let DeviceSpec::Cuda(i) = d else { continue };
        if let CudaStatus::Available { driver_version } = inv.cuda_status {
            if driver_version < MIN_CUDA_DRIVER {
                return Err(Error::DriverTooOld {
                    found: format_cuda_version(driver_version),
                    required: format_cuda_version(MIN_CUDA_DRIVER),
                });
            }
        }
        let Some(gpu) = inv.gpu(i) else { continue };
        let cc = gpu.compute_capability;
        let (need, why) = if quant.bnb_4bit_compute_dtype == ComputeDtype::Bf16 {
            (BF16_COMPUTE_CAPABILITY, "bfloat16 compute; use --compute-dtype f16 on this GPU")
        } else {
            (MIN_COMPUTE_CAPABILITY, "nibble's CUDA kernels; this GPU is too old")
        };
        if cc < need {
            return Err(Error::CapabilityMismatch {
                device: d.to_string(),
                found: format!("{}.{}", cc.0, cc.1),
                required: format!("{}.{}", need.0, need.1),
                hint: why.to_string(),
            });
        }
    }
    Ok(())
}

/// Formats a CUDA version number (12040 → "12.4").
pub fn format_cuda_version(v: u32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// Splits `n` layers into `parts` contiguous runs whose sizes differ by at most one.
fn balanced_counts(n: usize, parts: usize) -> Vec<usize> {
    let parts = parts.max(1);
    (0..parts).map(|k| n / parts + usize::from(k >= parts - n % parts)).collect()
}

/// Places layers in runs of `counts` over `gpus`, embed on `embed`, head on the last GPU with layers.
fn layout(gpus: &[usize], counts: &[usize], embed: DeviceSpec, cpu_tail: usize, head: Option<DeviceSpec>) -> LayerPlan {
    let mut layers = Vec::new();
    for (g, c) in gpus.iter().zip(counts) {
        layers.extend(std::iter::repeat_n(DeviceSpec::Cuda(*g), *c));
    }
    layers.extend(std::iter::repeat_n(DeviceSpec::Cpu, cpu_tail));
    let last_gpu = gpus.iter().zip(counts).filter(|(_, c)| **c > 0).map(|(g, _)| DeviceSpec::Cuda(*g)).next_back();
    LayerPlan { embed, layers, head: head.or(last_gpu).unwrap_or(embed) }
}

/// Fills GPUs in `order` with at most `cap` layers, as far as budgets allow; with `head_room`,
/// each GPU keeps room for the head (any of them may turn out to be the last one with layers).
/// Returns the layer counts per GPU and the layers left over.
fn sequential_counts(
    order: &[usize],
    embed_gpu: usize,
    est: &Estimate,
    req: &PlanRequest,
    inv: &Inventory,
    head_room: bool,
    cap: usize,
) -> Result<(Vec<usize>, usize)> {
    let n = est.layers.len();
    let cap = cap.min(n);
    let mut counts = vec![0usize; order.len()];
    let mut next = 0;
    for (k, &g) in order.iter().enumerate() {
        let dev = DeviceSpec::Cuda(g);
        let what = format!("the plan for {dev}");
        let mut used = if g == embed_gpu { est.embed } else { 0 };
        let room = budget(dev, req, inv)?;
        let head = match (head_room, g == embed_gpu) {
            (false, _) => 0,
            (true, true) => total(&what, &[est.head, est.head_off_cpu_extra, est.head_reserve])?,
            (true, false) => total(&what, &[est.head, est.head_off_cpu_extra, est.head_reserve, est.tied_head_copy])?,
        };
        while next < cap {
            let first = if counts[k] == 0 { est.layer_reserve } else { 0 };
            let add = total(&what, &[est.layers[next], est.kv_layers[next], first])?;
            if total(&what, &[used, add, head])? > room {
                break;
            }
            used = total(&what, &[used, add])?;
            counts[k] += 1;
            next += 1;
        }
    }
    Ok((counts, n - next))
}

/// Plans the placement of `cfg`, quantized as `quant`, on `inv`. When it does not fit, the
/// error carries a hint computed from the numbers.
pub fn plan(cfg: &ModelConfig, quant: &BitsAndBytesConfig, req: &PlanRequest, inv: &Inventory) -> Result<Plan> {
    let p = plan_raw(cfg, quant, req, inv).map_err(|e| with_hint(e, cfg, quant, req, inv))?;
    if p.offloaded_layers > 0 {
        tracing::warn!("{} decoder layer(s) do not fit on the GPUs and run on the CPU (slow)", p.offloaded_layers);
    }
    Ok(p)
}

fn plan_raw(cfg: &ModelConfig, quant: &BitsAndBytesConfig, req: &PlanRequest, inv: &Inventory) -> Result<Plan> {
    if req.max_seq_len == 0 || req.batch == 0 {
        return Err(Error::invalid_argument("max_seq_len", "max_seq_len and batch must be at least 1"));
    }
    for device in req.max_memory.0.keys() {
        if let DeviceSpec::Cuda(i) = device {
            if inv.gpu(*i).is_none() {
                return Err(Error::InvalidArgument {
                    name: "max_memory".into(),
                    reason: format!("{device} is not a device of this machine ({} CUDA device(s))", inv.cuda.len()),
                });
            }
        }
    }
    let mut est = Estimate::new(cfg, quant, req.dtype, req.max_seq_len, req.batch)?;
    est.add_adapters(&req.adapter_layer_bytes, req.adapter_head_bytes)?;
    let n = cfg.num_hidden_layers;
    let finish = |layers: LayerPlan| -> Result<Plan> {
        check_capability(&layers, quant, inv)?;
        let usage = usage_of(&layers, &est, req, inv)?;
        check_fits(&usage)?;
        Ok(Plan { layers, usage, estimate: est.clone(), offloaded_layers: 0 })
    };
    let gpus: Vec<usize> = inv.cuda.iter().map(|g| g.ordinal).collect();
    match &req.device_map {
        DeviceMap::Cpu => finish(LayerPlan::single(DeviceSpec::Cpu, n)),
        DeviceMap::Device(d) => finish(LayerPlan::single(*d, n)),
        DeviceMap::Explicit(map) => finish(resolve_explicit(map, n)?),
        _ if gpus.is_empty() => finish(LayerPlan::single(DeviceSpec::Cpu, n)),
        strategy => {
            let low0 = matches!(strategy, DeviceMap::BalancedLow0) && gpus.len() > 1;
            let layer_gpus: Vec<usize> = if low0 { gpus[1..].to_vec() } else { gpus.clone() };
            let embed = DeviceSpec::Cuda(gpus[0]);
            let balanced = !matches!(strategy, DeviceMap::Sequential);
            let even = balanced.then(|| layout(&layer_gpus, &balanced_counts(n, layer_gpus.len()), embed, 0, None));
            match even.map(&finish) {
                Some(Ok(p)) => Ok(p),
                _ => {
                    // Fill in order (GPU 0 last for balanced_low_0), then offload what is left.
                    let mut order = layer_gpus.clone();
                    if low0 {
                        order.push(gpus[0]);
                    }
                    let fill = |head_room: bool, cap: usize| sequential_counts(&order, gpus[0], &est, req, inv, head_room, cap);
                    // Everything on the GPUs, each keeping room for the head.
                    let (counts, left) = fill(true, n)?;
                    if left == 0 {
                        if let Ok(p) = finish(layout(&order, &counts, embed, 0, None)) {
                            return Ok(p);
                        }
                    }
                    // Layers spill: the head follows them to the CPU (accelerate's module order:
                    // embeddings, layers, norm, lm_head), so the GPUs keep no room for it and
                    // fill up with layers before any goes to the CPU.
                    let (mut counts, mut left) = fill(false, n)?;
                    if left == 0 {
                        // Every layer fits only without room for the head: the head may still fit
                        // on the last GPU with layers; if not, one layer goes with it to the CPU.
                        if let Ok(p) = finish(layout(&order, &counts, embed, 0, None)) {
                            return Ok(p);
                        }
                        (counts, left) = fill(false, n.saturating_sub(1))?;
                    }
                    if left > 0 && !req.allow_cpu_offload {
                        let l = layout(&order, &counts, embed, left, None);
                        let usage = usage_of(&l, &est, req, inv)?;
                        let worst = usage.iter().rfind(|u| !u.device.is_host()).cloned();
                        let what = "the layers that fit no GPU";
                        let mut spilled: Vec<u64> = est.layers.iter().rev().take(left).copied().collect();
                        spilled.extend(est.kv_layers.iter().rev().take(left).copied());
                        let needed = total(what, &spilled)?;
                        Err(match worst {
                            Some(u) => Error::OutOfMemory {
                                device: u.device.to_string(),
                                needed: total(what, &[u.used(), needed])?,
                                available: u.budget,
                                hint: String::new(),
                                max_seq_len_that_fits: None,
                                phase: OomPhase::Planned,
                            },
                            None => oom(&usage[0], ""),
                        })
                    } else {
                        let head = if left > 0 { Some(DeviceSpec::Cpu) } else { None };
                        finish(layout(&order, &counts, embed, left, head)).map(|p| Plan { offloaded_layers: left, ..p })
                    }
                }
            }
        }
    }
}

/// Adds a hint computed from the numbers to a planned out-of-memory error.
fn with_hint(e: Error, cfg: &ModelConfig, quant: &BitsAndBytesConfig, req: &PlanRequest, inv: &Inventory) -> Error {
    let Error::OutOfMemory { device, needed, available, phase: OomPhase::Planned, .. } = e else {
        return e;
    };
    let fits = |r: &PlanRequest, q: &BitsAndBytesConfig| plan_raw(cfg, q, r, inv).is_ok();
    let mut hints = Vec::new();
    // The largest context that fits, by bisection (fits(len) is monotone in len).
    let (mut lo, mut hi) = (0usize, req.max_seq_len);
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(&PlanRequest { max_seq_len: mid, ..req.clone() }, quant) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let best_len = (lo > 0).then_some(lo);
    if let Some(l) = best_len {
        hints.push(format!("reduce max_seq_len to {l} or less"));
    }
    if !req.allow_cpu_offload && fits(&PlanRequest { allow_cpu_offload: true, ..req.clone() }, quant) {
        hints.push("allow CPU offload (--offload cpu)".into());
    }
    if matches!(quant.method(), QuantMethod::Int8 | QuantMethod::None) {
        let four = BitsAndBytesConfig::nf4().with_compute_dtype(quant.bnb_4bit_compute_dtype);
        if fits(req, &four) {
            hints.push(format!(
                "use 4-bit (nf4) instead of {}",
                if quant.method() == QuantMethod::Int8 { "8-bit" } else { "no quantization" }
            ));
        }
    }
    if hints.is_empty() {
        let weights = Estimate::new(cfg, quant, req.dtype, 1, 1).map(|e| human(e.weight_bytes()));
        hints.push(match weights {
            Ok(w) => format!("the weights alone need {w}; add devices or memory"),
            Err(_) => "add devices or memory".into(),
        });
    }
    Error::OutOfMemory {
        device,
        needed,
        available,
        hint: hints.join("; or "),
        max_seq_len_that_fits: best_len,
        phase: OomPhase::Planned,
    }
}

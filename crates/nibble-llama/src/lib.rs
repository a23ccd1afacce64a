//! `nibble-llama`: the decoder of the Llama family, built from [`QuantLinear`] layers.
//!
//! GQA attention with RoPE (default, linear and llama3 scaling; whole or partial heads), optional
//! per-head q/k RMSNorm and sliding windows, biases, fused or separate projections, RMSNorm, SiLU
//! MLP, tied or untied lm_head, a KV cache, and any number of layers, each placed on its own
//! device: hidden states move at layer boundaries and each layer's cache lives where the layer
//! does. What a layer is made of comes from the architecture's description
//! ([`nibble_load::arch`]) through [`ModelConfig::layer_linears`] and
//! [`ModelConfig::layer_norms`]; the model wires modules by [`Role`] and never looks at the
//! weight format: a [`WeightProvider`] builds every linear layer.

mod host;
mod rope;

use candle_core::{DType, Device, Tensor, D};
use nibble_core::{Error, Result};
use nibble_load::{ModelConfig, Role};
use nibble_quant::kernels::Precision;
use nibble_quant::{AdapterSel, DenseLinear, QuantLinear};

use host::HostKv;

pub use rope::Rope;

/// Where each part of the model lives.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Device of `model.embed_tokens`.
    pub embed: Device,
    /// Device of each `model.layers.N`.
    pub layers: Vec<Device>,
    /// Device of `model.norm` and `lm_head`.
    pub head: Device,
}

impl Placement {
    /// Everything on one device.
    pub fn single(device: &Device, num_layers: usize) -> Self {
        Self { embed: device.clone(), layers: vec![device.clone(); num_layers], head: device.clone() }
    }
}

/// Supplies the weights the model is built from, in the model dtype (transformers' `dtype`).
pub trait WeightProvider {
    /// Builds the linear layer `name` (e.g. `model.layers.0.self_attn.q_proj`) of shape
    /// `[out, in]` from the checkpoint tensor `weight_name` (different from `name.weight` only for a
    /// tied lm_head), with the bias `name.bias` when `bias`, on `device`.
    fn linear(&mut self, name: &str, weight_name: &str, shape: LinearShape, device: &Device) -> Result<Box<dyn QuantLinear>>;

    /// Loads a dense tensor (a norm weight, the token embedding) of `shape` on `device`, in the
    /// model dtype.
    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor>;

    /// Whether the linear layer `name` is quantized (a tied `lm_head` that is not shares the
    /// embedding's storage instead of being loaded again).
    fn quantizes(&self, name: &str) -> bool;

    /// The bias `name.bias` of the linear layer `name` when `shape` says it has one, through
    /// [`WeightProvider::tensor`] (biases stay unquantized, in the model dtype).
    fn bias(&mut self, name: &str, shape: LinearShape, device: &Device) -> Result<Option<Tensor>> {
        if !shape.bias {
            return Ok(None);
        }
        self.tensor(&format!("{name}.bias"), &[shape.out_features], device).map(Some)
    }
}

/// The shape of a linear layer a [`WeightProvider`] is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearShape {
    /// Rows of the weight.
    pub out_features: usize,
    /// Columns of the weight.
    pub in_features: usize,
    /// Whether the layer has a bias `[out_features]`.
    pub bias: bool,
}

/// Query, key and value projections: three matrices, or one whose rows are q, k, v.
#[derive(Debug)]
enum Qkv {
    Separate { q: Box<dyn QuantLinear>, k: Box<dyn QuantLinear>, v: Box<dyn QuantLinear> },
    Fused(Box<dyn QuantLinear>),
}

/// Gate and up projections: two matrices, or one whose first half of rows is the gate.
#[derive(Debug)]
enum GateUp {
    Separate { gate: Box<dyn QuantLinear>, up: Box<dyn QuantLinear> },
    Fused(Box<dyn QuantLinear>),
}

/// An RMSNorm weight, with its values widened to f32 once for the host decode step.
#[derive(Debug)]
struct Norm {
    weight: Tensor,
    host: Vec<f32>,
}

impl Norm {
    fn new(weight: Tensor) -> Result<Self> {
        let host = weight.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1()?;
        Ok(Self { weight, host })
    }
}

#[derive(Debug)]
struct Layer {
    qkv: Qkv,
    o: Box<dyn QuantLinear>,
    gate_up: GateUp,
    down: Box<dyn QuantLinear>,
    input_norm: Norm,
    post_norm: Norm,
    /// Per-head RMSNorm of queries and keys (Qwen3).
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    /// Attention window (`None`: full causal attention).
    window: Option<usize>,
    device: Device,
}

impl Layer {
    /// The linear layer playing `role`.
    fn linear(&self, role: Role) -> Option<&dyn QuantLinear> {
        let l = match (role, &self.qkv, &self.gate_up) {
            (Role::Q, Qkv::Separate { q, .. }, _) => q,
            (Role::K, Qkv::Separate { k, .. }, _) => k,
            (Role::V, Qkv::Separate { v, .. }, _) => v,
            (Role::Qkv, Qkv::Fused(qkv), _) => qkv,
            (Role::O, ..) => &self.o,
            (Role::Gate, _, GateUp::Separate { gate, .. }) => gate,
            (Role::Up, _, GateUp::Separate { up, .. }) => up,
            (Role::GateUp, _, GateUp::Fused(gu)) => gu,
            (Role::Down, ..) => &self.down,
            _ => return None,
        };
        Some(l.as_ref())
    }

    /// Bytes of its linears (with quant state and biases) and norms.
    fn resident_bytes(&self) -> usize {
        let lin = |l: &dyn QuantLinear| l.resident_bytes();
        let qkv = match &self.qkv {
            Qkv::Separate { q, k, v } => lin(q.as_ref()) + lin(k.as_ref()) + lin(v.as_ref()),
            Qkv::Fused(f) => lin(f.as_ref()),
        };
        let gate_up = match &self.gate_up {
            GateUp::Separate { gate, up } => lin(gate.as_ref()) + lin(up.as_ref()),
            GateUp::Fused(f) => lin(f.as_ref()),
        };
        let norms = [Some(&self.input_norm), Some(&self.post_norm), self.q_norm.as_ref(), self.k_norm.as_ref()];
        qkv + lin(self.o.as_ref()) + gate_up + lin(self.down.as_ref()) + norms.iter().flatten().map(|n| tensor_bytes(&n.weight)).sum::<usize>()
    }

    /// The norm playing `role`.
    fn norm(&self, role: Role) -> Option<&Norm> {
        match role {
            Role::InputNorm => Some(&self.input_norm),
            Role::PostAttentionNorm => Some(&self.post_norm),
            Role::QueryNorm => self.q_norm.as_ref(),
            Role::KeyNorm => self.k_norm.as_ref(),
            _ => None,
        }
    }
}

/// Per-layer key/value cache.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Slot>,
}

/// One layer's keys and values: tensors on the layer's device, or host buffers for a CPU layer
/// (whose decode step appends in place, see `host`). A windowed layer keeps only the positions a
/// later query can still see.
#[derive(Debug, Clone, Default)]
enum Slot {
    #[default]
    Empty,
    /// Keys, values (`[batch, kv_heads, kept, head_dim]`) and the positions seen so far.
    Tensors(Tensor, Tensor, usize),
    Host(HostKv),
}

impl Slot {
    /// Positions seen (not all of them kept under a window).
    fn len(&self) -> usize {
        match self {
            Slot::Empty => 0,
            Slot::Tensors(.., seen) => *seen,
            Slot::Host(h) => h.seen(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Slot::Empty => 0,
            Slot::Tensors(k, v, _) => (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes(),
            Slot::Host(h) => h.bytes(),
        }
    }

    /// Whether the first `len` positions (fewer than seen) are all still held.
    fn can_truncate(&self, len: usize) -> bool {
        match self {
            Slot::Empty => true,
            Slot::Tensors(k, _, seen) => k.dim(2).is_ok_and(|kept| kept == *seen),
            Slot::Host(h) => h.can_truncate(len),
        }
    }

    /// Keeps the first `len` positions ([`Slot::can_truncate`] said it can).
    fn truncate(&mut self, len: usize) -> Result<()> {
        match self {
            Slot::Empty => {}
            Slot::Tensors(k, v, seen) => {
                *k = k.narrow(2, 0, len)?.contiguous()?;
                *v = v.narrow(2, 0, len)?.contiguous()?;
                *seen = len;
            }
            Slot::Host(h) => h.truncate(len),
        }
        Ok(())
    }
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![Slot::Empty; num_layers] }
    }

    /// Number of positions processed (a windowed layer keeps only its window of them).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, Slot::len)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = Slot::Empty);
    }

    /// Bytes held by the cache (host buffers count their spare capacity).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(Slot::bytes).sum()
    }

    /// Forgets every position from `len` on, keeping the first `len` (a prompt's shared prefix,
    /// reused by the next request). Returns false, leaving the cache as it was, when a layer
    /// cannot: a windowed layer has already dropped positions the shorter cache would need.
    pub fn truncate(&mut self, len: usize) -> Result<bool> {
        if len >= self.len() {
            return Ok(true);
        }
        if !self.layers.iter().all(|s| s.can_truncate(len)) {
            return Ok(false);
        }
        for slot in &mut self.layers {
            slot.truncate(len)?;
        }
        Ok(true)
    }
}

/// A causal language model of the Llama family.
#[derive(Debug)]
pub struct Llama {
    cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Box<dyn QuantLinear>,
    /// Whether `lm_head` is the embedding's own storage (a tied, unquantized head).
    head_shared: bool,
    rope: Rope,
    placement: Placement,
    /// The model dtype: what transformers' `dtype` sets (activations, the KV cache, every
    /// weight left unquantized).
    dtype: DType,
}

impl Llama {
    /// Builds the model, asking `weights` for every tensor; `dtype` is the model dtype
    /// (transformers' `from_pretrained(dtype=...)`), f32, bf16 or f16.
    pub fn load(cfg: &ModelConfig, placement: Placement, dtype: DType, weights: &mut dyn WeightProvider) -> Result<Self> {
        if placement.layers.len() != cfg.num_hidden_layers {
            return Err(Error::InvalidDeviceMap {
                reason: format!(
                    "placement covers {} layers, the model has {}",
                    placement.layers.len(),
                    cfg.num_hidden_layers
                ),
            });
        }
        let h = cfg.hidden_size;
        if Precision::from_dtype(dtype).is_none() {
            return Err(Error::invalid_argument("dtype", format!("{dtype:?} is not a model dtype; use f32, bf16 or f16")));
        }
        let embed = weights.tensor("model.embed_tokens.weight", &[cfg.vocab_size, h], &placement.embed)?;
        let (specs, norm_specs) = (cfg.layer_linears(), cfg.layer_norms());
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (i, device) in placement.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let mut linears: Vec<(Role, Box<dyn QuantLinear>)> = Vec::with_capacity(specs.len());
            for s in &specs {
                let full = format!("{p}.{}", s.name);
                let shape = LinearShape { out_features: s.out_features, in_features: s.in_features, bias: s.bias };
                linears.push((s.role, weights.linear(&full, &format!("{full}.weight"), shape, device)?));
            }
            let mut norms: Vec<(Role, Norm)> = Vec::with_capacity(norm_specs.len());
            for n in &norm_specs {
                norms.push((n.role, Norm::new(weights.tensor(&format!("{p}.{}.weight", n.name), &[n.len], device)?)?));
            }
            layers.push(assemble(cfg, i, linears, norms, device)?);
        }
        let norm = weights.tensor("model.norm.weight", &[h], &placement.head)?;
        // A tied head left unquantized is the embedding itself, as in transformers (one tensor,
        // held once); a quantized one is its own matrix made from the embedding's values.
        let shared = cfg.tie_word_embeddings && !weights.quantizes("lm_head") && placement.head.same_device(&placement.embed);
        let lm_head: Box<dyn QuantLinear> = if shared {
            Box::new(DenseLinear::new(embed.clone(), None)?)
        } else {
            let head_source = if cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
            let shape = LinearShape { out_features: cfg.vocab_size, in_features: h, bias: false };
            weights.linear("lm_head", head_source, shape, &placement.head)?
        };
        Ok(Self {
            rope: Rope::new(cfg)?,
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            head_shared: shared,
            placement,
            dtype,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The model dtype (activations, KV cache, unquantized weights).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the head is the embedding's storage (a tied, unquantized `lm_head`).
    pub fn head_is_shared(&self) -> bool {
        self.head_shared
    }

    /// Where each part lives.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// A fresh cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Bytes of weights held resident (embeddings, norms, every linear with its quant state and
    /// bias).
    pub fn resident_weight_bytes(&self) -> usize {
        let head = if self.head_shared { 0 } else { self.lm_head.resident_bytes() };
        let layers: usize = self.layers.iter().map(Layer::resident_bytes).sum();
        tensor_bytes(&self.embed) + layers + tensor_bytes(&self.norm) + head
    }

    /// Every linear layer with its module name, in checkpoint order (for saving).
    pub fn linears(&self) -> Vec<(String, &dyn QuantLinear)> {
        let desc = self.cfg.description();
        let mut out: Vec<(String, &dyn QuantLinear)> = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for m in desc.attention.iter().chain(desc.mlp) {
                if let Some(lin) = l.linear(m.role) {
                    out.push((format!("model.layers.{i}.{}", m.name), lin));
                }
            }
        }
        out.push(("lm_head".to_string(), self.lm_head.as_ref()));
        out
    }

    /// Every dense tensor (embedding, norms) with its checkpoint name.
    pub fn dense_tensors(&self) -> Vec<(String, &Tensor)> {
        let desc = self.cfg.description();
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed)];
        for (i, l) in self.layers.iter().enumerate() {
            for m in desc.norms {
                if let Some(n) = l.norm(m.role) {
                    out.push((format!("model.layers.{i}.{}.weight", m.name), &n.weight));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), &self.norm));
        out
    }

    /// Runs `input_ids` (`[batch, seq]`, u32) at positions `offset..offset+seq`, extending `cache`.
    /// Returns f32 logits `[batch, seq, vocab]` (values of the model dtype), or `[batch, 1, vocab]`
    /// for the last position only when `last_only` (generation needs no more).
    pub fn forward(&self, input_ids: &Tensor, offset: usize, cache: &mut KvCache, last_only: bool) -> Result<Tensor> {
        self.forward_sel(input_ids, offset, cache, last_only, AdapterSel::Active)
    }

    /// [`Llama::forward`] with the LoRA adapters `sel` picks (one choice per batch row, or the
    /// active adapter for all).
    pub fn forward_sel(
        &self,
        input_ids: &Tensor,
        offset: usize,
        cache: &mut KvCache,
        last_only: bool,
        sel: AdapterSel<'_>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let prefill = t > 1 && !(last_only && self.prefills_on_host(b, t, cache));
        if prefill && rayon::current_thread_index().is_none() {
            // Run a prefill on a thread of rayon's pool: its products are split across the pool,
            // and from inside it the caller takes its share instead of parking on every product.
            // A decode step's products are small and go to the kernel team from this thread.
            return rayon::scope(|_| self.forward_here(input_ids, offset, cache, last_only, sel));
        }
        self.forward_here(input_ids, offset, cache, last_only, sel)
    }

    fn forward_here(
        &self,
        input_ids: &Tensor,
        offset: usize,
        cache: &mut KvCache,
        last_only: bool,
        sel: AdapterSel<'_>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if t == 0 {
            return Err(Error::invalid_argument("input_ids", "needs at least one token"));
        }
        if cache.layers.len() != self.layers.len() || cache.len() != offset {
            return Err(Error::invalid_argument(
                "offset",
                format!("the cache holds {} positions but the forward starts at {offset}", cache.len()),
            ));
        }
        let max_id = input_ids.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
        if max_id >= self.cfg.vocab_size {
            return Err(Error::invalid_argument(
                "input_ids",
                format!("token id {max_id} is outside the vocabulary of {}", self.cfg.vocab_size),
            ));
        }
        let ids = input_ids.to_device(&self.placement.embed)?;
        // Activations travel as f32 tensors holding values of the model dtype: every op computes
        // in f32 and rounds to the model dtype where transformers' op returns that dtype.
        let x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(DType::F32)?
            .reshape((b, t, self.cfg.hidden_size))?;
        // A generation's prompt (only the last position's logits) runs on host buffers where it
        // can (a 540-token SmolLM2 prompt: about 1.5x the tensors' speed on two cores). Scoring
        // every position (perplexity) stays on the tensors: the two paths' sums run in different
        // orders, which moves a bfloat16 model's 256-token perplexity by up to 1%
        // (docs/quantization.md), so the figures compared with transformers keep the path they
        // were measured on.
        let x = if last_only && self.prefills_on_host(b, t, cache) {
            self.prefill_host(x, offset, cache, sel)?
        } else {
            self.layers_forward(x, offset, cache, sel)?
        };
        let x = x.to_device(&self.placement.head)?;
        let x = if last_only { x.narrow(1, t - 1, 1)? } else { x };
        let x = self.rms_norm(&x.contiguous()?, &self.norm)?;
        self.linear(self.lm_head.as_ref(), &x, sel)
    }

    /// `x` (`[1, t, hidden]`) through every layer on host buffers ([`Llama::prefills_on_host`]
    /// said it applies), each position's rotation computed once for all layers.
    fn prefill_host(&self, x: Tensor, offset: usize, cache: &mut KvCache, sel: AdapterSel<'_>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let t = dims.get(1).copied().unwrap_or(0);
        let rots: Vec<_> = (offset..offset + t).map(|p| self.rope.cos_sin_host(p, self.precision())).collect();
        let mut xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            if let Some(kv) = self.host_slot(slot, layer) {
                xs = self.layer_prefill_host(layer, xs, &rots, kv, sel)?;
            }
        }
        Ok(Tensor::from_vec(xs, dims, &Device::Cpu)?)
    }

    /// `x` (`[batch, t, hidden]` at positions `offset..`) through every layer on its device:
    /// one token on host buffers where the layer is on the CPU, else candle's tensors.
    fn layers_forward(&self, mut x: Tensor, offset: usize, cache: &mut KvCache, sel: AdapterSel<'_>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        // The position's rotation, shared by every layer that steps on host buffers.
        let rot = if t == 1 { self.rope.cos_sin_host(offset, self.precision()) } else { (Vec::new(), Vec::new()) };
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            // A device running out of memory mid-forward is reported as such, with the device named.
            let on_device = |e: Error| match e {
                Error::Candle(c) => Error::from_device(device_name(&layer.device), c),
                other => other,
            };
            x = x.to_device(&layer.device).map_err(|e| on_device(e.into()))?;
            x = match slot {
                Slot::Host(kv) if t == 1 => self.layer_step_host(layer, &x, &rot, kv, sel),
                Slot::Empty if t == 1 && self.host_path(&layer.device) => {
                    let mut kv = self.host_kv(b, layer.window);
                    let y = self.layer_step_host(layer, &x, &rot, &mut kv, sel);
                    *slot = Slot::Host(kv);
                    y
                }
                _ => self.layer_forward(layer, &x, offset, slot, sel),
            }
            .map_err(on_device)?;
        }
        Ok(x)
    }

    /// One decode step for several sequences at once, each with its own cache (a batch of one
    /// each, at its own position `caches[i].len()`): `tokens[i]` is sequence `i`'s next token.
    /// Returns f32 logits `[n, vocab]`. The matrix products run on all rows together (each weight
    /// read once per step); attention runs per sequence over its own cache, with no padding.
    /// Where a layer is not on the host, the sequences step one at a time.
    pub fn decode_rows(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        self.decode_rows_sel(tokens, caches, AdapterSel::Active)
    }

    /// [`Llama::decode_rows`] with the LoRA adapters `sel` picks: with
    /// [`AdapterSel::Groups`], one choice per sequence.
    pub fn decode_rows_sel(&self, tokens: &[u32], caches: &mut [&mut KvCache], sel: AdapterSel<'_>) -> Result<Tensor> {
        let n = tokens.len();
        if let AdapterSel::Groups(g) = sel {
            if g.len() != n {
                return Err(Error::invalid_argument("adapters", format!("{} adapter choices for {n} sequences", g.len())));
            }
        }
        if n == 0 || caches.len() != n {
            return Err(Error::invalid_argument("tokens", format!("{n} tokens for {} caches", caches.len())));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::invalid_argument(
                "tokens",
                format!("token id {bad} is outside the vocabulary of {}", self.cfg.vocab_size),
            ));
        }
        let host = self.layers.iter().all(|l| self.host_path(&l.device)) && self.placement.embed.is_cpu();
        let slots_ok = caches.iter().all(|c| {
            c.layers.len() == self.layers.len() && c.layers.iter().all(|s| matches!(s, Slot::Empty | Slot::Host(_)))
        });
        if !host || !slots_ok {
            let mut rows = Vec::with_capacity(n);
            for (i, (&t, cache)) in tokens.iter().zip(caches.iter_mut()).enumerate() {
                let ids = Tensor::new(&[[t]], &self.placement.embed)?;
                let offset = cache.len();
                let one = match sel {
                    AdapterSel::Groups(g) => AdapterSel::Groups(g.get(i..i + 1).unwrap_or_default()),
                    AdapterSel::Active => AdapterSel::Active,
                };
                rows.push(self.forward_sel(&ids, offset, cache, true, one)?.reshape((1, self.cfg.vocab_size))?);
            }
            return Ok(Tensor::cat(&rows, 0)?);
        }
        let h = self.cfg.hidden_size;
        let ids = Tensor::new(tokens, &self.placement.embed)?;
        let mut xs: Vec<f32> = self.embed.index_select(&ids, 0)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let p = self.precision();
        let rots: Vec<_> = caches.iter().map(|c| self.rope.cos_sin_host(c.len(), p)).collect();
        for (li, layer) in self.layers.iter().enumerate() {
            let mut kvs = Vec::with_capacity(n);
            for cache in caches.iter_mut() {
                if let Some(kv) = self.host_slot(&mut cache.layers[li], layer) {
                    kvs.push(kv);
                }
            }
            xs = self.layer_step_rows(layer, xs, &rots, &mut kvs, sel)?;
        }
        let x = Tensor::from_vec(xs, (n, 1, h), &Device::Cpu)?.to_device(&self.placement.head)?;
        let x = self.rms_norm(&x, &self.norm)?;
        Ok(self.linear(self.lm_head.as_ref(), &x, sel)?.reshape((n, self.cfg.vocab_size))?)
    }

    /// A one-sequence layer slot as host buffers: made empty ones for `layer` where the slot has
    /// none yet; `None` for a slot holding tensors.
    fn host_slot<'c>(&self, slot: &'c mut Slot, layer: &Layer) -> Option<&'c mut HostKv> {
        if matches!(slot, Slot::Empty) {
            *slot = Slot::Host(self.host_kv(1, layer.window));
        }
        match slot {
            Slot::Host(kv) => Some(kv),
            _ => None,
        }
    }

    /// An empty host cache for a layer with attention window `window`, `batch` rows.
    fn host_kv(&self, batch: usize, window: Option<usize>) -> HostKv {
        HostKv::new(batch, self.cfg.num_key_value_heads, self.cfg.head_dim, self.precision(), window)
    }

    /// The model dtype as the rounding the host code applies.
    pub(crate) fn precision(&self) -> Precision {
        Precision::from_dtype(self.dtype).unwrap_or(Precision::F32)
    }

    /// Rounds an f32 tensor's values to the model dtype, keeping f32 (a no-op for f32 models).
    fn round(&self, t: Tensor) -> Result<Tensor> {
        if self.dtype == DType::F32 {
            return Ok(t);
        }
        Ok(t.to_dtype(self.dtype)?.to_dtype(DType::F32)?)
    }

    /// A linear layer on f32 activations: handed to the layer in the model dtype (exact, the
    /// values already are), its output widened back.
    fn linear(&self, l: &dyn QuantLinear, x: &Tensor, sel: AdapterSel<'_>) -> Result<Tensor> {
        Ok(l.forward_sel(&x.to_dtype(self.dtype)?, sel)?.to_dtype(DType::F32)?)
    }

    /// transformers' `LlamaRMSNorm`: `w * (x * rsqrt(mean(x^2) + eps)).to(dtype)`, in f32 with
    /// the normalized value and the product each rounded to the model dtype.
    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (var + eps)?.sqrt()?.recip()?;
        let n = self.round(x.broadcast_mul(&inv)?)?;
        self.round(n.broadcast_mul(&w.to_dtype(DType::F32)?)?)
    }

    fn layer_forward(&self, layer: &Layer, x: &Tensor, offset: usize, cache: &mut Slot, sel: AdapterSel<'_>) -> Result<Tensor> {
        let h = self.rms_norm(x, &layer.input_norm.weight)?;
        let attn = self.attention(layer, &h, offset, cache, sel)?;
        let x = self.round((x + attn)?)?;
        let h = self.rms_norm(&x, &layer.post_norm.weight)?;
        let (gate, up) = match &layer.gate_up {
            GateUp::Separate { gate, up } => (self.linear(gate.as_ref(), &h, sel)?, self.linear(up.as_ref(), &h, sel)?),
            GateUp::Fused(gu) => {
                // `chunk(2, dim=-1)`: the gate is the first half.
                let both = self.linear(gu.as_ref(), &h, sel)?;
                let inter = self.cfg.intermediate_size;
                (both.narrow(D::Minus1, 0, inter)?, both.narrow(D::Minus1, inter, inter)?)
            }
        };
        let gate = self.round(candle_nn::ops::silu(&gate.contiguous()?)?)?;
        let mlp = self.linear(layer.down.as_ref(), &self.round((gate * up.contiguous()?)?)?, sel)?;
        self.round((x + mlp)?)
    }

    /// Rotate-half RoPE as transformers applies it to the first `rotary_dim` dimensions of each
    /// head (the rest pass through): `q * cos + rotate_half(q) * sin`, with cos and sin in the
    /// model dtype and each product and the sum rounded to it (f32: candle's fused op).
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let rd = self.cfg.rotary_dim;
        if rd < self.cfg.head_dim {
            let rotated = self.rope_whole(&x.narrow(D::Minus1, 0, rd)?.contiguous()?, cos, sin)?;
            let pass = x.narrow(D::Minus1, rd, self.cfg.head_dim - rd)?;
            return Ok(Tensor::cat(&[&rotated, &pass], D::Minus1)?.contiguous()?);
        }
        self.rope_whole(x, cos, sin)
    }

    /// [`Llama::rope`] of tensors whose last dimension is all rotated.
    fn rope_whole(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.dtype == DType::F32 {
            return Ok(candle_nn::rotary_emb::rope(x, cos, sin)?);
        }
        let half = x.dim(D::Minus1)? / 2;
        let (cos, sin) = (Tensor::cat(&[cos, cos], D::Minus1)?, Tensor::cat(&[sin, sin], D::Minus1)?);
        let rotated = Tensor::cat(&[&x.narrow(D::Minus1, half, half)?.neg()?, &x.narrow(D::Minus1, 0, half)?], D::Minus1)?;
        let a = self.round(x.broadcast_mul(&cos)?)?;
        let b = self.round(rotated.broadcast_mul(&sin)?)?;
        self.round((a + b)?)
    }

    /// The q, k and v projections of `x` (`[batch, t, hidden]`), each `[batch, t, width]`.
    fn project_qkv(&self, layer: &Layer, x: &Tensor, sel: AdapterSel<'_>) -> Result<(Tensor, Tensor, Tensor)> {
        match &layer.qkv {
            Qkv::Separate { q, k, v } => {
                Ok((self.linear(q.as_ref(), x, sel)?, self.linear(k.as_ref(), x, sel)?, self.linear(v.as_ref(), x, sel)?))
            }
            Qkv::Fused(qkv) => {
                let all = self.linear(qkv.as_ref(), x, sel)?;
                let (qw, kw) = (self.cfg.q_width(), self.cfg.kv_width());
                Ok((all.narrow(D::Minus1, 0, qw)?, all.narrow(D::Minus1, qw, kw)?, all.narrow(D::Minus1, qw + kw, kw)?))
            }
        }
    }

    fn attention(&self, layer: &Layer, x: &Tensor, offset: usize, cache: &mut Slot, sel: AdapterSel<'_>) -> Result<Tensor> {
        let device = &layer.device;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let (q, k, v) = self.project_qkv(layer, x, sel)?;
        // `[b, t, width]` -> `[b, heads, t, head_dim]`, through the per-head norm where there is one.
        let heads = |y: Tensor, n: usize, norm: Option<&Norm>| -> Result<Tensor> {
            let y = y.contiguous()?.reshape((b, t, n, hd))?;
            let y = match norm {
                Some(w) => self.rms_norm(&y, &w.weight)?,
                None => y,
            };
            Ok(y.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(q, nh, layer.q_norm.as_ref())?;
        let k = heads(k, nkv, layer.k_norm.as_ref())?;
        let v = heads(v, nkv, None)?;
        let (cos, sin) = self.rope.cos_sin(offset, t, self.dtype, device)?;
        let (cos, sin) = (cos.to_dtype(DType::F32)?, sin.to_dtype(DType::F32)?);
        let q = self.rope(&q, &cos, &sin)?;
        let k = self.rope(&k, &cos, &sin)?;
        let (k, v) = self.extend_cache(cache, k, v, layer.window, device)?;
        let mask = causal_mask(t, offset, k.dim(2)?, layer.window)?;
        let rep = nh / nkv;
        let k = repeat_kv(&k, rep)?;
        let v = repeat_kv(&v, rep)?;
        // torch's CPU scaled-dot-product (flash) kernel: f32 scores, max-subtracted exponentials
        // rounded to the model dtype for the product with V, f32 sums, divided at the end.
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(&m.to_device(device)?)?,
            None => scores,
        };
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        let out = self.round(e.clone())?.matmul(&v)?.broadcast_div(&sum)?;
        let out = self.round(out)?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.linear(layer.o.as_ref(), &out, sel)
    }
}

impl Llama {
    /// Appends this step's keys and values (`[batch, kv_heads, t, head_dim]`) to `cache` and
    /// returns every position the step's queries may see: the cached ones, then these. A CPU
    /// layer keeps host buffers, so its later decode steps append in place; other layers keep
    /// tensors on their device. A windowed layer keeps the last `window - 1` positions, as
    /// transformers' sliding-window cache does (the next query sees those and itself).
    fn extend_cache(
        &self,
        cache: &mut Slot,
        k: Tensor,
        v: Tensor,
        window: Option<usize>,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let keep = |x: &Tensor| -> Result<Tensor> {
            let n = x.dim(2)?;
            match window {
                Some(w) if n >= w => Ok(x.narrow(2, n + 1 - w, w - 1)?.contiguous()?),
                _ => Ok(x.clone()),
            }
        };
        match std::mem::take(cache) {
            Slot::Tensors(pk, pv, seen) => {
                let (k, v) = (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?);
                *cache = Slot::Tensors(keep(&k)?, keep(&v)?, seen + t);
                Ok((k, v))
            }
            Slot::Empty if !self.host_path(device) => {
                *cache = Slot::Tensors(keep(&k)?, keep(&v)?, t);
                Ok((k, v))
            }
            slot => {
                let mut kv = match slot {
                    Slot::Host(kv) => kv,
                    _ => self.host_kv(k.dim(0)?, window),
                };
                // The cached positions are read before the append: under a window the buffer
                // only has room for the window, and this step's early queries see older keys.
                let all = if kv.kept() == 0 {
                    (k.clone(), v.clone())
                } else {
                    let (pk, pv) = kv.tensors(device)?;
                    (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?)
                };
                let flat = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_vec1::<f32>()?) };
                kv.append(&flat(&k)?, &flat(&v)?, t)?;
                *cache = Slot::Host(kv);
                Ok(all)
            }
        }
    }
}

/// Wires one decoder layer from its linears and norms by role; a description that lacks a role
/// the model needs is an error naming the layer.
fn assemble(
    cfg: &ModelConfig,
    index: usize,
    linears: Vec<(Role, Box<dyn QuantLinear>)>,
    norms: Vec<(Role, Norm)>,
    device: &Device,
) -> Result<Layer> {
    let mut lin: std::collections::HashMap<Role, Box<dyn QuantLinear>> = linears.into_iter().collect();
    let mut nrm: std::collections::HashMap<Role, Norm> = norms.into_iter().collect();
    let missing = |what: &str| Error::invalid_argument("architecture", format!("layer {index} has no {what}"));
    let qkv = match (lin.remove(&Role::Qkv), lin.remove(&Role::Q), lin.remove(&Role::K), lin.remove(&Role::V)) {
        (Some(f), None, None, None) => Qkv::Fused(f),
        (None, Some(q), Some(k), Some(v)) => Qkv::Separate { q, k, v },
        _ => return Err(missing("q/k/v projections (separate or fused)")),
    };
    let gate_up = match (lin.remove(&Role::GateUp), lin.remove(&Role::Gate), lin.remove(&Role::Up)) {
        (Some(f), None, None) => GateUp::Fused(f),
        (None, Some(gate), Some(up)) => GateUp::Separate { gate, up },
        _ => return Err(missing("gate/up projections (separate or fused)")),
    };
    Ok(Layer {
        qkv,
        o: lin.remove(&Role::O).ok_or_else(|| missing("o_proj"))?,
        gate_up,
        down: lin.remove(&Role::Down).ok_or_else(|| missing("down_proj"))?,
        input_norm: nrm.remove(&Role::InputNorm).ok_or_else(|| missing("input_layernorm"))?,
        post_norm: nrm.remove(&Role::PostAttentionNorm).ok_or_else(|| missing("post_attention_layernorm"))?,
        q_norm: nrm.remove(&Role::QueryNorm),
        k_norm: nrm.remove(&Role::KeyNorm),
        window: cfg.window(index),
        device: device.clone(),
    })
}

/// Bytes of a tensor's elements.
fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// `cpu`, `cuda:N`, `metal:N`: the spelling device maps use.
fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Additive mask `[t, kv_len]` for queries at positions `offset..offset + t` over the last
/// `kv_len` positions (ending at `offset + t`): a query sees keys up to its own position, and
/// under a window `w` only those within `w - 1` positions before it (transformers'
/// `kv_idx > q_idx - sliding_window`). `None` when nothing is masked.
fn causal_mask(t: usize, offset: usize, kv_len: usize, window: Option<usize>) -> Result<Option<Tensor>> {
    let end = offset + t;
    let first = end.checked_sub(kv_len).ok_or_else(|| Error::invalid_argument("kv cache", "holds more positions than were seen"))?;
    let visible = |q: usize, key: usize| key <= q && window.is_none_or(|w| key + w > q);
    let masked = (0..t).any(|i| (first..end).any(|j| !visible(offset + i, j)));
    if !masked {
        return Ok(None);
    }
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (first..end).map(move |j| if visible(offset + i, j) { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Some(Tensor::from_vec(data, (t, kv_len), &Device::Cpu)?))
}

/// Repeats each key/value head `n` times so GQA heads line up with query heads.
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.expand((b, kv, n, t, d))?.reshape((b, kv * n, t, d))?)
}

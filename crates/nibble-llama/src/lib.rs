//! `nibble-llama`: the Llama decoder, built from [`QuantLinear`] layers.
//!
//! GQA attention with RoPE (default, linear and llama3 scaling), RMSNorm, SiLU MLP, tied or untied
//! lm_head, a KV cache, and any number of layers, each placed on its own device: hidden states move
//! at layer boundaries and each layer's cache lives where the layer does. The model never looks at
//! the weight format; a [`WeightProvider`] builds every linear layer.

mod host;
mod rope;

use candle_core::{DType, Device, Tensor};
use nibble_core::{Error, Result};
use nibble_load::LlamaConfig;
use nibble_quant::QuantLinear;

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

/// Supplies the weights the model is built from, in the model's compute dtype.
pub trait WeightProvider {
    /// Builds the linear layer `name` (e.g. `model.layers.0.self_attn.q_proj`) of shape
    /// `[out, in]` from the checkpoint tensor `weight_name` (different from `name.weight` only for a
    /// tied lm_head), on `device`.
    fn linear(
        &mut self,
        name: &str,
        weight_name: &str,
        out_features: usize,
        in_features: usize,
        device: &Device,
    ) -> Result<Box<dyn QuantLinear>>;

    /// Loads a dense tensor (a norm weight) of `shape` on `device`, in the compute dtype.
    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor>;

    /// Loads the token embedding `[vocab, hidden]`: in the compute dtype, or in a narrower dtype
    /// that widens to it exactly (the model converts the rows it looks up).
    fn embedding(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.tensor(name, shape, device)
    }
}

#[derive(Debug)]
struct Attention {
    q: Box<dyn QuantLinear>,
    k: Box<dyn QuantLinear>,
    v: Box<dyn QuantLinear>,
    o: Box<dyn QuantLinear>,
}

#[derive(Debug)]
struct Mlp {
    gate: Box<dyn QuantLinear>,
    up: Box<dyn QuantLinear>,
    down: Box<dyn QuantLinear>,
}

#[derive(Debug)]
struct Layer {
    attn: Attention,
    mlp: Mlp,
    input_norm: Tensor,
    post_norm: Tensor,
    device: Device,
}

/// Per-layer key/value cache.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Slot>,
}

/// One layer's keys and values: tensors on the layer's device, or host buffers for a CPU layer
/// computing in f32 (whose decode step appends in place, see `host`).
#[derive(Debug, Clone, Default)]
enum Slot {
    #[default]
    Empty,
    Tensors(Tensor, Tensor),
    Host(HostKv),
}

impl Slot {
    fn len(&self) -> usize {
        match self {
            Slot::Empty => 0,
            Slot::Tensors(k, _) => k.dim(2).unwrap_or(0),
            Slot::Host(h) => h.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Slot::Empty => 0,
            Slot::Tensors(k, v) => (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes(),
            Slot::Host(h) => h.bytes(),
        }
    }
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![Slot::Empty; num_layers] }
    }

    /// Number of positions cached.
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
}

/// A Llama causal language model.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Box<dyn QuantLinear>,
    rope: Rope,
    placement: Placement,
    dtype: DType,
}

impl Llama {
    /// Builds the model, asking `weights` for every tensor; `dtype` is the compute dtype.
    pub fn load(cfg: &LlamaConfig, placement: Placement, dtype: DType, weights: &mut dyn WeightProvider) -> Result<Self> {
        if placement.layers.len() != cfg.num_hidden_layers {
            return Err(Error::InvalidDeviceMap {
                reason: format!(
                    "placement covers {} layers, the model has {}",
                    placement.layers.len(),
                    cfg.num_hidden_layers
                ),
            });
        }
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (q_out, kv_out) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
        let embed = weights.embedding("model.embed_tokens.weight", &[cfg.vocab_size, h], &placement.embed)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (i, device) in placement.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let mut lin = |name: &str, out: usize, inp: usize| {
                let full = format!("{p}.{name}");
                weights.linear(&full, &format!("{full}.weight"), out, inp, device)
            };
            let attn = Attention {
                q: lin("self_attn.q_proj", q_out, h)?,
                k: lin("self_attn.k_proj", kv_out, h)?,
                v: lin("self_attn.v_proj", kv_out, h)?,
                o: lin("self_attn.o_proj", h, q_out)?,
            };
            let mlp = Mlp {
                gate: lin("mlp.gate_proj", inter, h)?,
                up: lin("mlp.up_proj", inter, h)?,
                down: lin("mlp.down_proj", h, inter)?,
            };
            let input_norm = weights.tensor(&format!("{p}.input_layernorm.weight"), &[h], device)?;
            let post_norm = weights.tensor(&format!("{p}.post_attention_layernorm.weight"), &[h], device)?;
            layers.push(Layer { attn, mlp, input_norm, post_norm, device: device.clone() });
        }
        let norm = weights.tensor("model.norm.weight", &[h], &placement.head)?;
        let head_source = if cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        let lm_head = weights.linear("lm_head", head_source, cfg.vocab_size, h, &placement.head)?;
        Ok(Self { rope: Rope::new(cfg)?, cfg: cfg.clone(), embed, layers, norm, lm_head, placement, dtype })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Where each part lives.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// A fresh cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Bytes of weights held resident (embeddings, norms, every linear with its quant state).
    pub fn resident_weight_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let lin = |l: &dyn QuantLinear| l.resident_bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                lin(l.attn.q.as_ref())
                    + lin(l.attn.k.as_ref())
                    + lin(l.attn.v.as_ref())
                    + lin(l.attn.o.as_ref())
                    + lin(l.mlp.gate.as_ref())
                    + lin(l.mlp.up.as_ref())
                    + lin(l.mlp.down.as_ref())
                    + t(&l.input_norm)
                    + t(&l.post_norm)
            })
            .sum();
        t(&self.embed) + layers + t(&self.norm) + lin(self.lm_head.as_ref())
    }

    /// Every linear layer with its module name, in checkpoint order (for saving).
    pub fn linears(&self) -> Vec<(String, &dyn QuantLinear)> {
        let mut out: Vec<(String, &dyn QuantLinear)> = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.self_attn.q_proj"), l.attn.q.as_ref()));
            out.push((format!("{p}.self_attn.k_proj"), l.attn.k.as_ref()));
            out.push((format!("{p}.self_attn.v_proj"), l.attn.v.as_ref()));
            out.push((format!("{p}.self_attn.o_proj"), l.attn.o.as_ref()));
            out.push((format!("{p}.mlp.gate_proj"), l.mlp.gate.as_ref()));
            out.push((format!("{p}.mlp.up_proj"), l.mlp.up.as_ref()));
            out.push((format!("{p}.mlp.down_proj"), l.mlp.down.as_ref()));
        }
        out.push(("lm_head".to_string(), self.lm_head.as_ref()));
        out
    }

    /// Every dense tensor (embedding, norms) with its checkpoint name.
    pub fn dense_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed)];
        for (i, l) in self.layers.iter().enumerate() {
            out.push((format!("model.layers.{i}.input_layernorm.weight"), &l.input_norm));
            out.push((format!("model.layers.{i}.post_attention_layernorm.weight"), &l.post_norm));
        }
        out.push(("model.norm.weight".to_string(), &self.norm));
        out
    }

    /// Runs `input_ids` (`[batch, seq]`, u32) at positions `offset..offset+seq`, extending `cache`.
    /// Returns f32 logits `[batch, seq, vocab]`, or `[batch, 1, vocab]` for the last position only
    /// when `last_only` (generation needs no more).
    pub fn forward(&self, input_ids: &Tensor, offset: usize, cache: &mut KvCache, last_only: bool) -> Result<Tensor> {
        let prefill = input_ids.dim(1).is_ok_and(|t| t > 1);
        if prefill && rayon::current_thread_index().is_none() {
            // Run a prefill on a thread of rayon's pool: its products are split across the pool,
            // and from inside it the caller takes its share instead of parking on every product.
            // A decode step's products are small and go to the kernel team from this thread.
            return rayon::scope(|_| self.forward_here(input_ids, offset, cache, last_only));
        }
        self.forward_here(input_ids, offset, cache, last_only)
    }

    fn forward_here(&self, input_ids: &Tensor, offset: usize, cache: &mut KvCache, last_only: bool) -> Result<Tensor> {
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
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(self.dtype)?
            .reshape((b, t, self.cfg.hidden_size))?;
        let mask = causal_mask(t, offset)?;
        // The position's rotation, shared by every layer that steps on host buffers.
        let rot = if t == 1 { self.rope.cos_sin_host(offset) } else { (Vec::new(), Vec::new()) };
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            // A device running out of memory mid-forward is reported as such, with the device named.
            let on_device = |e: Error| match e {
                Error::Candle(c) => Error::from_device(device_name(&layer.device), c),
                other => other,
            };
            x = x.to_device(&layer.device).map_err(|e| on_device(e.into()))?;
            x = match slot {
                Slot::Host(kv) if t == 1 => self.layer_step_host(layer, &x, &rot, kv),
                Slot::Empty if t == 1 && self.host_path(&layer.device) => {
                    let mut kv = HostKv::new(b, self.cfg.num_key_value_heads, self.cfg.head_dim);
                    let y = self.layer_step_host(layer, &x, &rot, &mut kv);
                    *slot = Slot::Host(kv);
                    y
                }
                _ => self.layer_forward(layer, &x, offset, slot, mask.as_ref()),
            }
            .map_err(on_device)?;
        }
        let x = x.to_device(&self.placement.head)?;
        let x = if last_only { x.narrow(1, t - 1, 1)? } else { x };
        let x = candle_nn::ops::rms_norm(&x.contiguous()?, &self.norm, self.cfg.rms_norm_eps as f32)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        offset: usize,
        cache: &mut Slot,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        let h = candle_nn::ops::rms_norm(x, &layer.input_norm, eps)?;
        let attn = self.attention(&layer.attn, &h, offset, cache, mask, &layer.device)?;
        let x = (x + attn)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.post_norm, eps)?;
        let gate = candle_nn::ops::silu(&layer.mlp.gate.forward(&h)?)?;
        let up = layer.mlp.up.forward(&h)?;
        let mlp = layer.mlp.down.forward(&(gate * up)?)?;
        Ok((x + mlp)?)
    }

    fn attention(
        &self,
        a: &Attention,
        x: &Tensor,
        offset: usize,
        cache: &mut Slot,
        mask: Option<&Tensor>,
        device: &Device,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let q = a.q.forward(x)?.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = a.k.forward(x)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = a.v.forward(x)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let (cos, sin) = self.rope.cos_sin(offset, t, self.dtype, device)?;
        let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
        let (k, v) = self.extend_cache(cache, k, v, device)?;
        let rep = nh / nkv;
        let k = repeat_kv(&k, rep)?;
        let v = repeat_kv(&v, rep)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(&m.to_device(device)?)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        a.o.forward(&out)
    }
}

impl Llama {
    /// Appends this step's keys and values (`[batch, kv_heads, t, head_dim]`) to `cache` and
    /// returns all of them. A CPU layer computing in f32 keeps host buffers, so its later decode
    /// steps append in place; other layers keep tensors on their device.
    fn extend_cache(&self, cache: &mut Slot, k: Tensor, v: Tensor, device: &Device) -> Result<(Tensor, Tensor)> {
        match std::mem::take(cache) {
            Slot::Tensors(pk, pv) => {
                let (k, v) = (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?);
                *cache = Slot::Tensors(k.clone(), v.clone());
                Ok((k, v))
            }
            Slot::Empty if !self.host_path(device) => {
                *cache = Slot::Tensors(k.clone(), v.clone());
                Ok((k, v))
            }
            slot => {
                let (b, heads, t, d) = k.dims4()?;
                let mut kv = match slot {
                    Slot::Host(kv) => kv,
                    _ => HostKv::new(b, heads, d),
                };
                let flat = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_vec1::<f32>()?) };
                kv.append(&flat(&k)?, &flat(&v)?, t)?;
                let all = kv.tensors(device)?;
                *cache = Slot::Host(kv);
                Ok(all)
            }
        }
    }
}

/// `cpu`, `cuda:N`, `metal:N`: the spelling device maps use.
fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Additive mask `[t, offset + t]`: query `i` sees keys up to position `offset + i`.
fn causal_mask(t: usize, offset: usize) -> Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let total = offset + t;
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..total).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Some(Tensor::from_vec(data, (t, total), &Device::Cpu)?))
}

/// Repeats each key/value head `n` times so GQA heads line up with query heads.
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.expand((b, kv, n, t, d))?.reshape((b, kv * n, t, d))?)
}

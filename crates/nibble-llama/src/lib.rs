//! `nibble-llama`: the Llama decoder, built from [`QuantLinear`] layers.
//!
//! GQA attention with RoPE (default, linear and llama3 scaling), RMSNorm, SiLU MLP, tied or untied
//! lm_head, a KV cache, and any number of layers, each placed on its own device: hidden states move
//! at layer boundaries and each layer's cache lives where the layer does. The model never looks at
//! the weight format; a [`WeightProvider`] builds every linear layer.

mod host;
mod rope;

use candle_core::{DType, Device, Tensor, D};
use nibble_core::{Error, Result};
use nibble_load::LlamaConfig;
use nibble_quant::kernels::Precision;
use nibble_quant::{DenseLinear, QuantLinear};

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
    /// tied lm_head), on `device`.
    fn linear(
        &mut self,
        name: &str,
        weight_name: &str,
        out_features: usize,
        in_features: usize,
        device: &Device,
    ) -> Result<Box<dyn QuantLinear>>;

    /// Loads a dense tensor (a norm weight, the token embedding) of `shape` on `device`, in the
    /// model dtype.
    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor>;

    /// Whether the linear layer `name` is quantized (a tied `lm_head` that is not shares the
    /// embedding's storage instead of being loaded again).
    fn quantizes(&self, name: &str) -> bool;
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
    /// The two norm weights widened to f32 once, for the host decode step.
    input_norm_host: Vec<f32>,
    post_norm_host: Vec<f32>,
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
        if Precision::from_dtype(dtype).is_none() {
            return Err(Error::invalid_argument("dtype", format!("{dtype:?} is not a model dtype; use f32, bf16 or f16")));
        }
        let embed = weights.tensor("model.embed_tokens.weight", &[cfg.vocab_size, h], &placement.embed)?;
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
            let host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.to_vec1()?) };
            let (input_norm_host, post_norm_host) = (host(&input_norm)?, host(&post_norm)?);
            layers.push(Layer { attn, mlp, input_norm, post_norm, input_norm_host, post_norm_host, device: device.clone() });
        }
        let norm = weights.tensor("model.norm.weight", &[h], &placement.head)?;
        // A tied head left unquantized is the embedding itself, as in transformers (one tensor,
        // held once); a quantized one is its own matrix made from the embedding's values.
        let shared = cfg.tie_word_embeddings && !weights.quantizes("lm_head") && placement.head.same_device(&placement.embed);
        let lm_head: Box<dyn QuantLinear> = if shared {
            Box::new(DenseLinear::new(embed.clone(), None)?)
        } else {
            let head_source = if cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
            weights.linear("lm_head", head_source, cfg.vocab_size, h, &placement.head)?
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
    pub fn config(&self) -> &LlamaConfig {
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
        let head = if self.head_shared { 0 } else { lin(self.lm_head.as_ref()) };
        t(&self.embed) + layers + t(&self.norm) + head
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
    /// Returns f32 logits `[batch, seq, vocab]` (values of the model dtype), or `[batch, 1, vocab]`
    /// for the last position only when `last_only` (generation needs no more).
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
        // Activations travel as f32 tensors holding values of the model dtype: every op computes
        // in f32 and rounds to the model dtype where transformers' op returns that dtype.
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(DType::F32)?
            .reshape((b, t, self.cfg.hidden_size))?;
        let mask = causal_mask(t, offset)?;
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
                Slot::Host(kv) if t == 1 => self.layer_step_host(layer, &x, &rot, kv),
                Slot::Empty if t == 1 && self.host_path(&layer.device) => {
                    let mut kv = HostKv::new(b, self.cfg.num_key_value_heads, self.cfg.head_dim, self.precision());
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
        let x = self.rms_norm(&x.contiguous()?, &self.norm)?;
        self.linear(self.lm_head.as_ref(), &x)
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
    fn linear(&self, l: &dyn QuantLinear, x: &Tensor) -> Result<Tensor> {
        Ok(l.forward(&x.to_dtype(self.dtype)?)?.to_dtype(DType::F32)?)
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

    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        offset: usize,
        cache: &mut Slot,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let h = self.rms_norm(x, &layer.input_norm)?;
        let attn = self.attention(&layer.attn, &h, offset, cache, mask, &layer.device)?;
        let x = self.round((x + attn)?)?;
        let h = self.rms_norm(&x, &layer.post_norm)?;
        let gate = self.round(candle_nn::ops::silu(&self.linear(layer.mlp.gate.as_ref(), &h)?)?)?;
        let up = self.linear(layer.mlp.up.as_ref(), &h)?;
        let mlp = self.linear(layer.mlp.down.as_ref(), &self.round((gate * up)?)?)?;
        self.round((x + mlp)?)
    }

    /// Rotate-half RoPE as transformers applies it: `q * cos + rotate_half(q) * sin`, with cos and
    /// sin in the model dtype and each product and the sum rounded to it (f32: candle's fused op).
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.dtype == DType::F32 {
            return Ok(candle_nn::rotary_emb::rope(x, cos, sin)?);
        }
        let half = self.cfg.head_dim / 2;
        let (cos, sin) = (Tensor::cat(&[cos, cos], D::Minus1)?, Tensor::cat(&[sin, sin], D::Minus1)?);
        let rotated = Tensor::cat(&[&x.narrow(D::Minus1, half, half)?.neg()?, &x.narrow(D::Minus1, 0, half)?], D::Minus1)?;
        let a = self.round(x.broadcast_mul(&cos)?)?;
        let b = self.round(rotated.broadcast_mul(&sin)?)?;
        self.round((a + b)?)
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
        let heads = |l: &dyn QuantLinear, n: usize| -> Result<Tensor> {
            Ok(self.linear(l, x)?.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = (heads(a.q.as_ref(), nh)?, heads(a.k.as_ref(), nkv)?, heads(a.v.as_ref(), nkv)?);
        let (cos, sin) = self.rope.cos_sin(offset, t, self.dtype, device)?;
        let (cos, sin) = (cos.to_dtype(DType::F32)?, sin.to_dtype(DType::F32)?);
        let q = self.rope(&q, &cos, &sin)?;
        let k = self.rope(&k, &cos, &sin)?;
        let (k, v) = self.extend_cache(cache, k, v, device)?;
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
        self.linear(a.o.as_ref(), &out)
    }
}

impl Llama {
    /// Appends this step's keys and values (`[batch, kv_heads, t, head_dim]`) to `cache` and
    /// returns all of them. A CPU layer keeps host buffers, so its later decode steps append in
    /// place; other layers keep tensors on their device.
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
                    _ => HostKv::new(b, heads, d, self.precision()),
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

//! Memory needed by a model, from its config alone: no weight byte is read.
//!
//! Sized as the loader holds the model under transformers' `from_pretrained(dtype=...)` semantics:
//! the model dtype D governs everything that is not quantized (embedding, norms, biases, skipped or
//! unquantized linears, the KV cache, activations); the 4-bit compute dtype C only the 4-bit
//! products. Exact for nibble's own storage, plus the KV cache and an upper-bound reserve for
//! activations and workspace; `docs/device-map.md` states every term. Every product and sum is
//! checked: a size beyond 64 bits is `Error::SizeOverflow`, never a wrapped number that "fits".

use candle_core::DType;
use nibble_core::{Error, Result};
use nibble_load::ModelConfig;
use nibble_quant::{BitsAndBytesConfig, ModelDtype, QuantMethod};

/// Positions processed per forward call during prefill; the model chunks longer prompts, so the
/// activation reserve does not grow with the prompt.
pub const PREFILL_CHUNK: usize = 512;

/// transformers' `dtype="auto"`: the dtype config.json names (`dtype`, or the older `torch_dtype`),
/// read as the loader reads it ([`ModelDtype::from_hf_name`]: `float32`, `bfloat16`,
/// `float16`/`half` and their short spellings, with or without a `torch.` prefix). Absent or
/// anything else → F32, which is what transformers loads when the config names none.
pub fn auto_dtype(cfg: &ModelConfig) -> DType {
    cfg.dtype.as_deref().and_then(ModelDtype::from_hf_name).unwrap_or(DType::F32)
}

fn overflow(what: &str) -> Error {
    Error::SizeOverflow { what: what.to_string() }
}

/// The product of `factors`, or `Error::SizeOverflow` naming `what`.
pub(crate) fn product(what: &str, factors: &[u64]) -> Result<u64> {
    factors.iter().try_fold(1u64, |acc, &f| acc.checked_mul(f)).ok_or_else(|| overflow(what))
}

/// The sum of `terms`, or `Error::SizeOverflow` naming `what`.
pub(crate) fn total(what: &str, terms: &[u64]) -> Result<u64> {
    terms.iter().try_fold(0u64, |acc, &t| acc.checked_add(t)).ok_or_else(|| overflow(what))
}

/// Resident bytes of one `[out, in]` linear's weight stored as `method`; `dense_bytes` is the
/// element size of an unquantized weight (the model dtype D).
pub fn linear_bytes(out: u64, inp: u64, method: QuantMethod, quant: &BitsAndBytesConfig, dense_bytes: u64) -> Result<u64> {
    let what = "a linear weight";
    let n = product(what, &[out, inp])?;
    match method {
        QuantMethod::None => product(what, &[n, dense_bytes]),
        QuantMethod::FourBit(_) => {
            // validate() keeps the block size in 32..=4096; a hand-built config may not have run it.
            let blocksize = quant.bnb_4bit_blocksize as u64;
            if blocksize == 0 {
                return Err(Error::quant_config("bnb_4bit_blocksize", "must be a power of two from 32 to 4096"));
            }
            let blocks = n.div_ceil(blocksize);
            let absmax = if quant.bnb_4bit_use_double_quant {
                // u8 code per block, f32 nested absmax per 256 blocks, one f32 offset.
                total(what, &[blocks, product(what, &[4, blocks.div_ceil(256)])?, 4])?
            } else {
                product(what, &[4, blocks])?
            };
            total(what, &[n.div_ceil(2), absmax])
        }
        QuantMethod::Int8 => total(what, &[n, product(what, &[4, out])?]),
    }
}

/// Bytes of a linear's bias (`out` elements in the model dtype), when the architecture has one.
pub fn bias_bytes(out: u64, has_bias: bool, dense_bytes: u64) -> Result<u64> {
    if has_bias {
        product("a linear bias", &[out, dense_bytes])
    } else {
        Ok(0)
    }
}

/// What each module and each layer's cache needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    /// `model.embed_tokens`.
    pub embed: u64,
    /// Each `model.layers.N`: its linears (with their biases) and norms, as the architecture
    /// describes them.
    pub layers: Vec<u64>,
    /// `model.norm` plus `lm_head`'s own storage (none for a tied, unquantized lm_head: it shares
    /// the embedding's).
    pub head: u64,
    /// A tied, unquantized lm_head shares the embedding's storage only on the embedding's device:
    /// these are the bytes of the copy the head's device holds when it is another one; 0 when the
    /// head is not such a shared matrix.
    pub tied_head_copy: u64,
    /// What the head holds beyond `head` on a device other than the CPU (a GGUF `Q8_0` head of
    /// an f32 model stays in its blocks only on the CPU); 0 otherwise.
    pub head_off_cpu_extra: u64,
    /// KV cache of one full-attention layer for `max_seq_len` × `batch`.
    pub kv_per_layer: u64,
    /// KV cache of each layer: a windowed layer holds at most its window of positions.
    pub kv_layers: Vec<u64>,
    /// Activation and workspace reserve of a device that runs decoder layers.
    pub layer_reserve: u64,
    /// Extra reserve of the device that runs the head (the logits).
    pub head_reserve: u64,
    /// The model dtype D everything unquantized is sized in.
    pub dtype: DType,
    /// The context length planned for.
    pub max_seq_len: usize,
    /// The batch size planned for.
    pub batch: usize,
}

impl Estimate {
    /// Computes every term for `cfg` quantized as `quant`, unquantized parts held in `dtype`.
    /// `Error::SizeOverflow` when a size does not fit in 64 bits.
    pub fn new(cfg: &ModelConfig, quant: &BitsAndBytesConfig, dtype: DType, max_seq_len: usize, batch: usize) -> Result<Self> {
        let d = dtype.size_in_bytes() as u64;
        let c = quant.bnb_4bit_compute_dtype.dtype().size_in_bytes() as u64;
        let h = cfg.hidden_size as u64;
        let inter = cfg.intermediate_size as u64;
        let hd = cfg.head_dim as u64;
        let (nh, nkv) = (cfg.num_attention_heads as u64, cfg.num_key_value_heads as u64);
        let vocab = cfg.vocab_size as u64;
        let method_of = |name: &str| if quant.skips(name) { QuantMethod::None } else { quant.method() };
        // The description's linears (name, out, in, bias) and norm widths.
        let specs = cfg.layer_linears();
        let norm_lens: Vec<u64> = cfg.layer_norms().iter().map(|n| n.len as u64).collect();
        let norms = product("a layer's norms", &[total("a layer's norms", &norm_lens)?, d])?;
        let (mut largest_4bit, mut widest_4bit) = (0u64, 0u64);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let mut bytes = norms;
            for s in &specs {
                let (out, inp) = (s.out_features as u64, s.in_features as u64);
                let method = method_of(&format!("model.layers.{i}.{}", s.name));
                if matches!(method, QuantMethod::FourBit(_)) {
                    largest_4bit = largest_4bit.max(product("a linear weight", &[out, inp])?);
                    widest_4bit = widest_4bit.max(total("a linear's width", &[out, inp])?);
                }
                let w = linear_bytes(out, inp, method, quant, d)?;
                bytes = total("a decoder layer", &[bytes, w, bias_bytes(out, s.bias, d)?])?;
            }
            layers.push(bytes);
        }

        let embed = product("the embedding", &[vocab, h, d])?;
        let head_method = method_of("lm_head");
        // A tied lm_head left unquantized is the embedding matrix itself; quantized, it is its own.
        let shared = cfg.tie_word_embeddings && head_method == QuantMethod::None;
        let lm_head = if shared { 0 } else { linear_bytes(vocab, h, head_method, quant, d)? };
        // A GGUF `Q8_0` head of an f32 model is held as its blocks on the CPU (an i8 code a
        // weight, an f32 scale per 32); elsewhere as the dense matrix.
        let (lm_head, head_off_cpu_extra) = if cfg.head_q8_blocks && !shared && head_method == QuantMethod::None && dtype == DType::F32 {
            let n = product("lm_head", &[vocab, h])?;
            let blocks = total("lm_head", &[n, product("lm_head", &[4, n / 32])?])?;
            (blocks, lm_head.saturating_sub(blocks))
        } else {
            (lm_head, 0)
        };
        let head = total("the head", &[product("model.norm", &[h, d])?, lm_head])?;
        let tied_head_copy = if shared { embed } else { 0 };

        let (b, t_all) = (batch as u64, max_seq_len as u64);
        let t = t_all.min(PREFILL_CHUNK as u64);
        let kv_per_layer = product("the KV cache per layer", &[2, b, t_all, nkv, hd, d])?;
        // A windowed layer's cache holds its window (the query and the window - 1 before it).
        let kv_layers = (0..cfg.num_hidden_layers)
            .map(|i| match cfg.window(i) {
                Some(w) => product("the KV cache per layer", &[2, b, t_all.min(w as u64), nkv, hd, d]),
                None => Ok(kv_per_layer),
            })
            .collect::<Result<Vec<u64>>>()?;
        let what = "the activation reserve";
        // bitsandbytes dequantizes a 4-bit weight straight into C: an `[out, in]` f32 temporary
        // and its C result for the largest one; the product runs in C, so the input is cast to C
        // and the output comes back in C before the cast to D.
        let dequant = product(what, &[largest_4bit, total(what, &[4, c])?])?;
        let products_4bit = product(what, &[b, t, widest_4bit, c])?;
        // One prefill chunk, in D: residual stream and norm output, q/k/v/attention output, the
        // MLP's gate, up and product; f32 attention scores and probabilities against the whole
        // context; keys/values repeated to all query heads.
        let hidden = product(what, &[3, b, t, h, d])?;
        let qkv = product(what, &[2, b, t, total(what, &[nh, product(what, &[2, nkv])?])?, hd, d])?;
        let mlp = product(what, &[3, b, t, inter, d])?;
        let scores = product(what, &[2, b, nh, t, t_all, 4])?;
        let repeated = product(what, &[2, b, nh, t_all, hd, d])?;
        let layer_reserve = total(what, &[dequant, products_4bit, hidden, qkv.max(mlp), scores, repeated])?;
        // Logits of the last position in D, plus their f32 copy for sampling; a 4-bit lm_head
        // dequantizes like any 4-bit linear.
        let what = "the head reserve";
        let logits = product(what, &[b, vocab, total(what, &[4, d])?])?;
        let head_4bit = match head_method {
            QuantMethod::FourBit(_) => total(
                what,
                &[
                    product(what, &[vocab, h, total(what, &[4, c])?])?,
                    product(what, &[b, total(what, &[vocab, h])?, c])?,
                ],
            )?,
            _ => 0,
        };
        let head_reserve = total(what, &[logits, head_4bit])?;
        let est = Self {
            embed,
            layers,
            head,
            tied_head_copy,
            head_off_cpu_extra,
            kv_per_layer,
            kv_layers,
            layer_reserve,
            head_reserve,
            dtype,
            max_seq_len,
            batch,
        };
        // Checked once here so that weight_bytes() cannot overflow.
        let mut terms = est.layers.clone();
        terms.extend([est.embed, est.head, est.tied_head_copy]);
        total("the weights", &terms)?;
        total("the KV cache", &est.kv_layers)?;
        Ok(est)
    }

    /// Adds LoRA adapter bytes to each decoder layer (`layers`: one per layer, or empty) and to
    /// the head: an adapter lives on its layer's device.
    ///
    /// Errors: a list of another length, or a sum past 64 bits.
    pub fn add_adapters(&mut self, layers: &[u64], head: u64) -> Result<()> {
        if !layers.is_empty() && layers.len() != self.layers.len() {
            return Err(Error::invalid_argument(
                "adapter_layer_bytes",
                format!("{} values for {} layers", layers.len(), self.layers.len()),
            ));
        }
        for (l, a) in self.layers.iter_mut().zip(layers) {
            *l = total("a decoder layer with its adapters", &[*l, *a])?;
        }
        self.head = total("the head with its adapters", &[self.head, head])?;
        let mut terms = self.layers.clone();
        terms.extend([self.embed, self.head, self.tied_head_copy]);
        total("the weights", &terms)?;
        Ok(())
    }

    /// Total weight bytes with the head on the embedding's device (a tied lm_head shares the
    /// embedding then). `Estimate::new` checked that the sum fits.
    pub fn weight_bytes(&self) -> u64 {
        self.layers.iter().fold(self.embed.saturating_add(self.head), |acc, l| acc.saturating_add(*l))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn cfg_with_dtype(dtype: Option<&str>) -> ModelConfig {
        let mut v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 256
        });
        if let Some(d) = dtype {
            v["torch_dtype"] = serde_json::json!(d);
        }
        ModelConfig::from_json(&v, Path::new("config.json")).unwrap()
    }

    #[test]
    fn auto_dtype_follows_the_config() {
        let cases = [
            (Some("float32"), DType::F32),
            (Some("bfloat16"), DType::BF16),
            (Some("torch.bfloat16"), DType::BF16),
            (Some("float16"), DType::F16),
            (Some("half"), DType::F16),
            (Some("torch.float16"), DType::F16),
            (Some("float64"), DType::F32),
            (None, DType::F32),
        ];
        for (name, want) in cases {
            assert_eq!(auto_dtype(&cfg_with_dtype(name)), want, "{name:?}");
        }
    }

    #[test]
    fn checked_arithmetic_reports_what_overflowed() {
        assert_eq!(product("x", &[3, 5, 7]).unwrap(), 105);
        assert_eq!(total("x", &[3, 5, 7]).unwrap(), 15);
        assert!(matches!(product("kv", &[u64::MAX, 2]), Err(Error::SizeOverflow { ref what }) if what == "kv"));
        assert!(matches!(total("sum", &[u64::MAX, 1]), Err(Error::SizeOverflow { ref what }) if what == "sum"));
        let nf4 = BitsAndBytesConfig::nf4();
        assert!(matches!(linear_bytes(u64::MAX, 2, nf4.method(), &nf4, 2), Err(Error::SizeOverflow { .. })));
        assert_eq!(bias_bytes(4096, true, 2).unwrap(), 8192);
        assert_eq!(bias_bytes(4096, false, 2).unwrap(), 0);
    }
}

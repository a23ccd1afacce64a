//! Memory needed by a model, from its config alone: no weight byte is read.
//!
//! Exact for nibble's own storage (the same arithmetic as each layer's `resident_bytes`), plus the
//! KV cache and a reserve for activations and workspace; `docs/device-map.md` states every term.

use nibble_load::LlamaConfig;
use nibble_quant::{BitsAndBytesConfig, QuantMethod};

/// Positions processed per forward call during prefill; the model chunks longer prompts, so the
/// activation reserve does not grow with the prompt.
pub const PREFILL_CHUNK: usize = 512;

/// Bytes per element of a dtype name (`float32`, `bfloat16`, ...), 4 when unknown.
fn dtype_bytes(name: Option<&str>) -> u64 {
    match name.map(|s| s.trim_start_matches("torch.")) {
        Some("float16") | Some("bfloat16") | Some("half") => 2,
        _ => 4,
    }
}

/// Resident bytes of one `[out, in]` linear stored as `method`.
pub fn linear_bytes(out: u64, inp: u64, method: QuantMethod, quant: &BitsAndBytesConfig, compute_bytes: u64) -> u64 {
    let n = out * inp;
    match method {
        QuantMethod::None => n * compute_bytes,
        QuantMethod::FourBit(_) => {
            let blocks = n.div_ceil(quant.bnb_4bit_blocksize as u64);
            let absmax = if quant.bnb_4bit_use_double_quant {
                // u8 code per block, f32 nested absmax per 256 blocks, one f32 offset.
                blocks + 4 * blocks.div_ceil(256) + 4
            } else {
                4 * blocks
            };
            n.div_ceil(2) + absmax
        }
        QuantMethod::Int8 => n + 4 * out,
    }
}

/// What each module and each layer's cache needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    /// `model.embed_tokens`.
    pub embed: u64,
    /// Each `model.layers.N`: seven linears and two norms.
    pub layers: Vec<u64>,
    /// `model.norm` plus `lm_head`.
    pub head: u64,
    /// KV cache of one layer for `max_seq_len` × `batch`.
    pub kv_per_layer: u64,
    /// Activation and workspace reserve of a device that runs decoder layers.
    pub layer_reserve: u64,
    /// Extra reserve of the device that runs the head (the logits).
    pub head_reserve: u64,
    /// The context length planned for.
    pub max_seq_len: usize,
    /// The batch size planned for.
    pub batch: usize,
}

impl Estimate {
    /// Computes every term for `cfg` quantized as `quant`.
    pub fn new(cfg: &LlamaConfig, quant: &BitsAndBytesConfig, max_seq_len: usize, batch: usize) -> Self {
        let cb = quant.bnb_4bit_compute_dtype.dtype().size_in_bytes() as u64;
        let h = cfg.hidden_size as u64;
        let inter = cfg.intermediate_size as u64;
        let hd = cfg.head_dim as u64;
        let (nh, nkv) = (cfg.num_attention_heads as u64, cfg.num_key_value_heads as u64);
        let vocab = cfg.vocab_size as u64;
        let method_of = |name: &str| if quant.skips(name) { QuantMethod::None } else { quant.method() };
        let shapes = [
            ("self_attn.q_proj", nh * hd, h),
            ("self_attn.k_proj", nkv * hd, h),
            ("self_attn.v_proj", nkv * hd, h),
            ("self_attn.o_proj", h, nh * hd),
            ("mlp.gate_proj", inter, h),
            ("mlp.up_proj", inter, h),
            ("mlp.down_proj", h, inter),
        ];
        let layers: Vec<u64> = (0..cfg.num_hidden_layers)
            .map(|i| {
                let linears: u64 = shapes
                    .iter()
                    .map(|(n, o, k)| linear_bytes(*o, *k, method_of(&format!("model.layers.{i}.{n}")), quant, cb))
                    .sum();
                linears + 2 * h * cb
            })
            .collect();
        let head = h * cb + linear_bytes(vocab, h, method_of("lm_head"), quant, cb);

        let (b, t_all) = (batch as u64, max_seq_len as u64);
        let t = t_all.min(PREFILL_CHUNK as u64);
        let kv_per_layer = 2 * b * t_all * nkv * hd * cb;
        // A 4-bit layer dequantizes its whole weight per call: into the checkpoint dtype, then a
        // copy in the compute dtype.
        let largest = shapes.iter().map(|(_, o, k)| o * k).max().unwrap_or(0);
        let dequant = match quant.method() {
            QuantMethod::FourBit(_) => largest * (dtype_bytes(cfg.dtype.as_deref()) + cb),
            _ => 0,
        };
        // One prefill chunk: residual stream and norm output, q/k/v/attention output, the MLP's
        // gate, up and product, f32 attention scores and probabilities against the whole context,
        // and keys/values repeated to all query heads.
        let hidden = 3 * b * t * h * cb;
        let qkv = 2 * b * t * (nh + 2 * nkv) * hd * cb;
        let mlp = 3 * b * t * inter * cb;
        let scores = 2 * b * nh * t * t_all * 4;
        let repeated = 2 * b * nh * t_all * hd * cb;
        let layer_reserve = dequant + hidden + qkv.max(mlp) + scores + repeated;
        // Logits of the last position in f32, plus their compute-dtype original.
        let head_reserve = b * vocab * (4 + cb) + match method_of("lm_head") {
            QuantMethod::FourBit(_) => vocab * h * (dtype_bytes(cfg.dtype.as_deref()) + cb),
            _ => 0,
        };
        Self { embed: vocab * h * cb, layers, head, kv_per_layer, layer_reserve, head_reserve, max_seq_len, batch }
    }

    /// Total weight bytes.
    pub fn weight_bytes(&self) -> u64 {
        self.embed + self.layers.iter().sum::<u64>() + self.head
    }
}

//! Generation settings and results.

use candle_transformers::generation::{LogitsProcessor, Sampling};
use nibble_core::{Error, Result};

/// How to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most new tokens to produce.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f64,
    /// Keep only the k most likely tokens (after temperature).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p.
    pub top_p: Option<f64>,
    /// Divides positive logits (multiplies negative ones) of tokens already in the context; 1 = off.
    pub repetition_penalty: f32,
    /// Sampling seed.
    pub seed: u64,
    /// Stop at any of the model's eos ids.
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self::greedy(256)
    }
}

impl GenerateOptions {
    /// Greedy decoding of up to `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 299_792_458,
            stop_at_eos: true,
        }
    }

    /// Sampling at `temperature`.
    pub fn sampled(max_new_tokens: usize, temperature: f64, seed: u64) -> Self {
        Self { temperature, seed, ..Self::greedy(max_new_tokens) }
    }

    /// Checks ranges; each error names the argument.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::invalid_argument("temperature", format!("{} must be >= 0 (0 = greedy)", self.temperature)));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::invalid_argument("top_p", format!("{p} must be in (0, 1]")));
            }
        }
        if self.top_k == Some(0) {
            return Err(Error::invalid_argument("top_k", "must be at least 1"));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(Error::invalid_argument(
                "repetition_penalty",
                format!("{} must be > 0 (1 = off)", self.repetition_penalty),
            ));
        }
        Ok(())
    }

    pub(crate) fn logits_processor(&self) -> LogitsProcessor {
        let temperature = self.temperature;
        let sampling = if temperature == 0.0 {
            Sampling::ArgMax
        } else {
            match (self.top_k, self.top_p) {
                (None, None) => Sampling::All { temperature },
                (Some(k), None) => Sampling::TopK { k, temperature },
                (None, Some(p)) => Sampling::TopP { p, temperature },
                (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
            }
        };
        LogitsProcessor::from_sampling(self.seed, sampling)
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced this eos id.
    Eos(u32),
    /// `max_new_tokens` were produced.
    MaxTokens,
    /// The prompt and the new tokens filled the context the model was planned for
    /// ([`crate::Model::context_len`]).
    ContextFull,
}

/// The outcome of a generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Number of prompt tokens.
    pub prompt_tokens: usize,
    /// Of those, the leading ones whose keys and values a session already held (not prefilled
    /// again; 0 without a session).
    pub cached_tokens: usize,
    /// The new tokens (an eos that stopped generation included).
    pub tokens: Vec<u32>,
    /// The new text (special tokens left out).
    pub text: String,
    /// Why it stopped.
    pub stop: StopReason,
    /// Seconds spent on the prompt (prefill, up to the first new token).
    pub prefill_secs: f64,
    /// Seconds spent producing the remaining tokens.
    pub decode_secs: f64,
}

impl Generation {
    /// Decode speed: tokens after the first, per second.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1) as f64;
        if self.decode_secs > 0.0 { n / self.decode_secs } else { 0.0 }
    }
}

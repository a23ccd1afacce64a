//! What every front end prints besides the model's text: logging setup, run statistics and
//! errors. Everything here goes to stderr so stdout carries only the model's output.

use std::process::ExitCode;

use nibble::{BitsAndBytesConfig, Generation, Model, QuantMethod, QuantType};
use tracing_subscriber::EnvFilter;

/// Sends `tracing` output to stderr, filtered by `RUST_LOG` (default `warn`).
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    // try_init: a second call (tests, embedding) must not panic.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Generation statistics summed over one or more turns.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Generations added (chat turns answered).
    pub turns: usize,
    /// New tokens generated.
    pub tokens: usize,
    /// Tokens after the first of each turn: the ones `decode_secs` was spent on.
    pub decode_tokens: usize,
    /// Seconds of decoding.
    pub decode_secs: f64,
    /// Seconds of prefill.
    pub prefill_secs: f64,
    /// Prompt tokens prefilled (the ones a session did not hold already).
    pub prefilled_tokens: usize,
    /// Prompt tokens whose keys and values were reused from earlier turns.
    pub cached_tokens: usize,
}

impl Stats {
    /// Adds one generation.
    pub fn add(&mut self, g: &Generation) {
        self.turns += 1;
        self.tokens += g.tokens.len();
        self.decode_tokens += g.tokens.len().saturating_sub(1);
        self.decode_secs += g.decode_secs;
        self.prefill_secs += g.prefill_secs;
        self.prefilled_tokens += g.prompt_tokens.saturating_sub(g.cached_tokens);
        self.cached_tokens += g.cached_tokens;
    }

    /// Decode tokens per second over all turns; the same figure as
    /// [`Generation::decode_tokens_per_sec`] for a single turn.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        if self.decode_secs > 0.0 {
            self.decode_tokens as f64 / self.decode_secs
        } else {
            0.0
        }
    }

    /// Prefilled prompt tokens per second (to the first new token, which the prefill's logits
    /// give).
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        if self.prefill_secs > 0.0 {
            self.prefilled_tokens as f64 / self.prefill_secs
        } else {
            0.0
        }
    }

    /// Prints the statistics and the model's resident weight size to stderr.
    pub fn print(&self, model: &Model) {
        let bytes = model.resident_weight_bytes();
        // A single turn is the common case (generate, one-shot chat): no need to say so.
        if self.turns != 1 {
            eprintln!("turns answered:   {}", self.turns);
        }
        // The figures `nibble-bench` reports, so that the CLI reproduces a row.
        eprintln!("prompt tokens:    {}", self.prefilled_tokens + self.cached_tokens);
        eprintln!("generated tokens: {}", self.tokens);
        eprintln!("prefill speed:    {:.2} tokens/s ({:.3} s)", self.prefill_tokens_per_sec(), self.prefill_secs);
        eprintln!("decode speed:     {:.2} tokens/s", self.decode_tokens_per_sec());
        if self.cached_tokens > 0 {
            eprintln!(
                "prompt reuse:     {} prefilled, {} reused from earlier turns",
                self.prefilled_tokens, self.cached_tokens
            );
        }
        eprintln!(
            "resident weights: {:.2} MiB ({bytes} bytes), {}",
            bytes as f64 / (1024.0 * 1024.0),
            quant_label(model.quantization())
        );
    }
}

/// The quantization actually applied, in the CLI's words (`nf4 + double quant, compute f32`):
/// it can differ from `--quant` when the checkpoint is pre-quantized.
pub fn quant_label(q: &BitsAndBytesConfig) -> String {
    let compute = q.bnb_4bit_compute_dtype.as_hf_str();
    match q.method() {
        QuantMethod::None => format!("unquantized, compute {compute}"),
        QuantMethod::Int8 => format!("int8, compute {compute}"),
        QuantMethod::FourBit(t) => {
            let name = match t {
                QuantType::Nf4 => "nf4",
                QuantType::Fp4 => "fp4",
            };
            let dq = if q.bnb_4bit_use_double_quant { " + double quant" } else { "" };
            format!("{name}{dq}, compute {compute}")
        }
    }
}

/// Prints `error: {e}` and its causes to stderr. A cause whose text the message above already
/// contains is skipped: nibble's errors often quote their source in their own message.
pub fn print_error(e: &anyhow::Error) {
    eprintln!("error: {e}");
    let mut shown = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !shown.contains(&text) {
            eprintln!("  caused by: {text}");
        }
        shown = text;
    }
}

/// The process exit code of a run: success, or failure after printing the error.
pub fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}

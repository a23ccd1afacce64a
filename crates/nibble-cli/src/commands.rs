//! The `nibble` command line: [`Cli`], its subcommands, and [`run`].

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::args::ModelArgs;
use crate::chat::{self, ChatArgs};
use crate::report::{quant_label, Stats};
use crate::serve::{self, ServeArgs};
use crate::tools::{self, ImportGgufArgs, PlanArgs, QuantizeArgs};

/// Run Hugging Face Llama models quantized on load (bitsandbytes NF4, FP4, LLM.int8()).
#[derive(Debug, Parser)]
#[command(name = "nibble", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Chat with the model in the terminal, or answer one --prompt.
    Chat(ChatArgs),
    /// Continue a prompt (no chat template).
    Generate(GenerateArgs),
    /// Perplexity of the model on a text file.
    Perplexity(PerplexityArgs),
    /// Where each layer would go and whether it fits, before any weight is read.
    Plan(PlanArgs),
    /// What this build and machine can run.
    Doctor,
    /// Quantize a model and save it in the bitsandbytes checkpoint layout.
    Quantize(QuantizeArgs),
    /// Convert a Llama GGUF file to a Hugging Face folder (bf16 safetensors).
    ImportGguf(ImportGgufArgs),
    /// Serve the model over an OpenAI-compatible HTTP API, batching concurrent requests.
    Serve(ServeArgs),
}

/// Flags of `nibble generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Model and generation flags.
    #[command(flatten)]
    pub model: ModelArgs,

    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
}

/// Flags of `nibble perplexity`. `--max-tokens` (from the model flags) is how many tokens of the
/// file are scored.
#[derive(Debug, Clone, Args)]
#[command(mut_arg("max_tokens", |a| a.help("Tokens of the file to score (from its start)")))]
pub struct PerplexityArgs {
    /// Model flags.
    #[command(flatten)]
    pub model: ModelArgs,

    /// UTF-8 text file to score.
    #[arg(long)]
    pub file: PathBuf,
}

/// Runs a parsed command line.
pub fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Chat(args) => chat::run(args),
        Command::Generate(args) => generate(args),
        Command::Perplexity(args) => perplexity(args),
        Command::Plan(args) => tools::plan(args),
        Command::Doctor => tools::doctor(),
        Command::Quantize(args) => tools::quantize(args),
        Command::ImportGguf(args) => tools::import_gguf(args),
        Command::Serve(args) => serve::run(args),
    }
}

/// `nibble generate`: streams the continuation to stdout.
fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let opts = args.model.generate_options()?;
    let model = args.model.load()?;
    let mut out = io::stdout().lock();
    let mut write_error = None;
    let generation = model.generate_text(&args.prompt, &opts, |piece| {
        // The callback cannot fail, so keep the first write error for after generation.
        if write_error.is_none() {
            write_error = out.write_all(piece.as_bytes()).and_then(|()| out.flush()).err();
        }
    })?;
    if let Some(e) = write_error {
        return Err(e).context("writing the output");
    }
    writeln!(out).context("writing the output")?;
    let mut stats = Stats::default();
    stats.add(&generation);
    stats.print(&model);
    Ok(())
}

/// `nibble perplexity`: the figure is the last line of stdout, so scripts can take the last number.
fn perplexity(args: &PerplexityArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let model = args.model.load()?;
    let scored = model.tokenizer()?.encode(&text, true)?.len().min(args.model.max_tokens);
    eprintln!("scoring {scored} tokens of {} ({})", args.file.display(), quant_label(model.quantization()));
    let ppl = model.perplexity(&text, args.model.max_tokens)?;
    // writeln rather than println: a closed pipe is an error to report, not a panic.
    writeln!(io::stdout(), "perplexity: {ppl:.4}").context("writing the output")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--ignore-eos` turns the eos stop off; by default it is on.
    #[test]
    fn ignore_eos_turns_the_eos_stop_off() {
        let stops = |extra: &[&str]| {
            let mut argv = vec!["nibble", "generate", "--prompt", "x"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Command::Generate(g)) => g.model.generate_options().map(|o| o.stop_at_eos).ok(),
                _ => None,
            }
        };
        assert_eq!(stops(&[]), Some(true));
        assert_eq!(stops(&["--ignore-eos"]), Some(false));
    }
}

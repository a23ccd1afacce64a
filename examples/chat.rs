//! Chat with a quantized model in the terminal: the same chat as `nibble chat`, from the
//! `nibble-cli` library.
//!
//! ```text
//! cargo run --release --example chat                                   # default model, NF4
//! cargo run --release --example chat -- --model models/smollm2-135m-instruct --quant int8
//! cargo run --release --example chat -- --prompt "What is 2 + 2?" --temperature 0
//! cargo run --release --example chat -- --help                         # every flag
//! ```
//!
//! In the chat, `/reset` clears the conversation and `/exit` (or Ctrl-D) quits.

use std::process::ExitCode;

use clap::Parser;
use nibble_cli::{chat, exit_code, init_tracing, ChatArgs};

/// Chat with a Llama model quantized on load.
#[derive(Debug, Parser)]
#[command(name = "chat")]
struct Cli {
    #[command(flatten)]
    chat: ChatArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    exit_code(chat::run(&cli.chat))
}

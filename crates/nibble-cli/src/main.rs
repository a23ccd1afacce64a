//! `nibble`: the command-line tool; see `nibble --help`.

use std::process::ExitCode;

use clap::Parser;
use nibble_cli::{commands, exit_code, init_tracing, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    exit_code(commands::run(&cli))
}

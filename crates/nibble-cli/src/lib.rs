//! The library part of the `nibble` command-line tool: the shared model flags ([`args::ModelArgs`]),
//! the chat loop ([`chat`]), the subcommands ([`commands`]) and what every front end prints
//! ([`report`]). It is a library so that `examples/chat.rs` runs the very same chat as
//! `nibble chat` instead of a copy of it.

pub mod args;
pub mod chat;
pub mod commands;
pub mod report;
pub mod serve;
pub mod tools;

pub use args::ModelArgs;
pub use chat::ChatArgs;
pub use commands::{Cli, Command};
pub use report::{exit_code, init_tracing};

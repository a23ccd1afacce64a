//! The terminal chat: `nibble chat` and `examples/chat.rs` both run [`run`].

use std::io::{self, BufRead, IsTerminal, Write};

use anyhow::Context;
use clap::Args;
use nibble::{ChatMessage, GenerateOptions, Generation, Model, Session};

use crate::args::ModelArgs;
use crate::report::Stats;

/// Flags of `nibble chat`.
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    /// Model and generation flags.
    #[command(flatten)]
    pub model: ModelArgs,

    /// Answer this one message and exit instead of chatting interactively.
    #[arg(long)]
    pub prompt: Option<String>,

    /// System message that opens the conversation (kept across /reset).
    #[arg(long)]
    pub system: Option<String>,
}

const HELP: &str = "type a message; /reset clears the conversation, /exit (or end of input) quits";

/// A conversation with a model: the history the chat template is applied to, the session whose
/// KV cache holds the turns so far (so a turn prefills only its new messages), plus statistics.
#[derive(Debug)]
pub struct Chat<'m> {
    model: &'m Model,
    opts: GenerateOptions,
    system: Option<String>,
    history: Vec<ChatMessage>,
    session: Session,
    stats: Stats,
    warned_context: bool,
}

impl<'m> Chat<'m> {
    /// A new conversation, opened by `system` when given.
    pub fn new(model: &'m Model, opts: GenerateOptions, system: Option<String>) -> Self {
        let session = model.new_session();
        let mut chat =
            Self { model, opts, system, history: Vec::new(), session, stats: Stats::default(), warned_context: false };
        chat.reset();
        chat
    }

    /// Forgets every turn, keeping the system message.
    pub fn reset(&mut self) {
        self.history.clear();
        self.session.clear();
        if let Some(s) = &self.system {
            self.history.push(ChatMessage::new("system", s.clone()));
        }
        self.warned_context = false;
    }

    /// The conversation so far.
    pub fn history(&self) -> &[ChatMessage] {
        &self.history
    }

    /// Statistics of every turn so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Answers `user`, streaming the reply to `out`. The outer error is a failure to write `out`
    /// (which ends a chat); the inner one is the model's (after which the chat can go on, so the
    /// user message is taken back out of the history).
    fn ask(&mut self, user: &str, out: &mut impl Write) -> io::Result<nibble::Result<Generation>> {
        self.history.push(ChatMessage::new("user", user));
        let mut write_error = None;
        let result = self.model.chat_in(&mut self.session, &self.history, &self.opts, |piece| {
            // The callback cannot fail, so keep the first write error for after generation.
            if write_error.is_none() {
                write_error = out.write_all(piece.as_bytes()).and_then(|()| out.flush()).err();
            }
        });
        let generation = match result {
            Ok(g) => g,
            Err(e) => {
                self.history.pop();
                return Ok(Err(e));
            }
        };
        if let Some(e) = write_error {
            return Err(e);
        }
        writeln!(out)?;
        out.flush()?;
        self.history.push(ChatMessage::new("assistant", generation.text.clone()));
        self.stats.add(&generation);
        self.warn_if_past_context(&generation);
        Ok(Ok(generation))
    }

    /// A reply cut short by a full context is said so once instead of silently (the next turn
    /// would not fit at all).
    fn warn_if_past_context(&mut self, g: &Generation) {
        let limit = self.model.context_len();
        if !self.warned_context && g.stop == nibble::StopReason::ContextFull {
            self.warned_context = true;
            eprintln!("note: the conversation filled the {limit}-token context (--max-seq-len); /reset starts over");
        }
    }

    /// Answers one message, streaming the reply to `out`.
    pub fn turn(&mut self, user: &str, out: &mut impl Write) -> anyhow::Result<Generation> {
        Ok(self.ask(user, out).context("writing the reply")??)
    }

    /// Reads messages from `input` line by line and answers each, until `/exit` or end of input.
    /// `show_prompt` draws a `> ` prompt (for terminals). A model error is reported and the chat
    /// goes on; failing to read input or write output ends it.
    pub fn interactive(&mut self, input: impl BufRead, out: &mut impl Write, show_prompt: bool) -> anyhow::Result<()> {
        let mut lines = input.lines();
        loop {
            if show_prompt {
                write!(out, "> ")?;
                out.flush()?;
            }
            let Some(line) = lines.next() else { break };
            let line = line.context("reading input")?;
            match line.trim() {
                "" => {}
                "/exit" | "/quit" => break,
                "/reset" => {
                    self.reset();
                    eprintln!("(conversation cleared)");
                }
                "/help" => eprintln!("{HELP}"),
                message => {
                    if let Err(e) = self.ask(message, out).context("writing the reply")? {
                        crate::report::print_error(&e.into());
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs `nibble chat`: loads the model, then answers `--prompt` once or chats on stdin.
pub fn run(args: &ChatArgs) -> anyhow::Result<()> {
    let opts = args.model.generate_options()?;
    let model = args.model.load()?;
    // Without a tokenizer there is no chat; say so before waiting for input.
    model.tokenizer()?;
    let mut chat = Chat::new(&model, opts, args.system.clone());
    let mut out = io::stdout().lock();
    match &args.prompt {
        Some(prompt) => {
            chat.turn(prompt, &mut out)?;
        }
        None => {
            let stdin = io::stdin();
            let terminal = stdin.is_terminal();
            if terminal {
                eprintln!("{HELP}");
            }
            chat.interactive(stdin.lock(), &mut out, terminal)?;
        }
    }
    chat.stats().print(&model);
    Ok(())
}

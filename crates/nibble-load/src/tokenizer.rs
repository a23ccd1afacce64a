//! The tokenizer (`tokenizer.json`), its special tokens (`tokenizer_config.json`) and the chat
//! template (`chat_template.jinja`, or the `chat_template` field of `tokenizer_config.json`).

use std::path::{Path, PathBuf};

use nibble_core::{Error, Result};
use serde::Serialize;
use serde_json::Value;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// Fuel of one render (minijinja 3 charges an instruction, an item a filter walks, a byte
/// written): a template comes from a file anyone can write, and `{% for a in range(99999) %}{%
/// for b in range(99999) %}` would otherwise run for hours. Real templates take a few hundred
/// units per message plus its length (see the tokenizer tests), so this allows conversations of
/// thousands of long messages and stops a runaway template in well under a second.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// Bytes one render may produce: far beyond any context, small enough to never exhaust memory.
pub const TEMPLATE_MAX_OUTPUT: usize = 64 << 20;

/// Items (list entries, map keys and values, at every depth) one `{{ ... }}` may print. A list
/// repeated by `*` is lazy in minijinja (up to 10^8 items, charged no fuel), and printing it
/// walks every item even after the output cap has refused the bytes: seconds to minutes (the
/// `chat_template` fuzz target's find). Real templates print strings.
pub const TEMPLATE_MAX_PRINTED_ITEMS: usize = 1 << 16;

/// Refuses to print a value holding more than `budget` items.
fn check_printed_size(v: &minijinja::Value, budget: &mut usize) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    if !matches!(v.kind(), ValueKind::Seq | ValueKind::Map | ValueKind::Iterable | ValueKind::Plain) {
        return Ok(());
    }
    let too_large = || {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("a printed value holds more than {TEMPLATE_MAX_PRINTED_ITEMS} items"),
        )
    };
    if v.len().is_some_and(|n| n > *budget) {
        return Err(too_large());
    }
    let Ok(items) = v.try_iter() else { return Ok(()) };
    let map = v.kind() == ValueKind::Map;
    for item in items {
        *budget = budget.checked_sub(1).ok_or_else(too_large)?;
        if map {
            if let Ok(value) = v.get_item(&item) {
                check_printed_size(&value, budget)?;
            }
        }
        check_printed_size(&item, budget)?;
    }
    Ok(())
}

/// Characters of code (outside string literals and whitespace) one `{{ }}` or `{% %}` tag may
/// hold. minijinja's parser guards the nesting of brackets but not of chains (`- - - x`, `not not
/// x`, `1+1+...`, `a.b.c...`, `x|f|f...`): each link is one more level of recursion in the
/// parser, the code generator and the tree's drop, and 20,000 links overflow a thread's stack
/// (the `chat_template` fuzz target's find). Real tags hold at most a few hundred.
pub const TEMPLATE_MAX_TAG_CODE: usize = 4096;

/// Stack of the thread a template compiles on: [`TEMPLATE_MAX_TAG_CODE`] levels of recursion
/// fit many times over (a level takes well under a kilobyte of it).
const COMPILE_STACK: usize = 64 << 20;

/// Refuses a template with a tag of more than [`TEMPLATE_MAX_TAG_CODE`] characters of code.
fn check_tag_code(source: &str) -> Result<()> {
    let b = source.as_bytes();
    let mut i = 0;
    while i + 1 < b.len() {
        let close: &[u8] = match (b[i], b[i + 1]) {
            (b'{', b'{') => b"}}",
            (b'{', b'%') => b"%}",
            (b'{', b'#') => b"#}",
            _ => {
                i += 1;
                continue;
            }
        };
        let comment = close == b"#}";
        i += 2;
        let mut code = 0usize;
        while i < b.len() && !b[i..].starts_with(close) {
            match b[i] {
                q @ (b'\'' | b'"') if !comment => {
                    // A string literal: skipped to its closing quote (escapes included).
                    i += 1;
                    while i < b.len() && b[i] != q {
                        i += if b[i] == b'\\' { 2 } else { 1 };
                    }
                }
                c if !comment && !c.is_ascii_whitespace() => {
                    code += 1;
                    if code > TEMPLATE_MAX_TAG_CODE {
                        return Err(Error::ChatTemplate {
                            reason: format!("a tag holds more than {TEMPLATE_MAX_TAG_CODE} characters of code"),
                        });
                    }
                }
                _ => {}
            }
            i += 1;
        }
        i += 2;
    }
    Ok(())
}

/// A writer that refuses to grow past [`TEMPLATE_MAX_OUTPUT`].
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len().saturating_add(buf.len()) > TEMPLATE_MAX_OUTPUT {
            return Err(std::io::Error::other(format!("the output passed {TEMPLATE_MAX_OUTPUT} bytes")));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A model's chat template, rendered with minijinja and Python-compatible string methods.
#[derive(Debug)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
}

impl ChatTemplate {
    /// Compiles `source`.
    pub fn new(source: String) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        // transformers compiles chat templates with `trim_blocks` and `lstrip_blocks`: a block tag
        // swallows the newline after it and the indentation before it. Templates written over
        // several indented lines (Qwen2's, say) rely on it.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::ChatTemplate { reason: format!("the template syntax: {e}") })?;
        env.set_syntax(syntax);
        // HF templates call Python string methods (`.strip()`, `.startswith()`...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // minijinja's own recursion limit (500) stays; loops are bounded by fuel.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_formatter(|out, state, value| {
            let mut budget = TEMPLATE_MAX_PRINTED_ITEMS;
            check_printed_size(value, &mut budget)?;
            minijinja::escape_formatter(out, state, value)
        });
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        check_tag_code(&source)?;
        // Compiled on a thread with a stack sized for the deepest chain a tag may hold.
        let compiled = std::thread::scope(|scope| {
            let job = std::thread::Builder::new()
                .stack_size(COMPILE_STACK)
                .spawn_scoped(scope, move || env.add_template_owned("chat", source).map(|()| env).map_err(|e| e.to_string()));
            match job {
                Ok(handle) => handle.join().unwrap_or_else(|_| Err("the template compiler panicked".into())),
                Err(e) => Err(format!("cannot start the compiling thread: {e}")),
            }
        });
        let env = compiled.map_err(|e| Error::ChatTemplate { reason: format!("the template does not compile: {e}") })?;
        Ok(Self { env })
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant speaks.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| Error::ChatTemplate { reason: e.to_string() })?;
        let mut out = Capped(Vec::new());
        // minijinja has integer arithmetic that overflows on hostile slices (found by the
        // `chat_template` fuzz target: `x[1:5:-1]` subtracts past zero); where overflow checks
        // are on (debug builds) that is a panic, caught here and reported as the template's error.
        let rendered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tmpl.render_captured_to(
                minijinja::context! {
                    messages => minijinja::value::Serde(messages),
                    add_generation_prompt => add_generation_prompt,
                    bos_token => bos_token,
                    eos_token => eos_token,
                },
                &mut out,
            )
        }))
        .map_err(|_| Error::ChatTemplate { reason: "rendering failed: the template engine panicked".into() })?;
        rendered.map_err(|e| Error::ChatTemplate { reason: format!("rendering failed: {e}") })?;
        String::from_utf8(out.0).map_err(|e| Error::ChatTemplate { reason: format!("the output is not UTF-8: {e}") })
    }
}

/// A tokenizer with the model's special tokens and chat template.
#[derive(Debug)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// The bos token text, when the model has one.
    pub bos_token: Option<String>,
    /// The eos token text, when the model has one.
    pub eos_token: Option<String>,
    /// The chat template, when the model has one.
    pub chat_template: Option<ChatTemplate>,
}

/// `tokenizer_config.json` writes special tokens as a string or as `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The `chat_template` field: a string, or a list of `{name, template}` (the `default` one wins).
fn template_from_config(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => {
            let named = |n: &str| {
                items.iter().find(|t| t.get("name").and_then(Value::as_str) == Some(n))
            };
            named("default")
                .or(items.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string)
        }
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, with special tokens and chat template from the optional files.
    pub fn from_files(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
        chat_template_file: Option<&Path>,
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| Error::Tokenizer {
            path: tokenizer_json.to_path_buf(),
            reason: e.to_string(),
        })?;
        let cfg: Value = match tokenizer_config {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                serde_json::from_str(&text).map_err(|e| Error::InvalidConfig {
                    path: p.to_path_buf(),
                    field: "<root>".into(),
                    reason: format!("not valid JSON: {e}"),
                })?
            }
            None => Value::Null,
        };
        let template_source = match chat_template_file {
            Some(p) if p.extension().is_some_and(|e| e == "json") => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                let v: Value = serde_json::from_str(&text)
                    .map_err(|e| Error::ChatTemplate { reason: format!("{}: not valid JSON: {e}", p.display()) })?;
                template_from_config(v.get("chat_template"))
            }
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?),
            None => template_from_config(cfg.get("chat_template")),
        };
        Ok(Self {
            inner,
            path: tokenizer_json.to_path_buf(),
            bos_token: token_text(cfg.get("bos_token")),
            eos_token: token_text(cfg.get("eos_token")),
            chat_template: template_source.map(ChatTemplate::new).transpose()?,
        })
    }

    /// Wraps an in-memory tokenizer (one rebuilt from a GGUF file, say) with its special tokens and
    /// chat template source; `path` is the file it came from, named in errors.
    pub fn from_tokenizer(
        inner: tokenizers::Tokenizer,
        path: &Path,
        bos_token: Option<String>,
        eos_token: Option<String>,
        chat_template: Option<String>,
    ) -> Result<Self> {
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            bos_token,
            eos_token,
            chat_template: chat_template.map(ChatTemplate::new).transpose()?,
        })
    }

    /// Token ids of `text`; `add_special_tokens` adds what the tokenizer's post-processor adds
    /// (a bos, for Llama).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), reason: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), reason: e.to_string() })
    }

    /// The id of a token's text, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders a conversation with the model's template and tokenizes it (no extra special
    /// tokens: the template writes them, as `apply_chat_template` does).
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let tmpl = self.chat_template.as_ref().ok_or_else(|| Error::ChatTemplate {
            reason: "the model has no chat template (chat_template.jinja or tokenizer_config.json's \
                     `chat_template`); use plain generation instead"
                .into(),
        })?;
        let text = tmpl.render(
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )?;
        self.encode(&text, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_tags_trim_as_transformers_does() {
        // jinja2 with trim_blocks and lstrip_blocks (transformers' settings) renders "U:a\nU:c\n".
        let source = "{% for m in messages %}\n  {% if m.role == 'user' %}\nU:{{ m.content }}\n  {% endif %}\n{% endfor %}";
        let tmpl = ChatTemplate::new(source.to_string()).unwrap();
        let messages = [ChatMessage::new("user", "a"), ChatMessage::new("x", "b"), ChatMessage::new("user", "c")];
        assert_eq!(tmpl.render(&messages, false, "", "").unwrap(), "U:a\nU:c\n");
    }

    /// Hostile templates end in an error, quickly: a loop of 10^10 steps (fuel), unbounded
    /// macro recursion (minijinja's limit), an output of gigabytes (the output cap), a list
    /// repeated 7.8 * 10^13 times (the `chat_template` fuzz target's hang under minijinja 2,
    /// whose lazy repetition had no bound; minijinja 3 refuses sequences past 10^8 items).
    #[test]
    fn runaway_templates_end_in_an_error() {
        let messages = [ChatMessage::new("user", "hi")];
        for source in [
            "{% for a in range(99999) %}{% for b in range(99999) %}{{ a }}{% endfor %}{% endfor %}",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "{% for a in range(99999) %}{{ 'x' * 99999999 }}{% endfor %}",
            "{E{{['ontent'] *77733379653924 }}\n'}}co|",
            "{{ (['x'] * 99999999) | join }}",
            "{{ ['ontent'] * 55554 * 924 }}",
            "{{ [(['x'] * 9999999)] }}",
        ] {
            let started = std::time::Instant::now();
            let tmpl = ChatTemplate::new(source.to_string()).unwrap();
            let err = tmpl.render(&messages, true, "", "").unwrap_err();
            assert!(matches!(err, Error::ChatTemplate { .. }), "{source}: {err}");
            assert!(started.elapsed().as_secs() < 20, "{source} took {:?}", started.elapsed());
        }
    }

    /// Chains of 20,000 links in one tag overflowed the stack inside minijinja's parser (the
    /// fuzz target's find: 22,244 `-` in a row): refused before parsing; chains up to the limit
    /// compile, on a test thread's small stack too, and render.
    #[test]
    fn deep_chains_are_refused_or_compiled_never_a_stack_overflow() {
        let messages = [ChatMessage::new("user", "hi")];
        for (link, n) in [("-", 20_000), ("not ", 20_000), ("+1", 20_000), (".a", 20_000), ("|trim", 20_000)] {
            let source = match link {
                "-" | "not " => format!("{{{{ {}1 }}}}", link.repeat(n)),
                _ => format!("{{{{ x{} }}}}", link.repeat(n)),
            };
            let err = ChatTemplate::new(source).unwrap_err();
            assert!(err.to_string().contains("characters of code"), "{link}: {err}");
        }
        let deep = format!("{{{{ {}1 }}}}", "-".repeat(TEMPLATE_MAX_TAG_CODE - 1));
        assert_eq!(ChatTemplate::new(deep).unwrap().render(&messages, true, "", "").unwrap(), "-1");
        // Long string literals and comments are not code.
        let long = format!("{{% set s = '{}' %}}{{# {} #}}{{{{ s | length }}}}", "x".repeat(50_000), "y".repeat(50_000));
        assert_eq!(ChatTemplate::new(long).unwrap().render(&messages, true, "", "").unwrap(), "50000");
    }

    /// A slice minijinja's arithmetic overflows on (the `chat_template` fuzz target's find) is
    /// an answer or a typed error, never a panic, in debug builds (overflow checks on) too.
    #[test]
    fn overflowing_slices_are_not_a_panic() {
        let messages = [ChatMessage::new("user", "hi"), ChatMessage::new("user", "ho")];
        for source in ["{{ messages[0:5:-1] }}", "{{ 'abc'[1:9:-2] }}"] {
            let tmpl = ChatTemplate::new(source.to_string()).unwrap();
            match tmpl.render(&messages, true, "", "") {
                Ok(text) => eprintln!("{source}: {text:?}"),
                Err(e) => {
                    eprintln!("{source}: {e}");
                    assert!(matches!(e, Error::ChatTemplate { .. }), "{source}: {e}");
                }
            }
        }
    }

    /// The fuel is far above what real templates need: each tiny model's template (Llama,
    /// Mistral, Qwen2, Phi-3) renders a conversation of 2,000 messages.
    #[test]
    fn real_templates_render_long_conversations_within_the_fuel() {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        // 2,000 messages of 200 bytes: 400 KB, a 100,000-token conversation.
        let messages: Vec<ChatMessage> = (0..2000)
            .map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, format!("message {i} {}", "x".repeat(188))))
            .collect();
        for name in ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-phi3"] {
            let source = std::fs::read_to_string(models.join(name).join("chat_template.jinja")).unwrap();
            let out = ChatTemplate::new(source).unwrap().render(&messages, true, "<s>", "</s>").unwrap();
            assert!(out.contains("message 1999"), "{name}");
        }
    }
}

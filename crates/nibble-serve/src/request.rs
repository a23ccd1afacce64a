//! Parsing and validating OpenAI request bodies. Every wrong type or value is a 400 naming the
//! field, found before anything reaches the engine.

use nibble::{ChatMessage, GenerateOptions};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// What to continue: chat messages (through the chat template) or a prompt.
#[derive(Debug, Clone)]
pub enum Input {
    /// `messages` of a chat completion.
    Messages(Vec<ChatMessage>),
    /// `prompt` as text.
    Text(String),
    /// `prompt` as token ids.
    Tokens(Vec<u32>),
}

/// A validated request.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// `model`, when given.
    pub model: Option<String>,
    /// The input.
    pub input: Input,
    /// `max_tokens` / `max_completion_tokens`, when given.
    pub max_tokens: Option<usize>,
    /// Sampling (its `max_new_tokens` is set once the prompt length is known).
    pub opts: GenerateOptions,
    /// `stop`.
    pub stop: Vec<String>,
    /// `presence_penalty`.
    pub presence_penalty: f32,
    /// `frequency_penalty`.
    pub frequency_penalty: f32,
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

/// Parses a chat completion (`chat`) or completion body.
pub fn parse(body: &[u8], chat: bool) -> Result<Parsed, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}"), "invalid_json"))?;
    let Value::Object(o) = v else {
        return Err(ApiError::bad_request("the body must be a JSON object", "invalid_json"));
    };
    let f = Fields(&o);
    // Fields whose meaning nibble does not implement: refused by name rather than ignored.
    for name in ["tools", "tool_choice", "functions", "function_call", "logit_bias", "suffix"] {
        if f.present(name) {
            return Err(ApiError::invalid(name, format!("`{name}` is not supported by nibble")));
        }
    }
    // `logprobs` is a boolean in chat completions and a count in completions: either way only
    // "off" is accepted.
    for name in ["logprobs", "top_logprobs"] {
        if f.present(name) && o.get(name) != Some(&Value::Bool(false)) {
            return Err(ApiError::invalid(name, format!("`{name}` is not supported by nibble")));
        }
    }
    if f.bool("echo")?.unwrap_or(false) {
        return Err(ApiError::invalid("echo", "`echo` is not supported by nibble"));
    }
    if let Some(n) = f.uint("n")? {
        if n != 1 {
            return Err(ApiError::invalid("n", format!("`n` = {n}: only one choice per request is supported")));
        }
    }
    if let Some(n) = f.uint("best_of")? {
        if n != 1 {
            return Err(ApiError::invalid("best_of", format!("`best_of` = {n}: only 1 is supported")));
        }
    }
    if let Some(Value::Object(rf)) = o.get("response_format") {
        if rf.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::invalid("response_format", "only `{\"type\": \"text\"}` is supported"));
        }
    }
    let input = if chat { Input::Messages(messages(&o)?) } else { prompt(&o)? };
    let model = f.string("model")?;
    let max_tokens = match f.uint("max_completion_tokens")? {
        Some(n) => Some(n),
        None => f.uint("max_tokens")?,
    };
    if max_tokens == Some(0) {
        let name = if f.present("max_completion_tokens") { "max_completion_tokens" } else { "max_tokens" };
        return Err(ApiError::invalid(name, format!("`{name}` must be at least 1")));
    }
    let temperature = f.number("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("temperature", format!("`temperature` = {temperature} must be in [0, 2]")));
    }
    let top_p = f.number("top_p")?;
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid("top_p", format!("`top_p` = {p} must be in (0, 1]")));
        }
    }
    let top_k = f.uint("top_k")?;
    if top_k == Some(0) {
        return Err(ApiError::invalid("top_k", "`top_k` must be at least 1"));
    }
    let seed = f.int("seed")?;
    let penalty = |name: &str| -> Result<f32, ApiError> {
        let v = f.number(name)?.unwrap_or(0.0);
        if !(-2.0..=2.0).contains(&v) {
            return Err(ApiError::invalid(name, format!("`{name}` = {v} must be in [-2, 2]")));
        }
        Ok(v as f32)
    };
    let presence_penalty = penalty("presence_penalty")?;
    let frequency_penalty = penalty("frequency_penalty")?;
    let stop = match o.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            if a.len() > 4 {
                return Err(ApiError::invalid("stop", "`stop` takes at most 4 sequences"));
            }
            a.iter()
                .map(|s| s.as_str().map(str::to_string).ok_or_else(|| ApiError::invalid("stop", "`stop` must be a string or a list of strings")))
                .collect::<Result<_, _>>()?
        }
        Some(_) => return Err(ApiError::invalid("stop", "`stop` must be a string or a list of strings")),
    };
    let stream = f.bool("stream")?.unwrap_or(false);
    // An extension (llama.cpp's and vLLM's name): generate exactly `max_tokens`, past any eos.
    let ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
    let include_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(so)) => Fields(so).bool("include_usage")?.unwrap_or(false),
        Some(_) => return Err(ApiError::invalid("stream_options", "`stream_options` must be an object")),
    };
    let opts = GenerateOptions {
        max_new_tokens: 0,
        temperature,
        top_k,
        top_p,
        repetition_penalty: 1.0,
        // A fixed default keeps unseeded requests reproducible, as `nibble generate` is.
        seed: seed.map_or(299_792_458, |s| s as u64),
        stop_at_eos: !ignore_eos,
    };
    Ok(Parsed { model, input, max_tokens, opts, stop, presence_penalty, frequency_penalty, stream, include_usage })
}

/// `messages`: a non-empty list of `{role, content}`, content a string or a list of text parts.
fn messages(o: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(Value::Array(list)) = o.get("messages") else {
        return Err(ApiError::invalid("messages", "`messages` must be a list of messages"));
    };
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must not be empty"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |what: &str| ApiError::invalid(format!("messages[{i}]"), format!("`messages[{i}]`: {what}"));
            let Value::Object(m) = m else { return Err(at("must be an object")) };
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| at("`role` must be a string"))?;
            if !matches!(role, "system" | "developer" | "user" | "assistant") {
                return Err(at(&format!("role `{role}` is not supported (system, developer, user, assistant)")));
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => return Err(at("only text content parts are supported")),
                        }
                    }
                    text
                }
                Some(Value::Null) | None => String::new(),
                Some(_) => return Err(at("`content` must be a string or a list of text parts")),
            };
            // OpenAI's newer "developer" role is the system role of older templates.
            let role = if role == "developer" { "system" } else { role };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// `prompt`: a string, a list of one string, or a list of token ids.
fn prompt(o: &Map<String, Value>) -> Result<Input, ApiError> {
    let bad = || ApiError::invalid("prompt", "`prompt` must be a string, a list of one string or a list of token ids");
    match o.get("prompt") {
        Some(Value::String(s)) => Ok(Input::Text(s.clone())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => Ok(Input::Text(a[0].as_str().unwrap_or("").to_string())),
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => a
            .iter()
            .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(bad))
            .collect::<Result<_, _>>()
            .map(Input::Tokens),
        Some(Value::Array(a)) if a.len() > 1 && a.iter().all(Value::is_string) => {
            Err(ApiError::invalid("prompt", "several prompts in one request are not supported; send one each"))
        }
        _ => Err(bad()),
    }
}

/// Typed reads of optional fields; `null` counts as absent, a wrong type is a 400 naming it.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn present(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    fn wrong(name: &str, what: &str) -> ApiError {
        ApiError::invalid(name, format!("`{name}` must be {what}"))
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        self.get(name).map(|v| v.as_bool().ok_or_else(|| Self::wrong(name, "a boolean"))).transpose()
    }

    fn string(&self, name: &str) -> Result<Option<String>, ApiError> {
        self.get(name).map(|v| v.as_str().map(str::to_string).ok_or_else(|| Self::wrong(name, "a string"))).transpose()
    }

    fn number(&self, name: &str) -> Result<Option<f64>, ApiError> {
        self.get(name).map(|v| v.as_f64().ok_or_else(|| Self::wrong(name, "a number"))).transpose()
    }

    fn uint(&self, name: &str) -> Result<Option<usize>, ApiError> {
        self.get(name)
            .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| Self::wrong(name, "a non-negative integer")))
            .transpose()
    }

    fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.get(name).map(|v| v.as_i64().ok_or_else(|| Self::wrong(name, "an integer"))).transpose()
    }
}

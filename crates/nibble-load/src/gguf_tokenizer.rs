//! The tokenizer of a GGUF file, rebuilt as a Hugging Face `tokenizer.json` document.
//!
//! One JSON document is both what `import_gguf` writes to disk and what a direct GGUF load parses,
//! so the two paths cannot tokenize differently. It is built from `tokenizer.ggml.tokens`,
//! `tokenizer.ggml.merges` and `tokenizer.ggml.token_type` (control and unknown tokens become
//! special added tokens, user-defined ones plain added tokens, and llama.cpp's unused `[PAD…]`
//! fillers plain vocabulary, as transformers' GGUF loader has them), with the pre-tokenizer and
//! normalizer that `tokenizer.ggml.pre` names. Only byte-level BPE (`tokenizer.ggml.model` =
//! `gpt2`) is built, and only the pre-tokenizers listed in [`SUPPORTED_PRE`]: an unknown one would
//! split text differently than the model was trained on and still "work", so it is refused.

use std::collections::HashSet;
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value as GValue;
use nibble_core::{Error, Result};
use serde_json::{json, Map, Value};

use crate::gguf::GgufFile;
use crate::tokenizer::TextTokenizer;

/// The `tokenizer.ggml.pre` values nibble implements.
pub const SUPPORTED_PRE: [&str; 3] = ["smollm", "gpt2", "qwen2"];

/// Qwen2's split (its tokenizer.json, transformers' `Qwen2Tokenizer` and llama.cpp's
/// `LLAMA_VOCAB_PRE_TYPE_QWEN2` agree): GPT-4-like, but every digit alone (`\p{N}`, not
/// `\p{N}{1,3}`) and case-insensitive contractions.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A GGUF file's tokenizer in Hugging Face form, with its special tokens and chat template.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// The `tokenizer.json` document.
    pub json: Value,
    /// The bos token text (`tokenizer.ggml.bos_token_id`), when given.
    pub bos_token: Option<String>,
    /// The eos token text (`tokenizer.ggml.eos_token_id`), when given.
    pub eos_token: Option<String>,
    /// The unknown token text, when given.
    pub unk_token: Option<String>,
    /// The padding token text, when given.
    pub pad_token: Option<String>,
    /// The bos id, when given.
    pub bos_token_id: Option<u32>,
    /// The eos id, when given.
    pub eos_token_id: Option<u32>,
    /// The padding id, when given.
    pub pad_token_id: Option<u32>,
    /// Whether encoding with special tokens prepends bos (`tokenizer.ggml.add_bos_token`).
    pub add_bos_token: bool,
    /// Whether encoding with special tokens appends eos (`tokenizer.ggml.add_eos_token`).
    pub add_eos_token: bool,
    /// The chat template (`tokenizer.chat_template`), when given.
    pub chat_template: Option<String>,
    /// Every special (control or unknown) token, by id.
    pub special_tokens: Vec<(u32, String)>,
    /// The longest context (`llama.context_length`), for `model_max_length`.
    pub model_max_length: Option<u64>,
}

fn invalid(path: &Path, field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidConfig { path: path.to_path_buf(), field: field.into(), reason: reason.into() }
}

fn byte_level(add_prefix_space: bool, trim_offsets: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets, "use_regex": true})
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` value, as the model's original tokenizer.json has it.
fn pre_tokenizer(pre: &str) -> Option<Value> {
    match pre {
        // SmolLM's (StarCoder's) tokenizer: every digit alone, then GPT-2's byte-level regex split.
        "smollm" => Some(json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(false, true)]
        })),
        "gpt2" => Some(byte_level(false, true)),
        // The regex does the splitting, so ByteLevel only maps bytes to its alphabet.
        "qwen2" => Some(json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
            ]
        })),
        _ => None,
    }
}

/// The normalizer for a `tokenizer.ggml.pre` value, as the model's original tokenizer.json has it.
///
/// Qwen2's tokenizer.json composes text to NFC before splitting. A GGUF does not record it, and
/// llama.cpp and transformers' GGUF loader leave it out, but the model was trained on NFC text: a
/// decomposed "é" (`e` + U+0301) would otherwise become byte tokens it rarely saw. NFC text, which
/// is nearly all text, tokenizes the same either way.
fn normalizer(pre: &str) -> Value {
    match pre {
        "qwen2" => json!({"type": "NFC"}),
        _ => Value::Null,
    }
}

/// A merge rule `"a b"` as the pair `[a, b]`; the split is at the first space after the first
/// character, as llama.cpp reads it (a token may itself be a space in other encodings).
fn split_merge(rule: &str) -> Option<(&str, &str)> {
    let first = rule.chars().next()?.len_utf8();
    let at = rule.get(first..)?.find(' ')? + first;
    Some((rule.get(..at)?, rule.get(at + 1..)?))
}

fn strings<'a>(values: &'a [GValue], path: &Path, key: &str) -> Result<Vec<&'a str>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            GValue::String(s) => Ok(s.as_str()),
            _ => Err(invalid(path, key, format!("entry {i} is not a string"))),
        })
        .collect()
}

fn integer(v: &GValue) -> Option<i64> {
    match v {
        GValue::I8(x) => Some(i64::from(*x)),
        GValue::U8(x) => Some(i64::from(*x)),
        GValue::I16(x) => Some(i64::from(*x)),
        GValue::U16(x) => Some(i64::from(*x)),
        GValue::I32(x) => Some(i64::from(*x)),
        GValue::U32(x) => Some(i64::from(*x)),
        GValue::I64(x) => Some(*x),
        GValue::U64(x) => i64::try_from(*x).ok(),
        _ => None,
    }
}

impl GgufTokenizer {
    /// Builds the tokenizer of `gguf`.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let path = gguf.path();
        let model = gguf.meta_str("tokenizer.ggml.model")?.unwrap_or("");
        if model != "gpt2" {
            return Err(Error::UnsupportedConfig {
                path: path.to_path_buf(),
                field: "tokenizer.ggml.model".into(),
                value: format!("{model:?}"),
                hint: "nibble rebuilds byte-level BPE tokenizers (\"gpt2\") from GGUF; load the Hugging Face \
                       checkpoint for other tokenizers"
                    .into(),
            });
        }
        let pre_name = gguf.meta_str("tokenizer.ggml.pre")?.unwrap_or("(missing)");
        let pre = pre_tokenizer(pre_name).ok_or_else(|| Error::UnsupportedConfig {
            path: path.to_path_buf(),
            field: "tokenizer.ggml.pre".into(),
            value: format!("{pre_name:?}"),
            hint: format!(
                "the pre-tokenizer decides how text is split before BPE; nibble implements {SUPPORTED_PRE:?}, \
                 and guessing another would tokenize differently from the model's training"
            ),
        })?;

        let tokens = strings(
            gguf.meta_array("tokenizer.ggml.tokens")?
                .ok_or_else(|| invalid(path, "tokenizer.ggml.tokens", "missing"))?,
            path,
            "tokenizer.ggml.tokens",
        )?;
        let merges = strings(
            gguf.meta_array("tokenizer.ggml.merges")?
                .ok_or_else(|| invalid(path, "tokenizer.ggml.merges", "missing; a BPE tokenizer needs its merges"))?,
            path,
            "tokenizer.ggml.merges",
        )?;
        let types: Vec<i64> = match gguf.meta_array("tokenizer.ggml.token_type")? {
            None => vec![1; tokens.len()],
            Some(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    integer(v).ok_or_else(|| invalid(path, "tokenizer.ggml.token_type", format!("entry {i} is not an integer")))
                })
                .collect::<Result<_>>()?,
        };
        if types.len() != tokens.len() {
            return Err(invalid(
                path,
                "tokenizer.ggml.token_type",
                format!("has {} entries for {} tokens", types.len(), tokens.len()),
            ));
        }

        let mut vocab = Map::new();
        let mut added = Vec::new();
        let mut special_tokens = Vec::new();
        for (id, (&text, &kind)) in tokens.iter().zip(&types).enumerate() {
            let id = u32::try_from(id).map_err(|_| invalid(path, "tokenizer.ggml.tokens", "more than 2^32 tokens"))?;
            if vocab.insert(text.to_string(), Value::from(id)).is_some() {
                return Err(invalid(
                    path,
                    "tokenizer.ggml.tokens",
                    format!("token {text:?} appears twice; a vocabulary maps each text to one id"),
                ));
            }
            let special = kind == TOKEN_TYPE_CONTROL || kind == TOKEN_TYPE_UNKNOWN;
            if special || kind == TOKEN_TYPE_USER_DEFINED {
                added.push(json!({
                    "id": id, "content": text, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": special
                }));
            }
            if special {
                special_tokens.push((id, text.to_string()));
            }
        }
        let mut pairs = Vec::with_capacity(merges.len());
        let mut seen = HashSet::with_capacity(merges.len());
        for (i, rule) in merges.iter().enumerate() {
            let (a, b) = split_merge(rule)
                .ok_or_else(|| invalid(path, "tokenizer.ggml.merges", format!("entry {i} ({rule:?}) is not `left right`")))?;
            // The tokenizers crate refuses a merge whose parts or result are not in the vocabulary
            // only at parse time, with a message that names no field; say which rule first.
            if !vocab.contains_key(a) || !vocab.contains_key(b) {
                return Err(invalid(path, "tokenizer.ggml.merges", format!("entry {i} ({rule:?}) merges a token not in the vocabulary")));
            }
            if seen.insert((a, b)) {
                pairs.push(json!([a, b]));
            }
        }

        let id_of = |key: &str| -> Result<Option<u32>> {
            match gguf.meta_u64(key)? {
                None => Ok(None),
                Some(id) => match usize::try_from(id).ok().and_then(|i| tokens.get(i)) {
                    Some(_) => Ok(u32::try_from(id).ok()),
                    None => Err(invalid(path, key, format!("{id} is outside the vocabulary of {}", tokens.len()))),
                },
            }
        };
        let text_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).map(|t| t.to_string());
        let bos_token_id = id_of("tokenizer.ggml.bos_token_id")?;
        let eos_token_id = id_of("tokenizer.ggml.eos_token_id")?;
        let unk_token_id = id_of("tokenizer.ggml.unknown_token_id")?;
        let pad_token_id = id_of("tokenizer.ggml.padding_token_id")?;
        // llama.cpp adds bos by default for SentencePiece models only; byte-level BPE files say so
        // explicitly when they want it.
        let add_bos_token = gguf.meta_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        let add_eos_token = gguf.meta_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);

        let mut template_ends = Vec::new();
        if add_bos_token {
            let bos = text_of(bos_token_id).ok_or_else(|| {
                invalid(path, "tokenizer.ggml.bos_token_id", "missing, but tokenizer.ggml.add_bos_token is true")
            })?;
            template_ends.push(("bos", bos, bos_token_id));
        }
        if add_eos_token {
            let eos = text_of(eos_token_id).ok_or_else(|| {
                invalid(path, "tokenizer.ggml.eos_token_id", "missing, but tokenizer.ggml.add_eos_token is true")
            })?;
            template_ends.push(("eos", eos, eos_token_id));
        }
        let post_processor = if template_ends.is_empty() {
            // What the original SmolLM2 tokenizer.json has: it only adjusts offsets, never ids.
            byte_level(true, false)
        } else {
            post_processor_template(&template_ends)
        };

        let json = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer(pre_name),
            "pre_tokenizer": pre,
            "post_processor": post_processor,
            "decoder": byte_level(true, true),
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": pairs
            }
        });
        Ok(Self {
            json,
            bos_token: text_of(bos_token_id),
            eos_token: text_of(eos_token_id),
            unk_token: text_of(unk_token_id),
            pad_token: text_of(pad_token_id),
            bos_token_id,
            eos_token_id,
            pad_token_id,
            add_bos_token,
            add_eos_token,
            chat_template: gguf.meta_str("tokenizer.chat_template")?.map(str::to_string),
            special_tokens,
            // The key is per architecture (`llama.context_length`, `qwen2.context_length`...).
            model_max_length: match gguf.meta_str("general.architecture")? {
                Some(arch) => gguf.meta_u64(&format!("{arch}.context_length"))?,
                None => None,
            },
        })
    }

    /// The `tokenizers` tokenizer; `path` (the GGUF file) is named in errors.
    pub fn build(&self, path: &Path) -> Result<tokenizers::Tokenizer> {
        tokenizers::Tokenizer::from_str(&self.json.to_string())
            .map_err(|e| Error::Tokenizer { path: path.to_path_buf(), reason: format!("rebuilt tokenizer.json: {e}") })
    }

    /// The [`TextTokenizer`] a model uses: the rebuilt tokenizer, special tokens and chat template.
    pub fn text_tokenizer(&self, path: &Path) -> Result<TextTokenizer> {
        TextTokenizer::from_tokenizer(
            self.build(path)?,
            path,
            self.bos_token.clone(),
            self.eos_token.clone(),
            self.chat_template.clone(),
        )
    }

    /// A `tokenizer_config.json` for transformers (4.x and 5.x): special tokens, whether bos/eos
    /// are added, and the chat template.
    pub fn tokenizer_config(&self) -> Value {
        let mut decoder = Map::new();
        for (id, text) in &self.special_tokens {
            decoder.insert(
                id.to_string(),
                json!({"content": text, "lstrip": false, "normalized": false, "rstrip": false,
                       "single_word": false, "special": true}),
            );
        }
        let mut cfg = Map::new();
        cfg.insert("add_bos_token".into(), Value::from(self.add_bos_token));
        cfg.insert("add_eos_token".into(), Value::from(self.add_eos_token));
        cfg.insert("added_tokens_decoder".into(), Value::Object(decoder));
        for (key, token) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("unk_token", &self.unk_token),
            ("pad_token", &self.pad_token),
        ] {
            if let Some(t) = token {
                cfg.insert(key.into(), Value::from(t.as_str()));
            }
        }
        if let Some(t) = &self.chat_template {
            cfg.insert("chat_template".into(), Value::from(t.as_str()));
        }
        cfg.insert("clean_up_tokenization_spaces".into(), Value::from(false));
        if let Some(n) = self.model_max_length {
            cfg.insert("model_max_length".into(), Value::from(n));
        }
        // The generic fast tokenizer: it reads everything from tokenizer.json, in 4.x and 5.x.
        cfg.insert("tokenizer_class".into(), Value::from("PreTrainedTokenizerFast"));
        Value::Object(cfg)
    }
}

/// A `TemplateProcessing` post-processor that adds bos in front and/or eos behind.
fn post_processor_template(ends: &[(&str, String, Option<u32>)]) -> Value {
    let piece = |seq: &str, type_id: u32| json!({"Sequence": {"id": seq, "type_id": type_id}});
    let special = |text: &str, type_id: u32| json!({"SpecialToken": {"id": text, "type_id": type_id}});
    let bos = ends.iter().find(|(k, _, _)| *k == "bos");
    let eos = ends.iter().find(|(k, _, _)| *k == "eos");
    let mut single = Vec::new();
    let mut pair = Vec::new();
    if let Some((_, t, _)) = bos {
        single.push(special(t, 0));
    }
    single.push(piece("A", 0));
    if let Some((_, t, _)) = eos {
        single.push(special(t, 0));
    }
    pair.extend(single.iter().cloned());
    if let Some((_, t, _)) = bos {
        pair.push(special(t, 1));
    }
    pair.push(piece("B", 1));
    if let Some((_, t, _)) = eos {
        pair.push(special(t, 1));
    }
    let mut specials = Map::new();
    for (_, text, id) in ends {
        specials.insert(text.clone(), json!({"id": text, "ids": [id], "tokens": [text]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_split_at_the_first_inner_space() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ", "t")));
        assert_eq!(split_merge("Ġt he"), Some(("Ġt", "he")));
        assert_eq!(split_merge("  x"), Some((" ", "x")));
        assert_eq!(split_merge("ab"), None);
        assert_eq!(split_merge(""), None);
    }

    /// A tokenizer of `tokens` (ids in order) and `merges`, split as `pre` says.
    fn tiny(pre: &str, tokens: &[&str], merges: &[[&str; 2]]) -> tokenizers::Tokenizer {
        let mut vocab = Map::new();
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.to_string(), Value::from(i));
        }
        let doc = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": normalizer(pre),
            "pre_tokenizer": pre_tokenizer(pre), "post_processor": byte_level(true, false),
            "decoder": byte_level(true, true),
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        });
        tokenizers::Tokenizer::from_str(&doc.to_string()).unwrap()
    }

    #[test]
    fn smollm_splits_digits_one_by_one() {
        let tok = tiny("smollm", &["1", "2", "3", "a", "Ġ", "Ġa", "12"], &[["Ġ", "a"], ["1", "2"]]);
        // "12" is in the vocabulary with a merge, yet digits stay apart: the Digits pre-tokenizer
        // splits them before BPE sees them.
        let ids = tok.encode("123 a", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![0, 1, 2, 5]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "123 a");
    }

    #[test]
    fn qwen2_splits_digits_and_contractions_and_composes_to_nfc() {
        let tokens = ["1", "2", "3", "'", "L", "'L", "'LL", "LL", "Ã", "©", "Ã©", "e", "Ġ", "Ġe", "12"];
        let merges = [["1", "2"], ["'", "L"], ["'L", "L"], ["L", "L"], ["Ã", "©"], ["Ġ", "e"]];
        let tok = tiny("qwen2", &tokens, &merges);
        let ids = |text: &str| tok.encode(text, false).unwrap().get_ids().to_vec();
        // Every digit alone, though "12" has a merge.
        assert_eq!(ids("123"), vec![0, 1, 2]);
        // Contractions match whatever their case: "'LL" is one piece, so its merges apply.
        assert_eq!(ids("'LL"), vec![6]);
        // A space goes with the letters after it.
        assert_eq!(ids(" e"), vec![13]);
        // "e" + U+0301 becomes "é" (bytes C3 A9, "Ã©" in the byte alphabet) before splitting.
        assert_eq!(ids("e\u{301}"), vec![10]);
        assert_eq!(tok.decode(&[10], false).unwrap(), "é");
    }
}

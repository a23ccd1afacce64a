//! Qwen2.5-Coder-0.5B-Instruct's tokenizer and chat template, rebuilt from its GGUF
//! (`tokenizer.ggml.pre` = `qwen2`), against what transformers builds from the same file:
//! tests/fixtures/qwen2.5-coder/tokenizer-ref.json, made by
//! models/reference/make_qwen_tokenizer_refs.py. Every test is skipped, with the reason printed,
//! when models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf is missing (run
//! models/fetch-qwen2.5-coder.sh to fetch it).

use std::path::PathBuf;

use nibble_load::{ChatMessage, GgufFile, GgufTokenizer, TextTokenizer};
use serde_json::Value;

/// The workspace root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn gguf_file() -> Option<PathBuf> {
    let p = root().join("models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    if p.is_file() {
        Some(p)
    } else {
        println!("skipped: {} is missing; run models/fetch-qwen2.5-coder.sh to fetch it", p.display());
        None
    }
}

fn reference() -> Value {
    let p = root().join("tests/fixtures/qwen2.5-coder/tokenizer-ref.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|i| u32::try_from(i.as_u64().unwrap()).unwrap()).collect()
}

fn load() -> Option<(GgufTokenizer, TextTokenizer)> {
    let path = gguf_file()?;
    let gguf = GgufFile::open(&path).unwrap();
    let rebuilt = GgufTokenizer::from_gguf(&gguf).unwrap();
    let tok = rebuilt.text_tokenizer(&path).unwrap();
    Some((rebuilt, tok))
}

#[test]
fn special_tokens_and_no_bos() {
    let Some((rebuilt, tok)) = load() else { return };
    let r = reference();
    assert_eq!(tok.vocab_size() as u64, r["vocab_size"].as_u64().unwrap());
    assert_eq!(rebuilt.bos_token.as_deref(), r["special"]["bos"].as_str());
    assert_eq!(rebuilt.eos_token.as_deref(), r["special"]["eos"].as_str());
    assert_eq!(rebuilt.pad_token.as_deref(), r["special"]["pad"].as_str());
    assert_eq!(rebuilt.add_bos_token, r["special"]["add_bos_token"].as_bool().unwrap());
    assert!(!rebuilt.add_eos_token);
    assert_eq!(rebuilt.model_max_length, Some(32768), "from qwen2.context_length");
    // The 20 control tokens are special; `<tool_call>` and `</tool_call>` (user-defined) are not,
    // nor are llama.cpp's `[PAD…]` fillers (unused) up to the embedding size.
    let special: Vec<&str> = rebuilt.special_tokens.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(special.len(), 20, "{special:?}");
    for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"] {
        assert!(special.contains(&t), "{t} is not special");
    }
    assert!(!special.iter().any(|t| t.contains("tool_call") || t.starts_with("[PAD")));
    assert_eq!(rebuilt.json["normalizer"]["type"], "NFC");
}

#[test]
fn ppl_text_ids_match_transformers() {
    let Some((_, tok)) = load() else { return };
    let r = reference();
    let text = std::fs::read_to_string(root().join(r["ppl"]["file"].as_str().unwrap())).unwrap();
    let all = tok.encode(&text, true).unwrap();
    let want = ids(&r["ppl"]["ids"]);
    assert_eq!(&all[..want.len().min(all.len())], &want[..]);
    assert_eq!(tok.decode(&all, false).unwrap(), text);
}

#[test]
fn tricky_strings_match_transformers() {
    let Some((_, tok)) = load() else { return };
    let r = reference();
    for case in r["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        let got = tok.encode(text, true).unwrap();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(tok.decode(&got, false).unwrap(), case["decoded"].as_str().unwrap(), "{text:?}");
        assert_eq!(tok.decode(&got, true).unwrap(), case["decoded_skip_special"].as_str().unwrap(), "{text:?}");
    }
}

#[test]
fn decomposed_text_is_composed_first_as_qwens_tokenizer_json_does() {
    let Some((_, tok)) = load() else { return };
    let r = reference();
    let text = r["nfc"]["text"].as_str().unwrap();
    let got = tok.encode(text, true).unwrap();
    assert_eq!(got, ids(&r["nfc"]["ids_qwen_tokenizer_json"]));
    // transformers' GGUF loader drops the normalizer and so parts from the original tokenizer here.
    assert_ne!(got, ids(&r["nfc"]["ids_transformers_gguf"]));
}

#[test]
fn chat_template_renders_as_transformers() {
    let Some((_, tok)) = load() else { return };
    let r = reference();
    for chat in r["chat"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let add = chat["add_generation_prompt"].as_bool().unwrap();
        let template = tok.chat_template.as_ref().unwrap();
        let text = template
            .render(&messages, add, tok.bos_token.as_deref().unwrap_or(""), tok.eos_token.as_deref().unwrap_or(""))
            .unwrap();
        assert_eq!(text, chat["text"].as_str().unwrap());
        assert_eq!(tok.apply_chat_template(&messages, add).unwrap(), ids(&chat["ids"]));
    }
}

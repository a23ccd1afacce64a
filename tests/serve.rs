//! `nibble serve` over raw HTTP on loopback (tiny Llama NF4): every endpoint, streaming, batching
//! of concurrent requests, and each error status with OpenAI's error object.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::server::Running;
use common::*;
use nibble::{BitsAndBytesConfig, LoadOptions, Model};
use serde_json::{json, Value};

fn start(api_key: Option<&str>, max_queue: usize, max_body: usize) -> Running {
    let load = || Model::load(&tiny_model(), &LoadOptions { quant: BitsAndBytesConfig::nf4(), ..LoadOptions::default() });
    Running::start(api_key, max_queue, max_body, 256, load)
}

/// One HTTP/1.0 exchange (the answer ends when the server closes): status and body.
fn http(r: &Running, method: &str, path: &str, body: Option<&[u8]>, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(r.addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: x\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    if let Some(b) = body {
        // A server may answer (413) and close before reading everything.
        let _ = s.write_all(b);
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

fn post(r: &Running, path: &str, v: &Value) -> (u16, Value) {
    let (status, body) = http(r, "POST", path, Some(v.to_string().as_bytes()), &[]);
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// The data lines of a server-sent event stream.
fn sse(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

fn chat_body(content: &str, extra: Value) -> Value {
    let mut v = json!({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0});
    if let (Value::Object(o), Value::Object(e)) = (&mut v, extra) {
        o.extend(e);
    }
    v
}

#[test]
fn endpoints_answer() {
    let r = start(None, 64, 1 << 20);
    let (status, body) = http(&r, "GET", "/v1/models", None, &[]);
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");

    let (status, whole) = post(&r, "/v1/chat/completions", &chat_body("hello there", json!({})));
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(["stop", "length"].contains(&whole["choices"][0]["finish_reason"].as_str().unwrap()));
    let usage = &whole["usage"];
    assert_eq!(usage["total_tokens"], usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap());

    // Streamed: the deltas add up to the plain answer; the stream ends in [DONE].
    let body = chat_body("hello there", json!({"stream": true, "stream_options": {"include_usage": true}}));
    let (status, raw) = http(&r, "POST", "/v1/chat/completions", Some(body.to_string().as_bytes()), &[]);
    assert_eq!(status, 200);
    let events = sse(&raw);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, text);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let su = &chunks.last().unwrap()["usage"];
    assert_eq!(su["completion_tokens"], usage["completion_tokens"]);
    assert_eq!(su["prompt_tokens"], usage["prompt_tokens"]);
    // The same prompt again: all of it but the last token comes from the first request's cache.
    assert_eq!(su["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"].as_u64().unwrap() - 1);

    let (status, c) = post(&r, "/v1/completions", &json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}));
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["usage"]["completion_tokens"], 5);
    assert_eq!(c["choices"][0]["finish_reason"], "length");

    let (status, metrics) = http(&r, "GET", "/metrics", None, &[]);
    assert_eq!(status, 200);
    for name in [
        "nibble_requests_total{",
        "nibble_prompt_tokens_total",
        "nibble_completion_tokens_total",
        "nibble_queue_depth",
        "nibble_running_sequences",
        "nibble_batch_size_bucket",
        "nibble_time_to_first_token_seconds_bucket",
        "nibble_decode_tokens_per_second",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}:\n{metrics}");
    }
}

/// Eight greedy requests at once answer as each does alone.
#[test]
fn concurrent_requests_answer_as_alone() {
    let r = start(None, 64, 1 << 20);
    let prompts: Vec<String> = (0..8).map(|i| format!("tell me about the number {i}")).collect();
    let alone: Vec<Value> = prompts.iter().map(|p| post(&r, "/v1/chat/completions", &chat_body(p, json!({}))).1).collect();
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts.iter().map(|p| s.spawn(|| post(&r, "/v1/chat/completions", &chat_body(p, json!({}))).1)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, t) in alone.iter().zip(&together) {
        assert_eq!(a["choices"][0]["message"], t["choices"][0]["message"]);
    }
    let (_, metrics) = http(&r, "GET", "/metrics", None, &[]);
    // Some decode step ran more than one sequence (batch-size buckets above 1 were hit).
    let le1: f64 = metric(&metrics, "nibble_batch_size_bucket{le=\"1.0\"}");
    let count: f64 = metric(&metrics, "nibble_batch_size_count");
    assert!(count > le1, "no batched decode step:\n{metrics}");
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

/// Every error status with OpenAI's error object; none reaches the engine.
#[test]
fn errors_are_openai_error_objects() {
    let r = start(None, 64, 4096);
    let check = |status: u16, body: &str, want: u16, param: Option<&str>| {
        assert_eq!(status, want, "{body}");
        let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
        let e = &v["error"];
        assert!(e["message"].is_string() && e["type"].is_string(), "{body}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{body}");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{body}");
        }
    };
    let raw = |b: &[u8]| http(&r, "POST", "/v1/chat/completions", Some(b), &[]);
    let (s, b) = raw(b"{not json");
    check(s, &b, 400, None);
    let (s, b) = raw(b"[1, 2]");
    check(s, &b, 400, None);
    let cases = [
        (json!({"messages": "hi"}), "messages"),
        (json!({"messages": []}), "messages"),
        (chat_body("x", json!({"temperature": "hot"})), "temperature"),
        (chat_body("x", json!({"temperature": 3.5})), "temperature"),
        (chat_body("x", json!({"top_p": 0})), "top_p"),
        (chat_body("x", json!({"max_tokens": -1})), "max_tokens"),
        (chat_body("x", json!({"max_tokens": 0})), "max_tokens"),
        (chat_body("x", json!({"n": 2})), "n"),
        (chat_body("x", json!({"logprobs": true})), "logprobs"),
        (chat_body("x", json!({"top_logprobs": 2})), "top_logprobs"),
        (chat_body("x", json!({"stop": [1]})), "stop"),
        (chat_body("x", json!({"presence_penalty": 5})), "presence_penalty"),
        (chat_body("x", json!({"stream": "yes"})), "stream"),
        (chat_body("x", json!({"tools": []})), "tools"),
    ];
    for (body, param) in cases {
        let (s, b) = http(&r, "POST", "/v1/chat/completions", Some(body.to_string().as_bytes()), &[]);
        check(s, &b, 400, Some(param));
    }
    // Beyond the context: a 400 whose message gives the counts.
    let (s, b) = http(&r, "POST", "/v1/chat/completions", Some(chat_body("x", json!({"max_tokens": 1000})).to_string().as_bytes()), &[]);
    check(s, &b, 400, Some("messages"));
    assert!(b.contains("1000") && b.contains("256"), "{b}");
    let (s, b) = http(&r, "POST", "/v1/completions", Some(json!({"prompt": [1, 2, 99999]}).to_string().as_bytes()), &[]);
    check(s, &b, 400, Some("prompt"));
    let (s, b) = http(&r, "POST", "/v1/chat/completions", Some(chat_body("x", json!({"model": "gpt-9"})).to_string().as_bytes()), &[]);
    check(s, &b, 404, Some("model"));
    let (s, b) = http(&r, "GET", "/v2/nothing", None, &[]);
    check(s, &b, 404, None);
    let big = format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}", "a".repeat(10_000));
    let (s, b) = raw(big.as_bytes());
    check(s, &b, 413, None);
    let (_, metrics) = http(&r, "GET", "/metrics", None, &[]);
    assert_eq!(metric(&metrics, "nibble_prompt_tokens_total"), 0.0, "a bad request reached the engine");
    assert!(!metrics.contains("status=\"500\""), "{metrics}");
}

#[test]
fn api_key_and_full_queue() {
    let r = start(Some("sekret"), 0, 1 << 20);
    let body = chat_body("x", json!({}));
    let (s, b) = http(&r, "POST", "/v1/chat/completions", Some(body.to_string().as_bytes()), &[]);
    assert_eq!(s, 401, "{b}");
    assert!(b.contains("invalid_api_key"));
    let (s, _) = http(&r, "POST", "/v1/chat/completions", Some(body.to_string().as_bytes()), &[("Authorization", "Bearer wrong")]);
    assert_eq!(s, 401);
    assert_eq!(http(&r, "GET", "/v1/models", None, &[]).0, 401);
    assert_eq!(http(&r, "GET", "/health", None, &[]).0, 200);
    // With the key, a queue of 0 refuses every request: 429 with its error object.
    let (s, b) = http(&r, "POST", "/v1/chat/completions", Some(body.to_string().as_bytes()), &[("Authorization", "Bearer sekret")]);
    assert_eq!(s, 429, "{b}");
    assert!(b.contains("queue_full"));
}

/// A client that disconnects mid-stream frees its sequence.
#[test]
fn a_disconnected_stream_is_freed() {
    let r = start(None, 64, 1 << 20);
    let body = chat_body("go on and on", json!({"stream": true, "max_tokens": 240}));
    let body = body.to_string();
    let mut s = TcpStream::connect(r.addr).unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut first = [0u8; 256];
    let _ = s.read(&mut first).unwrap();
    drop(s);
    let t0 = Instant::now();
    loop {
        let (_, m) = http(&r, "GET", "/metrics", None, &[]);
        if metric(&m, "nibble_running_sequences") == 0.0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "the sequence was never freed:\n{m}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn adapters_are_served_side_by_side() {
    let lora = |n: &str| nibble::AdapterSpec { name: n.into(), source: fixture("lora").join(n).display().to_string() };
    let opts = LoadOptions { quant: BitsAndBytesConfig::nf4(), adapters: vec![lora("lora-qv"), lora("lora-all-linear")], ..LoadOptions::default() };
    let r = Running::start(None, 64, 1 << 20, 256, move || Model::load(&tiny_model(), &opts));
    let (status, body) = http(&r, "GET", "/v1/models", None, &[]);
    assert_eq!(status, 200);
    let ids: Vec<String> = serde_json::from_str::<Value>(&body).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["tiny", "tiny:lora-qv", "tiny:lora-all-linear"]);
    let names = ["tiny", "tiny:lora-qv", "tiny:lora-all-linear"];
    let body = |m: &str| json!({"model": m, "prompt": "This program is free software", "max_tokens": 12, "temperature": 0});
    let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("{v}")).to_string();
    let alone: Vec<String> = names.iter().map(|m| text(&post(&r, "/v1/completions", &body(m)).1)).collect();
    assert_ne!(alone[0], alone[1]);
    assert_ne!(alone[1], alone[2]);
    // Each adapter's answer is the one a model loaded with that adapter alone gives.
    for (i, a) in ["lora-qv", "lora-all-linear"].iter().enumerate() {
        let opts = LoadOptions { quant: BitsAndBytesConfig::nf4(), adapters: vec![lora(a)], ..LoadOptions::default() };
        let one = Model::load(&tiny_model(), &opts).unwrap();
        let g = one.generate_text("This program is free software", &nibble::GenerateOptions::greedy(12), |_| {}).unwrap();
        assert_eq!(alone[i + 1], g.text, "{a}");
    }
    // All at once, twice over, batched in the same steps: the same answers.
    let server = &r;
    let together: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = names.iter().chain(&names).map(|m| s.spawn(move || text(&post(server, "/v1/completions", &body(m)).1))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, t) in together.iter().enumerate() {
        assert_eq!(t, &alone[i % 3], "{}", names[i % 3]);
    }
    let (status, err) = post(&r, "/v1/completions", &body("tiny:nope"));
    assert_eq!((status, err["error"]["code"].as_str()), (404, Some("model_not_found")));
}

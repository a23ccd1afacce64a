//! `nibble serve` under abuse, on loopback over the tiny Llama (NF4): slow headers, a thousand
//! connections at once, a streaming client that stops reading, a flood beyond the queue; and an
//! ignored soak test that drives the release `nibble serve` binary and samples its memory.
//! Every test is bounded in count and time (see `docs/reliability-serve.md`).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::server::Running;
use common::*;
use nibble::{BitsAndBytesConfig, EngineOptions, LoadOptions, Model};
use nibble_serve::ServeOptions;
use serde_json::{json, Value};

fn load() -> nibble::Result<Model> {
    Model::load(&tiny_model(), &LoadOptions { quant: BitsAndBytesConfig::nf4(), ..LoadOptions::default() })
}

/// Test options: the tiny model named `tiny`, batch 8 over a context of 256, a queue of
/// `max_queue`.
fn opts(max_queue: usize) -> ServeOptions {
    let mut engine = EngineOptions::new(8, 256);
    engine.max_queue = max_queue;
    ServeOptions { port: 0, model_name: "tiny".into(), engine, ..ServeOptions::default() }
}

/// One HTTP/1.0 exchange (the answer ends when the server closes): status and body.
fn http(r: &Running, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(r.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: x\r\n");
    if let Some(b) = body {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    split(&out)
}

/// Status and body of a raw HTTP answer.
fn split(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

fn chat(content: &str, max_tokens: usize, extra: Value) -> String {
    let mut v = json!({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0});
    if let (Value::Object(o), Value::Object(e)) = (&mut v, extra) {
        o.extend(e);
    }
    v.to_string()
}

/// The value of the sample `name` in a Prometheus text (0 when absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

/// A Prometheus sample of `/metrics`.
fn gauge(r: &Running, name: &str) -> f64 {
    let (_, m) = http(r, "GET", "/metrics", None);
    metric(&m, name)
}

/// Asserts `body` is OpenAI's error object with `code`.
fn error_object(body: &str, code: &str) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    let e = &v["error"];
    assert!(e["message"].is_string() && e["type"].is_string() && e.get("param").is_some(), "{body}");
    assert_eq!(e["code"], code, "{body}");
}

/// Waits (at most `limit`) until `f` holds.
fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client sending its headers a byte every 200 ms is cut off at the header read timeout
/// (1 s here), while a normal request on another connection is answered meanwhile.
#[test]
fn slow_headers_are_cut_off() {
    let r = Running::start_with(ServeOptions { header_read_timeout: Duration::from_secs(1), ..opts(16) }, load);
    let addr = r.addr;
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let t0 = Instant::now();
        let head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
        for &b in head.iter().cycle().take(200) {
            if s.write_all(&[b]).is_err() {
                return t0.elapsed();
            }
            // The server's answer (a 408, or nothing) and then its close.
            let mut buf = [0u8; 512];
            match s.read(&mut buf) {
                Ok(_) => return t0.elapsed(),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return t0.elapsed(),
            }
        }
        panic!("the slow client was never cut off ({:?})", t0.elapsed());
    });
    // Meanwhile a normal request goes through.
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let (status, body) = http(&r, "POST", "/v1/chat/completions", Some(&chat("hi", 8, json!({}))));
    assert_eq!(status, 200, "{body}");
    assert!(t0.elapsed() < Duration::from_secs(5), "a normal request took {:?}", t0.elapsed());
    let cut = slow.join().unwrap();
    assert!(cut >= Duration::from_millis(900) && cut < Duration::from_secs(4), "cut off after {cut:?}");
    assert!(r.healthy());
    eventually(Duration::from_secs(5), "the slow connection is closed", || gauge(&r, "nibble_open_connections") <= 1.0);
}

/// A body that does not arrive within the body read timeout (1 s here) is a 408 with the error
/// object, and never reaches the engine.
#[test]
fn a_slow_body_is_a_408() {
    let r = Running::start_with(ServeOptions { body_read_timeout: Duration::from_secs(1), ..opts(16) }, load);
    let mut s = TcpStream::connect(r.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"mess").unwrap();
    let t0 = Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let (status, body) = split(&out);
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&out));
    error_object(&body, "request_timeout");
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert_eq!(gauge(&r, "nibble_prompt_tokens_total"), 0.0);
}

/// Raises this process's open-file limit to `want` when the hard limit allows; returns the soft
/// limit in effect.
fn raise_nofile(want: u64) -> u64 {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 0;
        }
        if l.rlim_cur < want {
            l.rlim_cur = want.min(l.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        }
    }
    l.rlim_cur
}

/// 1,000 connections at once against a limit of 256: the ones beyond it get a 503 with the error
/// object at once, a new one meanwhile too (not a hang); once they go, `/health` answers and the
/// server is alive.
#[test]
fn a_thousand_connections() {
    const N: usize = 1000;
    const LIMIT: usize = 256;
    let soft = raise_nofile(4096);
    assert!(soft >= 2 * N as u64, "RLIMIT_NOFILE is {soft}: the test needs {} descriptors", 2 * N);
    let r = Running::start_with(
        ServeOptions { max_connections: LIMIT, header_read_timeout: Duration::from_secs(60), ..opts(16) },
        load,
    );
    let t0 = Instant::now();
    let mut conns: Vec<TcpStream> = (0..N).map(|_| TcpStream::connect(r.addr).unwrap()).collect();
    for c in &conns {
        c.set_nonblocking(true).unwrap();
    }
    // Gather the answers of the refused ones (the held ones sent nothing and get nothing).
    let mut answers: Vec<Vec<u8>> = vec![Vec::new(); N];
    let mut closed = vec![false; N];
    let settle = Instant::now();
    loop {
        for (i, c) in conns.iter_mut().enumerate() {
            let mut buf = [0u8; 1024];
            loop {
                match c.read(&mut buf) {
                    Ok(0) => {
                        closed[i] = true;
                        break;
                    }
                    Ok(n) => answers[i].extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed[i] = true;
                        break;
                    }
                }
            }
        }
        let refused = closed.iter().filter(|&&c| c).count();
        if refused >= N - LIMIT || settle.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused: Vec<usize> = (0..N).filter(|&i| closed[i]).collect();
    assert_eq!(refused.len(), N - LIMIT, "refused (a held one has a permit)");
    for &i in &refused {
        let (status, body) = split(&answers[i]);
        assert_eq!(status, 503, "{}", String::from_utf8_lossy(&answers[i]));
        error_object(&body, "too_many_connections");
    }
    println!("{N} connections opened and sorted in {:?}: {} held, {} refused", t0.elapsed(), N - refused.len(), refused.len());
    // While the limit is reached, a new connection is answered at once too.
    let t1 = Instant::now();
    let (status, body) = http(&r, "GET", "/health", None);
    assert_eq!(status, 503, "{body}");
    error_object(&body, "too_many_connections");
    assert!(t1.elapsed() < Duration::from_secs(2), "{:?}", t1.elapsed());
    drop(conns);
    eventually(Duration::from_secs(10), "/health answers once the flood has gone", || r.healthy());
    assert!(r.alive());
    assert!(gauge(&r, "nibble_refused_connections_total") >= (N - LIMIT + 1) as f64);
    let (status, body) = http(&r, "POST", "/v1/chat/completions", Some(&chat("hi", 8, json!({}))));
    assert_eq!(status, 200, "{body}");
}

/// A client that opens a long stream and never reads: once the socket buffers (kept small here)
/// fill, the write waits, the write timeout (1 s) drops the connection and the engine frees the
/// sequence; the client gets a cut stream (no `[DONE]`); a new request then completes.
#[test]
fn a_stream_nobody_reads_is_dropped() {
    let r = Running::start_with(
        ServeOptions { write_timeout: Duration::from_secs(1), send_buffer: Some(4096), ..opts(16) },
        load,
    );
    let body = chat("go on", 220, json!({"stream": true, "ignore_eos": true}));
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&r.addr.into()).unwrap();
    let mut s: TcpStream = sock.into();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let t0 = Instant::now();
    // The engine's slot comes back and the connection goes, without the client reading a byte.
    eventually(Duration::from_secs(15), "the stalled stream's sequence is freed", || gauge(&r, "nibble_running_sequences") == 0.0);
    eventually(Duration::from_secs(15), "the stalled connection is dropped", || gauge(&r, "nibble_open_connections") <= 1.0);
    println!("stalled stream dropped within {:?}", t0.elapsed());
    let mut got = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.contains("[DONE]"), "the whole stream fit in the buffers: the test proves nothing");
    println!("the client got {} bytes before the cut", got.len());
    let (status, body) = http(&r, "POST", "/v1/chat/completions", Some(&chat("hi", 8, json!({}))));
    assert_eq!(status, 200, "{body}");
}

/// 48 concurrent requests against a batch of 8 and a queue of 4: the refused get 429 with the
/// error object at once; every accepted one completes with all its tokens.
#[test]
fn a_flood_beyond_the_queue() {
    const N: usize = 48;
    const TOKENS: u64 = 128;
    let r = Arc::new(Running::start_with(opts(4), load));
    let gate = Arc::new(Barrier::new(N));
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let (r, gate) = (r.clone(), gate.clone());
            std::thread::spawn(move || {
                let body = chat(&format!("request {i}"), TOKENS as usize, json!({"ignore_eos": true}));
                gate.wait();
                let t0 = Instant::now();
                let (status, body) = http(&r, "POST", "/v1/chat/completions", Some(&body));
                (status, body, t0.elapsed())
            })
        })
        .collect();
    let results: Vec<(u16, String, Duration)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let (mut ok, mut refused) = (0, 0);
    let mut slowest_refusal = Duration::ZERO;
    for (status, body, took) in &results {
        match status {
            200 => {
                ok += 1;
                let v: Value = serde_json::from_str(body).unwrap();
                assert_eq!(v["usage"]["completion_tokens"], TOKENS, "{body}");
                assert_eq!(v["choices"][0]["finish_reason"], "length", "{body}");
            }
            429 => {
                refused += 1;
                error_object(body, "queue_full");
                slowest_refusal = slowest_refusal.max(*took);
            }
            s => panic!("status {s}: {body}"),
        }
    }
    println!("{ok} completed, {refused} refused (slowest refusal {slowest_refusal:?})");
    assert!(refused > 0, "the flood never filled the queue");
    assert!(ok >= 4, "only {ok} accepted");
    assert!(slowest_refusal < Duration::from_secs(2), "a 429 took {slowest_refusal:?}");
    let (_, m) = http(&r, "GET", "/metrics", None);
    assert_eq!(metric(&m, "nibble_completion_tokens_total"), (ok as u64 * TOKENS) as f64);
    assert!(!m.contains("status=\"500\""), "{m}");
}

/// The soak: the release `nibble serve` binary (`NIBBLE_BIN`, default `target/release/nibble`
/// under `CARGO_TARGET_DIR`) over `SOAK_MODEL` (default the tiny Llama) for `SOAK_SECS`
/// seconds (default 300) with `SOAK_CLIENTS` clients (default 6) mixing whole answers, streams,
/// abandoned streams, bad requests and 429s; the server's VmRSS is sampled every 5 s.
/// Run: `cargo test --release --test serve_abuse -- --ignored --nocapture soak`.
#[test]
#[ignore]
fn soak() {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let target = env("CARGO_TARGET_DIR", &root().join("target").display().to_string());
    let bin = env("NIBBLE_BIN", &format!("{target}/release/nibble"));
    let model = env("SOAK_MODEL", &tiny_model());
    let secs: u64 = env("SOAK_SECS", "300").parse().unwrap();
    let clients: usize = env("SOAK_CLIENTS", "6").parse().unwrap();
    let mut child = std::process::Command::new(&bin)
        .args(["serve", "--model", &model, "--port", "0", "--served-model-name", "tiny", "--queue", "4", "--max-connections", "64"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e} (build it: cargo build --release -p nibble-cli)"));
    let pid = child.id();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut err, &mut line).unwrap() > 0, "the server ended before listening");
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.split_whitespace().next().unwrap().parse::<std::net::SocketAddr>().unwrap();
        }
    };
    // Keep draining its log so that it never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let r = Running::attach(addr);
    eventually(Duration::from_secs(300), "the soak server became ready", || r.healthy());
    let rss = || -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counts = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<u16, u64>::new()));
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            let (stop, counts, r) = (stop.clone(), counts.clone(), Running::attach(addr));
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let status = match (n + c as u64) % 6 {
                        0 | 1 => http(&r, "POST", "/v1/chat/completions", Some(&chat(&format!("soak {c} {n}"), 48, json!({})))).0,
                        2 => http(&r, "POST", "/v1/chat/completions", Some(&chat("stream", 64, json!({"stream": true})))).0,
                        3 => {
                            // A stream abandoned after its first bytes.
                            let mut s = TcpStream::connect(r.addr).unwrap();
                            let body = chat("abandon", 200, json!({"stream": true, "ignore_eos": true}));
                            let req = format!("POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                            s.write_all(req.as_bytes()).unwrap();
                            let mut buf = [0u8; 64];
                            let _ = s.read(&mut buf);
                            split(&buf).0
                        }
                        4 => http(&r, "POST", "/v1/completions", Some(&json!({"model": "tiny", "prompt": "Once", "max_tokens": 32}).to_string())).0,
                        _ => http(&r, "POST", "/v1/chat/completions", Some("{not json")).0,
                    };
                    *counts.lock().unwrap().entry(status).or_default() += 1;
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    let mut samples = vec![(0u64, rss())];
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(5));
        samples.push((t0.elapsed().as_secs(), rss()));
        assert!(child.try_wait().unwrap().is_none(), "the server died");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    samples.push((t0.elapsed().as_secs(), rss()));
    let (_, m) = http(&r, "GET", "/metrics", None);
    let _ = child.kill();
    let _ = child.wait();
    for (t, kb) in &samples {
        println!("rss t={t:>4}s {:>8.1} MiB", *kb as f64 / 1024.0);
    }
    let start = samples[1].1;
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let end = samples.last().map_or(0, |s| s.1);
    let half = samples[samples.len() / 2].1;
    println!(
        "soak {secs} s, {clients} clients, model {model}: requests by status {:?}; completion tokens {}; RSS start {:.1} MiB, max {:.1} MiB, end {:.1} MiB",
        counts.lock().unwrap(),
        metric(&m, "nibble_completion_tokens_total"),
        start as f64 / 1024.0,
        max as f64 / 1024.0,
        end as f64 / 1024.0
    );
    assert!(!m.contains("status=\"500\""), "{m}");
    // No growth once warm: the second half stays within a quarter (and 16 MiB) of the middle.
    assert!(end <= half + half / 4 + 16 * 1024, "RSS grew from {half} kB to {end} kB");
}

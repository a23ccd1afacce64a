//! The Hub client reading what a server answers: the input is the raw HTTP response a loopback
//! server sends to every request (status line, headers such as `X-Repo-Commit`, `ETag`,
//! `X-Linked-Etag`, `Location`, `Retry-After`, `Content-Range`, and a body), while the client
//! fetches a config.json into a fresh cache. One attempt and short timeouts keep each run short.

mod scratch;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nibble_load::hub::{HubConfig, RetryPolicy};

fn main() {
    let answer: Arc<Mutex<Vec<u8>>> = Arc::new(Mutex::new(Vec::new()));
    let Ok(listener) = TcpListener::bind("127.0.0.1:0") else { return };
    let Ok(addr) = listener.local_addr() else { return };
    let served = answer.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
            // Read the request's head, then answer and close.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let bytes = served.lock().map(|a| a.clone()).unwrap_or_default();
            let _ = conn.write_all(&bytes);
        }
    });
    let cache = scratch::dir().join("hub-cache");
    let mut cfg = HubConfig::new(format!("http://{addr}"), &cache);
    cfg.retry = RetryPolicy { max_attempts: 1, base_delay: Duration::from_millis(1), max_delay: Duration::from_millis(5) };
    cfg.timeout = Duration::from_millis(300);
    cfg.read_timeout = Duration::from_millis(300);
    cfg.progress = false;
    afl::fuzz!(|data: &[u8]| {
        if let Ok(mut a) = answer.lock() {
            *a = data.to_vec();
        }
        let _ = std::fs::remove_dir_all(&cache);
        let _ = nibble_load::hub::fetch_config(&cfg, "org/model", "main");
    });
}

//! Loading from the Hugging Face Hub, against a mock Hub on loopback.
//!
//! Each test starts its own mock on 127.0.0.1 (ephemeral port) in a thread. It speaks the parts
//! of the Hub protocol nibble relies on: `/{repo}/resolve/{revision}/{file}` with `X-Repo-Commit`,
//! `ETag`, `X-Error-Code`; safetensors files as LFS files (a 302 to a "CDN" path with
//! `X-Linked-Etag`, their sha256, and `X-Linked-Size`); `Content-Length`; `Range` requests.
//! Faults are injected through its shared state: statuses (and headers) for the next requests, a
//! required token, cut, stalled, slow or corrupted bodies, redirect loops.
//!
//! Some faults need a process of their own (a file-size limit, SIGINT): those tests run this test
//! binary again as a child, on `child_process_entry` (see `child`), against the mock in the parent.
//!
//! Every test passes an explicit `HubConfig` (its own cache folder, the mock's endpoint), so tests
//! running in parallel never depend on process-global environment variables; only the
//! `from_pretrained` test sets them, and only it reads them.

mod common;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use common::{max_abs_diff, reference, reference_ids, root};
use nibble::{BitsAndBytesConfig, DeviceMap, Error, HubConfig, HubToken, LoadOptions, Model, RetryPolicy};

// ---------------------------------------------------------------------------------------------
// The mock Hub
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct MockFile {
    bytes: Arc<Vec<u8>>,
    etag: String,
    /// Served like an LFS file: the resolve URL redirects to the CDN.
    lfs: bool,
}

struct MockRepo {
    commit: String,
    files: BTreeMap<String, MockFile>,
}

/// One request as the mock saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    range: Option<String>,
    auth: Option<String>,
    /// When it arrived.
    at: Instant,
}

/// Where the mock answers with a redirect to the request's own URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loop {
    /// Resolve URLs (relative redirects, followed by the metadata request).
    Resolve,
    /// CDN URLs (absolute redirects, followed by the download).
    Cdn,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, MockRepo>,
    /// When set, resolve requests without `Authorization: Bearer <token>` get a 401.
    token: Option<String>,
    /// Statuses answered to the next requests, whatever they ask.
    fail_next: VecDeque<u16>,
    /// Headers sent with those statuses (`Retry-After`).
    fail_headers: Vec<(String, String)>,
    /// CDN bodies stop (the connection is closed) at this byte offset of the file.
    cut_at: Option<u64>,
    /// The next CDN body only stops (the connection closed) at this offset; later ones are whole.
    cut_once: Option<u64>,
    /// The next CDN body sends bytes up to this offset, then nothing, the connection held open
    /// for this long.
    stall_once: Option<(u64, Duration)>,
    /// CDN bodies are sent this many bytes at a time, with this pause after each (a slow link).
    throttle: Option<(usize, Duration)>,
    /// CDN bodies have one byte changed (the sha256 announced no longer matches).
    corrupt: bool,
    /// Answer requests with a redirect to themselves.
    redirect_loop: Option<Loop>,
    log: Vec<Seen>,
}

struct MockHub {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn hash_hex(data: &[u8], salt: &str) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    salt.hash(&mut h);
    data.hash(&mut h);
    let a = h.finish();
    data.len().hash(&mut h);
    format!("{a:016x}{:016x}", h.finish())
}

impl MockHub {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, addr, &st);
                });
            }
            // The listener drops here: the port refuses connections from now on.
        });
        Self { addr, state, stop, thread: Some(thread) }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Publishes a repo; `*.safetensors` files are served as LFS files. Returns its commit.
    fn add_repo(&self, id: &str, files: &[(String, Vec<u8>)]) -> String {
        let commit = format!("{}{}", hash_hex(id.as_bytes(), "commit"), "00000000")[..40].to_string();
        let files = files
            .iter()
            .map(|(name, bytes)| {
                let lfs = name.ends_with(".safetensors");
                // The Hub's etag of an LFS file is its sha256; of a plain file, a git hash.
                let etag = if lfs { sha256_hex(bytes) } else { hash_hex(bytes, name) };
                let f = MockFile { etag, bytes: Arc::new(bytes.clone()), lfs };
                (name.clone(), f)
            })
            .collect();
        self.state.lock().unwrap().repos.insert(id.to_string(), MockRepo { commit: commit.clone(), files });
        commit
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    fn log(&self) -> Vec<Seen> {
        self.with(|s| s.log.clone())
    }

    fn etag(&self, repo: &str, file: &str) -> String {
        self.with(|s| s.repos[repo].files[file].etag.clone())
    }

    fn bytes(&self, repo: &str, file: &str) -> Arc<Vec<u8>> {
        self.with(|s| s.repos[repo].files[file].bytes.clone())
    }

    fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            // Wakes the accept loop so it sees the flag.
            let _ = TcpStream::connect(self.addr);
            let _ = t.join();
        }
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Arc<Vec<u8>>,
    /// Byte range of `body` to send.
    span: (usize, usize),
    /// Close the connection after this many body bytes (a cut transfer).
    cut_after: Option<usize>,
    /// After this many body bytes, send nothing for this long, the connection open.
    stall: Option<(usize, Duration)>,
    /// Send the body this many bytes at a time, pausing after each.
    throttle: Option<(usize, Duration)>,
}

impl Reply {
    fn status(status: u16, headers: &[(&str, &str)]) -> Self {
        Reply {
            status,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: Arc::new(Vec::new()),
            span: (0, 0),
            cut_after: None,
            stall: None,
            throttle: None,
        }
    }
}

fn percent_decode(s: &str) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let b = s.as_bytes()[i];
        if b == b'%' {
            if let Some(v) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves `file` honouring `Range: bytes=a-` / `bytes=a-b`.
fn serve(file: &MockFile, range: Option<&String>, extra: Vec<(String, String)>, cut_at: Option<u64>) -> Reply {
    let total = file.bytes.len();
    let mut headers = extra;
    let (status, start, end) = match range.and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-')) {
        Some((a, b)) => {
            let start: usize = a.parse().unwrap_or(0);
            let end = b.parse::<usize>().map(|e| e + 1).unwrap_or(total).min(total);
            if start >= total {
                return Reply::status(416, &[("Content-Range", &format!("bytes */{total}"))]);
            }
            headers.push(("Content-Range".into(), format!("bytes {start}-{}/{total}", end - 1)));
            (206, start, end)
        }
        None => (200, 0, total),
    };
    headers.push(("Content-Length".into(), (end - start).to_string()));
    headers.push(("Accept-Ranges".into(), "bytes".into()));
    let cut_after = cut_at.map(|c| (c as usize).saturating_sub(start).min(end - start));
    Reply { status, headers, body: file.bytes.clone(), span: (start, end), cut_after, stall: None, throttle: None }
}

fn route(method: &str, path: &str, headers: &HashMap<String, String>, addr: SocketAddr, state: &Mutex<State>) -> Reply {
    let mut st = state.lock().unwrap();
    st.log.push(Seen {
        method: method.into(),
        path: path.into(),
        range: headers.get("range").cloned(),
        auth: headers.get("authorization").cloned(),
        at: Instant::now(),
    });
    if let Some(code) = st.fail_next.pop_front() {
        let extra: Vec<(&str, &str)> = st.fail_headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        return Reply::status(code, &extra);
    }
    let to_self = |scheme_host: &str| Reply::status(302, &[("Location", &format!("{scheme_host}{path}"))]);
    if let Some(rest) = path.strip_prefix("/cdn/") {
        if st.redirect_loop == Some(Loop::Cdn) {
            return to_self(&format!("http://localhost:{}", addr.port()));
        }
        let etag = rest.split('?').next().unwrap_or("");
        let file = st.repos.values().flat_map(|r| r.files.values()).find(|f| f.etag == etag).cloned();
        let Some(mut f) = file else { return Reply::status(404, &[]) };
        if st.corrupt {
            let mut bytes = f.bytes.to_vec();
            let i = bytes.len() / 2;
            bytes[i] ^= 0x55;
            f.bytes = Arc::new(bytes);
        }
        let cut = st.cut_once.take().or(st.cut_at);
        let mut reply = serve(&f, headers.get("range"), vec![("ETag".into(), format!("\"{etag}\""))], cut);
        if let Some((at, hold)) = st.stall_once.take() {
            reply.stall = Some(((at as usize).saturating_sub(reply.span.0), hold));
        }
        reply.throttle = st.throttle;
        return reply;
    }
    if st.redirect_loop == Some(Loop::Resolve) {
        return to_self("");
    }
    // /{org}/{name}/resolve/{revision}/{file...}
    let parts: Vec<&str> = path.splitn(6, '/').collect();
    if parts.len() < 6 || parts[3] != "resolve" {
        return Reply::status(404, &[]);
    }
    let repo_id = format!("{}/{}", parts[1], parts[2]);
    let revision = percent_decode(parts[4]);
    let file_name = percent_decode(parts[5]);
    if let Some(token) = &st.token {
        if headers.get("authorization") != Some(&format!("Bearer {token}")) {
            return Reply::status(
                401,
                &[("X-Error-Message", "Access to this model is restricted. You must be authenticated to access it.")],
            );
        }
    }
    let Some(repo) = st.repos.get(&repo_id) else {
        return Reply::status(404, &[("X-Error-Code", "RepoNotFound"), ("X-Error-Message", "Repository not found")]);
    };
    if revision != "main" && revision != repo.commit {
        return Reply::status(404, &[("X-Error-Code", "RevisionNotFound"), ("X-Error-Message", "Invalid rev id")]);
    }
    let commit = repo.commit.clone();
    let Some(file) = repo.files.get(&file_name).cloned() else {
        return Reply::status(
            404,
            &[("X-Error-Code", "EntryNotFound"), ("X-Error-Message", "Entry not found"), ("X-Repo-Commit", &commit)],
        );
    };
    if file.lfs {
        // Another host name than the endpoint's (same server): the CDN is another origin, which
        // must not receive the token.
        let location = format!("http://localhost:{}/cdn/{}?X-Amz-Signature=deadbeef", addr.port(), file.etag);
        return Reply::status(
            302,
            &[
                ("Location", &location),
                ("X-Repo-Commit", &commit),
                ("X-Linked-Etag", &format!("\"{}\"", file.etag)),
                ("X-Linked-Size", &file.bytes.len().to_string()),
                ("ETag", "\"0123456789abcdef0123456789abcdef01234567\""),
                ("Content-Length", "0"),
            ],
        );
    }
    let extra = vec![("X-Repo-Commit".into(), commit), ("ETag".into(), format!("\"{}\"", file.etag))];
    serve(&file, headers.get("range"), extra, None)
}

fn handle(conn: TcpStream, addr: SocketAddr, state: &Mutex<State>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or("").to_string();
    let path = words.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    if method.is_empty() {
        return Ok(());
    }
    let reply = route(&method, &path, &headers, addr, state);
    let mut out = conn;
    let mut head = format!("HTTP/1.1 {} Mock\r\nConnection: close\r\n", reply.status);
    let has_len = reply.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_len {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if method != "HEAD" {
        let (a, b) = reply.span;
        let b = reply.cut_after.map_or(b, |n| a + n);
        let body = &reply.body[a..b];
        if let Some((n, hold)) = reply.stall {
            let n = n.min(body.len());
            out.write_all(&body[..n])?;
            out.flush()?;
            // Nothing more, the connection open: only a read timeout gets the client out.
            std::thread::sleep(hold);
            out.write_all(&body[n..])?;
        } else if let Some((chunk, pause)) = reply.throttle {
            for part in body.chunks(chunk.max(1)) {
                out.write_all(part)?;
                out.flush()?;
                std::thread::sleep(pause);
            }
        } else {
            out.write_all(body)?;
        }
    }
    out.flush()?;
    // Dropping the stream closes the connection, ending a cut body early.
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const REPO: &str = "nibble-test/tiny-llama";

/// The tiny model's files, as a repo with a single `model.safetensors`.
fn single_file_repo() -> Vec<(String, Vec<u8>)> {
    let dir = root().join("models/tiny-llama");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    // A file nibble must not fetch.
    files.push(("README.md".into(), b"# tiny\n".to_vec()));
    files
}

/// The same model with its weights split into two shards and an index.
fn sharded_repo() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = single_file_repo().into_iter().filter(|(n, _)| n != "model.safetensors").collect();
    let bytes = std::fs::read(root().join("models/tiny-llama/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let half = names.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in [&names[..half], &names[half..]].into_iter().enumerate() {
        let shard = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> =
            chunk.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
        files.push((shard.clone(), safetensors::serialize(views, None).unwrap()));
        for n in chunk {
            weight_map.insert(n.clone(), serde_json::Value::String(shard.clone()));
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": bytes.len() }, "weight_map": weight_map });
    files.push(("model.safetensors.index.json".into(), serde_json::to_vec_pretty(&index).unwrap()));
    files
}

/// A config for `hub` with its own cache, fast retries and no progress bar.
fn config(hub: &MockHub, cache: &Path) -> HubConfig {
    config_at(&hub.endpoint(), cache)
}

fn config_at(endpoint: &str, cache: &Path) -> HubConfig {
    let mut cfg = HubConfig::new(endpoint, cache);
    cfg.retry = RetryPolicy { max_attempts: 4, base_delay: Duration::from_millis(5), max_delay: Duration::from_millis(40) };
    cfg.timeout = Duration::from_secs(5);
    cfg.read_timeout = Duration::from_secs(5);
    cfg.progress = false;
    cfg
}

fn load(id: &str, cfg: &HubConfig) -> nibble::Result<Model> {
    Model::load(
        id,
        &LoadOptions {
            quant: BitsAndBytesConfig::none(),
            device_map: DeviceMap::Auto,
            hub: Some(cfg.clone()),
            ..LoadOptions::default()
        },
    )
}

fn assert_logits_match(model: &Model) {
    let d = max_abs_diff(&model.logits(&reference_ids()).unwrap(), &reference("logits_f32"));
    assert!(d < 1e-4, "max abs diff {d} >= 1e-4");
}

fn repo_dir(cache: &Path) -> PathBuf {
    cache.join("models--nibble-test--tiny-llama")
}

fn downloads(log: &[Seen]) -> usize {
    log.iter().filter(|s| s.method == "GET").count()
}

/// The `Range` header of each CDN download, in order.
fn cdn_ranges(log: &[Seen]) -> Vec<Option<String>> {
    log.iter().filter(|s| s.method == "GET" && s.path.starts_with("/cdn/")).map(|s| s.range.clone()).collect()
}

/// The `.incomplete` files in the repo's blobs folder.
fn incomplete_files(cache: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(repo_dir(cache).join("blobs")) else { return Vec::new() };
    rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.to_string_lossy().ends_with(".incomplete")).collect()
}

/// `file`'s blob holds exactly the repo's bytes (an LFS file's sha256 is its etag), and nothing
/// partial is left.
fn assert_blob_complete(hub: &MockHub, cache: &Path, file: &str) {
    let etag = hub.etag(REPO, file);
    let blob = std::fs::read(repo_dir(cache).join("blobs").join(&etag)).unwrap();
    assert!(blob == *hub.bytes(REPO, file), "{file}: the blob differs from the served file");
    if file.ends_with(".safetensors") {
        assert_eq!(sha256_hex(&blob), etag);
    }
    assert_eq!(incomplete_files(cache), Vec::<PathBuf>::new());
}

/// Neither the blob of `file`, nor a partial download of it, nor a snapshot entry for it.
fn assert_nothing_kept(hub: &MockHub, cache: &Path, file: &str) {
    let dir = repo_dir(cache);
    let etag = hub.etag(REPO, file);
    assert!(!dir.join("blobs").join(&etag).exists(), "blob kept");
    assert!(std::fs::symlink_metadata(dir.join("blobs").join(format!("{etag}.incomplete"))).is_err(), ".incomplete kept");
    let commit = hub.with(|s| s.repos[REPO].commit.clone());
    let link = dir.join("snapshots").join(commit).join(file);
    assert!(std::fs::symlink_metadata(&link).is_err(), "snapshot entry kept: {}", link.display());
}

/// This test binary again, running only `child_process_entry`, which loads `REPO` from `hub`
/// into `cache` and prints `CHILD-RESULT ok` or `CHILD-RESULT err ...`.
fn child(hub: &MockHub, cache: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args(["child_process_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env("NIBBLE_HUB_CHILD_ENDPOINT", hub.endpoint())
        .env("NIBBLE_HUB_CHILD_CACHE", cache)
        .env_remove("NIBBLE_HUB_CHILD_FSIZE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c
}

/// What a child printed after `CHILD-RESULT `.
fn child_result(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    // libtest prints `test child_process_entry ... ` on the same line, before it.
    match stdout.lines().find_map(|l| l.split_once("CHILD-RESULT ").map(|(_, r)| r)) {
        Some(r) => r.to_string(),
        None => panic!("the child printed no result ({:?}):\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr)),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn first_load_downloads_into_the_shared_layout_then_the_cache_serves_with_the_server_stopped() {
    let mut hub = MockHub::start();
    let commit = hub.add_repo(REPO, &single_file_repo());
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = config(&hub, cache.path());
    cfg.token = Some(HubToken::new("hf_test_token_abc"));

    let model = load(REPO, &cfg).unwrap();
    assert_logits_match(&model);

    // Python's layout: refs/main → commit, snapshot files are relative links to blobs.
    let dir = repo_dir(cache.path());
    assert_eq!(std::fs::read_to_string(dir.join("refs/main")).unwrap().trim(), commit);
    let snap = dir.join("snapshots").join(&commit);
    let st_etag = hub.etag(REPO, "model.safetensors");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"] {
        assert!(snap.join(f).is_file(), "{f} not in the snapshot");
    }
    #[cfg(unix)]
    {
        let target = std::fs::read_link(snap.join("model.safetensors")).unwrap();
        assert_eq!(target, Path::new("../../blobs").join(&st_etag));
    }
    assert!(dir.join("blobs").join(&st_etag).is_file());
    assert!(!snap.join("README.md").exists(), "fetched a file the model does not need");
    // The repo has no special_tokens_map.json: recorded for offline runs, as Python does.
    assert!(dir.join(".no_exist").join(&commit).join("special_tokens_map.json").exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("blobs"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty());

    // The token went to the Hub, never to the CDN.
    let log = hub.log();
    assert!(log.iter().filter(|s| s.path.contains("/resolve/")).all(|s| s.auth.as_deref() == Some("Bearer hf_test_token_abc")));
    let cdn: Vec<_> = log.iter().filter(|s| s.path.starts_with("/cdn/")).collect();
    assert_eq!(cdn.len(), 1, "{cdn:?}");
    assert!(cdn.iter().all(|s| s.auth.is_none()), "token sent to the CDN");
    // Later files were asked for at the commit the revision resolved to.
    assert!(log.iter().skip(1).all(|s| !s.path.contains("/resolve/main/")), "{log:?}");

    // A second load with the server up downloads nothing.
    let before = downloads(&hub.log());
    load(REPO, &cfg).unwrap();
    assert_eq!(downloads(&hub.log()), before);

    // With the server gone, the complete cached snapshot is used.
    hub.stop();
    let model = load(REPO, &cfg).unwrap();
    assert_logits_match(&model);
}

#[test]
fn sharded_repo_downloads_the_index_and_its_shards() {
    let hub = MockHub::start();
    let commit = hub.add_repo(REPO, &sharded_repo());
    let cache = tempfile::tempdir().unwrap();
    let model = load(REPO, &config(&hub, cache.path())).unwrap();
    assert_logits_match(&model);
    let snap = repo_dir(cache.path()).join("snapshots").join(&commit);
    for f in ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        assert!(snap.join(f).is_file(), "{f}");
    }
    // A commit hash as revision, fully cached: no request at all.
    let n = hub.log().len();
    let opts = LoadOptions {
        quant: BitsAndBytesConfig::none(),
        revision: Some(commit.clone()),
        hub: Some(config(&hub, cache.path())),
        ..LoadOptions::default()
    };
    Model::load(REPO, &opts).unwrap();
    assert_eq!(hub.log().len(), n);
}

#[test]
fn offline_mode_uses_the_cache_and_lists_what_is_missing() {
    let mut hub = MockHub::start();
    let commit = hub.add_repo(REPO, &sharded_repo());
    let cache = tempfile::tempdir().unwrap();
    let mut offline = config(&hub, cache.path());
    offline.offline = true;

    // Nothing cached yet.
    match load(REPO, &offline).unwrap_err() {
        Error::HubOfflineNotCached { repo, revision, missing, .. } => {
            assert_eq!((repo.as_str(), revision.as_str()), (REPO, "main"));
            assert!(missing.iter().any(|m| m.starts_with("refs/main")), "{missing:?}");
        }
        e => panic!("expected HubOfflineNotCached, got {e:?}"),
    }
    assert!(hub.log().is_empty(), "offline mode used the network");

    load(REPO, &config(&hub, cache.path())).unwrap();
    hub.stop();
    assert_logits_match(&load(REPO, &offline).unwrap());

    // A shard gone from the cache: named in the error.
    let snap = repo_dir(cache.path()).join("snapshots").join(&commit);
    std::fs::remove_file(snap.join("model-00002-of-00002.safetensors")).unwrap();
    match load(REPO, &offline).unwrap_err() {
        Error::HubOfflineNotCached { missing, .. } => {
            assert_eq!(missing, vec!["model-00002-of-00002.safetensors".to_string()]);
        }
        e => panic!("expected HubOfflineNotCached, got {e:?}"),
    }
    // An unknown revision offline.
    let opts = LoadOptions { revision: Some("v2".into()), hub: Some(offline.clone()), ..LoadOptions::default() };
    assert!(matches!(Model::load(REPO, &opts).unwrap_err(), Error::HubOfflineNotCached { .. }));
}

#[test]
fn transient_503_is_retried() {
    let hub = MockHub::start();
    hub.add_repo(REPO, &single_file_repo());
    hub.with(|s| s.fail_next.extend([503, 503]));
    let cache = tempfile::tempdir().unwrap();
    assert_logits_match(&load(REPO, &config(&hub, cache.path())).unwrap());
    let log = hub.log();
    // Two failed tries of the first request, then the third worked.
    assert!(log[..3].iter().all(|s| s.path.ends_with("/config.json")), "{log:?}");

    // A failure that outlasts the retries is a typed network error naming the file.
    let hub = MockHub::start();
    hub.add_repo(REPO, &single_file_repo());
    hub.with(|s| s.fail_next.extend([503; 10]));
    let cache = tempfile::tempdir().unwrap();
    match load(REPO, &config(&hub, cache.path())).unwrap_err() {
        Error::HubNetwork { file, attempts, reason, .. } => {
            assert_eq!((file.as_str(), attempts), ("config.json", 4));
            assert!(reason.contains("503"), "{reason}");
        }
        e => panic!("expected HubNetwork, got {e:?}"),
    }
    assert_eq!(hub.log().len(), 4);
}

#[test]
fn unauthorized_401_is_the_gated_error_and_never_shows_the_token() {
    let hub = MockHub::start();
    hub.add_repo(REPO, &single_file_repo());
    hub.with(|s| s.token = Some("hf_the_right_one".into()));
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = config(&hub, cache.path());
    let secret = "hf_FAKEtokenDoNotLeak123";
    cfg.token = Some(HubToken::new(secret));
    let err = load(REPO, &cfg).unwrap_err();
    assert!(matches!(&err, Error::HubUnauthorized { status: 401, repo, .. } if repo == REPO), "{err:?}");
    let text = format!("{err} {err:?} {cfg:?}");
    assert!(text.contains("HF_TOKEN") && text.contains("license"), "{text}");
    assert!(!text.contains(secret), "token leaked: {text}");

    // Failures of other kinds do not show it either.
    hub.with(|s| {
        s.token = None;
        s.fail_next.extend([500; 10]);
    });
    let err = load(REPO, &cfg).unwrap_err();
    assert!(matches!(err, Error::HubNetwork { .. }), "{err:?}");
    assert!(!format!("{err} {err:?}").contains(secret));

    // With the right token it loads.
    hub.with(|s| {
        s.token = Some("hf_the_right_one".into());
        s.fail_next.clear();
    });
    cfg.token = Some(HubToken::new("hf_the_right_one"));
    load(REPO, &cfg).unwrap();
}

#[test]
fn missing_repo_and_revision_are_typed() {
    let hub = MockHub::start();
    hub.add_repo(REPO, &single_file_repo());
    let cache = tempfile::tempdir().unwrap();
    let cfg = config(&hub, cache.path());
    match load("nibble-test/no-such-model", &cfg).unwrap_err() {
        Error::HubRepoNotFound { repo, endpoint } => {
            assert_eq!(repo, "nibble-test/no-such-model");
            assert_eq!(endpoint, hub.endpoint());
        }
        e => panic!("expected HubRepoNotFound, got {e:?}"),
    }
    let opts = LoadOptions { revision: Some("v9".into()), hub: Some(cfg.clone()), ..LoadOptions::default() };
    assert!(matches!(Model::load(REPO, &opts).unwrap_err(), Error::HubRevisionNotFound { revision, .. } if revision == "v9"));
    // A revision that would leave refs/ is refused before any request.
    let n = hub.log().len();
    let opts = LoadOptions { revision: Some("../../x".into()), hub: Some(cfg), ..LoadOptions::default() };
    assert!(matches!(Model::load(REPO, &opts).unwrap_err(), Error::InvalidArgument { .. }));
    assert_eq!(hub.log().len(), n);
}

#[test]
fn a_cut_download_is_never_left_looking_complete() {
    let hub = MockHub::start();
    let commit = hub.add_repo(REPO, &single_file_repo());
    let etag = hub.etag(REPO, "model.safetensors");
    let cut = 1_000_000u64;
    hub.with(|s| s.cut_at = Some(cut));
    let cache = tempfile::tempdir().unwrap();
    let cfg = config(&hub, cache.path());

    match load(REPO, &cfg).unwrap_err() {
        Error::HubNetwork { file, attempts, .. } => assert_eq!((file.as_str(), attempts), ("model.safetensors", 4)),
        e => panic!("expected HubNetwork, got {e:?}"),
    }
    let dir = repo_dir(cache.path());
    assert!(!dir.join("blobs").join(&etag).exists(), "a cut download got the blob's name");
    assert!(!dir.join("snapshots").join(&commit).join("model.safetensors").exists());
    let part = dir.join("blobs").join(format!("{etag}.incomplete"));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), cut);
    // Retries resumed from where the cut left off.
    let ranges: Vec<_> = hub.log().iter().filter(|s| s.path.starts_with("/cdn/")).map(|s| s.range.clone()).collect();
    assert_eq!(ranges[0], None);
    assert!(ranges[1..].iter().all(|r| r.as_deref() == Some("bytes=1000000-")), "{ranges:?}");
    // Offline, the partial file does not count.
    let mut offline = cfg.clone();
    offline.offline = true;
    assert!(matches!(load(REPO, &offline).unwrap_err(), Error::HubOfflineNotCached { .. }));

    // The next run resumes and completes.
    hub.with(|s| s.cut_at = None);
    assert_logits_match(&load(REPO, &cfg).unwrap());
    assert!(!part.exists());
    let last = hub.log().into_iter().rfind(|s| s.path.starts_with("/cdn/")).unwrap();
    assert_eq!(last.range.as_deref(), Some("bytes=1000000-"));
}

#[test]
fn pickle_only_repo_is_refused() {
    let hub = MockHub::start();
    let files: Vec<(String, Vec<u8>)> = single_file_repo()
        .into_iter()
        .filter(|(n, _)| n != "model.safetensors")
        .chain([("pytorch_model.bin".to_string(), b"not really a pickle".to_vec())])
        .collect();
    hub.add_repo(REPO, &files);
    let cache = tempfile::tempdir().unwrap();
    match load(REPO, &config(&hub, cache.path())).unwrap_err() {
        Error::PickleOnly { source_name, file } => {
            assert_eq!((source_name.as_str(), file.as_str()), (REPO, "pytorch_model.bin"));
        }
        e => panic!("expected PickleOnly, got {e:?}"),
    }
    assert!(hub.log().iter().all(|s| !(s.method == "GET" && s.path.ends_with("pytorch_model.bin"))), "downloaded the pickle");
}

#[test]
fn bad_shard_indexes_are_typed_errors() {
    let index_with = |name: &str| {
        let mut files: Vec<(String, Vec<u8>)> =
            sharded_repo().into_iter().filter(|(n, _)| n != "model.safetensors.index.json").collect();
        let index = serde_json::json!({ "weight_map": { "model.embed_tokens.weight": "model-00001-of-00002.safetensors", "lm_head.weight": name } });
        files.push(("model.safetensors.index.json".into(), serde_json::to_vec(&index).unwrap()));
        files
    };

    // A shard the repo does not have.
    let hub = MockHub::start();
    hub.add_repo(REPO, &index_with("model-00003-of-00003.safetensors"));
    let cache = tempfile::tempdir().unwrap();
    match load(REPO, &config(&hub, cache.path())).unwrap_err() {
        Error::HubFileNotFound { file, .. } => assert_eq!(file, "model-00003-of-00003.safetensors"),
        e => panic!("expected HubFileNotFound, got {e:?}"),
    }

    // Shard paths that leave the snapshot folder: refused before anything is asked for them.
    for bad in ["../../../../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"] {
        let hub = MockHub::start();
        hub.add_repo(REPO, &index_with(bad));
        let cache = tempfile::tempdir().unwrap();
        match load(REPO, &config(&hub, cache.path())).unwrap_err() {
            Error::CorruptCheckpoint { reason, .. } => assert!(reason.contains("leaves the model folder"), "{reason}"),
            e => panic!("{bad}: expected CorruptCheckpoint, got {e:?}"),
        }
        assert!(hub.log().iter().all(|s| !s.path.contains("outside") && !s.path.contains("passwd")));
        assert!(!cache.path().join("outside.safetensors").exists());
    }
}

#[test]
fn a_cache_folder_path_loads_through_refs_main() {
    let mut hub = MockHub::start();
    hub.add_repo(REPO, &single_file_repo());
    let cache = tempfile::tempdir().unwrap();
    load(REPO, &config(&hub, cache.path())).unwrap();
    hub.stop();
    let dir = repo_dir(cache.path());
    let model = nibble::from_pretrained(dir.to_str().unwrap(), BitsAndBytesConfig::none(), DeviceMap::Auto).unwrap();
    assert_logits_match(&model);
    let opts = LoadOptions { revision: Some("nope".into()), ..LoadOptions::default() };
    assert!(matches!(Model::load(dir.to_str().unwrap(), &opts).unwrap_err(), Error::InvalidSource { .. }));
}

/// The one test that goes through the environment, as a user would; no other test reads it.
#[test]
fn from_pretrained_with_a_hub_id_reads_the_environment() {
    let hub = MockHub::start();
    hub.add_repo(REPO, &sharded_repo());
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("HF_ENDPOINT", hub.endpoint());
    std::env::set_var("HF_HUB_CACHE", cache.path());
    std::env::set_var("HF_HOME", cache.path().join("home"));
    std::env::remove_var("HF_TOKEN");
    std::env::remove_var("HF_HUB_OFFLINE");
    let model = nibble::from_pretrained(REPO, BitsAndBytesConfig::none(), DeviceMap::Auto).unwrap();
    assert_logits_match(&model);
    assert!(repo_dir(cache.path()).join("refs/main").is_file());
}

// ---------------------------------------------------------------------------------------------
// Faults (issue 15, item 3)
// ---------------------------------------------------------------------------------------------

/// Not a test of its own: the body of the child processes that `child` starts (it returns at once
/// when the test binary runs normally). It loads `REPO` with the real code path, optionally under
/// a file-size limit, and prints the outcome for the parent.
#[test]
fn child_process_entry() {
    let Ok(endpoint) = std::env::var("NIBBLE_HUB_CHILD_ENDPOINT") else { return };
    let cache = PathBuf::from(std::env::var("NIBBLE_HUB_CHILD_CACHE").unwrap());
    #[cfg(unix)]
    if let Ok(limit) = std::env::var("NIBBLE_HUB_CHILD_FSIZE") {
        let limit: libc::rlim_t = limit.parse().unwrap();
        // SAFETY: plain libc calls on a struct owned here; the process is single-purpose.
        unsafe {
            // Past the limit the kernel sends SIGXFSZ, which kills by default; ignored, the write
            // fails with EFBIG instead, which is what the code under test sees.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut rl), 0);
            rl.rlim_cur = limit.min(rl.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &rl), 0);
        }
    }
    match load(REPO, &config_at(&endpoint, &cache)) {
        Ok(_) => println!("CHILD-RESULT ok"),
        Err(e) => println!("CHILD-RESULT err {e:?} | {e}"),
    }
}

#[test]
fn a_body_cut_short_is_resumed_with_a_range_request() {
    let hub = MockHub::start();
    hub.add_repo(REPO, &single_file_repo());
    hub.with(|s| s.cut_once = Some(1_000_000));
    let cache = tempfile::tempdir().unwrap();
    assert_logits_match(&load(REPO, &config(&hub, cache.path())).unwrap());
    // The second attempt asked for the rest, from the .incomplete file's length.
    assert_eq!(cdn_ranges(&hub.log()), vec![None, Some("bytes=1000000-".to_string())]);
    assert_blob_complete(&hub, cache.path(), "model.safetensors");
}

#[test]
fn bytes_that_do_not_match_the_linked_etag_are_a_typed_error_and_nothing_is_kept() {
    let hub = MockHub::start();
    hub.add_repo(REPO, &single_file_repo());
    hub.with(|s| s.corrupt = true);
    let cache = tempfile::tempdir().unwrap();
    let cfg = config(&hub, cache.path());
    let etag = hub.etag(REPO, "model.safetensors");
    match load(REPO, &cfg).unwrap_err() {
        Error::HubChecksumMismatch { repo, file, expected, actual } => {
            assert_eq!((repo.as_str(), file.as_str()), (REPO, "model.safetensors"));
            assert_eq!(expected, etag);
            let mut served = hub.bytes(REPO, "model.safetensors").to_vec();
            let i = served.len() / 2;
            served[i] ^= 0x55;
            assert_eq!(actual, sha256_hex(&served));
        }
        e => panic!("expected HubChecksumMismatch, got {e:?}"),
    }
    assert_nothing_kept(&hub, cache.path(), "model.safetensors");
    // Wrong bytes are not retried (the same server would send them again).
    assert_eq!(cdn_ranges(&hub.log()).len(), 1);

    // Once the server sends the right bytes, the next run downloads them afresh.
    hub.with(|s| s.corrupt = false);
    assert_logits_match(&load(REPO, &cfg).unwrap());
    assert_eq!(cdn_ranges(&hub.log()), vec![None, None]);
    assert_blob_complete(&hub, cache.path(), "model.safetensors");
}

#[test]
fn a_server_that_stops_sending_hits_the_read_timeout_and_the_retry_resumes() {
    assert_eq!(HubConfig::new("http://x", "/tmp").read_timeout, Duration::from_secs(10), "huggingface_hub's default");
    let hub = MockHub::start();
    hub.add_repo(REPO, &single_file_repo());
    // A megabyte, then nothing for a minute with the connection open.
    hub.with(|s| s.stall_once = Some((1_000_000, Duration::from_secs(60))));
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = config(&hub, cache.path());
    cfg.read_timeout = Duration::from_millis(300);
    let t0 = Instant::now();
    assert_logits_match(&load(REPO, &cfg).unwrap());
    assert!(t0.elapsed() < Duration::from_secs(20), "took {:?}", t0.elapsed());
    assert_eq!(cdn_ranges(&hub.log()), vec![None, Some("bytes=1000000-".to_string())]);
    let cdn: Vec<Instant> = hub.log().iter().filter(|s| s.path.starts_with("/cdn/")).map(|s| s.at).collect();
    // The read timeout, not the 5 s connect/response timeout of `config`, ended the attempt.
    let gap = cdn[1] - cdn[0];
    assert!(gap >= Duration::from_millis(300) && gap < Duration::from_millis(2500), "retried after {gap:?}");
    assert_blob_complete(&hub, cache.path(), "model.safetensors");
}

#[test]
fn a_redirect_loop_is_a_typed_error_after_a_bounded_number_of_redirects() {
    for (mode, file) in [(Loop::Resolve, "config.json"), (Loop::Cdn, "model.safetensors")] {
        let hub = MockHub::start();
        hub.add_repo(REPO, &single_file_repo());
        hub.with(|s| s.redirect_loop = Some(mode));
        let cache = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        match load(REPO, &config(&hub, cache.path())).unwrap_err() {
            Error::HubTooManyRedirects { repo, file: f, redirects, last } => {
                assert_eq!((repo.as_str(), f.as_str(), redirects), (REPO, file, 5), "{mode:?}");
                assert!(!last.contains("Signature"), "{last}");
            }
            e => panic!("{mode:?}: expected HubTooManyRedirects, got {e:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "{mode:?}: took {:?}", t0.elapsed());
        // The request, then five redirects followed; not retried.
        let looped = hub.log().iter().filter(|s| s.path.contains(if mode == Loop::Cdn { "/cdn/" } else { "/config.json" })).count();
        assert_eq!(looped, 6, "{mode:?}: {:?}", hub.log());
    }
}

#[test]
fn retry_after_on_429_is_honoured_and_capped_by_max_delay() {
    // (Retry-After, max_delay) -> the wait expected between the two tries, at least and at most.
    let cases = [
        ("1", Duration::from_secs(5), Duration::from_millis(950), Duration::from_secs(3)),
        ("3600", Duration::from_millis(300), Duration::from_millis(280), Duration::from_secs(2)),
    ];
    for (after, max_delay, lo, hi) in cases {
        let hub = MockHub::start();
        hub.add_repo(REPO, &single_file_repo());
        hub.with(|s| {
            s.fail_next.push_back(429);
            s.fail_headers = vec![("Retry-After".into(), after.into())];
        });
        let cache = tempfile::tempdir().unwrap();
        let mut cfg = config(&hub, cache.path());
        cfg.retry.max_delay = max_delay;
        assert_logits_match(&load(REPO, &cfg).unwrap());
        let log = hub.log();
        assert!(log[..2].iter().all(|s| s.path.ends_with("/config.json")), "{log:?}");
        let gap = log[1].at - log[0].at;
        assert!(gap >= lo && gap < hi, "Retry-After {after}, max_delay {max_delay:?}: waited {gap:?}");
    }
}

/// A full disk, for real: the `.incomplete` file is a link to `/dev/full`, where every write
/// fails with ENOSPC. The download code opens, writes and cleans up that path exactly as it would
/// a file on a full disk (no test hook in the library), and needs no root, unlike a small tmpfs.
#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_is_a_typed_error_and_leaves_no_partial_blob() {
    if !Path::new("/dev/full").exists() {
        eprintln!("no /dev/full here; skipped");
        return;
    }
    let hub = MockHub::start();
    hub.add_repo(REPO, &single_file_repo());
    let cache = tempfile::tempdir().unwrap();
    let blobs = repo_dir(cache.path()).join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let part = blobs.join(format!("{}.incomplete", hub.etag(REPO, "model.safetensors")));
    std::os::unix::fs::symlink("/dev/full", &part).unwrap();
    let err = load(REPO, &config(&hub, cache.path())).unwrap_err();
    let text = err.to_string();
    match &err {
        Error::WriteFailed { path, source } => {
            assert_eq!(path, &part);
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{source}");
        }
        e => panic!("expected WriteFailed, got {e:?}"),
    }
    assert!(text.contains("disk is full") && text.contains(&part.display().to_string()), "{text}");
    assert_nothing_kept(&hub, cache.path(), "model.safetensors");
    assert!(Path::new("/dev/full").exists());
}

/// A file-size limit (`RLIMIT_FSIZE`) in a child process: writes to a regular file in the cache
/// fail with EFBIG past it, the other way a disk runs out, exercising the same write-error path as
/// ENOSPC on the real file (the limit cannot be set in this process: it would hit every test).
#[cfg(unix)]
#[test]
fn a_file_size_limit_in_a_child_process_is_a_typed_error_and_leaves_no_partial_blob() {
    let hub = MockHub::start();
    hub.add_repo(REPO, &single_file_repo());
    let cache = tempfile::tempdir().unwrap();
    let out = child(&hub, cache.path()).env("NIBBLE_HUB_CHILD_FSIZE", "1000000").output().unwrap();
    let result = child_result(&out);
    let part = repo_dir(cache.path()).join("blobs").join(format!("{}.incomplete", hub.etag(REPO, "model.safetensors")));
    assert!(result.starts_with("err WriteFailed"), "{result}");
    assert!(result.contains(&part.display().to_string()) && result.contains("disk is full"), "{result}");
    assert!(result.contains(&format!("os error {}", libc::EFBIG)), "{result}");
    assert_nothing_kept(&hub, cache.path(), "model.safetensors");
    // The small files that fit were kept, complete.
    assert_blob_complete(&hub, cache.path(), "config.json");
}

#[test]
fn two_clients_downloading_the_same_file_at_once_download_it_once() {
    let hub = MockHub::start();
    hub.add_repo(REPO, &single_file_repo());
    // The weights take about a second to arrive: long enough for both to be at them together.
    hub.with(|s| s.throttle = Some((128 * 1024, Duration::from_millis(50))));
    let cache = tempfile::tempdir().unwrap();
    let cfg = config(&hub, cache.path());
    let start = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (cfg, start) = (cfg.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                load(REPO, &cfg).map(drop)
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    assert_once_each(&hub.log());
    assert_blob_complete(&hub, cache.path(), "model.safetensors");
    assert!(repo_dir(cache.path()).parent().unwrap().join(".locks/models--nibble-test--tiny-llama").is_dir());
}

#[cfg(unix)]
#[test]
fn two_processes_downloading_the_same_file_at_once_download_it_once() {
    let hub = MockHub::start();
    hub.add_repo(REPO, &single_file_repo());
    hub.with(|s| s.throttle = Some((128 * 1024, Duration::from_millis(50))));
    let cache = tempfile::tempdir().unwrap();
    let a = child(&hub, cache.path()).spawn().unwrap();
    let b = child(&hub, cache.path()).spawn().unwrap();
    for p in [a, b] {
        let out = p.wait_with_output().unwrap();
        assert_eq!(child_result(&out), "ok");
    }
    assert_once_each(&hub.log());
    assert_blob_complete(&hub, cache.path(), "model.safetensors");
}

/// Each file was downloaded once, though both clients asked for its metadata, and the second
/// asked for the weights while the first was still receiving them (so it waited on the lock).
fn assert_once_each(log: &[Seen]) {
    let mut gets: BTreeMap<&str, usize> = BTreeMap::new();
    for s in log.iter().filter(|s| s.method == "GET") {
        *gets.entry(s.path.split('?').next().unwrap_or("")).or_default() += 1;
    }
    assert!(gets.values().all(|&n| n == 1), "{gets:?}");
    let heads: Vec<Instant> =
        log.iter().filter(|s| s.method == "HEAD" && s.path.ends_with("/model.safetensors")).map(|s| s.at).collect();
    assert_eq!(heads.len(), 2, "{log:?}");
    let cdn = log.iter().find(|s| s.path.starts_with("/cdn/")).unwrap().at;
    let last_head = heads.iter().max().unwrap();
    assert!(
        *last_head < cdn + Duration::from_millis(700),
        "the second client came {:?} after the download started: they did not overlap",
        last_head.saturating_duration_since(cdn)
    );
}

#[cfg(unix)]
#[test]
fn a_download_interrupted_by_sigint_is_resumed_by_the_next_run() {
    use std::os::unix::process::ExitStatusExt;
    let hub = MockHub::start();
    hub.add_repo(REPO, &single_file_repo());
    let etag = hub.etag(REPO, "model.safetensors");
    let total = hub.bytes(REPO, "model.safetensors").len() as u64;
    // About 1.6 MB/s: the child is interrupted well before the end.
    hub.with(|s| s.throttle = Some((32 * 1024, Duration::from_millis(20))));
    let cache = tempfile::tempdir().unwrap();
    let part = repo_dir(cache.path()).join("blobs").join(format!("{etag}.incomplete"));
    let mut proc = child(&hub, cache.path()).stdout(std::process::Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < 300_000 {
        assert!(proc.try_wait().unwrap().is_none(), "the child ended before it was interrupted");
        assert!(Instant::now() < deadline, "the child never got 300 kB into the download");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: a signal to the child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(proc.id() as libc::pid_t, libc::SIGINT) }, 0);
    let status = proc.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
    let have = std::fs::metadata(&part).expect("the .incomplete file did not survive SIGINT").len();
    assert!(have >= 300_000 && have < total, "{have} of {total}");
    assert!(!repo_dir(cache.path()).join("blobs").join(&etag).exists());

    hub.with(|s| s.throttle = None);
    assert_logits_match(&load(REPO, &config(&hub, cache.path())).unwrap());
    let ranges = cdn_ranges(&hub.log());
    assert_eq!(ranges.first(), Some(&None));
    assert_eq!(ranges.last(), Some(&Some(format!("bytes={have}-"))), "{ranges:?}");
    assert_blob_complete(&hub, cache.path(), "model.safetensors");
}

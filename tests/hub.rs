//! Loading from the Hugging Face Hub, against a mock Hub on loopback.
//!
//! Each test starts its own mock on 127.0.0.1 (ephemeral port) in a thread. It speaks the parts
//! of the Hub protocol nibble relies on: `/{repo}/resolve/{revision}/{file}` with `X-Repo-Commit`,
//! `ETag`, `X-Error-Code`; safetensors files as LFS files (a 302 to a "CDN" path with
//! `X-Linked-Etag` and `X-Linked-Size`); `Content-Length`; `Range` requests. Faults are injected
//! through its shared state: statuses for the next requests, a required token, cut bodies.
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
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

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
}

#[derive(Default)]
struct State {
    repos: HashMap<String, MockRepo>,
    /// When set, resolve requests without `Authorization: Bearer <token>` get a 401.
    token: Option<String>,
    /// Statuses answered to the next requests, whatever they ask.
    fail_next: VecDeque<u16>,
    /// CDN bodies stop (the connection is closed) at this byte offset of the file.
    cut_at: Option<u64>,
    log: Vec<Seen>,
}

struct MockHub {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
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
                let f = MockFile {
                    etag: hash_hex(bytes, name),
                    bytes: Arc::new(bytes.clone()),
                    lfs: name.ends_with(".safetensors"),
                };
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
}

impl Reply {
    fn status(status: u16, headers: &[(&str, &str)]) -> Self {
        Reply {
            status,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: Arc::new(Vec::new()),
            span: (0, 0),
            cut_after: None,
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
    Reply { status, headers, body: file.bytes.clone(), span: (start, end), cut_after }
}

fn route(method: &str, path: &str, headers: &HashMap<String, String>, addr: SocketAddr, state: &Mutex<State>) -> Reply {
    let mut st = state.lock().unwrap();
    st.log.push(Seen {
        method: method.into(),
        path: path.into(),
        range: headers.get("range").cloned(),
        auth: headers.get("authorization").cloned(),
    });
    if let Some(code) = st.fail_next.pop_front() {
        return Reply::status(code, &[]);
    }
    if let Some(rest) = path.strip_prefix("/cdn/") {
        let etag = rest.split('?').next().unwrap_or("");
        let file = st.repos.values().flat_map(|r| r.files.values()).find(|f| f.etag == etag).cloned();
        return match file {
            Some(f) => serve(&f, headers.get("range"), vec![("ETag".into(), format!("\"{etag}\""))], st.cut_at),
            None => Reply::status(404, &[]),
        };
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
        out.write_all(&reply.body[a..b])?;
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
    let mut cfg = HubConfig::new(hub.endpoint(), cache);
    cfg.retry = RetryPolicy { max_attempts: 4, base_delay: Duration::from_millis(5), max_delay: Duration::from_millis(40) };
    cfg.timeout = Duration::from_secs(5);
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

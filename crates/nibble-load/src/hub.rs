//! Fetching a model from the Hugging Face Hub into the cache shared with Python.
//!
//! [`snapshot`] downloads exactly the files a load needs (config, tokenizer files, generation
//! config, chat template, and the safetensors weights: one file, or the index and the shards it
//! names) of a repository at a revision, and returns the snapshot folder, ready for
//! [`ModelFiles::from_dir`](crate::ModelFiles::from_dir). Files already in the cache (downloaded by
//! nibble or by Python's `huggingface_hub`) are not downloaded again.
//!
//! Settings come from a [`HubConfig`], by default read from the environment as Python reads it
//! (`HF_ENDPOINT`, `HF_HUB_CACHE`, `HF_HOME`, `HF_TOKEN`, the cached token file, `HF_HUB_OFFLINE`);
//! programs and tests can build one instead, since environment variables are process-global.
//!
//! The client is written here over `ureq` rather than taken from the `hf-hub` crate: its blocking
//! API (0.4) unwraps on network data, retries neither metadata requests nor 5xx answers, and its
//! 1.x series is async-only. What this needs from the protocol is small (see `client`).

mod cache;
mod client;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nibble_core::{Error, Result};

use cache::{Incomplete, RepoCache};
use client::{Client, FileMeta};

/// The Hub used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The revision used when none is given.
pub const DEFAULT_REVISION: &str = "main";

/// How long a download may receive nothing before the attempt fails (`HF_HUB_DOWNLOAD_TIMEOUT`
/// unset): Python's `huggingface_hub` default.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Tokenizer files: fetched when the repo has them; offline, each must be cached or known absent.
const TOKENIZER_FILES: [&str; 2] = ["tokenizer.json", "tokenizer_config.json"];

/// Files fetched when the repo has them, never required.
const OPTIONAL_FILES: [&str; 3] = ["generation_config.json", "special_tokens_map.json", "chat_template.jinja"];

/// Pickle weight files, looked for only to explain a refusal.
const PICKLE_FILES: [&str; 2] = ["pytorch_model.bin", "pytorch_model.bin.index.json"];

/// A Hub access token. Its `Debug` output is redacted and it has no `Display`, so it cannot end
/// up in a log line or an error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct HubToken(String);

impl HubToken {
    /// Wraps a token (`hf_...`).
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The secret itself, for the `Authorization` header only.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for HubToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HubToken(***)")
    }
}

/// How transient failures (5xx, 408, 429, connection resets, timeouts, cut downloads) are retried:
/// exponential backoff with jitter, a bounded number of attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included (at least 1).
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled for each following one.
    pub base_delay: Duration,
    /// Cap on any single wait (a server's `Retry-After` included).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 4, base_delay: Duration::from_millis(500), max_delay: Duration::from_secs(10) }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `n` (0-based): `base * 2^n`, capped, scaled by a random
    /// factor in [0.5, 1] so that many clients failing together do not retry in lockstep; at
    /// least the server's `Retry-After` when it sent one (still capped).
    pub fn delay(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32.checked_shl(n.min(16)).unwrap_or(u32::MAX));
        let capped = exp.min(self.max_delay);
        let jittered = capped.mul_f64(0.5 + 0.5 * unit_random());
        jittered.max(retry_after.unwrap_or_default().min(self.max_delay))
    }
}

/// A random number in [0, 1), from the standard library's per-process random hash keys (jitter
/// needs no more than that, and this avoids a dependency).
fn unit_random() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Where and how to reach the Hub. [`HubConfig::from_env`] reads the same variables as Python's
/// `huggingface_hub`; [`HubConfig::new`] reads none.
#[derive(Clone)]
pub struct HubConfig {
    /// The Hub's base URL, without a trailing `/` (`HF_ENDPOINT`, default [`DEFAULT_ENDPOINT`]).
    pub endpoint: String,
    /// The hub cache folder holding `models--org--name` folders (`HF_HUB_CACHE`, else
    /// `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// The access token (`HF_TOKEN`, else the token file `hf auth login` writes).
    pub token: Option<HubToken>,
    /// Use the cache only, never the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// Connect timeout, and the longest time to receive a response's headers.
    pub timeout: Duration,
    /// The longest wait for any read of a response, headers or body (`HF_HUB_DOWNLOAD_TIMEOUT`,
    /// default 10 s as in Python's `huggingface_hub`): a server that keeps the connection open
    /// but stops sending fails the attempt after this long, and the retry resumes the download.
    pub read_timeout: Duration,
    /// Show a download progress bar (drawn only when stderr is a terminal).
    pub progress: bool,
}

impl fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("offline", &self.offline)
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .field("read_timeout", &self.read_timeout)
            .field("progress", &self.progress)
            .finish()
    }
}

impl HubConfig {
    /// A config for `endpoint` and `cache_dir`, with no token, online, default retries and
    /// timeout; reads no environment variable.
    pub fn new(endpoint: impl Into<String>, cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            endpoint: endpoint.into().trim_end_matches('/').to_string(),
            cache_dir: cache_dir.into(),
            token: None,
            offline: false,
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(30),
            read_timeout: DEFAULT_READ_TIMEOUT,
            progress: true,
        }
    }

    /// The config Python's `huggingface_hub` would use in this environment.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let home = var("HOME").or_else(|| var("USERPROFILE")).map(PathBuf::from);
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| home.map(|h| h.join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token_file = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| std::fs::read_to_string(&token_file).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .map(HubToken);
        let offline = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]
            .iter()
            .any(|k| var(k).is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true")));
        let mut cfg = Self::new(var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.into()), cache_dir);
        cfg.token = token;
        cfg.offline = offline;
        if let Some(secs) = var("HF_HUB_DOWNLOAD_TIMEOUT").and_then(|v| v.trim().parse::<f64>().ok()) {
            if let Ok(d) = Duration::try_from_secs_f64(secs) {
                if !d.is_zero() {
                    cfg.read_timeout = d;
                }
            }
        }
        cfg
    }
}

/// The cache folder name of a model repo: `org/name` → `models--org--name`.
pub fn repo_folder_name(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

/// Whether `s` is a full commit hash (40 hex digits).
pub fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `dir` is a repo folder of the hub cache (`models--org--name`, with `snapshots/`).
pub fn is_cache_repo_dir(dir: &Path) -> bool {
    dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("models--")) && dir.join("snapshots").is_dir()
}

/// The snapshot folder of `revision` (a branch, tag or commit) in a `models--org--name` cache
/// folder, found through `refs/<revision>`. Only the folder is checked; its files are checked by
/// [`ModelFiles::from_dir`](crate::ModelFiles::from_dir).
pub fn snapshot_in_cache_dir(dir: &Path, revision: &str) -> Result<PathBuf> {
    check_revision(dir.display().to_string().as_str(), revision)?;
    let cache = RepoCache::at(dir);
    match cache.resolve_commit(revision) {
        Some(commit) if cache.snapshot_dir(&commit).is_dir() => Ok(cache.snapshot_dir(&commit)),
        _ => Err(Error::InvalidSource {
            source_name: dir.display().to_string(),
            reason: format!(
                "this hub cache folder has no snapshot for revision {revision:?} (no refs/{revision}); \
                 pass one of its snapshots/<commit> folders, or load it by hub id"
            ),
        }),
    }
}

/// Makes sure `repo_id`'s files at `revision` are in the cache, downloading what is missing, and
/// returns the snapshot folder.
///
/// Offline ([`HubConfig::offline`]), only the cache is used, and what it lacks is listed in
/// [`Error::HubOfflineNotCached`]. Online, each file's metadata is asked for (so a moved branch
/// is followed); if the Hub cannot be reached at all, a complete cached snapshot of the revision
/// is used instead, with a warning, as Python does.
pub fn snapshot(cfg: &HubConfig, repo_id: &str, revision: &str) -> Result<PathBuf> {
    check_repo_id(repo_id)?;
    check_revision(repo_id, revision)?;
    let cache = RepoCache::new(&cfg.cache_dir, repo_id);
    if cfg.offline {
        return from_cache(&cache, repo_id, revision);
    }
    // A commit never changes: a complete snapshot of it needs no network.
    if is_commit_hash(revision) {
        if let Ok(dir) = cache.complete_snapshot(revision) {
            return Ok(dir);
        }
    }
    let client = Client::new(cfg, repo_id);
    let config = match client.head("config.json", revision) {
        Ok(Some(meta)) => meta,
        Ok(None) => {
            return Err(Error::HubFileNotFound {
                repo: repo_id.into(),
                revision: revision.into(),
                file: "config.json".into(),
                hint: "nibble loads Hugging Face Transformers models, which have a config.json".into(),
            })
        }
        Err(e @ Error::HubNetwork { .. }) => {
            return match cache.complete_snapshot(revision) {
                Ok(dir) => {
                    tracing::warn!("{e}; using the cached snapshot {}", dir.display());
                    Ok(dir)
                }
                Err(_) => Err(e),
            };
        }
        Err(e) => return Err(e),
    };
    // Every other file is asked for at this commit, so a push during the download cannot mix
    // files of two commits.
    let commit = config.commit.clone();
    cache.write_ref(revision, &commit)?;
    tracing::info!("{repo_id}@{revision}: commit {commit}");
    fetch(&client, &cache, &config)?;

    for file in TOKENIZER_FILES.iter().chain(OPTIONAL_FILES.iter()) {
        if cache.cached_file(&commit, file).is_some() || cache.known_missing(&commit, file) {
            continue;
        }
        match client.head(file, &commit)? {
            Some(meta) => {
                fetch(&client, &cache, &meta)?;
            }
            None => {
                if TOKENIZER_FILES.contains(file) {
                    tracing::warn!("{repo_id} has no {file}");
                }
                cache.mark_missing(&commit, file);
            }
        }
    }

    fetch_weights(&client, &cache, repo_id, &commit)?;
    Ok(cache.snapshot_dir(&commit))
}

/// Fetches only `config.json` of `repo_id` at `revision` (into the cache, or found there), so
/// that a plan can be made before a single weight is downloaded.
pub fn fetch_config(cfg: &HubConfig, repo_id: &str, revision: &str) -> Result<PathBuf> {
    check_repo_id(repo_id)?;
    check_revision(repo_id, revision)?;
    let cache = RepoCache::new(&cfg.cache_dir, repo_id);
    let cached = || cache.resolve_commit(revision).and_then(|c| cache.cached_file(&c, "config.json"));
    if cfg.offline {
        return cached().ok_or_else(|| Error::HubOfflineNotCached {
            repo: repo_id.into(),
            revision: revision.into(),
            cache: cache.dir.clone(),
            missing: vec!["config.json".into()],
        });
    }
    let client = Client::new(cfg, repo_id);
    let meta = client.head("config.json", revision)?.ok_or_else(|| Error::HubFileNotFound {
        repo: repo_id.into(),
        revision: revision.into(),
        file: "config.json".into(),
        hint: "nibble loads Hugging Face Transformers models, which have a config.json".into(),
    })?;
    cache.write_ref(revision, &meta.commit)?;
    fetch(&client, &cache, &meta)
}

/// Fetches a PEFT adapter of `repo_id` at `revision` (`adapter_config.json` and
/// `adapter_model.safetensors`, into the cache or found there) and returns its snapshot folder.
/// A repository with only `adapter_model.bin` is refused ([`Error::PickleOnly`]).
pub fn fetch_adapter(cfg: &HubConfig, repo_id: &str, revision: &str) -> Result<PathBuf> {
    const FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];
    check_repo_id(repo_id)?;
    check_revision(repo_id, revision)?;
    let cache = RepoCache::new(&cfg.cache_dir, repo_id);
    if cfg.offline {
        let commit = cache.resolve_commit(revision);
        let missing: Vec<String> = FILES
            .iter()
            .filter(|f| commit.as_ref().and_then(|c| cache.cached_file(c, f)).is_none())
            .map(|f| f.to_string())
            .collect();
        return match (commit, missing.is_empty()) {
            (Some(c), true) => Ok(cache.snapshot_dir(&c)),
            _ => Err(Error::HubOfflineNotCached { repo: repo_id.into(), revision: revision.into(), cache: cache.dir.clone(), missing }),
        };
    }
    let client = Client::new(cfg, repo_id);
    let not_found = |file: &str, hint: &str| Error::HubFileNotFound {
        repo: repo_id.into(),
        revision: revision.into(),
        file: file.into(),
        hint: hint.into(),
    };
    let config = client
        .head(FILES[0], revision)?
        .ok_or_else(|| not_found(FILES[0], "a PEFT adapter repository has adapter_config.json"))?;
    // The weights are asked for at the config's commit, so the two files are of one commit.
    let commit = config.commit.clone();
    cache.write_ref(revision, &commit)?;
    fetch(&client, &cache, &config)?;
    match client.head(FILES[1], &commit)? {
        Some(meta) => {
            fetch(&client, &cache, &meta)?;
        }
        None if client.head("adapter_model.bin", &commit)?.is_some() => {
            return Err(Error::PickleOnly { source_name: repo_id.into(), file: "adapter_model.bin".into() });
        }
        None => return Err(not_found(FILES[1], "a PEFT adapter repository has adapter_model.safetensors")),
    }
    Ok(cache.snapshot_dir(&commit))
}

/// The safetensors weights: `model.safetensors`, else the index and its shards; a repo with only
/// pickle weights is refused.
fn fetch_weights(client: &Client<'_>, cache: &RepoCache, repo_id: &str, commit: &str) -> Result<()> {
    let known = |file: &str| -> Result<Option<FileMeta>> {
        if cache.known_missing(commit, file) {
            return Ok(None);
        }
        let meta = client.head(file, commit)?;
        if meta.is_none() {
            cache.mark_missing(commit, file);
        }
        Ok(meta)
    };
    if cache.cached_file(commit, "model.safetensors").is_some() {
        return Ok(());
    }
    if let Some(meta) = known("model.safetensors")? {
        return fetch(client, cache, &meta).map(drop);
    }
    let index = match cache.cached_file(commit, "model.safetensors.index.json") {
        Some(p) => Some(p),
        None => match known("model.safetensors.index.json")? {
            Some(meta) => Some(fetch(client, cache, &meta)?),
            None => None,
        },
    };
    if let Some(index) = index {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        for shard in shard_names(&index, &text)? {
            if cache.cached_file(commit, &shard).is_some() {
                continue;
            }
            let Some(meta) = client.head(&shard, commit)? else {
                return Err(Error::HubFileNotFound {
                    repo: repo_id.into(),
                    revision: commit.into(),
                    file: shard,
                    hint: "model.safetensors.index.json names this shard but the repository does not have it".into(),
                });
            };
            fetch(client, cache, &meta)?;
        }
        return Ok(());
    }
    for file in PICKLE_FILES {
        if client.head(file, commit)?.is_some() {
            return Err(Error::PickleOnly { source_name: repo_id.into(), file: file.into() });
        }
    }
    Err(Error::HubFileNotFound {
        repo: repo_id.into(),
        revision: commit.into(),
        file: "model.safetensors".into(),
        hint: "the repository has neither model.safetensors nor model.safetensors.index.json".into(),
    })
}

/// Puts one file in the snapshot: linked to its blob, downloaded first when the blob is not
/// cached. Returns the snapshot path.
///
/// The blob's lock file (`<cache>/.locks/models--org--name/<etag>.lock`, Python's) is held from
/// the check for the blob to the snapshot link, so two downloads of one blob at once (threads,
/// processes, or nibble and Python) become one download: the second waits, then finds the blob.
fn fetch(client: &Client<'_>, cache: &RepoCache, meta: &FileMeta) -> Result<PathBuf> {
    if let Some(p) = cache.cached_file(&meta.commit, &meta.file) {
        return Ok(p);
    }
    let _lock = cache.lock_blob(&meta.etag, &meta.file)?;
    let blob = cache.blob(&meta.etag);
    if !blob.is_file() {
        let part = cache.incomplete(&meta.etag);
        let blobs = cache.dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
        tracing::info!("downloading {} ({})", meta.file, meta.size.map_or_else(|| "size unknown".into(), human_bytes));
        // On an interruption (a network failure past the retries, SIGINT, a crash) the
        // .incomplete file stays, and the next run resumes it; it is removed only when its bytes
        // are wrong (checksum) or could not be written (disk full).
        client.download(meta, &part)?;
        // Only a complete, verified, synced download gets the blob's name.
        std::fs::rename(&part, &blob).map_err(|e| Error::io(&blob, e))?;
    } else {
        tracing::debug!("{} is already in the cache (blob {})", meta.file, meta.etag);
    }
    cache.link(&meta.etag, &meta.commit, &meta.file)
}

/// The snapshot of `revision` from the cache alone, or the typed offline error.
fn from_cache(cache: &RepoCache, repo_id: &str, revision: &str) -> Result<PathBuf> {
    let missing = match cache.complete_snapshot(revision) {
        Ok(dir) => return Ok(dir),
        Err(Incomplete::NoRef) => vec![format!("refs/{revision} (the revision was never downloaded)")],
        Err(Incomplete::Missing(files)) => files,
        Err(Incomplete::PickleOnly(file)) => return Err(Error::PickleOnly { source_name: repo_id.into(), file }),
        Err(Incomplete::Corrupt(e)) => return Err(e),
    };
    Err(Error::HubOfflineNotCached {
        repo: repo_id.into(),
        revision: revision.into(),
        cache: cache.dir.clone(),
        missing,
    })
}

/// The distinct shard file names of a `model.safetensors.index.json`, in first-seen order. A name
/// that would leave the snapshot folder (absolute, `..`) is refused before anything is fetched.
pub(crate) fn shard_names(index: &Path, text: &str) -> Result<Vec<String>> {
    let corrupt = |reason: String| Error::CorruptCheckpoint { path: index.to_path_buf(), reason };
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| corrupt(format!("index is not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| corrupt("index has no `weight_map` object".into()))?;
    let mut names: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let name = file.as_str().ok_or_else(|| corrupt(format!("weight_map entry for `{tensor}` is not a file name")))?;
        if !cache::is_contained(name) {
            return Err(corrupt(format!("shard path {name:?} (for `{tensor}`) leaves the model folder")));
        }
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    Ok(names)
}

/// `org/name`: two non-empty parts of letters, digits, `-`, `_`, `.`, not starting with `.`.
fn check_repo_id(repo_id: &str) -> Result<()> {
    let parts: Vec<&str> = repo_id.split('/').collect();
    let ok = parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 96
                && !p.starts_with('.')
                && !p.contains("..")
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidSource { source_name: repo_id.into(), reason: "not a hub repository id (org/name)".into() })
    }
}

/// A branch, tag or commit; it names a file under `refs/`, so it must stay there.
fn check_revision(source: &str, revision: &str) -> Result<()> {
    let ok = revision.len() <= 255
        && revision.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        && revision.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            name: "revision".into(),
            reason: format!("{revision:?} (for {source}) is not a branch, tag or commit name"),
        })
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let p = RetryPolicy { max_attempts: 4, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(1) };
        for n in 0..20 {
            let d = p.delay(n, None);
            let full = Duration::from_millis(100).saturating_mul(1 << n.min(16)).min(Duration::from_secs(1));
            assert!(d <= full && d >= full / 2, "attempt {n}: {d:?} vs {full:?}");
        }
        assert_eq!(p.delay(0, Some(Duration::from_secs(60))), Duration::from_secs(1));
    }

    #[test]
    fn names() {
        assert_eq!(repo_folder_name("org/name"), "models--org--name");
        assert!(check_repo_id("meta-llama/Llama-3.2-1B").is_ok());
        for bad in ["a", "a/b/c", "../x", "a/..", "/a", "a/.b"] {
            assert!(check_repo_id(bad).is_err(), "{bad}");
        }
        assert!(check_revision("r", "refs/pr/1").is_ok());
        for bad in ["", "../main", "/main", "a//b", "a/../b", "a/./b", "main/", "a b"] {
            assert!(check_revision("r", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shard_names_refuse_escapes() {
        let p = Path::new("index.json");
        let ok = r#"{"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors", "c": "m-1.safetensors"}}"#;
        assert_eq!(shard_names(p, ok).unwrap(), vec!["m-1.safetensors", "m-2.safetensors"]);
        for bad in ["../x.safetensors", "/etc/passwd", "a/../../x", ""] {
            let text = format!(r#"{{"weight_map": {{"a": {bad:?}}}}}"#);
            assert!(matches!(shard_names(p, &text), Err(Error::CorruptCheckpoint { .. })), "{bad}");
        }
    }

    #[test]
    fn token_is_redacted() {
        let mut cfg = HubConfig::new("http://x", "/tmp");
        cfg.token = Some(HubToken::new("hf_secret"));
        assert!(!format!("{cfg:?}").contains("hf_secret"));
    }
}

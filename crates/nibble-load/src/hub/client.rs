//! A small blocking client for the Hub's file protocol, over `ureq`:
//!
//! - `HEAD {endpoint}/{repo}/resolve/{revision}/{file}` gives the metadata: `X-Repo-Commit` (the
//!   commit the revision points to), `X-Linked-Etag` (LFS files: their sha256) or `ETag`, and
//!   `X-Linked-Size` or `Content-Length`. Relative redirects (renamed repos) are followed; an
//!   absolute one (LFS files, to a CDN) ends the HEAD and its `Location` is where the bytes are.
//! - `GET` of that location, with `Range: bytes=N-` to resume a partial download.
//! - Errors: the status plus `X-Error-Code` (`RepoNotFound`, `GatedRepo`, `RevisionNotFound`,
//!   `EntryNotFound`) map to typed errors; 5xx, 408, 429, resets and timeouts are retried with
//!   exponential backoff and jitter, a bounded number of times.
//!
//! The token is sent only to the endpoint's own origin, never to the CDN a redirect points at
//! (its signed URL is the credential there), and is scrubbed from every message built from what
//! the network sent.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nibble_core::{Error, Result};
use ureq::http::{HeaderMap, Response};
use ureq::Body;

use super::HubConfig;

/// Redirects followed for one request before giving up (the Hub uses one or two).
const MAX_REDIRECTS: usize = 5;
/// Copy buffer for downloads.
const CHUNK: usize = 1 << 20;

/// What a `HEAD` of a resolve URL told about one file.
#[derive(Debug, Clone)]
pub(crate) struct FileMeta {
    /// The file, relative to the repo root.
    pub(crate) file: String,
    /// The commit the revision resolved to.
    pub(crate) commit: String,
    /// The blob name: `X-Linked-Etag` or `ETag`, unquoted.
    pub(crate) etag: String,
    /// The size, when the server said.
    pub(crate) size: Option<u64>,
    /// Where to `GET` the bytes (the resolve URL, or the CDN URL it redirected to).
    url: String,
}

/// How one attempt failed.
enum Attempt {
    /// Worth retrying (5xx, 429, a reset, a timeout, a cut body); `after` is the server's
    /// `Retry-After`, when given.
    Retry { reason: String, after: Option<Duration> },
    /// Final.
    Fail(Error),
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        Attempt::Fail(e)
    }
}

/// A client for one repository.
pub(crate) struct Client<'a> {
    cfg: &'a HubConfig,
    repo: &'a str,
    agent: ureq::Agent,
}

impl<'a> Client<'a> {
    pub(crate) fn new(cfg: &'a HubConfig, repo: &'a str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            // Statuses are data here: they become typed errors or retries.
            .http_status_as_error(false)
            // Redirects are followed by hand: relative ones only for HEAD (the headers of the
            // redirect itself carry the LFS metadata), and the token must not follow a redirect
            // to another origin.
            .max_redirects(0)
            .timeout_connect(Some(cfg.timeout))
            .timeout_recv_response(Some(cfg.timeout))
            // A stalled transfer fails (and is resumed) instead of hanging forever.
            .timeout_per_read(Some(cfg.timeout))
            .user_agent(concat!("nibble/", env!("CARGO_PKG_VERSION"), "; rust"))
            .build()
            .into();
        Self { cfg, repo, agent }
    }

    /// `HEAD` of `file` at `revision`, retried. `Ok(None)` when the repo has no such file.
    pub(crate) fn head(&self, file: &str, revision: &str) -> Result<Option<FileMeta>> {
        self.retrying(file, || self.head_once(file, revision))
    }

    /// Downloads `meta` into `dest` (the blob's `.incomplete` file), resuming what is there,
    /// retried. On success `dest` holds exactly the announced bytes, synced to disk.
    pub(crate) fn download(&self, meta: &FileMeta, dest: &Path) -> Result<()> {
        let bar = self.progress_bar(meta);
        let r = self.retrying(&meta.file, || self.download_once(meta, dest, &bar));
        bar.finish_and_clear();
        r
    }

    fn resolve_url(&self, file: &str, revision: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.cfg.endpoint,
            self.repo,
            encode(revision, false),
            encode(file, true)
        )
    }

    fn head_once(&self, file: &str, revision: &str) -> std::result::Result<Option<FileMeta>, Attempt> {
        let mut url = self.resolve_url(file, revision);
        for _ in 0..=MAX_REDIRECTS {
            let resp = self.request("HEAD", &url, None)?;
            let status = resp.status().as_u16();
            let headers = resp.headers();
            if (300..400).contains(&status) {
                let location = header(headers, "location").ok_or_else(|| self.protocol(file, "redirect without Location"))?;
                // A relative redirect (a renamed repo) is followed; an absolute one (an LFS file
                // on a CDN) carries the metadata in its own headers.
                if location.starts_with('/') {
                    url = format!("{}{}", origin(&self.cfg.endpoint), location);
                    continue;
                }
                let meta = self.meta_from(file, headers, Some(location.to_string()))?;
                return Ok(Some(meta));
            }
            if (200..300).contains(&status) {
                return Ok(Some(self.meta_from(file, headers, None)?));
            }
            return match self.status_attempt(status, headers, file, revision) {
                Attempt::Fail(Error::HubFileNotFound { .. }) => Ok(None),
                a => Err(a),
            };
        }
        Err(self.protocol(file, "too many redirects").into())
    }

    fn meta_from(
        &self,
        file: &str,
        headers: &HeaderMap,
        location: Option<String>,
    ) -> std::result::Result<FileMeta, Error> {
        let commit = header(headers, "x-repo-commit")
            .ok_or_else(|| self.protocol(file, "no X-Repo-Commit header (is HF_ENDPOINT a Hugging Face Hub?)"))?;
        let etag = header(headers, "x-linked-etag")
            .or_else(|| header(headers, "etag"))
            .ok_or_else(|| self.protocol(file, "no ETag header"))?;
        // `W/"abc"` or `"abc"` → `abc`: the blob's file name.
        let etag = etag.trim().trim_start_matches("W/").trim_matches('"').to_string();
        // Both become path components in the cache: nothing but a plain name is accepted.
        if !is_plain_name(&etag) {
            return Err(self.protocol(file, &format!("unusable ETag {etag:?}")));
        }
        if !is_plain_name(commit) || !commit.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(self.protocol(file, &format!("unusable commit hash {commit:?}")));
        }
        // For a redirect, Content-Length is the redirect's own (empty) body: only X-Linked-Size counts.
        let size = header(headers, "x-linked-size")
            .or_else(|| if location.is_none() { header(headers, "content-length") } else { None })
            .and_then(|s| s.trim().parse::<u64>().ok());
        // Not redirected: fetch at the commit rather than the branch, so the bytes are those of the
        // commit this metadata describes even if the branch moves meanwhile.
        let url = location.unwrap_or_else(|| self.resolve_url(file, commit));
        Ok(FileMeta { file: file.to_string(), commit: commit.to_string(), etag, size, url })
    }

    fn download_once(&self, meta: &FileMeta, dest: &Path, bar: &ProgressBar) -> std::result::Result<(), Attempt> {
        let io = |e| Attempt::Fail(Error::io(dest, e));
        let mut out = OpenOptions::new().create(true).append(true).open(dest).map_err(io)?;
        let mut start = out.metadata().map_err(io)?.len();
        let mut total = meta.size;
        if let Some(size) = total {
            if start > size {
                // Not a prefix of this blob: start over.
                out.set_len(0).map_err(io)?;
                start = 0;
            } else if start == size {
                out.sync_all().map_err(io)?;
                return Ok(());
            }
        }
        let mut url = meta.url.clone();
        let mut hops = 0;
        let mut resp = loop {
            let resp = self.request("GET", &url, (start > 0).then_some(start))?;
            let status = resp.status().as_u16();
            if (300..400).contains(&status) && hops < MAX_REDIRECTS {
                hops += 1;
                let location = header(resp.headers(), "location")
                    .ok_or_else(|| self.protocol(&meta.file, "redirect without Location"))?;
                url = absolute(&url, location);
                continue;
            }
            match status {
                200 => {
                    if start > 0 {
                        // The server ignored the Range header: take the whole body again.
                        out.set_len(0).map_err(io)?;
                        start = 0;
                    }
                    if total.is_none() {
                        total = header(resp.headers(), "content-length").and_then(|s| s.trim().parse().ok());
                    }
                }
                206 => {
                    let range = header(resp.headers(), "content-range").and_then(parse_content_range);
                    match range {
                        Some((first, size)) if first == start => {
                            total = total.or(size);
                        }
                        _ => {
                            // Bytes from elsewhere in the file cannot be appended: start over.
                            out.set_len(0).map_err(io)?;
                            return Err(Attempt::Retry { reason: "server answered another byte range".into(), after: None });
                        }
                    }
                }
                416 => {
                    // The partial file does not fit the blob: discard it.
                    out.set_len(0).map_err(io)?;
                    return Err(Attempt::Retry { reason: "range not satisfiable; restarting".into(), after: None });
                }
                _ => return Err(self.status_attempt(status, resp.headers(), &meta.file, &meta.commit)),
            }
            break resp;
        };

        if let Some(total) = total {
            bar.set_length(total);
        }
        bar.set_position(start);
        let mut reader = resp.body_mut().as_reader();
        let mut buf = vec![0u8; CHUNK];
        let mut have = start;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    out.write_all(&buf[..n]).map_err(io)?;
                    have += n as u64;
                    bar.set_position(have);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // What arrived stays in the .incomplete file; the next attempt resumes there.
                    out.flush().map_err(io)?;
                    return Err(Attempt::Retry {
                        reason: self.scrub(format!("connection lost after {have} bytes: {e}")),
                        after: None,
                    });
                }
            }
        }
        out.flush().map_err(io)?;
        match total {
            Some(size) if have < size => {
                Err(Attempt::Retry { reason: format!("download cut at {have} of {size} bytes"), after: None })
            }
            Some(size) if have > size => {
                out.set_len(0).map_err(io)?;
                Err(self.protocol(&meta.file, &format!("received {have} bytes, {size} announced")).into())
            }
            _ => {
                // Durable before the caller renames it into place, so a crash cannot leave a
                // complete-looking blob with missing bytes.
                out.sync_all().map_err(io)?;
                Ok(())
            }
        }
    }

    /// Sends one request. The token goes only to the endpoint's origin.
    fn request(&self, method: &str, url: &str, range_from: Option<u64>) -> std::result::Result<Response<Body>, Attempt> {
        let mut req = match method {
            "HEAD" => self.agent.head(url),
            _ => self.agent.get(url),
        };
        req = req.header("Accept-Encoding", "identity");
        if let Some(token) = &self.cfg.token {
            if origin(url) == origin(&self.cfg.endpoint) {
                req = req.header("Authorization", format!("Bearer {}", token.expose()));
            }
        }
        if let Some(from) = range_from {
            req = req.header("Range", format!("bytes={from}-"));
        }
        tracing::debug!("{method} {}", strip_query(url));
        req.call().map_err(|e| self.transport_attempt(e))
    }

    fn transport_attempt(&self, e: ureq::Error) -> Attempt {
        use ureq::Error as E;
        let reason = self.scrub(e.to_string());
        match e {
            E::Io(_)
            | E::Timeout(_)
            | E::HostNotFound
            | E::ConnectionFailed
            | E::Protocol(_)
            | E::BodyStalled => Attempt::Retry { reason, after: None },
            _ => Attempt::Fail(Error::HubNetwork { repo: self.repo.into(), file: String::new(), attempts: 1, reason }),
        }
    }

    /// Maps a non-success status to a typed error or a retry.
    fn status_attempt(&self, status: u16, headers: &HeaderMap, file: &str, revision: &str) -> Attempt {
        let code = header(headers, "x-error-code").unwrap_or("");
        let repo = self.repo.to_string();
        let e = match (code, status) {
            ("RepoNotFound", _) => Error::HubRepoNotFound { repo, endpoint: self.cfg.endpoint.clone() },
            ("GatedRepo", _) | (_, 401 | 403) => Error::HubUnauthorized { repo, file: file.into(), status },
            ("RevisionNotFound", _) => Error::HubRevisionNotFound { repo, revision: revision.into() },
            ("EntryNotFound", _) | (_, 404) => Error::HubFileNotFound {
                repo,
                revision: revision.into(),
                file: file.into(),
                hint: "the repository has no such file at this revision".into(),
            },
            (_, 408 | 429 | 500..=599) => {
                let after = header(headers, "retry-after").and_then(|s| s.trim().parse::<u64>().ok()).map(Duration::from_secs);
                return Attempt::Retry { reason: format!("HTTP {status}"), after };
            }
            _ => {
                let msg = header(headers, "x-error-message").unwrap_or("");
                self.protocol(file, &self.scrub(format!("HTTP {status} {msg}").trim_end().to_string()))
            }
        };
        Attempt::Fail(e)
    }

    /// Runs `op` until it succeeds, fails for good, or the attempts run out.
    fn retrying<T>(&self, file: &str, mut op: impl FnMut() -> std::result::Result<T, Attempt>) -> Result<T> {
        let max = self.cfg.retry.max_attempts.max(1);
        let mut last = String::new();
        for attempt in 1..=max {
            match op() {
                Ok(v) => return Ok(v),
                Err(Attempt::Fail(Error::HubNetwork { repo, reason, .. })) => {
                    return Err(Error::HubNetwork { repo, file: file.into(), attempts: attempt, reason })
                }
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Retry { reason, after }) => {
                    if attempt < max {
                        let wait = self.cfg.retry.delay(attempt - 1, after);
                        tracing::warn!(
                            "{}: {file}: {reason}; retrying in {:.1}s (attempt {}/{max})",
                            self.repo,
                            wait.as_secs_f32(),
                            attempt + 1
                        );
                        std::thread::sleep(wait);
                    }
                    last = reason;
                }
            }
        }
        Err(Error::HubNetwork { repo: self.repo.into(), file: file.into(), attempts: max, reason: last })
    }

    fn protocol(&self, file: &str, reason: &str) -> Error {
        Error::HubProtocol {
            repo: self.repo.into(),
            file: file.into(),
            endpoint: self.cfg.endpoint.clone(),
            reason: reason.into(),
        }
    }

    /// Removes the token from text that came from elsewhere (a server could echo it back).
    fn scrub(&self, text: String) -> String {
        match &self.cfg.token {
            Some(t) if !t.expose().is_empty() => text.replace(t.expose(), "***"),
            _ => text,
        }
    }

    /// A bytes/rate bar on stderr, drawn only when stderr is a terminal and progress is on.
    fn progress_bar(&self, meta: &FileMeta) -> ProgressBar {
        if !self.cfg.progress || !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(meta.size, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(meta.file.clone());
        bar
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `scheme://host[:port]` of a URL (the whole string when it has no path).
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

/// A redirect target as an absolute URL.
fn absolute(base: &str, location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", origin(base))
    } else {
        let dir = base.rfind('/').map_or(base, |i| &base[..=i]);
        format!("{dir}{location}")
    }
}

/// A URL without its query (CDN URLs carry signatures there), for logs.
fn strip_query(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

/// `bytes a-b/total` → (a, total).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (first, _) = range.split_once('-')?;
    Some((first.trim().parse().ok()?, total.trim().parse().ok()))
}

/// Whether `s` is safe as one path component.
fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && !s.starts_with('.')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Percent-encodes `s` for a URL path; `/` is kept when `keep_slash` (file paths), encoded
/// otherwise (a revision like `refs/pr/1` is one path segment, as the Hub expects).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(origin("https://huggingface.co/a/b/resolve/main/x"), "https://huggingface.co");
        assert_eq!(origin("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(absolute("http://h:1/a/b", "/c/d"), "http://h:1/c/d");
        assert_eq!(absolute("http://h:1/a/b", "https://cdn/x?y"), "https://cdn/x?y");
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(encode("sub/model 1.safetensors", true), "sub/model%201.safetensors");
        assert_eq!(parse_content_range("bytes 10-99/100"), Some((10, Some(100))));
        assert_eq!(parse_content_range("bytes 10-99/*"), Some((10, None)));
        assert!(!is_plain_name("../x") && !is_plain_name("a/b") && is_plain_name("abc123"));
    }
}

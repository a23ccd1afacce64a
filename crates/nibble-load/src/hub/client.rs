//! A small blocking client for the Hub's file protocol, over `ureq`:
//!
//! - `HEAD {endpoint}/{repo}/resolve/{revision}/{file}` gives the metadata: `X-Repo-Commit` (the
//!   commit the revision points to), `X-Linked-Etag` (LFS files: their sha256) or `ETag`, and
//!   `X-Linked-Size` or `Content-Length`. Relative redirects (renamed repos) are followed; an
//!   absolute one (LFS files, to a CDN) ends the HEAD and its `Location` is where the bytes are.
//! - `GET` of that location, with `Range: bytes=N-` to resume a partial download. The bytes of
//!   an LFS file are hashed as they arrive and must match its sha256 (the `X-Linked-Etag`).
//! - Errors: the status plus `X-Error-Code` (`RepoNotFound`, `GatedRepo`, `RevisionNotFound`,
//!   `EntryNotFound`) map to typed errors; 5xx, 408, 429, resets and timeouts (no bytes for
//!   [`HubConfig::read_timeout`]) are retried with exponential backoff and jitter, a bounded
//!   number of times, waiting at least what a `Retry-After` asks (capped). More than
//!   `MAX_REDIRECTS` redirects for one request is a typed error, as is a failed write.
//!
//! The token is sent only to the endpoint's own origin, never to the CDN a redirect points at
//! (its signed URL is the credential there), and is scrubbed from every message built from what
//! the network sent.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nibble_core::{Error, Result};
use sha2::{Digest as _, Sha256};
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
    /// The sha256 the bytes must have (lowercase hex): an LFS file's `X-Linked-Etag`.
    pub(crate) sha256: Option<String>,
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
            // A stalled transfer (the connection open, nothing arriving) fails after this long,
            // and the next attempt resumes it, instead of hanging forever.
            .timeout_per_read(Some(cfg.read_timeout))
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
    /// retried. On success `dest` holds exactly the announced bytes (of the announced sha256, for
    /// an LFS file), synced to disk.
    ///
    /// `dest` is removed when its bytes are wrong ([`Error::HubChecksumMismatch`]) or could not
    /// be written ([`Error::WriteFailed`], a full disk); after any other failure it stays, for
    /// the next run to resume.
    pub(crate) fn download(&self, meta: &FileMeta, dest: &Path) -> Result<()> {
        let bar = self.progress_bar(meta);
        let mut digest = meta.sha256.as_ref().map(|_| Digest::default());
        let r = self.retrying(&meta.file, || self.download_once(meta, dest, &bar, digest.as_mut()));
        bar.finish_and_clear();
        let r = r.and_then(|()| match (&meta.sha256, digest) {
            (Some(expected), Some(d)) => {
                let actual = d.hex();
                if actual == *expected {
                    Ok(())
                } else {
                    Err(Error::HubChecksumMismatch {
                        repo: self.repo.into(),
                        file: meta.file.clone(),
                        expected: expected.clone(),
                        actual,
                    })
                }
            }
            _ => Ok(()),
        });
        if let Err(Error::HubChecksumMismatch { .. } | Error::WriteFailed { .. }) = &r {
            if let Err(e) = std::fs::remove_file(dest) {
                tracing::warn!("could not remove {}: {e}", dest.display());
            }
        }
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
        Err(self.too_many_redirects(file, &url).into())
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
        // An LFS file's X-Linked-Etag is its sha256; a plain file's ETag is a git hash, not
        // checked here.
        let sha256 = header(headers, "x-linked-etag")
            .map(|e| e.trim().trim_start_matches("W/").trim_matches('"').to_ascii_lowercase())
            .filter(|e| e.len() == 64 && e.bytes().all(|b| b.is_ascii_hexdigit()));
        Ok(FileMeta { file: file.to_string(), commit: commit.to_string(), etag, size, sha256, url })
    }

    fn download_once(
        &self,
        meta: &FileMeta,
        dest: &Path,
        bar: &ProgressBar,
        mut digest: Option<&mut Digest>,
    ) -> std::result::Result<(), Attempt> {
        let io = |e| Attempt::Fail(Error::io(dest, e));
        // Writes into the file, and making it durable: their failure (a full disk) is final.
        let write_failed = |e| Attempt::Fail(Error::WriteFailed { path: dest.to_path_buf(), source: e });
        let mut out = OpenOptions::new().create(true).append(true).open(dest).map_err(io)?;
        let mut start = out.metadata().map_err(io)?.len();
        let mut total = meta.size;
        if let Some(size) = total {
            if start > size {
                // Not a prefix of this blob: start over.
                out.set_len(0).map_err(io)?;
                start = 0;
            } else if start == size {
                if let Some(d) = digest {
                    d.catch_up(dest, size).map_err(io)?;
                }
                out.sync_all().map_err(write_failed)?;
                return Ok(());
            }
        }
        let mut url = meta.url.clone();
        let mut hops = 0;
        let mut resp = loop {
            let resp = self.request("GET", &url, (start > 0).then_some(start))?;
            let status = resp.status().as_u16();
            if (300..400).contains(&status) {
                let location = header(resp.headers(), "location")
                    .ok_or_else(|| self.protocol(&meta.file, "redirect without Location"))?;
                url = absolute(&url, location);
                hops += 1;
                if hops > MAX_REDIRECTS {
                    return Err(self.too_many_redirects(&meta.file, &url).into());
                }
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
        // The hash covers the bytes already in the file (a resumed download) and those to come.
        if let Some(d) = digest.as_deref_mut() {
            d.catch_up(dest, start).map_err(io)?;
        }
        let mut reader = resp.body_mut().as_reader();
        let mut buf = vec![0u8; CHUNK];
        let mut have = start;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    out.write_all(&buf[..n]).map_err(write_failed)?;
                    if let Some(d) = digest.as_deref_mut() {
                        d.update(&buf[..n]);
                    }
                    have += n as u64;
                    bar.set_position(have);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // What arrived stays in the .incomplete file; the next attempt resumes there.
                    out.flush().map_err(write_failed)?;
                    let reason = if e.kind() == std::io::ErrorKind::TimedOut {
                        format!(
                            "nothing received for {:.1}s after {have} bytes (read timeout, HF_HUB_DOWNLOAD_TIMEOUT): {e}",
                            self.cfg.read_timeout.as_secs_f32()
                        )
                    } else {
                        format!("connection lost after {have} bytes: {e}")
                    };
                    return Err(Attempt::Retry { reason: self.scrub(reason), after: None });
                }
            }
        }
        out.flush().map_err(write_failed)?;
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
                out.sync_all().map_err(write_failed)?;
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
                let after = header(headers, "retry-after").and_then(|v| parse_retry_after(v, SystemTime::now()));
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

    fn too_many_redirects(&self, file: &str, last: &str) -> Error {
        Error::HubTooManyRedirects {
            repo: self.repo.into(),
            file: file.into(),
            redirects: MAX_REDIRECTS,
            last: self.scrub(strip_query(last).to_string()),
        }
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

/// The running sha256 of the bytes written to a `.incomplete` file, kept across attempts.
#[derive(Default)]
pub(crate) struct Digest {
    sha: Sha256,
    /// Bytes hashed so far.
    len: u64,
}

impl Digest {
    /// Makes the digest cover exactly the first `len` bytes of `file`: kept when it already
    /// does (the usual case, a retry after bytes it hashed), else rebuilt by reading them (a
    /// download resumed from an earlier run, or a file truncated to restart).
    fn catch_up(&mut self, file: &Path, len: u64) -> std::io::Result<()> {
        if self.len == len {
            return Ok(());
        }
        *self = Digest::default();
        let mut f = File::open(file)?.take(len);
        let mut buf = vec![0u8; CHUNK];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.update(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.len != len {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the partial download shrank while read"));
        }
        Ok(())
    }

    fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// The sha256 so far, lowercase hex.
    fn hex(&self) -> String {
        self.sha.clone().finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A `Retry-After` value: delay-seconds, or an HTTP-date (`Sun, 06 Nov 1994 08:49:37 GMT`)
/// turned into the time left from `now` (zero if past).
fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = parse_http_date(v)?;
    let now = now.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)))
}

/// Seconds since the Unix epoch of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form
/// HTTP servers send.
fn parse_http_date(v: &str) -> Option<u64> {
    let rest = v.split_once(',').map_or(v, |(_, r)| r).trim();
    let mut it = rest.split_whitespace();
    let day: u64 = it.next()?.parse().ok()?;
    let month = it.next()?;
    let year: u64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if it.next()? != "GMT" || !(1..=31).contains(&day) || year < 1970 || h > 23 || m > 59 || s > 60 {
        return None;
    }
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month = MONTHS.iter().position(|&x| x == month)? as u64 + 1;
    // Days from the epoch of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let (y, mo) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + h * 3600 + m * 60 + s)
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

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(parse_http_date("Tue, 29 Feb 2028 12:00:00 GMT"), Some(1_835_438_400));
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now), Some(Duration::ZERO));
        for bad in ["", "soon", "-1", "Sun, 06 Foo 1994 08:49:37 GMT", "Sun, 06 Nov 1994 08:49 GMT", "Sun, 06 Nov 1994 08:49:37 PST"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
    }

    #[test]
    fn digest_catches_up_with_a_file() {
        let dir = std::env::temp_dir().join(format!("nibble-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("part");
        std::fs::write(&p, b"hello world").unwrap();
        let mut d = Digest::default();
        d.catch_up(&p, 5).unwrap();
        d.update(b" world");
        d.catch_up(&p, 11).unwrap();
        // sha256("hello world")
        assert_eq!(d.hex(), "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9");
        let mut fresh = Digest::default();
        fresh.catch_up(&p, 11).unwrap();
        assert_eq!(fresh.hex(), d.hex());
        assert!(Digest::default().catch_up(&p, 12).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The on-disk cache layout shared with Python's `huggingface_hub`, so that a model downloaded by
//! either is found by the other:
//!
//! ```text
//! <cache>/models--org--name/
//!     blobs/<etag>                      file contents, named by their ETag (sha256 for LFS files)
//!     blobs/<etag>.incomplete           a download in progress (resumed with a Range request)
//!     refs/<revision>                   the commit hash a branch or tag pointed to when last fetched
//!     snapshots/<commit>/<file>         relative symlink to ../../blobs/<etag> (a copy where links fail)
//!     .no_exist/<commit>/<file>         empty marker: the file is not in the repo at that commit
//! <cache>/.locks/models--org--name/<etag>.lock   held while one process downloads that blob
//! ```

use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use nibble_core::{Error, Result};

use super::{is_commit_hash, shard_names, TOKENIZER_FILES};

/// The cache folder of one repository.
#[derive(Debug, Clone)]
pub(crate) struct RepoCache {
    /// `<cache>/models--org--name`.
    pub(crate) dir: PathBuf,
}

/// What a cached snapshot lacks.
pub(crate) enum Incomplete {
    /// The revision was never resolved here (no `refs/<revision>`, no snapshot of that commit).
    NoRef,
    /// The snapshot exists but lacks these files.
    Missing(Vec<String>),
    /// The snapshot holds pickle weights only (the named file).
    PickleOnly(String),
    /// The cached shard index is unreadable or names an unsafe path.
    Corrupt(Error),
}

impl RepoCache {
    /// The cache folder of `repo_id` under `cache_dir`.
    pub(crate) fn new(cache_dir: &Path, repo_id: &str) -> Self {
        Self { dir: cache_dir.join(super::repo_folder_name(repo_id)) }
    }

    /// The cache folder `dir` itself (a `models--org--name` folder the caller named).
    pub(crate) fn at(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    pub(crate) fn blob(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    /// Where a blob is written while it downloads. The name is Python's, so that either tool
    /// resumes the other's interrupted download; it is renamed to the blob only once complete,
    /// so a cut download never looks complete.
    pub(crate) fn incomplete(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{etag}.incomplete"))
    }

    /// Takes the exclusive lock of blob `etag` (for `file`), waiting while another thread or
    /// process holds it. The path is Python's (`<cache>/.locks/models--org--name/<etag>.lock`,
    /// an advisory `flock` there too), so nibble and `huggingface_hub` wait for each other. The
    /// lock is released when the returned file is dropped, or when the process dies; the lock
    /// file itself stays (removing it would let a third process lock a different file).
    pub(crate) fn lock_blob(&self, etag: &str, file: &str) -> Result<fs::File> {
        let root = self.dir.parent().unwrap_or(&self.dir);
        let dir = root.join(".locks").join(file_name(&self.dir));
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(format!("{etag}.lock"));
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match lock.try_lock() {
            Ok(()) => return Ok(lock),
            Err(fs::TryLockError::WouldBlock) => {
                tracing::info!("waiting for another download of {file} to finish (lock {})", path.display());
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        lock.lock().map_err(|e| Error::io(&path, e))?;
        Ok(lock)
    }

    pub(crate) fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    fn snapshot_file(&self, commit: &str, file: &str) -> PathBuf {
        self.snapshot_dir(commit).join(file)
    }

    fn no_exist(&self, commit: &str, file: &str) -> PathBuf {
        self.dir.join(".no_exist").join(commit).join(file)
    }

    /// The snapshot file if it is there and its blob too (a dangling link does not count).
    pub(crate) fn cached_file(&self, commit: &str, file: &str) -> Option<PathBuf> {
        let p = self.snapshot_file(commit, file);
        p.is_file().then_some(p)
    }

    /// Whether an earlier online run found `file` absent from the repo at `commit`.
    pub(crate) fn known_missing(&self, commit: &str, file: &str) -> bool {
        self.no_exist(commit, file).exists()
    }

    /// Records that `file` is not in the repo at `commit`, so offline runs know not to expect it.
    /// Best effort: the marker only saves work, so failing to write it is not an error.
    pub(crate) fn mark_missing(&self, commit: &str, file: &str) {
        let p = self.no_exist(commit, file);
        let written = p.parent().map_or(Ok(()), fs::create_dir_all).and_then(|()| fs::write(&p, b""));
        if let Err(e) = written {
            tracing::debug!("could not write {}: {e}", p.display());
        }
    }

    /// The commit `revision` points to in this cache: the revision itself when it is a commit
    /// hash with a snapshot, else the content of `refs/<revision>`.
    pub(crate) fn resolve_commit(&self, revision: &str) -> Option<String> {
        if is_commit_hash(revision) && self.snapshot_dir(revision).is_dir() {
            return Some(revision.to_string());
        }
        let text = fs::read_to_string(self.dir.join("refs").join(revision)).ok()?;
        let commit = text.trim();
        // The ref names a folder below; refuse anything that is not a plain name.
        (!commit.is_empty() && commit.chars().all(|c| c.is_ascii_alphanumeric())).then(|| commit.to_string())
    }

    /// Writes `refs/<revision>` = `commit`, through a temp file so a reader never sees half a hash.
    pub(crate) fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        let path = self.dir.join("refs").join(revision);
        if fs::read_to_string(&path).is_ok_and(|t| t.trim() == commit) {
            return Ok(());
        }
        let parent = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        // Unique per process and per call: two threads writing the same ref must not share a
        // temp file (the second rename would find it gone).
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = parent.join(format!(".{}.tmp{}-{seq}", file_name(&path), std::process::id()));
        let mut f = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        if let Err(e) = f.write_all(commit.as_bytes()) {
            drop(f);
            let _ = fs::remove_file(&tmp);
            return Err(Error::WriteFailed { path: tmp, source: e });
        }
        drop(f);
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }

    /// Makes `snapshots/<commit>/<file>` point at `blobs/<etag>` and returns it. A relative symlink,
    /// as Python makes, so the cache folder can be moved; a copy where symlinks are not allowed.
    pub(crate) fn link(&self, etag: &str, commit: &str, file: &str) -> Result<PathBuf> {
        let dst = self.snapshot_file(commit, file);
        let blob = self.blob(etag);
        let parent = dst.parent().unwrap_or(&self.dir);
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        // snapshots/<commit>/ is two levels below the repo folder, plus one per folder in `file`.
        let depth = 2 + Path::new(file).components().count().saturating_sub(1);
        let target = PathBuf::from("../".repeat(depth)).join("blobs").join(etag);
        // Already the right link (another process made it): kept as it is.
        if fs::read_link(&dst).is_ok_and(|t| t == target) && dst.is_file() {
            return Ok(dst);
        }
        // A dangling link (its blob deleted by a cache cleanup), or a link to another blob, is
        // replaced.
        if fs::symlink_metadata(&dst).is_ok() {
            fs::remove_file(&dst).map_err(|e| Error::io(&dst, e))?;
        }
        #[cfg(unix)]
        let linked = std::os::unix::fs::symlink(&target, &dst).is_ok();
        #[cfg(not(unix))]
        let linked = {
            let _ = &target;
            false
        };
        if !linked {
            if let Err(e) = fs::copy(&blob, &dst) {
                // A partial copy would look like a cached file.
                let _ = fs::remove_file(&dst);
                return Err(Error::WriteFailed { path: dst, source: e });
            }
        }
        Ok(dst)
    }

    /// Checks that the snapshot of `revision` holds everything a load needs, using only the disk.
    pub(crate) fn complete_snapshot(&self, revision: &str) -> std::result::Result<PathBuf, Incomplete> {
        let Some(commit) = self.resolve_commit(revision) else {
            return Err(Incomplete::NoRef);
        };
        let dir = self.snapshot_dir(&commit);
        let mut missing = Vec::new();
        let has = |f: &str| self.cached_file(&commit, f).is_some();
        if !has("config.json") {
            missing.push("config.json".to_string());
        }
        if !has("model.safetensors") {
            if has("model.safetensors.index.json") {
                let index = dir.join("model.safetensors.index.json");
                let names = fs::read_to_string(&index)
                    .map_err(|e| Error::io(&index, e))
                    .and_then(|text| shard_names(&index, &text))
                    .map_err(Incomplete::Corrupt)?;
                missing.extend(names.into_iter().filter(|n| !has(n)));
            } else if let Some(p) = ["pytorch_model.bin", "pytorch_model.bin.index.json"].into_iter().find(|f| has(f)) {
                return Err(Incomplete::PickleOnly(p.to_string()));
            } else {
                missing.push("model.safetensors (or model.safetensors.index.json)".to_string());
            }
        }
        // Tokenizer files count as present when an online run recorded that the repo lacks them.
        for f in TOKENIZER_FILES {
            if !has(f) && !self.known_missing(&commit, f) {
                missing.push(f.to_string());
            }
        }
        // The other optional files (generation config, chat template...) never block a load: the
        // loader has defaults for them.
        if missing.is_empty() {
            Ok(dir)
        } else {
            Err(Incomplete::Missing(missing))
        }
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Whether `rel` is a plain relative path that stays inside the folder it is joined to.
pub(crate) fn is_contained(rel: &str) -> bool {
    let p = Path::new(rel);
    !rel.is_empty() && !p.is_absolute() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

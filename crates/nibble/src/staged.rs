//! Output folders that appear whole or not at all.
//!
//! `save_pretrained` and `import_gguf` write a model folder of several files. Written in place,
//! a process killed halfway (SIGKILL, power loss) would leave a folder that looks like a model
//! and loads wrong or not at all. A [`StagedDir`] is written under a hidden temporary name next
//! to the target and renamed onto it when complete: the rename is atomic on one filesystem, so
//! the target either does not exist or holds the whole model. A failure removes the temporary
//! folder; a kill leaves only the hidden `.<name>.<what>-<pid>.tmp`, which nothing loads.

use std::path::{Path, PathBuf};

use nibble_core::{Error, Result};

/// A temporary folder that becomes `out` on [`StagedDir::commit`].
#[derive(Debug)]
pub(crate) struct StagedDir {
    tmp: PathBuf,
    out: PathBuf,
    /// `out` exists as an empty folder, removed just before the rename.
    replace_empty: bool,
    committed: bool,
}

impl StagedDir {
    /// Stages a folder for `out`, which must not exist or be an empty folder; `what` names the
    /// operation in the temporary name (`save`, `import`).
    pub(crate) fn new(out: &Path, what: &str) -> Result<Self> {
        let replace_empty = match std::fs::read_dir(out) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(Error::invalid_argument(
                        "out_dir",
                        format!("{} already exists and is not empty; remove it or choose another folder", out.display()),
                    ));
                }
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) if out.exists() => {
                return Err(Error::invalid_argument(
                    "out_dir",
                    format!("{} exists and is not a readable folder: {e}", out.display()),
                ))
            }
            Err(e) => return Err(Error::io(out, e)),
        };
        let name = out
            .file_name()
            .ok_or_else(|| Error::invalid_argument("out_dir", format!("{} does not name a folder", out.display())))?;
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let tmp = parent.join(format!(".{}.{what}-{}.tmp", name.to_string_lossy(), std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Self { tmp, out: out.to_path_buf(), replace_empty, committed: false })
    }

    /// The folder to write into.
    pub(crate) fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the finished folder onto `out`.
    pub(crate) fn commit(mut self) -> Result<()> {
        if self.replace_empty {
            std::fs::remove_dir(&self.out).map_err(|e| Error::io(&self.out, e))?;
        }
        std::fs::rename(&self.tmp, &self.out).map_err(|e| Error::io(&self.out, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the error being returned matters more than a failed cleanup.
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

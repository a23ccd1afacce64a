//! A per-process scratch folder in /dev/shm (memory, not disk) for targets whose code under test
//! reads files: the input is written there once per run.

use std::path::{Path, PathBuf};

/// The scratch folder of this process, created on first use.
pub fn dir() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let d = base.join(format!("nibble-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}

/// Writes `data` to `name` in the scratch folder and returns its path.
pub fn write(name: &str, data: &[u8]) -> PathBuf {
    let p = dir().join(name);
    let _ = std::fs::write(&p, data);
    p
}

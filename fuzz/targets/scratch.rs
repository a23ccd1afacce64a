//! A per-process scratch folder in /dev/shm (memory, not disk) for targets whose code under test
//! reads files: the input is written there once per run.

use std::path::{Path, PathBuf};

/// The scratch folder of this target, created on first use. Named after the executable, not the
/// process: AFL++ restarts a persistent target every few thousand runs, and a folder per process
/// would pile up in memory for the whole campaign.
pub fn dir() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let exe = std::env::current_exe().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let d = base.join(format!("nibble-fuzz-{}", exe.unwrap_or_else(|| "target".into())));
    let _ = std::fs::create_dir_all(&d);
    d
}

/// Writes `data` to `name` in the scratch folder and returns its path.
// Not every target that uses the folder writes its input there.
#[allow(dead_code)]
pub fn write(name: &str, data: &[u8]) -> PathBuf {
    let p = dir().join(name);
    let _ = std::fs::write(&p, data);
    p
}

//! The machine: CPU name, cores, load, memory read bandwidth, peak resident memory.

use std::time::Instant;

use rayon::prelude::*;

/// What the report says about the machine.
#[derive(Debug, Clone)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo (or "unknown").
    pub cpu: String,
    /// Logical CPUs this process may use.
    pub threads: usize,
    /// SIMD flags that matter to the kernels.
    pub flags: String,
    /// The kernel set nibble picked.
    pub kernels: String,
    /// /proc/loadavg at the start (other work on the machine skews every figure).
    pub loadavg: String,
}

impl Machine {
    /// Reads /proc and the kernel choice.
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let cpu = field("model name").unwrap_or_else(|| "unknown".into());
        let flags: Vec<&str> = ["avx2", "fma", "f16c", "avx512f", "asimd"]
            .into_iter()
            .filter(|f| cpuinfo.split_whitespace().any(|w| w == *f))
            .collect();
        let family = field("cpu family").map(|f| format!(", family {f}")).unwrap_or_default();
        let model = field("model\t").map(|m| format!(" model {m}")).unwrap_or_default();
        Self {
            cpu: format!("{cpu}{family}{model}"),
            threads: rayon::current_num_threads(),
            flags: flags.join(" "),
            kernels: nibble_quant::kernels::Isa::detect().name().to_string(),
            loadavg: std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string(),
        }
    }
}

/// Memory read bandwidth in bytes/s: `(one thread, all threads)`, best of `reps` sums over a
/// buffer of `bytes`.
pub fn read_bandwidth(bytes: usize, reps: usize) -> (f64, f64) {
    let n = bytes / 8;
    // Distinct values so the pages are really backed (no shared zero page).
    let buf: Vec<u64> = (0..n as u64).into_par_iter().map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
    let time = |f: &dyn Fn() -> u64| {
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t = Instant::now();
            std::hint::black_box(f());
            best = best.min(t.elapsed().as_secs_f64());
        }
        (n * 8) as f64 / best
    };
    // Eight independent lanes so the compiler vectorizes and the loop is load-bound.
    let sum = |s: &[u64]| {
        let mut acc = [0u64; 8];
        let mut c = s.chunks_exact(8);
        for v in &mut c {
            for l in 0..8 {
                acc[l] = acc[l].wrapping_add(v[l]);
            }
        }
        acc.iter().chain(c.remainder()).fold(0u64, |a, &b| a.wrapping_add(b))
    };
    let one = time(&|| sum(&buf));
    // One contiguous share per thread, on plain scoped threads: the cleanest streams (rayon's
    // splitting measured up to a third lower, and varied more from run to run).
    let threads = rayon::current_num_threads().max(1);
    let all = time(&|| {
        std::thread::scope(|sc| {
            let parts: Vec<_> = buf.chunks(n.div_ceil(threads).max(1)).map(|c| sc.spawn(move || sum(c))).collect();
            parts.into_iter().filter_map(|h| h.join().ok()).fold(0u64, u64::wrapping_add)
        })
    });
    (one, all)
}

/// Peak resident set size of this process so far (VmHWM, which counts the pages of memory-mapped
/// files too), in bytes.
pub fn vm_hwm() -> u64 {
    status_bytes("VmHWM:")
}

/// A field of /proc/self/status in bytes (the kernel reports kB).
pub fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Samples anonymous resident memory (RssAnon: heap, not the memory-mapped checkpoint) every
/// 2 ms on a background thread and keeps the maximum, until dropped.
pub struct AnonPeak {
    max: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl AnonPeak {
    /// Starts sampling.
    pub fn start() -> Self {
        use std::sync::atomic::Ordering;
        let max = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(status_bytes("RssAnon:")));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (m, st) = (max.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                m.fetch_max(status_bytes("RssAnon:"), Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        Self { max, stop, handle: Some(handle) }
    }

    /// Stops sampling and returns the largest RssAnon seen, in bytes.
    pub fn finish(mut self) -> u64 {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.max.fetch_max(status_bytes("RssAnon:"), Ordering::Relaxed).max(self.max.load(Ordering::Relaxed))
    }
}

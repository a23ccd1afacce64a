//! A team of spinning threads for the small parallel products of a decode step.
//!
//! One token through a 30-layer model is about two hundred matrix-vector products of a few
//! hundred microseconds or less each. Handing each to rayon costs a wake-up and a join every time
//! (rayon's idle workers yield to the OS and then sleep). Here the calling thread and
//! `threads - 1` helpers share each product: between products the helpers spin on an atomic counter for a couple of milliseconds (longer
//! than any gap inside or between decode steps) before they park, so a hand-off costs a cache-line
//! round trip instead of a system call.
//!
//! One caller owns the team at a time; a concurrent caller (another model, a parallel test) and a
//! call nested inside a team job fall back to rayon and to a plain loop respectively, so the
//! results never depend on who got the team (every index runs exactly once either way).

use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long an idle helper spins before it parks: longer than the gaps between the products of
/// a decode step and between steps (sampling, detokenizing), short enough that a finished decode
/// leaves no thread burning a core for long.
const SPIN_BEFORE_PARK: Duration = Duration::from_millis(2);

/// How long the owner spins for late helpers before it also yields its core (a helper may be
/// waiting for that very core when the machine is oversubscribed).
const SPIN_BEFORE_YIELD: Duration = Duration::from_micros(50);

/// A caught panic's payload.
type Panic = Box<dyn Any + Send>;

/// The job of one epoch: `f` for every index below `n`. The pointer's lifetime is erased; the
/// owner keeps `f` alive until every helper has reported the epoch done.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
}

/// State shared by the owner and the helpers.
struct Shared {
    /// Bumped once per job; helpers run a job when they see it change.
    epoch: AtomicU64,
    /// Written by the owner before it bumps `epoch`, read by helpers after they see the bump.
    job: UnsafeCell<Job>,
    /// The next index to claim.
    next: AtomicUsize,
    /// Helpers finished with the current epoch.
    done: AtomicUsize,
    /// The first panic of the current job on a helper, for the owner to re-raise.
    panic: Mutex<Option<Panic>>,
    /// Per helper: parked (or about to park), so the owner must unpark it.
    sleeping: Vec<AtomicBool>,
}

// SAFETY: `job` is written only by the owner (who holds the team's lock) while no helper reads it:
// before the epoch bump that publishes it (Release/Acquire on `epoch`) and after every helper has
// reported the previous epoch done. The job's closure is `Sync`, so running it from several
// threads at once is allowed.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

impl Shared {
    /// Claims and runs indices of `job` until none are left; the panic that stopped it, if one
    /// did. The payload is handed back, never dropped here: dropping it runs user code that may
    /// panic again, which must not unwind past the owner's wait for the helpers.
    fn run(&self, job: Job) -> Option<Panic> {
        // SAFETY: the owner keeps the closure alive until this epoch is reported done.
        let f = unsafe { &*job.f };
        catch_unwind(AssertUnwindSafe(|| loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= job.n {
                break;
            }
            f(i);
        }))
        .err()
    }

    /// Keeps a helper's panic for the owner; a second one is leaked rather than dropped (see
    /// [`Shared::run`]).
    fn keep_panic(&self, p: Panic) {
        let mut slot = self.panic.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(p);
        } else {
            std::mem::forget(p);
        }
    }
}

/// The process's team.
struct Team {
    owner: Mutex<()>,
    shared: Arc<Shared>,
    helpers: Vec<Thread>,
}

thread_local! {
    /// Set on helper threads, and on the owner while it runs a job: a nested call runs inline.
    static IN_TEAM: Cell<bool> = const { Cell::new(false) };
}

/// The process's team, started by the first call: one helper per rayon thread beyond the caller
/// (`RAYON_NUM_THREADS`, or one per core), counted in the pool that call runs in.
fn team() -> Option<&'static Team> {
    static TEAM: OnceLock<Option<Team>> = OnceLock::new();
    TEAM.get_or_init(|| Team::start(rayon::current_num_threads().saturating_sub(1))).as_ref()
}

impl Team {
    /// Starts `n` helpers; `None` when there are none to start (one thread: plain loops are best)
    /// or the OS refuses a thread.
    fn start(n: usize) -> Option<Team> {
        if n == 0 {
            return None;
        }
        let noop: &'static (dyn Fn(usize) + Sync) = &|_| {};
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(Job { f: noop, n: 0 }),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
            sleeping: (0..n).map(|_| AtomicBool::new(false)).collect(),
        });
        let mut helpers = Vec::with_capacity(n);
        for i in 0..n {
            let s = Arc::clone(&shared);
            let handle = thread::Builder::new().name(format!("nibble-team-{i}")).spawn(move || helper(&s, i));
            match handle {
                Ok(h) => helpers.push(h.thread().clone()),
                Err(e) => {
                    // Helpers already started spin out and park for good: harmless.
                    tracing::warn!("could not start a kernel thread ({e}); products use rayon");
                    return None;
                }
            }
        }
        Some(Team { owner: Mutex::new(()), shared, helpers })
    }
}

impl Team {
    /// The owner lock, unless another caller holds it. A lock poisoned by a panic that went
    /// through [`for_each_index`] is taken as it is: that call waited for every helper before
    /// unwinding, so the shared state is consistent.
    fn try_own(&self) -> Option<MutexGuard<'_, ()>> {
        match self.owner.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

/// A helper's life: wait for an epoch, run its share, report, repeat.
fn helper(s: &Shared, me: usize) {
    IN_TEAM.with(|t| t.set(true));
    let mut seen = 0u64;
    loop {
        let mut idle_since: Option<Instant> = None;
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) {
                std::hint::spin_loop();
                continue;
            }
            let start = *idle_since.get_or_insert_with(Instant::now);
            if start.elapsed() < SPIN_BEFORE_PARK {
                continue;
            }
            // Announce the nap, then look once more: the owner either sees the flag (and
            // unparks us) or bumped the epoch before it, which this load sees.
            let flag = s.sleeping.get(me);
            if let Some(flag) = flag {
                flag.store(true, Ordering::SeqCst);
            }
            if s.epoch.load(Ordering::SeqCst) == seen {
                thread::park();
            }
            if let Some(flag) = flag {
                flag.store(false, Ordering::SeqCst);
            }
            idle_since = None;
        }
        // SAFETY: see `Shared`: the owner wrote the job before the bump we just observed.
        let job = unsafe { *s.job.get() };
        if let Some(p) = s.run(job) {
            s.keep_panic(p);
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

/// Runs `f(i)` for every `i < n`, each exactly once, shared between the calling thread and the
/// team's helpers (or rayon's pool when the team is busy; inline inside a team job). Returns when
/// every call has returned; a panic in `f` is re-raised here.
pub fn for_each_index(n: usize, f: &(dyn Fn(usize) + Sync)) {
    if n <= 1 || IN_TEAM.with(|t| t.get()) {
        (0..n).for_each(f);
        return;
    }
    let Some(team) = team() else {
        (0..n).into_par_iter().for_each(f);
        return;
    };
    let Some(_owner) = team.try_own() else {
        (0..n).into_par_iter().for_each(f);
        return;
    };
    let s = &*team.shared;
    // SAFETY: only the lifetime is erased; `f` outlives this call, and this call returns only
    // after every helper has reported the epoch done (below), so no helper holds `f` after it.
    let erased: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
    let job = Job { f: erased, n };
    // SAFETY: we hold the owner lock and every helper finished the previous epoch (the previous
    // owner waited for them), so nobody reads the slot now.
    unsafe { *s.job.get() = job };
    s.next.store(0, Ordering::Relaxed);
    s.done.store(0, Ordering::Relaxed);
    s.epoch.fetch_add(1, Ordering::SeqCst);
    for (flag, t) in s.sleeping.iter().zip(&team.helpers) {
        if flag.load(Ordering::SeqCst) {
            t.unpark();
        }
    }
    IN_TEAM.with(|t| t.set(true));
    let mine = s.run(job);
    IN_TEAM.with(|t| t.set(false));
    let waiting = Instant::now();
    let mut spins = 0u32;
    while s.done.load(Ordering::Acquire) < team.helpers.len() {
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(256) && waiting.elapsed() > SPIN_BEFORE_YIELD {
            thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    // Every helper is done with `f`; only now may a panic unwind out of here.
    let theirs = s.panic.lock().unwrap_or_else(PoisonError::into_inner).take();
    match (mine, theirs) {
        (Some(p), other) => {
            std::mem::forget(other);
            resume_unwind(p)
        }
        (None, Some(p)) => resume_unwind(p),
        (None, None) => {}
    }
}

/// Splits `y` into chunks of `per_task` values and runs `run(t, chunk_t)` for each chunk `t`
/// with [`for_each_index`]; a single chunk runs inline (no hand-off at all).
pub fn for_each_chunk_mut<T: Send>(y: &mut [T], per_task: usize, run: impl Fn(usize, &mut [T]) + Sync) {
    let per_task = per_task.max(1);
    if y.len() <= per_task {
        run(0, y);
        return;
    }
    // Each chunk is claimed by exactly one index, so each lock is taken once, uncontended.
    let chunks: Vec<Mutex<&mut [T]>> = y.chunks_mut(per_task).map(Mutex::new).collect();
    for_each_index(chunks.len(), &|t| {
        if let Some(Ok(mut c)) = chunks.get(t).map(|m| m.lock()) {
            run(t, &mut c);
        }
    });
}

/// Whether products called from this thread now would be split by the team (its hand-offs are
/// cheap, so work can be cut finer than for rayon).
pub(crate) fn available() -> bool {
    !IN_TEAM.with(|t| t.get()) && team().is_some_and(|t| t.try_own().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every index runs exactly once, including from several callers at once (one gets the
    /// team, the others rayon) and from a call nested inside a job.
    #[test]
    fn every_index_once() {
        let run = |n: usize| {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for_each_index(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
                if i == 0 {
                    let inner: Vec<AtomicUsize> = (0..5).map(|_| AtomicUsize::new(0)).collect();
                    for_each_index(5, &|j| {
                        inner[j].fetch_add(1, Ordering::Relaxed);
                    });
                    assert!(inner.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}");
        };
        thread::scope(|sc| {
            for _ in 0..3 {
                sc.spawn(|| {
                    for n in [0, 1, 2, 3, 7, 64, 1000] {
                        for _ in 0..50 {
                            run(n);
                        }
                    }
                });
            }
        });
    }

    /// Chunks cover the slice in order, each written by its own task.
    #[test]
    fn chunks_cover_the_slice() {
        let mut y = vec![0usize; 1001];
        for_each_chunk_mut(&mut y, 64, |t, c| {
            for (i, v) in c.iter_mut().enumerate() {
                *v = t * 64 + i;
            }
        });
        assert!(y.iter().enumerate().all(|(i, &v)| i == v));
    }

    /// A panic payload whose drop panics again (user code can make one).
    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("dropping the payload");
        }
    }

    /// Such a payload reaches the caller as it is, whether the owner's share or a helper's
    /// threw it, only after every task has returned (tasks still running would be reading the
    /// caller's stack), and the team keeps working. (One task panics: rayon, which runs the job
    /// when another test holds the team, drops all but the first of several payloads.)
    #[test]
    fn a_panicking_payload_is_passed_through_whole() {
        for round in 0..20 {
            let running = AtomicUsize::new(0);
            let r = catch_unwind(AssertUnwindSafe(|| {
                for_each_index(64, &|i| {
                    running.fetch_add(1, Ordering::SeqCst);
                    thread::sleep(Duration::from_micros(50));
                    running.fetch_sub(1, Ordering::SeqCst);
                    // Early in some rounds, late in others: either thread may claim it.
                    if i == (round * 7) % 64 {
                        std::panic::panic_any(Bomb);
                    }
                })
            }));
            assert_eq!(running.load(Ordering::SeqCst), 0, "returned while tasks still ran");
            match r {
                Err(p) => {
                    assert!(p.is::<Bomb>(), "the payload is the task's own");
                    std::mem::forget(p);
                }
                Ok(()) => panic!("the panic was lost"),
            }
        }
        let hits = AtomicUsize::new(0);
        for_each_index(100, &|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 100);
    }

    /// A panic in a task reaches the caller, and the team keeps working afterwards.
    #[test]
    fn a_panic_reaches_the_caller() {
        let r = catch_unwind(|| for_each_index(100, &|i| assert!(i != 57, "task 57")));
        assert!(r.is_err());
        if let Some(t) = team() {
            // Other tests may hold the team for a moment; a poisoned lock must not stop it.
            let start = Instant::now();
            while t.try_own().is_none() {
                assert!(start.elapsed() < Duration::from_secs(10), "the team is not usable after a panic");
                thread::yield_now();
            }
        }
        let hits = AtomicUsize::new(0);
        for_each_index(100, &|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 100);
    }
}

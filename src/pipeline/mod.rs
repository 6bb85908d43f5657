//! The streaming pipelines behind `prune`, `apply` and `verify`: stages on threads joined by
//! bounded channels, chunk-parallel work on a fixed-size thread pool, one shared flag for
//! cancellation and atomic counters for progress. See docs/PIPELINE.md.

pub mod apply;
pub mod prune;
pub mod side;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;

use fapm_stages::{Error, Result};

/// Shared state of one run: cancellation and progress, read by the binary's progress bar.
#[derive(Default)]
pub struct Ctl {
    cancelled: AtomicBool,
    /// Input bytes processed so far (each pass over a tensor counts its bytes once).
    pub done: AtomicU64,
    /// Input bytes the run will process, when known.
    pub total: AtomicU64,
    /// The tensor being processed.
    pub current: Mutex<String>,
}

impl Ctl {
    /// Asks every stage to stop at its next chunk.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// Whether the run was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// `Err(Cancelled)` once the run was cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Counts `bytes` of input as processed.
    pub fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Records which tensor is being processed.
    pub fn set_current(&self, name: &str) {
        if let Ok(mut c) = self.current.lock() {
            c.clear();
            c.push_str(name);
        }
    }
}

/// Builds the worker pool for `threads` threads.
pub(crate) fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("fapm-worker-{i}"))
        .build()
        .map_err(|e| Error::Config(format!("cannot start {threads} worker threads: {e}")))
}

/// Joins a stage thread: its result, or its panic re-raised.
pub(crate) fn join<T>(handle: thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    match handle.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// The first real error of several stages: a cancellation caused by another stage's
/// failure is not the cause.
pub(crate) fn first_error<T>(results: impl IntoIterator<Item = Result<T>>) -> Result<()> {
    let mut cancelled = false;
    for r in results {
        match r {
            Ok(_) => {}
            Err(Error::Cancelled) => cancelled = true,
            Err(e) => return Err(e),
        }
    }
    if cancelled {
        Err(Error::Cancelled)
    } else {
        Ok(())
    }
}

/// Runs `job` on every item on the pool, at most `window` at a time, and hands the results
/// to `sink` in the items' order as soon as each is next: a sliding window, so that no
/// worker waits for a slower neighbour before it starts on the next item. Stops early when
/// the run is cancelled, at `sink`'s first error, or when `sink` returns `false` (whoever
/// it feeds has gone); returns that `false`.
pub(crate) fn ordered<I: Send, T: Send>(
    pool: &rayon::ThreadPool,
    items: impl IntoIterator<Item = I>,
    window: usize,
    ctl: &Ctl,
    job: impl Fn(I) -> T + Sync,
    mut sink: impl FnMut(T) -> Result<bool>,
) -> Result<bool> {
    use std::collections::BTreeMap;
    use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    let mut items = items.into_iter().enumerate();
    let job = &job;
    pool.in_place_scope_fifo(|scope| {
        let (mut started, mut next) = (0, 0);
        let mut finished = BTreeMap::new();
        loop {
            ctl.check()?;
            while started - next < window.max(1) {
                let Some((i, item)) = items.next() else { break };
                let done = done_tx.clone();
                scope.spawn_fifo(move |_| {
                    // A panic is carried back and raised here, not left to hang the wait.
                    let _ = done.send((i, catch_unwind(AssertUnwindSafe(|| job(item)))));
                });
                started += 1;
            }
            if next == started {
                return Ok(true);
            }
            let (i, result) = done_rx.recv().expect("this function holds a sender");
            finished.insert(i, result);
            while let Some(result) = finished.remove(&next) {
                next += 1;
                if !sink(result.unwrap_or_else(|panic| resume_unwind(panic)))? {
                    return Ok(false);
                }
            }
        }
    })
}

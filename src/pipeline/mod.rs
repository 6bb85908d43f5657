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

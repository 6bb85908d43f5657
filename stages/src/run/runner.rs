//! How stages run: the worker pool, stage threads that cancel the others when they fail,
//! joining them with the first real error, and the sliding window that runs per-chunk jobs
//! on the pool and hands their results on in order.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::thread;

use crate::{Error, Result};

use super::RunControl;

/// Builds the worker pool for `threads` threads.
pub fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("fapm-worker-{i}"))
        .build()
        .map_err(|e| Error::Config(format!("cannot start {threads} worker threads: {e}")))
}

/// Runs a stage body; a real failure cancels the other stages.
pub fn stage<T>(ctl: &RunControl, body: impl FnOnce() -> Result<T>) -> Result<T> {
    let r = body();
    if matches!(r, Err(ref e) if !matches!(e, Error::Cancelled)) {
        ctl.cancel();
    }
    r
}

/// Joins a stage thread: its result, or its panic re-raised.
pub fn join<T>(handle: thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    match handle.join() {
        Ok(r) => r,
        Err(panic) => resume_unwind(panic),
    }
}

/// The first real error of several stages: a cancellation caused by another stage's
/// failure is not the cause.
pub fn first_error<T>(results: impl IntoIterator<Item = Result<T>>) -> Result<()> {
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
pub fn ordered_window<I: Send, T: Send>(
    pool: &rayon::ThreadPool,
    items: impl IntoIterator<Item = I>,
    window: usize,
    ctl: &RunControl,
    job: impl Fn(I) -> T + Sync,
    mut sink: impl FnMut(T) -> Result<bool>,
) -> Result<bool> {
    // Never holds more than `window` results: one per job in flight.
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

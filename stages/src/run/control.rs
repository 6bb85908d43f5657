//! What every stage of a run shares: the cancellation flag and the progress counters that
//! the binary's progress bar reads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::{Error, Result};

/// Shared state of one run: cancellation and progress, read by the binary's progress bar.
#[derive(Default)]
pub struct RunControl {
    cancelled: AtomicBool,
    /// Input bytes processed so far (each pass over a tensor counts its bytes once).
    done: AtomicU64,
    /// Input bytes the run will process, when known.
    total: AtomicU64,
    /// The tensor being processed.
    current: Mutex<String>,
}

impl RunControl {
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

    /// Sets the number of input bytes the run will process.
    pub fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
    }

    /// How far the run is: input bytes processed so far and the total (0 when not known yet).
    pub fn progress(&self) -> (u64, u64) {
        (self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed))
    }

    /// The tensor being processed.
    pub fn current(&self) -> String {
        self.current.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Records which tensor is being processed.
    pub fn set_current(&self, name: &str) {
        if let Ok(mut c) = self.current.lock() {
            c.clear();
            c.push_str(name);
        }
    }
}

//! A guard against inputs that change under a memory map.
//!
//! fapm reads checkpoint shards through memory maps. If another process truncates a shard
//! while fapm reads it, touching a page past the new end raises SIGBUS, which would kill the
//! process silently and leave temporary outputs behind. [`install`] sets a handler that
//! prints one `error:` line, removes every registered temporary output and exits with code 1.
//!
//! The handler may only make async-signal-safe calls (`write`, `unlink`, `rmdir`, `_exit`),
//! so the paths to remove live in a fixed-size static table of NUL-terminated byte strings,
//! filled by [`register`] (called by `output::Staged` for each temporary file or directory)
//! and cleared by dropping the returned [`Registration`]. Each slot has an owner at all times,
//! recorded in its state: a thread writing it, the table (ready), or the handler, which takes
//! a ready slot before reading its path, so that no thread can free and rewrite the path
//! while the handler reads it. Paths longer than [`MAX_PATH`]
//! bytes or beyond the table's [`SLOTS`] entries are not registered: a SIGBUS then leaves them
//! behind (documented in docs/SECURITY.md).

use std::cell::UnsafeCell;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// How many temporary paths can be registered at once.
pub const SLOTS: usize = 256;
/// The longest registrable path, in bytes (without the NUL).
pub const MAX_PATH: usize = 1023;

const FREE: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;
/// Taken by the signal handler, which will end the process: never freed again.
const HANDLER: u8 = 3;

/// The message printed when a mapped input changes under fapm.
pub const MESSAGE: &str = "error: a memory-mapped input file changed or was truncated while fapm was reading it\n";

struct Slot {
    state: AtomicU8,
    path: UnsafeCell<[u8; MAX_PATH + 1]>,
}

// SAFETY: `path` is written only by the thread that moved `state` from FREE to WRITING, and
// read only by the signal handler after it moved `state` from READY to HANDLER. Both moves are
// compare-exchanges, so at most one of them owns the slot; READY is published with Release and
// taken with Acquire, so the handler sees the whole path. A slot only becomes FREE again from
// READY (by its `Registration`), never from HANDLER.
unsafe impl Sync for Slot {}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot { state: AtomicU8::new(FREE), path: UnsafeCell::new([0; MAX_PATH + 1]) };
static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];

/// A registered temporary path; dropping it unregisters the path.
#[derive(Debug)]
pub struct Registration(Option<usize>);

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            // Fails only when the signal handler has taken the slot: the process is ending and
            // the slot must stay as it is.
            let _ = TABLE[i].state.compare_exchange(READY, FREE, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

/// Registers `path` (a temporary file or directory) for removal if SIGBUS strikes.
/// Best effort: a path too long or a full table is silently not registered.
pub fn register(path: &Path) -> Registration {
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() > MAX_PATH || bytes.contains(&0) {
        return Registration(None);
    }
    for (i, slot) in TABLE.iter().enumerate() {
        if slot.state.compare_exchange(FREE, WRITING, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            // SAFETY: this thread owns the slot while it is WRITING (see `Sync` above).
            let buf = unsafe { &mut *slot.path.get() };
            buf[..bytes.len()].copy_from_slice(bytes);
            buf[bytes.len()] = 0;
            slot.state.store(READY, Ordering::Release);
            return Registration(Some(i));
        }
    }
    Registration(None)
}

/// Installs the SIGBUS handler. Call once, early in `main`.
pub fn install() {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler only
    // makes async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        action.sa_flags = 0;
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

/// Set by the first thread to enter the handler: several workers may fault at once, and
/// only one may print and clean up.
static ENTERED: AtomicBool = AtomicBool::new(false);

extern "C" fn handler(_signal: libc::c_int) {
    // SAFETY: write, unlink, rmdir, pause and _exit are async-signal-safe, and atomics are
    // lock-free; a slot's path is NUL-terminated and, once the handler holds the slot
    // (HANDLER), nobody else writes it (see `Sync` above).
    unsafe {
        if ENTERED.swap(true, Ordering::SeqCst) {
            // Another thread is cleaning up and will end the process.
            loop {
                libc::pause();
            }
        }
        libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
        // Take every ready slot first: from here on, other threads can neither free nor
        // rewrite them. A slot being written at this instant is skipped.
        for slot in TABLE.iter() {
            let _ = slot.state.compare_exchange(READY, HANDLER, Ordering::Acquire, Ordering::Relaxed);
        }
        // Files first, then directories, innermost first: a few passes of rmdir suffice for
        // the shallow trees fapm writes.
        for slot in TABLE.iter() {
            if slot.state.load(Ordering::Acquire) == HANDLER {
                libc::unlink((*slot.path.get()).as_ptr().cast());
            }
        }
        for _ in 0..4 {
            for slot in TABLE.iter() {
                if slot.state.load(Ordering::Acquire) == HANDLER {
                    libc::rmdir((*slot.path.get()).as_ptr().cast());
                }
            }
        }
        libc::_exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_take_and_free_slots() {
        let a = register(Path::new("/tmp/a"));
        let i = a.0.unwrap();
        assert_eq!(TABLE[i].state.load(Ordering::Acquire), READY);
        drop(a);
        assert_eq!(TABLE[i].state.load(Ordering::Acquire), FREE);
        assert!(register(Path::new(&"x".repeat(MAX_PATH + 1))).0.is_none());
    }

    /// Regression: a registration dropped while the handler held its slot freed it, so that
    /// another thread could write a new path into it while the handler read the old one.
    #[test]
    fn a_slot_the_handler_holds_is_never_freed_or_rewritten() {
        let a = register(Path::new("/tmp/held"));
        let i = a.0.unwrap();
        assert!(TABLE[i].state.compare_exchange(READY, HANDLER, Ordering::Acquire, Ordering::Relaxed).is_ok());
        drop(a);
        assert_eq!(TABLE[i].state.load(Ordering::Acquire), HANDLER);
        let others: Vec<Registration> = (0..SLOTS).map(|_| register(Path::new("/tmp/other"))).collect();
        assert!(others.iter().all(|r| r.0 != Some(i)));
        // SAFETY: the slot is held (HANDLER): nobody writes it.
        let path = unsafe { &*TABLE[i].path.get() };
        assert_eq!(&path[..10], b"/tmp/held\0");
        drop(others);
        TABLE[i].state.store(FREE, Ordering::Release); // give the slot back to other tests
    }
}

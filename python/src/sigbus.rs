//! A guard against memory-mapped inputs that shrink while the Python package reads them.
//!
//! A base checkpoint is memory-mapped (and a caller's arrays may be maps too, e.g. torch
//! tensors loaded by safetensors). If another process truncates such a file, touching a page
//! past its new end raises SIGBUS, which kills the interpreter. The command line's guard
//! (`fapm::sigbus`) prints an error and exits; a library must not end its host process, so
//! this one recovers instead: while Rust reads a buffer, the buffer is [`watch`]ed, and a
//! SIGBUS inside a watched buffer maps a page of zeros over the faulting page (the file's
//! bytes there are gone anyway), marks the watch and returns. The read goes on over zeros and
//! the caller turns the mark into `FapmError` ([`Watch::faulted`]). A SIGBUS anywhere else is
//! passed to the handler that was there before (Python's `faulthandler`, or the default
//! action, which ends the process as it would have without this guard).
//!
//! The handler makes only async-signal-safe calls and system calls (`mmap`, `sigaction`) and
//! reads a fixed static table of atomics.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicUsize, Ordering};

/// How many buffers can be watched at once (a call watches one or two); more are not watched.
const SLOTS: usize = 64;

const FREE: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;

struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    state: AtomicU8::new(FREE),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};
static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];

/// The handler that was installed before ours (leaked, never freed: the handler may read it
/// at any time); null: the default action.
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());

/// A buffer watched for SIGBUS until dropped.
pub struct Watch(Option<usize>);

impl Watch {
    /// Whether a page of the buffer was lost (its file shrank) while it was watched.
    pub fn faulted(&self) -> bool {
        self.0.is_some_and(|i| TABLE[i].faulted.load(Ordering::Acquire))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            TABLE[i].state.store(FREE, Ordering::Release);
        }
    }
}

/// Watches `bytes` for SIGBUS (and makes sure the handler is installed: code that runs after
/// the module's import, such as `faulthandler.enable()`, may have replaced it). Best effort:
/// with every slot taken the buffer is not watched.
pub fn watch(bytes: &[u8]) -> Watch {
    install();
    if bytes.is_empty() {
        return Watch(None);
    }
    let (start, end) = (bytes.as_ptr() as usize, bytes.as_ptr() as usize + bytes.len());
    for (i, slot) in TABLE.iter().enumerate() {
        if slot.state.compare_exchange(FREE, WRITING, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            slot.start.store(start, Ordering::Relaxed);
            slot.end.store(end, Ordering::Relaxed);
            slot.faulted.store(false, Ordering::Relaxed);
            slot.state.store(READY, Ordering::Release);
            return Watch(Some(i));
        }
    }
    Watch(None)
}

/// Installs the handler unless it is the current one, keeping the current one to pass
/// foreign faults to.
pub fn install() {
    // SAFETY: sigaction with a null new action only reads the current one; a zeroed sigaction
    // is a valid "no flags, empty mask" value; the handler is async-signal-safe (module doc).
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut current) != 0 {
            return;
        }
        if current.sa_sigaction == ours() {
            return;
        }
        let previous = if current.sa_sigaction == libc::SIG_DFL || current.sa_sigaction == libc::SIG_IGN {
            std::ptr::null_mut()
        } else {
            Box::into_raw(Box::new(current))
        };
        // An older one is leaked on purpose: a handler running now may still read it.
        PREVIOUS.store(previous, Ordering::Release);
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ours();
        libc::sigemptyset(&mut action.sa_mask);
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

type Action = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

fn ours() -> libc::sighandler_t {
    handler as Action as libc::sighandler_t
}

extern "C" fn handler(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: `info` is the kernel's siginfo for this signal; mmap and sigaction are system
    // calls; the table holds atomics only.
    unsafe {
        // A fault (si_code > 0), not a signal sent by a process.
        if !info.is_null() && (*info).si_code > 0 {
            let addr = (*info).si_addr() as usize;
            for slot in TABLE.iter() {
                if slot.state.load(Ordering::Acquire) == READY
                    && (slot.start.load(Ordering::Relaxed)..slot.end.load(Ordering::Relaxed)).contains(&addr)
                {
                    let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
                    let at = addr & !(page - 1);
                    let zeros = libc::mmap(
                        at as *mut libc::c_void,
                        page,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    );
                    if zeros != libc::MAP_FAILED {
                        slot.faulted.store(true, Ordering::Release);
                        return;
                    }
                }
            }
        }
        let previous = PREVIOUS.load(Ordering::Acquire);
        if previous.is_null() {
            // The default action: it ends the process when the faulting access runs again.
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
            if info.is_null() || (*info).si_code <= 0 {
                libc::raise(signal);
            }
            return;
        }
        let p = &*previous;
        if p.sa_flags & libc::SA_SIGINFO != 0 {
            std::mem::transmute::<libc::sighandler_t, Action>(p.sa_sigaction)(signal, info, context);
        } else {
            std::mem::transmute::<libc::sighandler_t, extern "C" fn(libc::c_int)>(p.sa_sigaction)(signal);
        }
    }
}

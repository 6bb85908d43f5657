//! Read-only memory maps of checkpoint shards, and the contract they carry: a file must not
//! change while it is mapped.

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};

/// A read-only memory map of a whole file.
pub struct Mmap {
    map: Option<memmap2::Mmap>,
}

impl Mmap {
    /// Maps `file`, which is `path` and `len` bytes long, read-only.
    ///
    /// # Safety
    ///
    /// The map is shared (`MAP_SHARED`, as memmap2 maps), not a private copy: for as long as
    /// it lives, a write to the file by anyone shows through it, and a truncation makes
    /// reading the pages past the new end raise SIGBUS. Rust assumes the bytes behind a
    /// `&[u8]` never change, so the caller must make sure that nobody modifies or truncates
    /// the file while the map (or a slice of it) is in use.
    pub(crate) unsafe fn map(path: &Path, file: &File, len: u64) -> Result<Self> {
        if len == 0 {
            return Ok(Mmap { map: None });
        }
        // SAFETY: passed on to our caller (see `# Safety`).
        let map = unsafe { memmap2::Mmap::map(file) }.map_err(|e| Error::io(path, e))?;
        Ok(Mmap { map: Some(map) })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Drops the page-table entries of the pages inside `range`, which the caller will not
    /// read again soon, rather than unmapping them all at exit, on one thread, after
    /// everything else is done. The file's pages stay in the page cache. The range is rounded
    /// inward to 4 KiB; where pages are larger the kernel's rounding may take in a page of a
    /// neighbouring tensor, which is harmless (see below).
    #[cfg(unix)]
    pub(crate) fn release(&self, range: std::ops::Range<usize>) {
        const PAGE: usize = 4096;
        let (Some(map), true) = (&self.map, range.end <= self.bytes().len()) else { return };
        let start = (map.as_ptr() as usize + range.start).next_multiple_of(PAGE) - map.as_ptr() as usize;
        let end = (map.as_ptr() as usize + range.end) / PAGE * PAGE - map.as_ptr() as usize;
        if start < end {
            // SAFETY: the map is a shared read-only file mapping, so MADV_DONTNEED discards no
            // data: it drops our page-table entries, the pages stay in the page cache, and a
            // later read of these bytes (by any thread, even at the same time) maps the same
            // file pages again. It is advice; a failure changes nothing and is ignored.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    }

    #[cfg(not(unix))]
    pub(crate) fn release(&self, _range: std::ops::Range<usize>) {}

    /// Reads the pages inside `range` into the page cache and maps them, so that whoever
    /// touches them next neither waits for the disk nor takes a page fault (the reader thread,
    /// `read::ahead`). Where the kernel has no `MADV_POPULATE_READ` (before Linux 5.14) it
    /// asks for them to be read in the background instead (`MADV_WILLNEED`). Advice: a
    /// failure changes nothing.
    #[cfg(target_os = "linux")]
    pub(crate) fn populate(&self, range: std::ops::Range<usize>) {
        use memmap2::Advice;
        let (Some(map), true) = (&self.map, range.start < range.end && range.end <= self.bytes().len()) else {
            return;
        };
        // A file truncated under the map makes this fail (EFAULT), not raise SIGBUS.
        if map.advise_range(Advice::PopulateRead, range.start, range.end - range.start).is_err() {
            let _ = map.advise_range(Advice::WillNeed, range.start, range.end - range.start);
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub(crate) fn populate(&self, _range: std::ops::Range<usize>) {}
}

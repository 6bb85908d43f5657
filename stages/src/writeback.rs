//! Starting the write-back of output files early, so that the final `fsync` has little
//! left to wait for.
//!
//! fapm syncs every output before it commits it. Without a hint the kernel keeps gigabytes
//! of freshly written pages dirty (below its dirty limits, a few GB on a large machine), so
//! the whole output would be written to disk inside that final `fsync`, after the work is
//! done. Started as soon as each range is written, the disk works while the CPU does.

use std::fs::File;

/// The page size the hints are rounded to (the kernel rounds to its own pages).
const PAGE: u64 = 4096;

/// Asks the kernel to start writing to disk the whole pages of `file` inside `len` bytes
/// from `offset`, without waiting for them. Pages shared with a neighbouring range, which
/// another thread may still be writing, are left to the final sync (some filesystems make a
/// writer wait for a page under write-back). Only a hint: errors are left to the final
/// sync, which reports them. A no-op where `sync_file_range` does not exist.
pub fn start(file: &File, offset: u64, len: u64) {
    // None also keeps a length of 0 ("to the end of the file") from the syscall.
    let Some((first, len)) = whole_pages(offset, len) else { return };
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(first), i64::try_from(len)) else { return };
        // SAFETY: sync_file_range reads no memory of ours; the fd is open for as long as
        // `file` is borrowed.
        unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, first, len);
}

/// The whole pages inside `len` bytes from `offset`, as (offset, length); None if none.
fn whole_pages(offset: u64, len: u64) -> Option<(u64, u64)> {
    let (first, end) = (offset.next_multiple_of(PAGE), offset.saturating_add(len) / PAGE * PAGE);
    (end > first).then(|| (first, end - first))
}

/// Tracks how much of a file written front to back has been handed to [`start`], and
/// hands it on every `STEP` bytes, in whole pages.
#[derive(Debug, Default)]
pub struct SequentialWriteback {
    started: u64,
}

impl SequentialWriteback {
    /// Bytes written between two hints.
    pub const STEP: u64 = 8 << 20;

    /// `written` bytes of `file` (from its start) are now in the kernel's hands.
    pub fn written(&mut self, file: &File, written: u64) {
        let whole = written / PAGE * PAGE; // a partial last page waits for the next hint
        if whole >= self.started + Self::STEP {
            start(file, self.started, whole - self.started);
            self.started = whole;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    /// Hints go out once per STEP of written bytes and never change what the file holds.
    #[test]
    fn hints_follow_the_writes_and_change_nothing() {
        let mut f = tempfile::tempfile().unwrap();
        let mut writeback = SequentialWriteback::default();
        // Pieces of a MiB and 100 bytes: the hints stop at the last whole page.
        let piece: Vec<u8> = (0..(1 << 20) + 100).map(|i| (i % 251) as u8).collect();
        let mut started = Vec::new();
        for i in 1..=20u64 {
            f.write_all(&piece).unwrap();
            writeback.written(&f, i * piece.len() as u64);
            started.push(writeback.started);
        }
        assert!(started.iter().all(|s| s % PAGE == 0));
        assert!(started.windows(2).all(|w| w[0] <= w[1]));
        let moves = started.windows(2).filter(|w| w[0] != w[1]).count() + (started[0] > 0) as usize;
        assert_eq!(moves, 2, "{started:?}"); // after 8 and 16 pieces
                                             // The whole pages of 8 and 16 pieces (8 MiB + 800 bytes, 16 MiB + 1600 bytes).
        assert_eq!((started[7], started[15], started[19]), (8 << 20, 16 << 20, 16 << 20));
        assert_eq!(whole_pages(10, 0), None); // never "to the end of the file"
        assert_eq!(whole_pages(10, 4096), None); // only parts of two pages
        assert_eq!(whole_pages(4000, 5000), Some((4096, 4096)));
        assert_eq!(whole_pages(8192, 3 * 4096), Some((8192, 3 * 4096)));
        start(&f, 4000, 5000);
        f.sync_all().unwrap();
        let mut back = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut back).unwrap();
        assert_eq!(back.len(), 20 * piece.len());
        assert!(back.chunks(piece.len()).all(|c| c == piece));
    }
}

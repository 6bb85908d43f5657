//! Starting the write-back of output files early, so that the final `fsync` has little
//! left to wait for.
//!
//! fapm syncs every output before it commits it. Without a hint the kernel keeps gigabytes
//! of freshly written pages dirty (below its dirty limits, a few GB on a large machine), so
//! the whole output would be written to disk inside that final `fsync`: 0.6 s for the
//! 1.7 GB that `apply` writes on the benchmark model, all of it after the work is done.
//! Started as soon as each range is written, the disk works while the CPU does.

use std::fs::File;

/// Asks the kernel to start writing `len` bytes of `file` from `offset` to disk, without
/// waiting for them. Only a hint: errors are left to the final sync, which reports them.
/// A no-op where `sync_file_range` does not exist.
pub fn start(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
        // SAFETY: sync_file_range reads no memory of ours; the fd is open for as long as
        // `file` is borrowed.
        unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Tracks how much of a file written front to back has been handed to [`start`], and
/// hands it on every `STEP` bytes.
#[derive(Debug, Default)]
pub struct Behind {
    started: u64,
}

impl Behind {
    /// Bytes written between two hints.
    pub const STEP: u64 = 8 << 20;

    /// `written` bytes of `file` (from its start) are now in the kernel's hands.
    pub fn written(&mut self, file: &File, written: u64) {
        if written >= self.started + Self::STEP {
            start(file, self.started, written - self.started);
            self.started = written;
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
        let mut behind = Behind::default();
        let piece: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let mut started = Vec::new();
        for i in 1..=20u64 {
            f.write_all(&piece).unwrap();
            behind.written(&f, i << 20);
            started.push(behind.started >> 20);
        }
        let want: Vec<u64> = (1..=20).map(|i| i / 8 * 8).collect();
        assert_eq!(started, want);
        f.sync_all().unwrap();
        let mut back = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut back).unwrap();
        assert_eq!(back.len(), 20 << 20);
        assert!(back.chunks(1 << 20).all(|c| c == piece));
    }
}

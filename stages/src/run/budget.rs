//! `--memory-budget` shared out among the stages. Every buffer that grows with the work
//! (chunks in flight, gathered hits) is sized here, so the peak stays below the budget
//! whatever the size of the model or of its largest tensor.

use crate::format::RAW_BLOCK_BYTES;

use crate::format::sparse::PIECE_BYTES;

/// The memory budget of one run and what it gives each stage.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Bytes fapm may allocate.
    pub bytes: u64,
    /// Worker threads (each keeps scratch buffers).
    pub threads: usize,
    /// Elements per chunk (prune: the configured block size; apply: the delta's).
    pub block_elems: u64,
}

impl Budget {
    /// The budget of `bytes` for `threads` workers on chunks of `block_elems` elements.
    pub fn new(bytes: u64, threads: usize, block_elems: u64) -> Self {
        Budget { bytes, threads, block_elems }
    }

    /// prune: how many chunks are in flight in the mask + encode stage (and queued for the
    /// writer): up to four per thread, as half the budget allows (4 with two threads and
    /// the default budget; 1 with 64M).
    pub fn encode_window(&self) -> usize {
        // Each worker keeps scratch buffers: keys of a chunk without hits (4 B/elem), kept
        // indices (4 B/elem) and the raw block (<= 18 B/elem at worst): 26 B/elem, and a
        // piece of the reconstructed chunk. Each chunk in flight holds its compressed block
        // (<= 18 B/elem at worst, about 0.5 B/elem in practice).
        let scratch = self.threads as u64 * (self.block_elems * 26 + PIECE_BYTES as u64);
        let fit = ((self.bytes / 2).saturating_sub(scratch) / (self.block_elems * 18)) as usize;
        fit.clamp(1, 4 * self.threads)
    }

    /// prune: the bytes gathered hits may hold: the half of the budget that
    /// [`Budget::encode_window`] leaves, less the threshold passes' own buffers (per worker:
    /// a chunk's worth of hits being gathered and two histograms).
    pub fn hit_bytes(&self) -> u64 {
        (self.bytes / 2).saturating_sub(self.threads as u64 * (self.block_elems * 8 + (2 << 20)))
    }

    /// apply and verify: how many blocks are decoded at a time: two per thread, as half the
    /// budget allows, each taking at least `block_memory` (the delta's largest block, as its
    /// reader counts it).
    pub fn decode_window(&self, block_memory: u64) -> usize {
        // A block in flight holds its compressed and raw bytes and its output chunk; the
        // block size is the delta's (validated to at most MAX_BLOCK_ELEMS).
        let per_block = (self.block_elems.max(RAW_BLOCK_BYTES / 8) * 30).max(block_memory);
        (2 * self.threads).clamp(1, (self.bytes / 2 / per_block).max(1) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two threads with the default budget keep four chunks in flight; the smallest budget one.
    #[test]
    fn windows_follow_the_budget() {
        let default = Budget::new(256 << 20, 2, crate::format::BLOCK_ELEMS);
        assert_eq!(default.encode_window(), 4);
        assert!(default.hit_bytes() > 100 << 20);
        assert_eq!(default.decode_window(0), 4);
        let tight = Budget::new(64 << 20, 2, crate::format::MAX_BLOCK_ELEMS);
        assert_eq!(tight.encode_window(), 1);
        assert_eq!(tight.decode_window(0), 1);
    }
}

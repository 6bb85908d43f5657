//! Memory for gathered hits: the candidates at or above a tensor's floor that a threshold
//! pass keeps per chunk, so that the masker selects from them instead of scoring the chunk
//! again.
//!
//! The threshold stage's workers copy a chunk's hits into a buffer from the pool when the
//! budget has room; the mask + encode stage hands each buffer back when it is done with the
//! chunk, and later chunks reuse it (fresh buffers would be page-faulted in for every
//! chunk). Buffers count against the budget for as long as they exist.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::threshold::select::{Gather, Hits};

/// Buffers for gathered hits, bounded by [`super::Budget::hit_bytes`].
pub struct HitPool {
    left: AtomicU64,
    spare: Mutex<Vec<Hits>>,
}

impl HitPool {
    /// A pool that may hold `bytes` of hits.
    pub fn new(bytes: u64) -> Self {
        HitPool { left: AtomicU64::new(bytes), spare: Mutex::new(Vec::new()) }
    }

    fn take(&self, bytes: u64) -> bool {
        self.left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(bytes)).is_ok()
    }

    /// A copy of what `gather` holds, or `None` when the budget has no room for it.
    pub fn hold(&self, gather: &Gather) -> Option<HeldHits<'_>> {
        if gather.is_empty() {
            return Some(HeldHits { hits: Hits::default(), pool: self });
        }
        let need = Hits::bytes_for(gather.len());
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        // The smallest spare buffer that fits; else a new one, a little larger than needed
        // so that it fits the similar chunks that follow, freeing spares to make room.
        let fit =
            (0..spare.len()).filter(|&i| spare[i].capacity_bytes() >= need).min_by_key(|&i| spare[i].capacity_bytes());
        let mut hits = match fit {
            Some(i) => spare.swap_remove(i),
            None => loop {
                let room = size_class(gather.len());
                if self.take(Hits::bytes_for(room)) {
                    break Hits::with_capacity(room);
                }
                let freed = spare.pop()?;
                self.left.fetch_add(freed.capacity_bytes(), Ordering::Relaxed);
            },
        };
        drop(spare);
        hits.copy_from(gather);
        Some(HeldHits { hits, pool: self })
    }
}

/// Rounds a buffer size up to one of 4 to 8 sizes per octave, so that buffers made for one
/// chunk fit the chunks of similar tensors, at most 25% larger than needed.
fn size_class(n: usize) -> usize {
    let n = n.max(1 << 12);
    let q = (n - 1).ilog2() - 2;
    ((n - 1) >> q).wrapping_add(1) << q
}

/// A chunk's hits, held against the budget; the buffer goes back to the pool when dropped.
pub struct HeldHits<'p> {
    /// The hits.
    pub hits: Hits,
    pool: &'p HitPool,
}

impl Drop for HeldHits<'_> {
    fn drop(&mut self) {
        let hits = std::mem::take(&mut self.hits);
        if hits.capacity_bytes() > 0 {
            self.pool.spare.lock().unwrap_or_else(|e| e.into_inner()).push(hits);
        }
    }
}

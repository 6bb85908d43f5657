//! Memory for gathered hits: the candidates at or above a tensor's floor that a threshold
//! pass keeps per chunk, so that the masker selects from them instead of scoring the chunk
//! again.
//!
//! The threshold stage's workers copy a chunk's hits into a buffer from the pool when the
//! budget has room; the mask + encode stage hands each buffer back when it is done with the
//! chunk, and later chunks reuse it (fresh buffers would be page-faulted in for every
//! chunk). Buffers count against the budget for as long as they exist.
//!
//! A chunk whose hits find no room is scored twice more (the low pass and the masker), so
//! before a tensor's high pass the threshold stage waits for the masker to give back the
//! room the tensor needs ([`HitPool::wait_for_room`]): the stage runs ahead of the masker,
//! and waiting costs less than scoring again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::run::RunControl;
use crate::threshold::select::{Gather, Hits};
use crate::Result;

/// The longest [`HitPool::wait_for_room`] waits: longer than the masker takes to encode the
/// largest tensor that fits the pool, short enough that a masker that is gone (a stage that
/// panicked) does not hang the run.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// Buffers for gathered hits, bounded by [`super::Budget::hit_bytes`].
pub struct HitPool {
    /// The bytes the pool may hold.
    total: u64,
    /// Bytes not allocated to a buffer.
    left: AtomicU64,
    spare: Mutex<Vec<Hits>>,
    /// Signalled whenever a buffer comes back.
    returned: Condvar,
}

impl HitPool {
    /// A pool that may hold `bytes` of hits.
    pub fn new(bytes: u64) -> Self {
        HitPool { total: bytes, left: AtomicU64::new(bytes), spare: Mutex::new(Vec::new()), returned: Condvar::new() }
    }

    /// Waits until `bytes` (or the whole pool, if less) are free, or until no buffer is held
    /// (when nothing more can come back), or [`MAX_WAIT`] has passed (the holder is gone, say:
    /// then chunks are scored again, as without waiting). Stops on cancellation.
    pub fn wait_for_room(&self, bytes: u64, ctl: &RunControl) -> Result<()> {
        self.wait_for_room_within(bytes, ctl, MAX_WAIT)
    }

    /// [`HitPool::wait_for_room`], waiting at most `longest`.
    fn wait_for_room_within(&self, bytes: u64, ctl: &RunControl, longest: Duration) -> Result<()> {
        let need = bytes.min(self.total);
        let deadline = Instant::now() + longest;
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let free = self.left.load(Ordering::Relaxed) + spare.iter().map(Hits::capacity_bytes).sum::<u64>();
            if free >= need || free >= self.total || Instant::now() >= deadline {
                return Ok(());
            }
            ctl.check()?;
            spare = self.returned.wait_timeout(spare, Duration::from_millis(20)).unwrap_or_else(|e| e.into_inner()).0;
        }
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
            self.pool.returned.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::threshold::select::Histogram;
    use crate::Error;

    /// A chunk's worth of `n` gathered hits.
    fn gathered(n: usize) -> Gather {
        let mut g = Gather::default();
        g.start(n);
        let mut high = Histogram::default();
        g.add(&vec![7u32; n], 1, 0, &mut high);
        assert!(g.finish(&mut high));
        assert_eq!(g.len(), n);
        g
    }

    #[test]
    fn room_that_is_free_is_not_waited_for() {
        let pool = HitPool::new(Hits::bytes_for(8192));
        let ctl = RunControl::default();
        let held = pool.hold(&gathered(6000)).expect("the pool has room");
        // 6144 hits' buffer (its size class) taken, 2048 hits' room left.
        pool.wait_for_room(Hits::bytes_for(2048), &ctl).unwrap();
        // Nothing held: more than the pool never waits.
        drop(held);
        pool.wait_for_room(Hits::bytes_for(1 << 20), &ctl).unwrap();
    }

    #[test]
    fn waiting_for_room_ends_when_the_hits_come_back() {
        let pool = HitPool::new(Hits::bytes_for(8192));
        let ctl = RunControl::default();
        let held = pool.hold(&gathered(6000)).expect("the pool has room");
        let returned = AtomicBool::new(false);
        let t0 = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(60));
                returned.store(true, Ordering::SeqCst);
                drop(held);
            });
            // The whole pool: free only once the buffer is back (as a spare, reusable).
            pool.wait_for_room(Hits::bytes_for(8192), &ctl).unwrap();
            assert!(returned.load(Ordering::SeqCst), "returned after {:?} with the hits still held", t0.elapsed());
        });
        // And the room is there: a chunk of the pool's whole size is held.
        assert!(pool.hold(&gathered(8192)).is_some());
    }

    #[test]
    fn waiting_for_room_gives_up_when_nothing_comes_back() {
        let pool = HitPool::new(Hits::bytes_for(8192));
        let ctl = RunControl::default();
        let _held = pool.hold(&gathered(6000)).expect("the pool has room");
        let t0 = Instant::now();
        pool.wait_for_room_within(Hits::bytes_for(8192), &ctl, Duration::from_millis(80)).unwrap();
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(80) && waited < Duration::from_secs(5), "waited {waited:?}");
    }

    #[test]
    fn waiting_for_room_stops_when_cancelled() {
        let pool = HitPool::new(Hits::bytes_for(8192));
        let ctl = RunControl::default();
        let _held = pool.hold(&gathered(6000)).expect("the pool has room");
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                ctl.cancel();
            });
            assert!(matches!(pool.wait_for_room(Hits::bytes_for(8192), &ctl), Err(Error::Cancelled)));
        });
    }
}

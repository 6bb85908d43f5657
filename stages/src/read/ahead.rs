//! Reading ahead of the threads that compute.
//!
//! The stages read the inputs through memory maps, so a page comes from the disk only when a
//! worker touches it: cold, one core computes while the other waits for a page fault, and a
//! run takes the time to read plus the time to compute. [`ReadAhead`] is a reader thread that
//! walks the tensors in the order the stages will need them and brings each one into memory a
//! step ahead of them: a shard's pages are faulted into the map (`MADV_POPULATE_READ`, so the
//! workers neither wait for the disk nor take the page faults), a file read with `pread` (the
//! delta) is asked into the page cache (`POSIX_FADV_WILLNEED`). Then the run takes the longer
//! of reading and computing, not their sum.
//!
//! It stays a bounded distance ahead of the tensor the stages are on ([`ahead_bytes`]: an
//! eighth of the memory the process can fill, at most 4 GiB), so a run inside a memory limit
//! smaller than its inputs does not evict what it is about to use. What it brings in is page
//! cache, which SPEC section 9 does not charge to the budget; it allocates nothing that grows
//! with the model.

use std::fs::File;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::checkpoint::TensorRef;
use crate::format::Manifest;
use crate::run::RunControl;

use super::Task;

/// The most the reader goes beyond where the stages are; less when memory is short
/// ([`ahead_bytes`]).
pub const MAX_AHEAD_BYTES: u64 = 4 << 30;

/// The least it goes beyond: a few steps.
const MIN_AHEAD_BYTES: u64 = 32 << 20;

/// How far the reader goes beyond where the stages are: an eighth of the memory the process
/// can fill (the memory available, or its memory cgroup's limit when that is smaller: there the
/// page cache is charged), from [`MIN_AHEAD_BYTES`] to [`MAX_AHEAD_BYTES`]. Reading further
/// ahead than memory holds would evict what the stages are about to read.
pub fn ahead_bytes() -> u64 {
    let room = [mem_available(), cgroup_limit()].into_iter().flatten().min().unwrap_or(MAX_AHEAD_BYTES * 8);
    (room / 8).clamp(MIN_AHEAD_BYTES, MAX_AHEAD_BYTES)
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = text.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|kb| kb << 10)
}

/// The memory limit of this process's cgroup (v2 `memory.max`, v1 `memory.limit_in_bytes`).
fn cgroup_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let limit = |path: String| std::fs::read_to_string(path).ok()?.trim().parse::<u64>().ok();
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        match controllers {
            "" => limit(format!("/sys/fs/cgroup{path}/memory.max")),
            c if c.split(',').any(|c| c == "memory") => {
                limit(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
            }
            _ => None,
        }
    })
}

/// The bytes one call brings in: small enough that the reader follows the stages closely,
/// large enough that the calls cost nothing next to the reading.
const STEP: u64 = 4 << 20;

/// How long the reader sleeps when it is far enough ahead.
const NAP: Duration = Duration::from_millis(1);

/// Where the bytes of a span are.
enum Source<'a> {
    /// A tensor of a memory-mapped shard.
    Tensor(TensorRef),
    /// A file the stages read with `pread`.
    File(&'a File),
}

/// A range of bytes the stages will read: of a tensor (relative to its first byte) or a file.
struct Span<'a> {
    source: Source<'a>,
    range: Range<u64>,
}

impl Span<'_> {
    /// Brings `range` (relative to the span's source) into memory; advice, so a failure
    /// (an old kernel, a file that shrank) changes nothing and is ignored.
    fn fetch(&self, range: Range<u64>) {
        match &self.source {
            Source::Tensor(t) => t.populate(range.start as usize..range.end as usize),
            Source::File(f) => will_need(f, range),
        }
    }
}

#[cfg(target_os = "linux")]
fn will_need(f: &File, range: Range<u64>) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (i64::try_from(range.start), i64::try_from(range.end - range.start)) else { return };
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open (borrowed
    // from `f`). It is advice: a failure changes nothing.
    let _ = unsafe { libc::posix_fadvise(f.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED) };
}

#[cfg(not(target_os = "linux"))]
fn will_need(_f: &File, _range: Range<u64>) {}

/// What the stages read, item by item (a tensor: its base, then its fine-tuned bytes, or its
/// base and its blocks in the delta), in the order they read it.
pub struct ReadAhead<'a> {
    spans: Vec<Span<'a>>,
    /// For each item, the index of its first span.
    items: Vec<usize>,
    /// For each item, where it starts in the bytes read ahead (the sum of the spans before it);
    /// one more entry at the end: the total.
    starts: Vec<u64>,
    total: u64,
    /// How far the reader goes beyond where the stages are ([`ahead_bytes`]).
    ahead: u64,
}

/// Where the stages are: the item they have started on. prune's threshold stage says so as it
/// takes each task ([`Position::at`]); the decoder's place is read from the run's progress
/// counter ([`Position::by_progress`]).
#[derive(Default)]
pub struct Position {
    item: AtomicU64,
    stop: AtomicBool,
    /// Where each item starts in the run's progress count, when that gives the place.
    progress_starts: Option<Vec<u64>>,
}

impl Position {
    /// A place read from the run's progress counter: item `i` starts when `starts[i]` bytes
    /// are done.
    pub fn by_progress(starts: Vec<u64>) -> Self {
        Position { progress_starts: Some(starts), ..Default::default() }
    }

    /// The stages have started on item `i` (they do not go back).
    pub fn at(&self, i: usize) {
        self.item.fetch_max(i as u64, Ordering::Relaxed);
    }

    /// Tells the reader to stop: the stages are done.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn stopped(&self, ctl: &RunControl) -> bool {
        self.stop.load(Ordering::Relaxed) || ctl.is_cancelled()
    }

    /// The item the stages are on.
    fn item(&self, ctl: &RunControl) -> usize {
        match &self.progress_starts {
            Some(starts) => {
                let done = ctl.progress().0;
                starts.partition_point(|&s| s <= done).saturating_sub(1)
            }
            None => self.item.load(Ordering::Relaxed) as usize,
        }
    }
}

impl<'a> ReadAhead<'a> {
    /// prune: each task's base tensor (the FAPM mean reads it first), then its fine-tuned
    /// tensor; item `i` is task `i`.
    pub fn prune(tasks: &[Task]) -> Self {
        let mut ra = ReadAhead::new(ahead_bytes());
        for t in tasks {
            ra.item();
            if let Some(b) = &t.base {
                ra.tensor(b);
            }
            ra.tensor(&t.ft);
        }
        ra
    }

    /// apply and verify: each record's blocks in the delta (read from `delta`, the delta
    /// file) and its base tensor, when there is a base; item `i` is record `i`.
    pub fn decode(m: &Manifest, delta: &'a File, bases: Option<&[Option<TensorRef>]>) -> Self {
        let mut ra = ReadAhead::new(ahead_bytes());
        for (i, t) in m.tensors.iter().enumerate() {
            ra.item();
            let first = t.blocks.iter().map(|b| b.offset).min().unwrap_or(0);
            let end = t.blocks.iter().map(|b| b.offset.saturating_add(b.len)).max().unwrap_or(0);
            ra.file(delta, first..end.max(first));
            if let Some(b) = bases.and_then(|b| b.get(i)).and_then(Option::as_ref) {
                ra.tensor(b);
            }
        }
        ra
    }

    /// Starts the next item.
    pub fn item(&mut self) {
        self.items.push(self.spans.len());
        self.starts.push(self.total);
    }

    /// The current item reads all of tensor `t`.
    pub fn tensor(&mut self, t: &TensorRef) {
        let len = t.info().byte_len();
        self.push(Span { source: Source::Tensor(t.clone()), range: 0..len });
    }

    /// The current item reads `range` of `file`.
    pub fn file(&mut self, file: &'a File, range: Range<u64>) {
        self.push(Span { source: Source::File(file), range });
    }

    fn push(&mut self, span: Span<'a>) {
        if span.range.is_empty() {
            return;
        }
        assert!(!self.items.is_empty(), "a span belongs to an item");
        self.total += span.range.end - span.range.start;
        self.spans.push(span);
    }

    /// How many items there are.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there is nothing to read.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Nothing to read yet, going at most `ahead` bytes beyond where the stages are.
    pub fn new(ahead: u64) -> Self {
        ReadAhead { spans: Vec::new(), items: Vec::new(), starts: Vec::new(), total: 0, ahead }
    }

    /// How far the reader may go while the stages are on item `i`: `ahead` bytes past its
    /// start, or to its end when the item is larger, up to four times `ahead` (the stages
    /// say where they are an item at a time, and read an item in several places at once).
    fn limit(&self, i: usize) -> u64 {
        let Some(&start) = self.starts.get(i) else { return u64::MAX };
        let len = self.starts.get(i + 1).copied().unwrap_or(self.total) - start;
        start.saturating_add(len.min(self.ahead.saturating_mul(4)).max(self.ahead))
    }

    /// Runs `stages` with the reader thread beside it, and stops the reader when they return
    /// (or panic).
    pub fn beside<T>(&self, at: &Position, ctl: &RunControl, stages: impl FnOnce() -> T) -> T {
        struct Stop<'p>(&'p Position);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.stop();
            }
        }
        std::thread::scope(|s| {
            std::thread::Builder::new().name("fapm-read-ahead".into()).spawn_scoped(s, || self.run(at, ctl)).ok(); // without a reader thread the stages read as they go
            let _stop = Stop(at);
            stages()
        })
    }

    /// The reader thread's body: reads every span in order, a step at a time, never beyond
    /// [`ReadAhead::limit`] of where the stages are; returns when everything is read, when
    /// the stages are done (`at.stop`) or when the run is cancelled.
    pub fn run(&self, at: &Position, ctl: &RunControl) {
        let mut done = 0u64; // bytes read ahead so far
        for span in &self.spans {
            let mut pos = span.range.start;
            while pos < span.range.end {
                loop {
                    if at.stopped(ctl) {
                        return;
                    }
                    if done < self.limit(at.item(ctl)) {
                        break;
                    }
                    std::thread::sleep(NAP);
                }
                let end = (pos + STEP).min(span.range.end);
                span.fetch(pos..end);
                done += end - pos;
                pos = end;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reader may read `ahead` past the start of the item the stages are on, or the
    /// whole item up to four times `ahead`; past the last item, everything.
    #[test]
    fn the_limit_follows_the_stages() {
        let mut ra = ReadAhead::new(100);
        let file = tempfile::tempfile().unwrap();
        for len in [10u64, 300, 1000, 5] {
            ra.item();
            ra.file(&file, 0..len);
        }
        assert_eq!(ra.len(), 4);
        assert_eq!(ra.limit(0), 100);
        assert_eq!(ra.limit(1), 10 + 300);
        assert_eq!(ra.limit(2), 310 + 400);
        assert_eq!(ra.limit(3), 1310 + 100);
        assert_eq!(ra.limit(4), u64::MAX);
    }

    /// Whatever the machine, the reader goes a bounded distance ahead.
    #[test]
    fn ahead_is_bounded() {
        assert!((MIN_AHEAD_BYTES..=MAX_AHEAD_BYTES).contains(&ahead_bytes()));
    }

    /// A reader whose stages stop returns without reading everything; one whose stages are
    /// past the last item reads everything and returns.
    #[test]
    fn the_reader_stops_with_the_stages() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let mut ra = ReadAhead::new(1 << 20);
        for _ in 0..100 {
            ra.item();
            ra.file(&file, 0..(1 << 20));
        }
        let (at, ctl) = (Position::default(), RunControl::default());
        std::thread::scope(|s| {
            let r = s.spawn(|| ra.run(&at, &ctl));
            at.stop();
            r.join().unwrap();
        });
        let at = Position::default();
        at.at(100);
        ra.run(&at, &ctl);
    }
}

//! Choosing which candidates to keep: the exact keep count, streaming histogram selection of
//! the k-th largest score, and the cut that the mask stage applies chunk by chunk.
//!
//! Selection never holds a tensor's scores: it asks for histograms (computed by whoever
//! can stream the tensor, from the maps) and needs at most two of them. The first counts the
//! high 16 bits of every candidate's key; the second the low 16 bits inside the boundary bin.
//! Ties at the final level are filled in index order, so counts, not values, decide.

use crate::threshold::pack::{for_each_in, pack, KeyPositions};
use crate::threshold::score::NOT_CANDIDATE;

/// The fraction of elements to prune, an exact decimal `num / den` in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sparsity {
    num: u128,
    den: u128,
}

impl Sparsity {
    /// Parses a plain decimal such as `0.9`, `1`, `0.125` (at most 18 fraction digits).
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("invalid sparsity '{text}': expected a decimal number from 0 to 1, such as 0.9");
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if (int.is_empty() && frac.is_empty())
            || !digits_ok(int)
            || !digits_ok(frac)
            || frac.len() > 18
            || int.len() > 18
        {
            return Err(bad());
        }
        let parse = |s: &str| {
            if s.is_empty() {
                Ok(0)
            } else {
                s.parse::<u128>().map_err(|_| bad())
            }
        };
        let den = 10u128.pow(frac.len() as u32);
        let num = parse(int)?.checked_mul(den).and_then(|x| x.checked_add(parse(frac).ok()?)).ok_or_else(bad)?;
        if num > den {
            return Err(format!("invalid sparsity '{text}': it must be between 0 and 1"));
        }
        Ok(Sparsity { num, den })
    }

    /// How many of `n` elements to keep: `floor(n * (1 - s))`, in exact integer arithmetic.
    ///
    /// ```
    /// use fapm_stages::threshold::select::Sparsity;
    /// let s = Sparsity::parse("0.9").unwrap();
    /// assert_eq!(s.keep_count(19), 1); // 19 * 0.1 = 1.9
    /// assert_eq!(s.keep_count(10), 1); // exact: 0.9 as an f64 would give 0.99999...
    /// ```
    pub fn keep_count(&self, n: u64) -> u64 {
        // den <= 10^18 < 2^60, so n * (den - num) < 2^124 fits in u128.
        (n as u128 * (self.den - self.num) / self.den) as u64
    }

    /// The decimal text, normalised (`0.90` stays `0.90`; used in the delta header).
    pub fn to_decimal(&self) -> String {
        let int = self.num / self.den;
        let frac = self.num % self.den;
        let digits = self.den.ilog10() as usize; // den is 10^(fraction digits given)
        if digits == 0 {
            format!("{int}")
        } else {
            format!("{int}.{frac:0width$}", width = digits)
        }
    }
}

/// Exact k-th score, or one histogram pass with a tolerance (SPEC section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThresholdMode {
    /// Keep exactly the first k by (score desc, index asc).
    Exact,
    /// Keep k, choosing among scores within 2^-7 relative of the boundary.
    Approx,
}

/// What one streaming pass over a tensor counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bins {
    /// The high 16 bits of every candidate key `>= floor`. The pass also gathers those
    /// candidates as [`Hits`], as far as its memory allows.
    High {
        /// 1 (every candidate), or a multiple of 2^16, so that bins are counted whole.
        floor: u32,
    },
    /// The low 16 bits of the candidate keys whose high 16 bits are `bin`.
    Low {
        /// The boundary bin to refine.
        bin: u32,
    },
}

/// A 65,536-bin histogram of keys. It keeps its total and the range of bins it has counted
/// into, so that totals, scans, merges and clearing cost what it holds rather than its whole
/// 512 KiB table; and a dropped histogram's table is reused by the next one made, rather
/// than a fresh table being zeroed for every pass of every tensor and scanned whole (which
/// shows on models of many small tensors).
pub struct Histogram {
    /// 65,536 bins, then 8 spare slots where non-candidates are counted (and ignored).
    counts: Vec<u64>,
    /// Every bin counted into lies in `lo..hi` (none when `lo >= hi`).
    lo: usize,
    hi: usize,
    /// The sum of the bins.
    total: u64,
}

const BINS: usize = 1 << 16;
type Table = [u64; BINS + 8];

/// Tables of dropped histograms, cleared, for the next ones made on any thread (a pass's
/// histograms are made on the workers and often dropped by the planner). At most four are
/// kept: 2 MiB, what the memory budget sets aside for each worker's histograms.
static SPARE_TABLES: std::sync::Mutex<Vec<Vec<u64>>> = std::sync::Mutex::new(Vec::new());
const SPARE_MAX: usize = 4;

impl Default for Histogram {
    fn default() -> Self {
        let spare = SPARE_TABLES.lock().ok().and_then(|mut t| t.pop());
        Histogram { counts: spare.unwrap_or_else(|| vec![0; BINS + 8]), lo: BINS, hi: 0, total: 0 }
    }
}

impl Drop for Histogram {
    fn drop(&mut self) {
        let mut counts = std::mem::take(&mut self.counts);
        if self.lo < self.hi {
            counts[self.lo..self.hi].fill(0);
        }
        counts[BINS..].fill(0);
        if let Ok(mut spare) = SPARE_TABLES.lock() {
            if spare.len() < SPARE_MAX {
                spare.push(counts);
            }
        }
    }
}

impl Histogram {
    fn table(&mut self) -> &mut Table {
        (&mut self.counts[..]).try_into().expect("a histogram has BINS + 8 slots")
    }

    /// Widens the range of counted bins to take in `lo..hi`.
    fn touch(&mut self, lo: usize, hi: usize) {
        (self.lo, self.hi) = (self.lo.min(lo), self.hi.max(hi));
    }

    /// Counts the high 16 bits of the candidate keys among `keys`.
    pub fn add_high(&mut self, keys: &[u32]) {
        crate::simd::widest(
            #[inline(always)]
            || self.add_high_in(keys),
        )
    }

    #[inline(always)]
    fn add_high_in(&mut self, keys: &[u32]) {
        // The count and the range first, in one pass that vectorizes (NOT_CANDIDATE is 0, so
        // the smallest candidate is the smallest `k - 1`, wrapping, plus one), a cache-sized
        // part at a time (the part's count fits 32-bit lanes).
        let (mut candidates, mut max, mut min) = (0u64, 0u32, u32::MAX);
        for part in keys.chunks(4096) {
            let (mut c, mut hi, mut lo) = (0u32, 0u32, u32::MAX);
            for &k in part {
                c += (k != NOT_CANDIDATE) as u32;
                hi = hi.max(k);
                lo = lo.min(k.wrapping_sub(1));
            }
            (candidates, max, min) = (candidates + c as u64, max.max(hi), min.min(lo));
        }
        if candidates > 0 {
            self.touch((min.wrapping_add(1) >> 16) as usize, (max >> 16) as usize + 1);
            self.total += candidates;
        }
        // Non-candidates (often most keys) would all increment bin 0, one long chain of
        // dependent read-modify-writes; spread them over eight spare slots instead.
        let counts = self.table();
        for (i, &k) in keys.iter().enumerate() {
            let spare = BINS + (i & 7);
            let bin = if k == NOT_CANDIDATE { spare } else { (k >> 16) as usize };
            counts[bin] += 1;
        }
    }

    /// Counts the low 16 bits of the candidate keys among `keys` whose high 16 bits are `bin`.
    pub fn add_low(&mut self, bin: u32, keys: &[u32]) {
        crate::simd::widest(
            #[inline(always)]
            || self.add_low_in(bin, keys),
        )
    }

    #[inline(always)]
    fn add_low_in(&mut self, bin: u32, keys: &[u32]) {
        // Few keys fall in the bin: test them a group at a time (vectorized), visit the hits.
        let (mut lo, mut hi, mut n) = (BINS, 0, 0);
        let counts = self.table();
        for_each_in(
            keys,
            |k| k >> 16 == bin && k != NOT_CANDIDATE,
            |p| {
                let low = (keys[p] & 0xffff) as usize;
                counts[low] += 1;
                (lo, hi, n) = (lo.min(low), hi.max(low + 1), n + 1);
            },
        );
        self.touch(lo, hi);
        self.total += n;
    }

    /// Adds another histogram's counts to this one.
    pub fn merge(mut self, other: &Histogram) -> Histogram {
        let (lo, hi) = (other.lo, other.hi.max(other.lo));
        for (a, b) in self.table()[lo..hi].iter_mut().zip(&other.counts[lo..hi]) {
            *a += b;
        }
        for (a, b) in self.table()[BINS..].iter_mut().zip(&other.counts[BINS..]) {
            *a += b;
        }
        self.touch(other.lo, other.hi);
        self.total += other.total;
        self
    }

    /// The total count.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The bin holding the k-th largest key (k >= 1, k <= total): `(bin, how many of the
    /// bin's entries are among the top k, the bin's count)`.
    fn boundary(&self, k: u64) -> (u32, u64, u64) {
        let mut above = 0u64;
        for bin in (self.lo..self.hi).rev() {
            let c = self.counts[bin];
            if above + c >= k {
                return (bin as u32, k - above, c);
            }
            above += c;
        }
        unreachable!("k = {k} exceeds the histogram total {above}")
    }
}

/// The candidates of one chunk whose keys are at least a floor, in index order: what the
/// encode pass needs to mask the chunk without computing its keys again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hits {
    /// Chunk-relative indices, ascending.
    pub idx: Vec<u32>,
    /// The key at each index.
    pub keys: Vec<u32>,
}

impl Hits {
    /// Empty hits with room for `n`, in [`Hits::bytes_for`]`(n)` bytes.
    pub fn with_capacity(n: usize) -> Self {
        Hits { idx: Vec::with_capacity(n), keys: Vec::with_capacity(n) }
    }

    /// The bytes that `n` hits take.
    pub fn bytes_for(n: usize) -> u64 {
        n as u64 * 8
    }

    /// Replaces the hits with what `gather` holds, reusing this one's buffers (growing
    /// them to exactly the size needed when they are too small).
    pub fn copy_from(&mut self, gather: &Gather) {
        let n = gather.n;
        self.idx.clear();
        self.keys.clear();
        self.idx.reserve_exact(n);
        self.keys.reserve_exact(n);
        self.idx.extend_from_slice(&gather.idx[..n]);
        self.keys.extend_from_slice(&gather.keys[..n]);
    }

    /// How many hits there are.
    pub fn len(&self) -> usize {
        self.idx.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.idx.is_empty()
    }

    /// The heap bytes the hits' buffers hold.
    pub fn capacity_bytes(&self) -> u64 {
        (self.idx.capacity() + self.keys.capacity()) as u64 * 4
    }
}

/// A buffer that gathers one chunk's [`Hits`], a piece of keys at a time, and counts them
/// into a histogram. When the chunk has more hits than the buffer has room for, it still
/// counts them all but gives up keeping them.
#[derive(Debug, Default)]
pub struct Gather {
    idx: Vec<u32>,
    keys: Vec<u32>,
    n: usize,
    room: usize,
    whole: bool,
}

impl Gather {
    /// Empties the buffer for a chunk, with room for `room` hits.
    pub fn start(&mut self, room: usize) {
        if self.idx.len() < room {
            self.idx.resize(room, 0);
            self.keys.resize(room, 0);
        }
        (self.n, self.room, self.whole) = (0, room, true);
    }

    /// Gathers the keys of `keys >= floor` (`floor >= 1`), at chunk-relative `offset + i`,
    /// and counts their high bits into `high` (at once, or by [`Gather::finish`]).
    pub fn add(&mut self, keys: &[u32], floor: u32, offset: usize, high: &mut Histogram) {
        debug_assert!(floor > NOT_CANDIDATE);
        if self.room - self.n < keys.len() {
            high.add_high(self.keys());
            (self.n, self.whole) = (0, false);
            if self.room < keys.len() {
                // Not even one piece fits: count it directly.
                let mut rest = Gather::default();
                rest.start(keys.len());
                rest.add(keys, floor, offset, high);
                rest.finish(high);
                return;
            }
        }
        let (idx, out) = (&mut self.idx[self.n..], &mut self.keys[self.n..]);
        let offset = u32::try_from(offset).expect("chunk-relative offsets fit u32 (blocks are at most 2^22)");
        self.n += pack(keys, floor, KeyPositions::From(offset), idx, Some(out));
    }

    /// Counts the rest of the chunk's hits into `high`; returns whether the buffer holds
    /// all of them.
    pub fn finish(&mut self, high: &mut Histogram) -> bool {
        high.add_high(self.keys());
        self.whole
    }

    /// The keys gathered (since the buffer last ran out of room).
    pub fn keys(&self) -> &[u32] {
        &self.keys[..self.n]
    }

    /// How many keys are gathered.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// Guesses a floor for the keys of a tensor's top `k` of `n`, from the high histogram of a
/// sample of `sample_n` of them: the start of a bin that, by the sample, has an eighth more
/// than k keys above it (and some margin for the sample's noise). 1 (no floor) when the
/// sample is too small to say. A floor too high costs another pass, never a different cut.
pub fn floor(k: u64, n: u64, sample: &Histogram, sample_n: u64) -> u32 {
    let sk = ((k as u128 * sample_n as u128) / (n.max(1) as u128)) as u64;
    let wanted = sk + sk / 8 + 4 * (sk as f64).sqrt() as u64 + 64;
    if sample.total() < wanted {
        return 1;
    }
    (sample.boundary(wanted).0 << 16).max(1)
}

/// What the mask stage keeps of a tensor's candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Keep no position.
    Nothing,
    /// Keep every candidate.
    All,
    /// Keep candidates whose `key >> shift` is above `level`, and the first `take` (in index
    /// order) of the `at_level` candidates whose `key >> shift` equals it.
    Level {
        /// 16 for a high-bits cut, 0 for an exact key.
        shift: u32,
        /// The boundary level.
        level: u32,
        /// How many boundary candidates to keep.
        take: u64,
        /// How many boundary candidates there are in the whole tensor.
        at_level: u64,
    },
}

/// Finds the cut that keeps `k` candidates. `pass` streams the tensor once and returns the
/// histogram its [`Bins`] ask for. The first pass counts (and gathers) the candidates from
/// `floor` up; when fewer than k are there, it is repeated from the bottom. Exact mode then
/// refines the boundary bin when only some of it is kept; a pass that gathered the hits
/// answers that from memory. The cut never reaches below the floor of the last `High` pass.
pub fn plan<E>(
    k: u64,
    mode: ThresholdMode,
    floor: u32,
    mut pass: impl FnMut(Bins) -> Result<Histogram, E>,
) -> Result<Cut, E> {
    if k == 0 {
        return Ok(Cut::Nothing);
    }
    // A floor inside a bin would gather only part of it: round it down to the bin's start.
    let mut floor = (floor & !0xffff).max(1);
    let high = loop {
        let high = pass(Bins::High { floor })?;
        if floor == 1 && high.total() <= k {
            return Ok(Cut::All);
        }
        if high.total() >= k {
            break high;
        }
        floor = 1;
    };
    let (bin, take, at_level) = high.boundary(k);
    if mode == ThresholdMode::Approx || take == at_level {
        return Ok(Cut::Level { shift: 16, level: bin, take, at_level });
    }
    let (lo, take, at_level) = pass(Bins::Low { bin })?.boundary(take);
    Ok(Cut::Level { shift: 0, level: (bin << 16) | lo, take, at_level })
}

impl Cut {
    /// Whether only some of the boundary candidates are kept, so that chunks need their
    /// boundary counts before they can be masked.
    pub fn is_partial(&self) -> bool {
        matches!(self, Cut::Level { take, at_level, .. } if take < at_level)
    }

    /// The number of boundary candidates among `keys`.
    pub fn at_level_in(&self, keys: &[u32]) -> u64 {
        match *self {
            Cut::Level { shift, level, .. } => crate::simd::widest(
                #[inline(always)]
                || keys.iter().filter(|&&k| k != NOT_CANDIDATE && k >> shift == level).count() as u64,
            ),
            _ => 0,
        }
    }

    /// Writes the chunk-relative index of every kept position of `keys` (a whole chunk's) to
    /// the front of `kept` (at least `keys.len()` long) and returns how many there are. At
    /// most `quota` boundary candidates are kept (the first ones); `at_level` is the chunk's
    /// boundary count when known (else it is counted when needed).
    pub fn select(&self, keys: &[u32], quota: u64, at_level: Option<u64>, kept: &mut [u32]) -> usize {
        self.select_at(keys, KeyPositions::From(0), quota, at_level, kept)
    }

    /// [`Cut::select`] over a chunk's gathered hits, whose floor this cut does not go below.
    pub fn select_hits(&self, hits: &Hits, quota: u64, at_level: Option<u64>, kept: &mut [u32]) -> usize {
        self.select_at(&hits.keys, KeyPositions::Of(&hits.idx), quota, at_level, kept)
    }

    /// Selection over keys at the chunk-relative indices `pos` (ascending).
    #[inline(always)]
    fn select_at(
        &self,
        keys: &[u32],
        pos: KeyPositions<'_>,
        quota: u64,
        at_level: Option<u64>,
        kept: &mut [u32],
    ) -> usize {
        match *self {
            Cut::Nothing => 0,
            Cut::All => pack(keys, 1, pos, kept, None),
            Cut::Level { shift, level, .. } => {
                // The smallest key at the level, and the smallest above it.
                let lo = (level << shift).max(1);
                let above = |start: usize, kept: &mut [u32]| match u32::try_from((level as u64 + 1) << shift) {
                    Ok(hi) => pack(&keys[start..], hi, pos.skip(start), kept, None),
                    Err(_) => 0, // nothing is above the top level
                };
                if quota == 0 {
                    return above(0, kept);
                }
                if quota == u64::MAX || at_level.is_some_and(|a| quota >= a) {
                    return pack(keys, lo, pos, kept, None);
                }
                // The quota runs out inside this chunk: keys at the level count up to the
                // position of the quota-th one, and only keys above the level after it.
                let mut seen = 0;
                let end = keys
                    .iter()
                    .position(|&k| {
                        seen += (k != NOT_CANDIDATE && k >> shift == level) as u64;
                        seen == quota
                    })
                    .map_or(keys.len(), |p| p + 1);
                let n = pack(&keys[..end], lo, pos, kept, None);
                n + above(end, &mut kept[n..])
            }
        }
    }
}

/// Splits a cut's boundary quota over chunks in index order, given each chunk's boundary count.
pub fn quotas(at_level_per_chunk: impl IntoIterator<Item = u64>, remaining: &mut u64) -> Vec<u64> {
    at_level_per_chunk
        .into_iter()
        .map(|c| {
            let q = c.min(*remaining);
            *remaining -= q;
            q
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::threshold::score::key;

    #[test]
    fn sparsity_is_an_exact_decimal() {
        let s = Sparsity::parse("0.9").unwrap();
        assert_eq!(s.keep_count(10), 1);
        assert_eq!(s.keep_count(9), 0); // 0.9 would be 0.8999... as f64: floor must not slip
        assert_eq!(s.keep_count(19), 1);
        assert_eq!(Sparsity::parse("0.3").unwrap().keep_count(10), 7);
        assert_eq!(Sparsity::parse("1").unwrap().keep_count(5), 0);
        assert_eq!(Sparsity::parse("0").unwrap().keep_count(u64::MAX), u64::MAX);
        assert_eq!(Sparsity::parse("0.5").unwrap().keep_count(u64::MAX), u64::MAX / 2);
        assert_eq!(Sparsity::parse(".25").unwrap().to_decimal(), "0.25");
        let tiny = Sparsity::parse("0.000000000000000001").unwrap();
        assert_eq!(tiny.keep_count(u64::MAX), u64::MAX - 19);
        assert!(Sparsity::parse("0.0000000000000000001").is_err());
        for bad in ["", ".", "1.5", "-0.1", "0.9x", "1e-1", "2", "0,9", " 0.9"] {
            assert!(Sparsity::parse(bad).is_err(), "{bad}");
        }
    }

    /// Plans a cut over `keys` from `floor`; returns it, the passes made and the hits that
    /// the last `High` pass gathered.
    fn plan_over(keys: &[u32], k: u64, mode: ThresholdMode, floor: u32) -> (Cut, Vec<Bins>, Hits) {
        let (mut passes, mut hits) = (Vec::new(), Hits::default());
        let cut = plan::<()>(k, mode, floor, |bins| {
            passes.push(bins);
            let mut h = Histogram::default();
            match bins {
                Bins::High { floor } => {
                    let mut g = Gather::default();
                    g.start(keys.len());
                    g.add(keys, floor, 0, &mut h);
                    assert!(g.finish(&mut h));
                    hits.copy_from(&g);
                }
                Bins::Low { bin } => h.add_low(bin, keys),
            }
            Ok(h)
        })
        .unwrap();
        (cut, passes, hits)
    }

    fn cut_of(keys: &[u32], k: u64, mode: ThresholdMode) -> Cut {
        let (cut, ..) = plan_over(keys, k, mode, 1);
        // A floor changes how many passes are needed, never the cut; and the hits of the
        // last pass select what the whole chunk does.
        for f in [1, 0x8000 << 16, 0xbf80 << 16, 0xffff << 16] {
            let (c, _, hits) = plan_over(keys, k, mode, f);
            assert_eq!(c, cut, "floor {f:#x}");
            let quota = match cut {
                Cut::Level { take, .. } => take,
                _ => 0,
            };
            let mut out = vec![0; keys.len()];
            let n = cut.select_hits(&hits, quota, None, &mut out);
            assert_eq!(out[..n], kept(keys, &cut)[..], "floor {f:#x}");
        }
        cut
    }

    #[test]
    fn a_floor_below_the_cut_gathers_everything_in_one_pass() {
        // 20,000 scores with ties (each value five times), keep 2,000.
        let scores: Vec<f32> = (0..20_000).map(|i| 1.0 + ((i * 7919) % 4000) as f32 / 64.0).collect();
        let keys: Vec<u32> = scores.iter().map(|&s| key(s)).collect();
        let mut sample = Histogram::default();
        sample.add_high(&keys);
        let f = floor(2000, 20_000, &sample, 20_000);
        assert!(f > 1, "the sample is the whole tensor: it finds a floor");
        let (cut, passes, hits) = plan_over(&keys, 2000, ThresholdMode::Exact, f);
        assert_eq!(passes[0], Bins::High { floor: f });
        assert!(passes[1..].iter().all(|b| matches!(b, Bins::Low { .. })), "{passes:?}");
        assert!(hits.len() >= 2000 && hits.len() < 20_000 / 2, "{}", hits.len());
        let mut order: Vec<u32> = (0..20_000).collect();
        order.sort_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]).then(a.cmp(&b)));
        order.truncate(2000);
        order.sort();
        assert_eq!(kept(&keys, &cut), order);
    }

    #[test]
    fn a_floor_above_the_cut_costs_a_pass_from_the_bottom() {
        let keys: Vec<u32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|&s| key(s)).collect();
        let high = key(3.5) & !0xffff;
        let (cut, passes, hits) = plan_over(&keys, 3, ThresholdMode::Exact, high);
        assert_eq!(passes[..2], [Bins::High { floor: high }, Bins::High { floor: 1 }]);
        assert_eq!(hits.len(), 4);
        assert_eq!(kept(&keys, &cut), [1, 2, 3]);
    }

    fn kept(keys: &[u32], cut: &Cut) -> Vec<u32> {
        let mut out = vec![0; keys.len()];
        let quota = match cut {
            Cut::Level { take, .. } => *take,
            _ => 0,
        };
        let n = cut.select(keys, quota, None, &mut out);
        out.truncate(n);
        out
    }

    #[test]
    fn exact_cut_breaks_ties_by_index() {
        let scores = [1.0, 3.0, 2.0, 3.0, 3.0, -1.0];
        let keys: Vec<u32> = scores.iter().map(|&s| key(s)).collect();
        let cut = cut_of(&keys, 2, ThresholdMode::Exact);
        assert_eq!(kept(&keys, &cut), [1, 3]);
        let cut = cut_of(&keys, 4, ThresholdMode::Exact);
        assert_eq!(kept(&keys, &cut), [1, 2, 3, 4]);
        assert_eq!(cut_of(&keys, 0, ThresholdMode::Exact), Cut::Nothing);
        assert_eq!(cut_of(&keys, 6, ThresholdMode::Exact), Cut::All);
    }

    #[test]
    fn non_candidates_are_never_kept() {
        let keys = [NOT_CANDIDATE, key(f32::NEG_INFINITY), NOT_CANDIDATE];
        let cut = cut_of(&keys, 3, ThresholdMode::Exact);
        assert_eq!(kept(&keys, &cut), [1]);
    }

    #[test]
    fn gathering_counts_every_hit_and_keeps_them_while_they_fit() {
        let keys = crate::threshold::pack::tests::random_keys(10_007, 0x9e37_79b9_7f4a_7c15);
        for floor in [1, 0x4000_0000, 0x8000_0000, 0xffff_0000, u32::MAX] {
            let want: (Vec<u32>, Vec<u32>) =
                (0..keys.len()).filter(|&i| keys[i] >= floor).map(|i| (5 + i as u32, keys[i])).unzip();
            let n = want.0.len();
            // In uneven pieces (each copy of the packing loop is checked in `pack`).
            let pieces = [1, 15, 16, 17, 4096, 10_007];
            let mut g = Gather::default();
            let mut high = Histogram::default();
            g.start(keys.len());
            let mut at = 0;
            for piece in pieces {
                let end = (at + piece).min(keys.len());
                g.add(&keys[at..end], floor, 5 + at, &mut high);
                at = end;
            }
            assert!(g.finish(&mut high));
            assert_eq!(g.len(), n, "floor {floor:#x}");
            assert_eq!(g.idx[..n], want.0[..n]);
            assert_eq!(g.keys[..n], want.1[..n]);
            let mut direct = Histogram::default();
            direct.add_high(&want.1[..n]);
            assert_eq!(high.counts[..], direct.counts[..]);
            // With too little room, every hit is still counted, but none kept.
            let mut small = Histogram::default();
            g.start(4096);
            let mut at = 0;
            for piece in pieces {
                let end = (at + piece).min(keys.len());
                g.add(&keys[at..end], floor, 5 + at, &mut small);
                at = end;
            }
            assert!(!g.finish(&mut small), "the last piece alone is larger than the room");
            assert_eq!(small.counts[..], direct.counts[..]);
            assert!(want.1[..n].iter().all(|&k| k >= floor));
        }
    }

    /// Totals, boundaries and merges over the counted range agree with counting every key,
    /// and a table handed on by a dropped histogram starts empty.
    #[test]
    fn histograms_count_merge_and_reuse_their_tables() {
        let keys = crate::threshold::pack::tests::random_keys(50_000, 0x2545_f491_4f6c_dd1d);
        let (a, b) = keys.split_at(20_000);
        for round in 0..3 {
            let (mut ha, mut hb) = (Histogram::default(), Histogram::default());
            assert_eq!((ha.total(), ha.counts.iter().sum::<u64>()), (0, 0), "round {round}: a reused table is empty");
            ha.add_high(a);
            hb.add_high(b);
            let mut low = Histogram::default();
            let bin = keys[7] >> 16;
            low.add_low(bin, &keys);
            let high = ha.merge(&hb);
            let mut sorted: Vec<u32> = keys.iter().copied().filter(|&k| k != NOT_CANDIDATE).collect();
            sorted.sort_unstable_by(|x, y| y.cmp(x));
            assert_eq!(high.total(), sorted.len() as u64);
            for k in [1, 2, 100, 9_999, sorted.len() as u64] {
                let kth = sorted[k as usize - 1] >> 16;
                let above = sorted.iter().filter(|&&x| x >> 16 > kth).count() as u64;
                let at = sorted.iter().filter(|&&x| x >> 16 == kth).count() as u64;
                assert_eq!(high.boundary(k), (kth, k - above, at), "k {k}");
            }
            let in_bin: Vec<u32> = sorted.iter().filter(|&&x| x >> 16 == bin).map(|&x| x & 0xffff).collect();
            assert_eq!(low.total(), in_bin.len() as u64);
            assert_eq!(low.boundary(1).0, in_bin[0]);
        }
    }

    #[test]
    fn quotas_fill_in_order() {
        let mut remaining = 5;
        assert_eq!(quotas([2, 0, 4, 3], &mut remaining), [2, 0, 3, 0]);
        assert_eq!(remaining, 0);
    }
}

//! Choosing which candidates to keep: the exact keep count, streaming histogram selection of
//! the k-th largest score, and the cut that the mask stage applies chunk by chunk.
//!
//! Selection never holds a tensor's scores: it asks for histograms (computed by whoever
//! can stream the tensor, from the maps) and needs at most two of them. The first counts the
//! high 16 bits of every candidate's key; the second the low 16 bits inside the boundary bin.
//! Ties at the final level are filled in index order, so counts, not values, decide.

use crate::score::NOT_CANDIDATE;

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
    /// use fapm_stages::threshold::Sparsity;
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

/// What one streaming pass counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bins {
    /// Count the high 16 bits of every candidate's key.
    pub high: bool,
    /// Count the low 16 bits of the candidates whose high 16 bits lie in
    /// `low.0 .. low.0 + low.1` (one histogram per high bin).
    pub low: (u32, u32),
}

/// How many boundary bins a pass refines on a guess: the guessed bin and four either side.
pub const GUESS_SPAN: u32 = 9;

/// A 65,536-bin histogram of keys.
#[derive(Clone)]
pub struct Histogram {
    /// 65,536 bins, then 8 spare slots where non-candidates are counted (and ignored).
    counts: Box<[u64; BINS + 8]>,
}

const BINS: usize = 1 << 16;

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: Box::new([0; BINS + 8]) }
    }
}

impl Histogram {
    /// Counts the high 16 bits of the candidate keys among `keys`.
    pub fn add_high(&mut self, keys: &[u32]) {
        // Non-candidates (often most keys) would all increment bin 0, one long chain of
        // dependent read-modify-writes; spread them over eight spare slots instead.
        for (i, &k) in keys.iter().enumerate() {
            let spare = BINS + (i & 7);
            let bin = if k == NOT_CANDIDATE { spare } else { (k >> 16) as usize };
            self.counts[bin] += 1;
        }
    }

    /// Adds another histogram's counts to this one.
    pub fn merge(mut self, other: &Histogram) -> Histogram {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self
    }

    /// The total count.
    pub fn total(&self) -> u64 {
        self.counts[..BINS].iter().sum()
    }

    /// The bin holding the k-th largest key (k >= 1, k <= total): `(bin, how many of the
    /// bin's entries are among the top k, the bin's count)`.
    fn boundary(&self, k: u64) -> (u32, u64, u64) {
        let mut above = 0u64;
        for bin in (0..BINS).rev() {
            let c = self.counts[bin];
            if above + c >= k {
                return (bin as u32, k - above, c);
            }
            above += c;
        }
        unreachable!("k = {k} exceeds the histogram total {above}")
    }
}

/// The histograms one pass produces, as its [`Bins`] asks.
#[derive(Clone)]
pub struct Counts {
    high: Option<Histogram>,
    low: Vec<Histogram>,
}

impl Counts {
    /// Empty counts for `bins`.
    pub fn new(bins: Bins) -> Self {
        Counts { high: bins.high.then(Histogram::default), low: vec![Histogram::default(); bins.low.1 as usize] }
    }

    /// Counts one piece of keys.
    pub fn add(&mut self, bins: Bins, keys: &[u32]) {
        if let Some(h) = &mut self.high {
            h.add_high(keys);
        }
        let (first, n) = bins.low;
        if n == 0 {
            return;
        }
        let mut count = |k: u32| {
            let bin = (k >> 16).wrapping_sub(first);
            if bin < n && k != NOT_CANDIDATE {
                self.low[bin as usize].counts[(k & 0xffff) as usize] += 1;
            }
        };
        // Few keys fall in the refined bins: test 32 at a time (vectorized), visit hits.
        let mut groups = keys.chunks_exact(32);
        for group in &mut groups {
            let group: &[u32; 32] = group.try_into().expect("32 keys");
            let mut mask = 0u32;
            for (j, &k) in group.iter().enumerate() {
                mask |= (((k >> 16).wrapping_sub(first) < n) as u32) << j;
            }
            while mask != 0 {
                count(group[mask.trailing_zeros() as usize]);
                mask &= mask - 1;
            }
        }
        groups.remainder().iter().for_each(|&k| count(k));
    }

    /// Adds another pass's counts (over other chunks) to these.
    pub fn merge(self, other: &Counts) -> Counts {
        Counts {
            high: match (self.high, &other.high) {
                (Some(a), Some(b)) => Some(a.merge(b)),
                (a, _) => a,
            },
            low: self.low.into_iter().zip(&other.low).map(|(a, b)| a.merge(b)).collect(),
        }
    }
}

/// Guesses the boundary bin of the k-th largest of `n` keys from the high histogram of a
/// sample of `sample_n` of them; `None` when the sample is too small to say.
pub fn guess(k: u64, n: u64, sample: &Histogram, sample_n: u64) -> Option<u32> {
    let sk = ((k as u128 * sample_n as u128) / (n.max(1) as u128)).max(1) as u64;
    (sample.total() >= sk).then(|| sample.boundary(sk).0)
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
/// counts its [`Bins`] ask for. The first pass counts high bits and, in exact mode, refines
/// the bins around `guess` at the same time; a second pass is needed only when the boundary
/// bin is split and was not among them.
pub fn plan<E>(
    k: u64,
    mode: ThresholdMode,
    guess: Option<u32>,
    mut pass: impl FnMut(Bins) -> Result<Counts, E>,
) -> Result<Cut, E> {
    if k == 0 {
        return Ok(Cut::Nothing);
    }
    let low = match (mode, guess) {
        (ThresholdMode::Exact, Some(g)) => {
            let first = g.saturating_sub(GUESS_SPAN / 2).max(1);
            (first, GUESS_SPAN.min((1 << 16) - first))
        }
        _ => (0, 0),
    };
    let mut first = pass(Bins { high: true, low })?;
    let high = first.high.take().expect("asked for");
    if high.total() <= k {
        return Ok(Cut::All);
    }
    let (bin, take, at_level) = high.boundary(k);
    if mode == ThresholdMode::Approx || take == at_level {
        return Ok(Cut::Level { shift: 16, level: bin, take, at_level });
    }
    let refined = match bin.checked_sub(low.0).filter(|&i| i < low.1) {
        Some(i) => first.low.swap_remove(i as usize),
        None => pass(Bins { high: false, low: (bin, 1) })?.low.pop().expect("asked for"),
    };
    let (lo, take, at_level) = refined.boundary(take);
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
            Cut::Level { shift, level, .. } => {
                keys.iter().filter(|&&k| k != NOT_CANDIDATE && k >> shift == level).count() as u64
            }
            _ => 0,
        }
    }

    /// Writes the chunk-relative index of every kept position of `keys` to the front of
    /// `kept` (at least `keys.len()` long) and returns how many there are. At most `quota`
    /// boundary candidates are kept (the first ones); `at_level` is the chunk's boundary
    /// count when known (else it is counted when needed).
    pub fn select(&self, keys: &[u32], quota: u64, at_level: Option<u64>, kept: &mut [u32]) -> usize {
        match *self {
            Cut::Nothing => 0,
            Cut::All => keep_at_least(keys, 1, 0, kept),
            Cut::Level { shift, level, .. } => {
                // The smallest key at the level, and the smallest above it.
                let lo = (level << shift).max(1);
                let above =
                    |keys: &[u32], offset: usize, kept: &mut [u32]| match u32::try_from((level as u64 + 1) << shift) {
                        Ok(hi) => keep_at_least(keys, hi, offset, kept),
                        Err(_) => 0, // nothing is above the top level
                    };
                if quota == 0 {
                    return above(keys, 0, kept);
                }
                if quota == u64::MAX || at_level.is_some_and(|a| quota >= a) {
                    return keep_at_least(keys, lo, 0, kept);
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
                let n = keep_at_least(&keys[..end], lo, 0, kept);
                n + above(&keys[end..], end, &mut kept[n..])
            }
        }
    }
}

/// Writes `offset +` the index of every key `>= t` (`t >= 1`) to the front of `kept`;
/// returns how many. Keys are compared 32 at a time into a bit mask (which vectorizes), and
/// only the set bits are visited: a 90%-sparse cut has about three per group.
fn keep_at_least(keys: &[u32], t: u32, offset: usize, kept: &mut [u32]) -> usize {
    const G: usize = 32;
    let mut n = 0;
    let mut groups = keys.chunks_exact(G);
    for (g, group) in (&mut groups).enumerate() {
        let group: &[u32; G] = group.try_into().expect("G keys");
        let mut mask = 0u32;
        for (j, &k) in group.iter().enumerate() {
            mask |= ((k >= t) as u32) << j;
        }
        while mask != 0 {
            kept[n] = (offset + g * G) as u32 + mask.trailing_zeros();
            n += 1;
            mask &= mask - 1;
        }
    }
    let rest = keys.len() - groups.remainder().len();
    for (j, &k) in groups.remainder().iter().enumerate() {
        if k >= t {
            kept[n] = (offset + rest + j) as u32;
            n += 1;
        }
    }
    n
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
    use crate::score::key;

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

    fn cut_of(keys: &[u32], k: u64, mode: ThresholdMode) -> Cut {
        let with_guess = |guess| {
            let mut passes = 0;
            let cut = plan::<()>(k, mode, guess, |bins| {
                passes += 1;
                let mut c = Counts::new(bins);
                c.add(bins, keys);
                Ok(c)
            })
            .unwrap();
            (cut, passes)
        };
        let (cut, _) = with_guess(None);
        // A guess changes how many passes are needed, never the cut.
        for g in [1, 0x8000, 0xbf80, 0xffff] {
            assert_eq!(with_guess(Some(g)).0, cut);
        }
        cut
    }

    #[test]
    fn a_right_guess_saves_the_second_pass() {
        let keys: Vec<u32> = [1.0f32, 1.0, 1.0, 2.0, 3.0, 1.0 + 1e-6].iter().map(|&s| key(s)).collect();
        let mut sample = Histogram::default();
        sample.add_high(&keys);
        let g = guess(3, 6, &sample, 6);
        let mut passes = 0;
        let cut = plan::<()>(3, ThresholdMode::Exact, g, |bins| {
            passes += 1;
            let mut c = Counts::new(bins);
            c.add(bins, &keys);
            Ok(c)
        })
        .unwrap();
        assert_eq!(passes, 1);
        assert_eq!(kept(&keys, &cut), [3, 4, 5]);
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
    fn quotas_fill_in_order() {
        let mut remaining = 5;
        assert_eq!(quotas([2, 0, 4, 3], &mut remaining), [2, 0, 3, 0]);
        assert_eq!(remaining, 0);
    }
}

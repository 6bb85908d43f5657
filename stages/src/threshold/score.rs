//! The task vector and its scores: candidates, the FAPM and magnitude metrics, and the
//! order-preserving key that turns an f32 score into a `u32` for histograms.
//!
//! Everything here is a pure function over one chunk of raw little-endian tensor bytes, so
//! the threshold and mask stages can recompute scores from the memory maps on every pass.

use crate::dtype::{convert, Bf16, DType, Elem, F16, F32, F64};
use crate::with_elems;

/// The key of a position that is not a candidate. No score has this key: NaN scores count
/// as `-inf`, whose key is `0x007f_ffff`.
pub const NOT_CANDIDATE: u32 = 0;

/// How positions are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// The paper's forgetting-aware metric: `|d| - mean(|pre|) * |d| / |pre|`.
    Fapm,
    /// Plain task-vector magnitude `|d|`.
    Magnitude,
}

impl Metric {
    /// The metric's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Fapm => "fapm",
            Metric::Magnitude => "magnitude",
        }
    }
}

/// The score of one position, exactly as SPEC section 3 orders the f32 operations.
#[inline(always)]
pub fn score(metric: Metric, ft: f32, pre: f32, mean: f32) -> f32 {
    penalised_score(metric, ft, pre, mean, 1.0)
}

/// [`score`] with the FAPM penalty strength `l` (`S = |d| - l * t`; 1 is the paper's metric,
/// 0 is magnitude; unused by magnitude).
#[inline(always)]
pub fn penalised_score(metric: Metric, ft: f32, pre: f32, mean: f32, l: f32) -> f32 {
    match form(metric, l) {
        MAGNITUDE => score_as::<MAGNITUDE>(ft, pre, mean, l),
        FAPM => score_as::<FAPM>(ft, pre, mean, l),
        _ => score_as::<PENALISED>(ft, pre, mean, l),
    }
}

/// The arithmetic a score takes, as a constant so that each scoring loop compiles to its own:
/// `|d|`; `|d| - t` (the paper's metric, `l = 1`, where `l * t` is `t` bit for bit); or
/// `|d| - l * t`. `l = 0` is magnitude exactly, also where `t` is infinite (SPEC section 3).
const MAGNITUDE: u8 = 0;
const FAPM: u8 = 1;
const PENALISED: u8 = 2;

fn form(metric: Metric, l: f32) -> u8 {
    match metric {
        Metric::Fapm if l == 1.0 => FAPM,
        Metric::Fapm if l != 0.0 => PENALISED,
        _ => MAGNITUDE,
    }
}

#[inline(always)]
fn score_as<const FORM: u8>(ft: f32, pre: f32, mean: f32, l: f32) -> f32 {
    let d = ft - pre;
    let ad = d.abs();
    if FORM == MAGNITUDE {
        return ad;
    }
    let r = ad / pre.abs();
    let t = mean * r;
    if FORM == FAPM {
        ad - t
    } else {
        ad - l * t
    }
}

/// Maps a score to a `u32` whose unsigned order is the score order. NaN counts as `-inf`
/// and `-0.0` as `+0.0`, so equal scores always get equal keys.
///
/// ```
/// use fapm_stages::threshold::score::key;
/// assert!(key(-2.0) < key(-1.0) && key(-1.0) < key(0.0) && key(0.0) < key(3.5));
/// assert_eq!(key(f32::NAN), key(f32::NEG_INFINITY));
/// assert_eq!(key(-0.0), key(0.0));
/// ```
#[inline(always)]
pub fn key(s: f32) -> u32 {
    let s = if s.is_nan() { f32::NEG_INFINITY } else { s + 0.0 };
    let b = s.to_bits();
    // Negative: flip every bit; positive: set the sign bit. Branch-free, so it vectorizes.
    b ^ ((((b as i32) >> 31) as u32) | 0x8000_0000)
}

/// The score a key came from (canonical: never NaN, never `-0.0`).
pub fn score_of_key(k: u32) -> f32 {
    let b = if k & 0x8000_0000 != 0 { k & 0x7fff_ffff } else { !k };
    f32::from_bits(b)
}

/// Sum of `|pre|` over a chunk of base bytes, each element widened to f32, summed in f64.
pub fn sum_abs(base: DType, bytes: &[u8]) -> f64 {
    let mut sum = AbsSum::default();
    sum.add(base, bytes);
    sum.total()
}

/// [`sum_abs`] of a chunk given a piece at a time: 32 independent f64 lanes (four vectors of
/// eight, so that the additions of one do not wait for the last), added in a fixed order,
/// fast and deterministic. Every piece but the last must hold a whole number of groups of 32
/// elements: then the lanes see the same additions in the same order as for the whole chunk,
/// and the total is the same bits.
#[derive(Debug, Clone, Default)]
pub struct AbsSum {
    lanes: [f64; 32],
    /// Whether a piece with a partial group was added (only the last may have one).
    ragged: bool,
}

impl AbsSum {
    /// Adds the `|pre|` of a piece of base bytes of dtype `base`.
    pub fn add(&mut self, base: DType, bytes: &[u8]) {
        assert!(!self.ragged, "AbsSum: a piece after one with a partial group");
        self.ragged = !bytes.len().is_multiple_of(32 * base.size());
        crate::simd::widest(
            #[inline(always)]
            || sum_abs_generic(base, bytes, &mut self.lanes),
        )
    }

    /// The sum of the pieces added.
    pub fn total(&self) -> f64 {
        self.lanes.iter().sum()
    }
}

#[inline(always)]
fn sum_abs_generic(base: DType, bytes: &[u8], acc: &mut [f64; 32]) {
    #[inline(always)]
    fn go<B: Elem>(bytes: &[u8], acc: &mut [f64; 32]) {
        let mut elems = bytes.chunks_exact(32 * B::SIZE);
        for group in &mut elems {
            for (a, e) in acc.iter_mut().zip(group.chunks_exact(B::SIZE)) {
                *a += B::score_f32(B::load(e)).abs() as f64;
            }
        }
        for (a, e) in acc.iter_mut().zip(elems.remainder().chunks_exact(B::SIZE)) {
            *a += B::score_f32(B::load(e)).abs() as f64;
        }
    }
    match base {
        DType::BF16 => go::<Bf16>(bytes, acc),
        DType::F16 => go::<F16>(bytes, acc),
        DType::F32 => go::<F32>(bytes, acc),
        DType::F64 => go::<F64>(bytes, acc),
        other => unreachable!("not diffable: {other}"),
    }
}

/// The FAPM mean `A = f32(sum_f64(|pre|) / n)` from per-chunk partial sums.
pub fn mean_abs(partials: impl IntoIterator<Item = f64>, n: u64) -> f32 {
    let sum: f64 = partials.into_iter().sum();
    (sum / n as f64) as f32
}

/// How to score one diffable tensor: dtypes, metric and the FAPM mean.
#[derive(Debug, Clone, Copy)]
pub struct Scorer {
    /// The fine-tuned dtype.
    pub ft: DType,
    /// The base dtype.
    pub base: DType,
    /// The metric.
    pub metric: Metric,
    /// `mean(|pre|)` for FAPM (unused by magnitude).
    pub mean: f32,
    /// The FAPM penalty strength `l` (1: the paper's metric; unused by magnitude).
    pub penalty: f32,
}

impl Scorer {
    /// Writes the key of every position of a chunk into `keys` ([`NOT_CANDIDATE`] where the
    /// fine-tuned bits equal the converted base bits). Returns the number of candidates.
    pub fn keys(&self, ft: &[u8], base: &[u8], keys: &mut [u32]) -> usize {
        let (mean, l) = (self.mean, self.penalty);
        let form = form(self.metric, l);
        with_elems!(self.ft, self.base, |F, B| {
            assert!(ft.len() == keys.len() * F::SIZE && base.len() == keys.len() * B::SIZE, "chunk sizes disagree");
            crate::simd::widest(
                #[inline(always)]
                || keys_of_form::<F, B>(ft, base, form, mean, l, keys),
            )
        })
    }
}

impl Scorer {
    /// Computes keys a cache-sized piece at a time and hands each piece to `f` with its
    /// chunk-relative offset: for passes that only count or gather keys, without a buffer
    /// for the whole chunk. Returns the number of candidates. Pieces of 1024 keys (4 KiB) stay
    /// in the L1 cache beside the inputs' lines.
    pub fn for_each_keys(&self, ft: &[u8], base: &[u8], f: impl FnMut(usize, &[u32])) -> u64 {
        // Small inputs (the sample's pieces of 64) get a small buffer, so that a whole piece is
        // not zeroed for every 64 keys.
        if ft.len() / self.ft.size() <= 256 {
            self.keys_in_pieces::<256>(ft, base, f)
        } else {
            self.keys_in_pieces::<1024>(ft, base, f)
        }
    }

    fn keys_in_pieces<const PIECE: usize>(&self, ft: &[u8], base: &[u8], mut f: impl FnMut(usize, &[u32])) -> u64 {
        let (fs, bs) = (self.ft.size(), self.base.size());
        let n = ft.len() / fs;
        let mut buf = [0u32; PIECE];
        let mut candidates = 0;
        for start in (0..n).step_by(PIECE) {
            let m = PIECE.min(n - start);
            candidates +=
                self.keys(&ft[start * fs..(start + m) * fs], &base[start * bs..(start + m) * bs], &mut buf[..m]) as u64;
            f(start, &buf[..m]);
        }
        candidates
    }
}

#[inline(always)]
fn keys_of_form<F: Elem, B: Elem>(ft: &[u8], base: &[u8], form: u8, mean: f32, l: f32, keys: &mut [u32]) -> usize {
    match form {
        MAGNITUDE => keys_typed::<F, B, MAGNITUDE>(ft, base, mean, l, keys),
        FAPM => keys_typed::<F, B, FAPM>(ft, base, mean, l, keys),
        _ => keys_typed::<F, B, PENALISED>(ft, base, mean, l, keys),
    }
}

#[inline(always)]
fn keys_typed<F: Elem, B: Elem, const FORM: u8>(ft: &[u8], base: &[u8], mean: f32, l: f32, keys: &mut [u32]) -> usize {
    // The count is kept in 32 bits, so that counting stays on 32-bit lanes (a usize count
    // would widen every lane to 64 bits); segments keep it exact (and their byte lengths fit
    // a 32-bit usize).
    const SEGMENT: usize = 1 << 28;
    let mut total = 0usize;
    for ((keys, ft), base) in
        keys.chunks_mut(SEGMENT).zip(ft.chunks(SEGMENT * F::SIZE)).zip(base.chunks(SEGMENT * B::SIZE))
    {
        let mut candidates = 0u32;
        for ((k, f), b) in keys.iter_mut().zip(ft.chunks_exact(F::SIZE)).zip(base.chunks_exact(B::SIZE)) {
            let (fb, bb) = (F::load(f), B::load(b));
            let (fu, cu) = (fb.into(), convert::<F, B>(bb.into()));
            // Compare at the element's width, so that the loop runs on 16- or 32-bit lanes.
            let changed = match F::SIZE {
                2 => fu as u16 != cu as u16,
                4 => fu as u32 != cu as u32,
                _ => fu != cu,
            };
            let kk = key(score_as::<FORM>(F::score_f32(fb), B::score_f32(bb), mean, l));
            *k = if changed { kk } else { NOT_CANDIDATE };
            candidates += changed as u32;
        }
        total += candidates as usize;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_orders_like_scores() {
        let xs = [f32::NEG_INFINITY, -3.5, -1e-30, 0.0, 1e-45, 2.0, f32::MAX, f32::INFINITY];
        for w in xs.windows(2) {
            assert!(key(w[0]) < key(w[1]), "{} vs {}", w[0], w[1]);
        }
        assert_eq!(key(-0.0), key(0.0));
        assert_eq!(key(f32::NAN), key(f32::NEG_INFINITY));
        assert!(key(f32::NEG_INFINITY) > NOT_CANDIDATE);
        for x in xs {
            assert_eq!(score_of_key(key(x)).to_bits(), x.to_bits());
        }
    }

    #[test]
    fn fapm_follows_the_spec_order() {
        // |d| = 0.5, |pre| = 2, A = 3: r = 0.25, t = 0.75, S = -0.25.
        assert_eq!(score(Metric::Fapm, 2.5, 2.0, 3.0), -0.25);
        // pre = 0: r = inf, S = -inf.
        assert_eq!(score(Metric::Fapm, 1.0, 0.0, 1.0), f32::NEG_INFINITY);
        // pre = 0 and A = 0: 0 * inf is NaN, which keys as -inf.
        assert_eq!(key(score(Metric::Fapm, 1.0, 0.0, 0.0)), key(f32::NEG_INFINITY));
        assert_eq!(score(Metric::Magnitude, -1.0, 2.0, 9.0), 3.0);
        // The penalty multiplies t: 2.5 - 0.5 * 0.75; at 0 it is magnitude, even where t is
        // infinite (0 * inf would be NaN); at 1 it is the paper's metric.
        assert_eq!(penalised_score(Metric::Fapm, 2.5, 2.0, 3.0, 0.5), 0.125);
        assert_eq!(penalised_score(Metric::Fapm, 1.0, 0.0, 1.0, 0.0), 1.0);
        assert_eq!(penalised_score(Metric::Fapm, 2.5, 2.0, 3.0, 1.0), -0.25);
        assert_eq!(penalised_score(Metric::Magnitude, -1.0, 2.0, 9.0, 7.0), 3.0);
    }

    #[test]
    fn keys_mark_candidates() {
        let base: Vec<u8> = [1.0f32, 2.0, -0.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let ft: Vec<u8> = [1.0f32, 3.0, 0.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut keys = [7u32; 3];
        let s = Scorer { ft: DType::F32, base: DType::F32, metric: Metric::Magnitude, mean: 0.0, penalty: 1.0 };
        assert_eq!(s.keys(&ft, &base, &mut keys), 2);
        assert_eq!(keys, [NOT_CANDIDATE, key(1.0), key(0.0)]);
    }

    /// Every compiled copy of `sum_abs` gives the portable copy's sum of `base` (its finite
    /// values: random bits are NaN too often for a sum to tell the copies apart, so the top
    /// exponent bit of every element is cleared).
    fn sum_copies_agree(bd: DType, base: &[u8]) {
        let mut finite = base.to_vec();
        finite.chunks_exact_mut(bd.size()).for_each(|e| e[bd.size() - 1] &= !0x40);
        let portable = |bytes: &[u8]| {
            let mut lanes = [0f64; 32];
            sum_abs_generic(bd, bytes, &mut lanes);
            lanes.iter().sum::<f64>()
        };
        let sum = portable(&finite);
        assert!(sum.is_finite() && sum > 0.0, "{bd}: {sum}");
        assert_eq!(sum_abs(bd, &finite).to_bits(), sum.to_bits());
        for (width, got) in crate::simd::each_width(
            #[inline(always)]
            || portable(&finite),
        ) {
            assert_eq!(got.to_bits(), sum.to_bits(), "{width} {bd}");
        }
    }

    /// A chunk summed a piece at a time (whole groups of 32, then the rest; the mean's pass
    /// uses `PIECE_BYTES` pieces, hashing each first): the same bits as summing it whole, for
    /// every dtype and for chunks that end in a partial group.
    #[test]
    fn a_sum_in_pieces_is_the_sum_of_the_whole() {
        use crate::format::sparse::PIECE_BYTES;
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for dtype in [DType::BF16, DType::F16, DType::F32, DType::F64] {
            for elems in [1000, 100_000usize, 3 * PIECE_BYTES / dtype.size() + 17] {
                let mut bytes: Vec<u8> = (0..elems * dtype.size()).map(|_| next() as u8).collect();
                // Finite values: the top exponent bit of every element cleared.
                bytes.chunks_exact_mut(dtype.size()).for_each(|e| e[dtype.size() - 1] &= !0x40);
                let whole = sum_abs(dtype, &bytes);
                for piece_bytes in [32 * dtype.size(), 7 * 32 * dtype.size(), PIECE_BYTES] {
                    let mut pieces = AbsSum::default();
                    for piece in bytes.chunks(piece_bytes) {
                        pieces.add(dtype, piece);
                    }
                    assert_eq!(pieces.total().to_bits(), whole.to_bits(), "{dtype}, {elems} in {piece_bytes} B pieces");
                }
            }
        }
    }

    /// A xorshift generator of test bits.
    fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// Every compiled copy of the key loop and of `sum_abs` (portable, AVX2, AVX-512) gives
    /// the same keys and sums, whichever one this CPU would pick.
    #[test]
    fn every_simd_copy_agrees() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let pairs = [
            (DType::BF16, DType::BF16),
            (DType::F16, DType::F32),
            (DType::F32, DType::F64),
            (DType::F64, DType::BF16),
            (DType::BF16, DType::F16),
        ];
        for (fd, bd) in pairs {
            let n = 1000;
            let base: Vec<u8> = (0..n * bd.size()).map(|_| next() as u8).collect();
            let mut ft = base.clone();
            if fd != bd {
                ft = (0..n * fd.size()).map(|_| next() as u8).collect();
            }
            for (i, b) in ft.iter_mut().enumerate() {
                if next().is_multiple_of(3) {
                    *b ^= 1 << (i % 8);
                }
            }
            sum_copies_agree(bd, &base);
            for (form, l) in [(FAPM, 1.0), (MAGNITUDE, 1.0), (PENALISED, 0.37)] {
                let mut want = vec![0u32; n];
                let count = with_elems!(fd, bd, |F, B| keys_of_form::<F, B>(&ft, &base, form, 0.02, l, &mut want));
                // The loop computes the scores the scalar function gives.
                let metric = if form == MAGNITUDE { Metric::Magnitude } else { Metric::Fapm };
                with_elems!(fd, bd, |F, B| {
                    for (i, &k) in want.iter().enumerate() {
                        let (f, b) = (
                            F::load(&ft[i * F::SIZE..(i + 1) * F::SIZE]),
                            B::load(&base[i * B::SIZE..(i + 1) * B::SIZE]),
                        );
                        let s = penalised_score(metric, F::score_f32(f), B::score_f32(b), 0.02, l);
                        assert!(k == NOT_CANDIDATE || k == key(s), "{fd} from {bd} at {i}");
                    }
                });
                assert_eq!(count, want.iter().filter(|&&k| k != NOT_CANDIDATE).count());
                let copies = crate::simd::each_width(
                    #[inline(always)]
                    || {
                        let mut got = vec![0u32; n];
                        let c = with_elems!(fd, bd, |F, B| keys_of_form::<F, B>(&ft, &base, form, 0.02, l, &mut got));
                        (c, got)
                    },
                );
                for (width, got) in copies {
                    assert_eq!(got, (count, want.clone()), "{width} {fd} from {bd}");
                }
            }
        }
    }
}

//! The report's numbers, computed the way `prune --threshold approx` chooses: both metrics'
//! score keys are counted into the threshold's own [`Histogram`], [`threshold::plan`] makes
//! the cut for each charted sparsity, and a last pass sums what every cut keeps, selected by
//! [`Cut::select`] as the mask stage selects. The curves are therefore what prune keeps,
//! position for position, not an estimate from the bins.
//!
//! Every pass streams the memory-mapped tensors in chunks of [`CHUNK`] elements; what stays
//! per tensor is two histograms and a few numbers.

use std::convert::Infallible;

use fapm_stages::checkpoint::TensorRef;
use fapm_stages::dtype::{DType, Elem};
use fapm_stages::score::{mean_abs, sum_abs, Metric, Scorer, NOT_CANDIDATE};
use fapm_stages::threshold::{self, Cut, Histogram, Sparsity, ThresholdMode};
use fapm_stages::with_elems;

/// Elements per chunk: the per-chunk buffers (keys, kept indices, changes) stay within the
/// L2 cache of most machines.
pub const CHUNK: usize = 1 << 16;

/// The sparsities the charts compare, as exact decimals.
pub const SPARSITIES: [&str; 5] = ["0.5", "0.75", "0.9", "0.95", "0.99"];

/// The sparsity whose kept positions the heatmaps show.
pub const MAP_SPARSITY: &str = "0.9";

/// The metrics compared, in the order of every `[_; 2]` in the report.
pub const METRICS: [Metric; 2] = [Metric::Magnitude, Metric::Fapm];

/// A 2-D tensor present with the same shape and a floating dtype in both checkpoints.
#[derive(Clone)]
pub struct Pair {
    /// Its name.
    pub name: String,
    /// The fine-tuned tensor.
    pub ft: TensorRef,
    /// The base tensor.
    pub base: TensorRef,
    /// Rows (outer dimension).
    pub rows: u64,
    /// Columns (inner dimension).
    pub cols: u64,
}

impl Pair {
    /// The number of elements.
    pub fn numel(&self) -> u64 {
        self.rows * self.cols
    }

    /// Calls `f(first_element, ft_bytes, base_bytes)` for consecutive chunks of the tensor.
    pub fn for_chunks(&self, mut f: impl FnMut(u64, &[u8], &[u8])) {
        let (fs, bs) = (self.ft.info().dtype.size(), self.base.info().dtype.size());
        let (ft, base) = (self.ft.bytes(), self.base.bytes());
        let n = self.numel() as usize;
        let mut start = 0;
        while start < n {
            let end = (start + CHUNK).min(n);
            f(start as u64, &ft[start * fs..end * fs], &base[start * bs..end * bs]);
            start = end;
        }
    }

    /// The FAPM mean `A = mean(|W_base|)`, one streaming pass over the base.
    pub fn base_mean(&self) -> f32 {
        let dtype = self.base.info().dtype;
        let mut partials = Vec::new();
        self.for_chunks(|_, _, base| partials.push(sum_abs(dtype, base)));
        mean_abs(partials, self.numel())
    }

    /// The fine-tuned and base dtypes.
    pub fn dtypes(&self) -> (DType, DType) {
        (self.ft.info().dtype, self.base.info().dtype)
    }

    /// The scorers of [`METRICS`] for this pair, given the FAPM mean.
    pub fn scorers(&self, mean: f32) -> [Scorer; 2] {
        let (ft, base) = self.dtypes();
        METRICS.map(|metric| Scorer { ft, base, metric, mean, penalty: 1.0 })
    }
}

/// What one metric keeps of one tensor at one sparsity.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Kept {
    /// Sum of `d^2` over kept positions (finite `d` only).
    pub d2: f64,
    /// Sum of `|d| / |pre|` over kept positions where it is finite.
    pub rel: f64,
    /// How many kept positions have a finite `|d| / |pre|`.
    pub rel_n: u64,
    /// How many positions are kept.
    pub count: u64,
}

impl Kept {
    /// Adds another tensor's numbers (the whole-model totals).
    pub fn add(&mut self, o: &Kept) {
        self.d2 += o.d2;
        self.rel += o.rel;
        self.rel_n += o.rel_n;
        self.count += o.count;
    }

    /// The fraction of the task vector's L2 norm that survives, given its total `sum d^2`.
    pub fn norm_fraction(&self, total_d2: f64) -> f64 {
        if total_d2 > 0.0 {
            (self.d2 / total_d2).sqrt().min(1.0)
        } else {
            f64::NAN
        }
    }

    /// The mean relative change `|d| / |pre|` of kept positions (NaN when none).
    pub fn mean_rel(&self) -> f64 {
        if self.rel_n > 0 {
            self.rel / self.rel_n as f64
        } else {
            f64::NAN
        }
    }
}

/// The cut `prune --threshold approx` makes to keep `k` of the candidates counted in `high`.
pub fn approx_cut(high: &Histogram, k: u64) -> Cut {
    // Approx mode only ever asks for the high-bits histogram, which is already counted.
    let planned =
        threshold::plan(k, ThresholdMode::Approx, 1, |_| Ok::<_, Infallible>(Histogram::default().merge(high)));
    planned.unwrap_or_else(|never| match never {})
}

/// A cut applied chunk by chunk in index order: the boundary quota is used up by the first
/// boundary candidates of the tensor, as in prune's mask stage.
pub struct Selection {
    cut: Cut,
    /// Boundary candidates still to keep.
    quota: u64,
    /// Boundary candidates in the chunks not yet seen.
    at_level_left: u64,
}

impl Selection {
    /// Starts selecting `cut` at the tensor's first element.
    pub fn new(cut: Cut) -> Self {
        let (quota, at_level_left) = match cut {
            Cut::Level { take, at_level, .. } => (take, at_level),
            _ => (0, 0),
        };
        Selection { cut, quota, at_level_left }
    }

    /// Writes the chunk-relative indices of the kept positions of the next chunk's `keys`
    /// to the front of `kept` (at least `keys.len()` long); returns how many there are.
    pub fn next(&mut self, keys: &[u32], kept: &mut [u32]) -> usize {
        // Boundary candidates are counted only in the chunks where the quota runs out:
        // before, every one is kept; after, none is.
        if self.quota == 0 || self.quota >= self.at_level_left {
            let quota = if self.quota == 0 { 0 } else { u64::MAX };
            return self.cut.select(keys, quota, None, kept);
        }
        let at_level = self.cut.at_level_in(keys);
        let quota = threshold::quotas([at_level], &mut self.quota)[0];
        self.at_level_left -= at_level;
        self.cut.select(keys, quota, Some(at_level), kept)
    }
}

/// The report's numbers for one tensor: totals, and what each metric keeps.
#[derive(Debug, Clone)]
pub struct TensorStats {
    /// The tensor's name.
    pub name: String,
    /// Its number of elements.
    pub n: u64,
    /// Positions whose fine-tuned bits differ from the base.
    pub candidates: u64,
    /// `sum d^2` over candidates (the squared norm of the task vector).
    pub total_d2: f64,
    /// The FAPM mean `mean(|W_base|)`.
    pub mean: f32,
    /// `kept[m][i]`: what metric `METRICS[m]` keeps at sparsity `sparsities[i]`.
    pub kept: [Vec<Kept>; 2],
    /// The cut of each metric at [`MAP_SPARSITY`].
    pub map_cut: [Cut; 2],
}

/// Per-chunk buffers, reused from chunk to chunk and tensor to tensor.
pub struct Scratch {
    /// Score keys of each metric ([`NOT_CANDIDATE`] where nothing changed).
    pub keys: [Vec<u32>; 2],
    /// Chunk-relative indices of kept positions.
    pub kept: Vec<u32>,
    d2: Vec<f64>,
    rel: Vec<f32>,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            keys: [vec![0; CHUNK], vec![0; CHUNK]],
            kept: vec![0; CHUNK],
            d2: vec![0.0; CHUNK],
            rel: vec![0.0; CHUNK],
        }
    }
}

impl Scratch {
    /// Scores one chunk with both scorers into [`Scratch::keys`]; returns the chunk length
    /// and its number of candidates (the same for both metrics).
    pub fn score(&mut self, scorers: &[Scorer; 2], ft: &[u8], base: &[u8]) -> (usize, u64) {
        let len = ft.len() / scorers[0].ft.size();
        let [mag, fapm] = &mut self.keys;
        let candidates = scorers[0].keys(ft, base, &mut mag[..len]);
        scorers[1].keys(ft, base, &mut fapm[..len]);
        (len, candidates as u64)
    }
}

/// Three streaming passes over one pair (base mean, histograms, kept sums), reduced to the
/// numbers the charts need at each of `sparsities`.
pub fn tensor_stats(pair: &Pair, sparsities: &[Sparsity], scratch: &mut Scratch) -> TensorStats {
    let mean = pair.base_mean();
    let scorers = pair.scorers(mean);
    let mut high = [Histogram::default(), Histogram::default()];
    let mut candidates = 0;
    pair.for_chunks(|_, ft, base| {
        let (len, c) = scratch.score(&scorers, ft, base);
        for (h, keys) in high.iter_mut().zip(&scratch.keys) {
            h.add_high(&keys[..len]);
        }
        candidates += c;
    });
    let n = pair.numel();
    let cuts = |h: &Histogram| -> Vec<Cut> { sparsities.iter().map(|s| approx_cut(h, s.keep_count(n))).collect() };
    let cuts = [cuts(&high[0]), cuts(&high[1])];
    let map_k = Sparsity::parse(MAP_SPARSITY).expect("constant sparsity").keep_count(n);
    let map_cut = [approx_cut(&high[0], map_k), approx_cut(&high[1], map_k)];
    drop(high);

    let mut selections: [Vec<Selection>; 2] = cuts.map(|c| c.into_iter().map(Selection::new).collect());
    let mut kept: [Vec<Kept>; 2] = [vec![Kept::default(); sparsities.len()], vec![Kept::default(); sparsities.len()]];
    let (ftd, based) = pair.dtypes();
    let mut total_d2 = 0.0;
    pair.for_chunks(|_, ft, base| {
        let (len, _) = scratch.score(&scorers, ft, base);
        let Scratch { keys, kept: idx, d2, rel } = scratch;
        with_elems!(ftd, based, |F, B| changes::<F, B>(ft, base, &mut d2[..len], &mut rel[..len]));
        total_d2 +=
            keys[0][..len].iter().zip(&d2[..len]).filter(|(&k, _)| k != NOT_CANDIDATE).map(|(_, d)| d).sum::<f64>();
        for m in 0..2 {
            for (sel, k) in selections[m].iter_mut().zip(&mut kept[m]) {
                let count = sel.next(&keys[m][..len], idx);
                for &i in &idx[..count] {
                    let (d2, rel) = (d2[i as usize], rel[i as usize]);
                    k.d2 += d2;
                    k.count += 1;
                    if rel.is_finite() {
                        k.rel += rel as f64;
                        k.rel_n += 1;
                    }
                }
            }
        }
    });
    TensorStats { name: pair.name.clone(), n, candidates, total_d2, mean, kept, map_cut }
}

/// `d^2` (0 where `d` is not finite) and `|d| / |pre|` of every position of a chunk, from
/// the values the scores are computed from.
fn changes<F: Elem, B: Elem>(ft: &[u8], base: &[u8], d2: &mut [f64], rel: &mut [f32]) {
    for (i, (d2, rel)) in d2.iter_mut().zip(rel.iter_mut()).enumerate() {
        let (f, p) = (F::to_f32(F::bits(ft, i)), B::to_f32(B::bits(base, i)));
        let d = f - p;
        *d2 = if d.is_finite() { (d as f64) * (d as f64) } else { 0.0 };
        *rel = d.abs() / p.abs();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fapm_stages::score::key;

    fn histogram(scores: &[f32]) -> Histogram {
        let keys: Vec<u32> = scores.iter().map(|&s| key(s)).collect();
        let mut h = Histogram::default();
        h.add_high(&keys);
        h
    }

    #[test]
    fn selections_keep_the_top_k_in_index_order() {
        let scores = [1.0f32, 4.0, 2.0, 3.0];
        let keys: Vec<u32> = scores.iter().map(|&s| key(s)).collect();
        let h = histogram(&scores);
        assert_eq!(approx_cut(&h, 0), Cut::Nothing);
        assert_eq!(approx_cut(&h, 4), Cut::All);
        let mut kept = [0u32; 4];
        let n = Selection::new(approx_cut(&h, 2)).next(&keys, &mut kept);
        assert_eq!(&kept[..n], [1, 3]);
    }

    #[test]
    fn a_shared_bin_is_filled_in_index_order_across_chunks() {
        // Four equal scores, two kept: the first two positions, whichever chunk they are in.
        let keys = [key(1.0); 4];
        let h = histogram(&[1.0; 4]);
        let mut sel = Selection::new(approx_cut(&h, 2));
        let mut kept = [0u32; 2];
        assert_eq!(sel.next(&keys[..1], &mut kept), 1);
        assert_eq!(sel.next(&keys[1..3], &mut kept), 1);
        assert_eq!(kept[0], 0);
        assert_eq!(sel.next(&keys[3..], &mut kept), 0);
    }
}

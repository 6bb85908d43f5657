//! The streaming passes behind the report: the FAPM base mean, and one pass per tensor that
//! bins every candidate by the high 16 bits of its order-preserving score key, for both
//! metrics at once, so that what survives at any sparsity can be read off the bins.
//!
//! Reading a keep count off the bins is exact except inside the one boundary bin, which is
//! taken pro rata (its entries are within 2^-7 relative of each other): good enough for a
//! chart, and documented in the report.

use fapm_stages::checkpoint::TensorRef;
use fapm_stages::dtype::DType;
use fapm_stages::score::{convert, key, mean_abs, score, sum_abs, Elem, Metric};
use fapm_stages::threshold::Sparsity;
use fapm_stages::with_elems;

/// Elements per chunk: no pass ever looks at more of a tensor at once.
pub const CHUNK: usize = 1 << 20;

/// The sparsities the charts compare, as exact decimals.
pub const SPARSITIES: [&str; 5] = ["0.5", "0.75", "0.9", "0.95", "0.99"];

/// The sparsity whose kept positions the heatmaps show.
pub const MAP_SPARSITY: &str = "0.9";

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
}

/// What one metric keeps of one tensor at one sparsity.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Kept {
    /// Sum of `d^2` over kept positions (finite `d` only).
    pub d2: f64,
    /// Sum of `|d| / |pre|` over kept positions where it is finite.
    pub rel: f64,
    /// How many kept positions have a finite `|d| / |pre|`.
    pub rel_n: f64,
    /// How many positions are kept.
    pub count: f64,
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
        if self.rel_n > 0.0 {
            self.rel / self.rel_n
        } else {
            f64::NAN
        }
    }
}

/// Which candidates of a tensor one metric keeps at [`MAP_SPARSITY`], to bin precision:
/// every key whose high 16 bits exceed `bin`, and a `frac` share of those equal to it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BinCut {
    /// The boundary bin (`u32::MAX` when nothing is kept, 0 when everything is).
    pub bin: u32,
    /// The share of the boundary bin that is kept.
    pub frac: f64,
}

impl BinCut {
    /// How much of a candidate with this key is kept (0, 1, or the boundary share).
    #[inline]
    pub fn weight(&self, key: u32) -> f64 {
        let b = key >> 16;
        if b > self.bin {
            1.0
        } else if b == self.bin {
            self.frac
        } else {
            0.0
        }
    }
}

/// Candidates of one tensor binned by the high 16 bits of one metric's score key.
pub struct KeyBins {
    count: Vec<u64>,
    d2: Vec<f64>,
    rel: Vec<f64>,
    rel_n: Vec<u64>,
}

impl Default for KeyBins {
    fn default() -> Self {
        KeyBins { count: vec![0; 1 << 16], d2: vec![0.0; 1 << 16], rel: vec![0.0; 1 << 16], rel_n: vec![0; 1 << 16] }
    }
}

impl KeyBins {
    /// Empties every bin, keeping the allocation.
    pub fn clear(&mut self) {
        self.count.fill(0);
        self.d2.fill(0.0);
        self.rel.fill(0.0);
        self.rel_n.fill(0);
    }

    #[inline]
    fn add(&mut self, key: u32, d2: f64, rel: f32) {
        let b = (key >> 16) as usize;
        self.count[b] += 1;
        self.d2[b] += d2;
        if rel.is_finite() {
            self.rel[b] += rel as f64;
            self.rel_n[b] += 1;
        }
    }

    /// What keeping the `k` highest-scoring candidates keeps (boundary bin pro rata).
    pub fn kept(&self, k: u64) -> Kept {
        let mut out = Kept::default();
        let mut left = k;
        for b in (0..self.count.len()).rev() {
            let c = self.count[b];
            if c == 0 {
                continue;
            }
            if left == 0 {
                break;
            }
            let share = if c <= left { 1.0 } else { left as f64 / c as f64 };
            out.d2 += self.d2[b] * share;
            out.rel += self.rel[b] * share;
            out.rel_n += self.rel_n[b] as f64 * share;
            out.count += c as f64 * share;
            left -= c.min(left);
        }
        out
    }

    /// The cut that keeps the `k` highest-scoring candidates.
    pub fn cut(&self, k: u64) -> BinCut {
        let mut left = k;
        if left == 0 {
            return BinCut { bin: u32::MAX, frac: 0.0 };
        }
        for b in (0..self.count.len()).rev() {
            let c = self.count[b];
            if c >= left {
                return BinCut { bin: b as u32, frac: left as f64 / c as f64 };
            }
            left -= c;
        }
        BinCut { bin: 0, frac: 1.0 }
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
    pub map_cut: [BinCut; 2],
}

/// Scratch bins for [`tensor_stats`], reused from tensor to tensor (4 MiB).
#[derive(Default)]
pub struct Scratch {
    bins: [KeyBins; 2],
}

/// Two streaming passes over one pair (base mean, then bins), reduced to the numbers the
/// charts need at each of `sparsities`.
pub fn tensor_stats(pair: &Pair, sparsities: &[Sparsity], scratch: &mut Scratch) -> TensorStats {
    let mean = pair.base_mean();
    let (ftd, based) = pair.dtypes();
    for b in &mut scratch.bins {
        b.clear();
    }
    let (mut candidates, mut total_d2) = (0u64, 0f64);
    pair.for_chunks(|_, ft, base| {
        let [mag, fapm] = &mut scratch.bins;
        let (c, d2) = with_elems!(ftd, based, |F, B| bin_chunk::<F, B>(ft, base, mean, mag, fapm));
        candidates += c;
        total_d2 += d2;
    });
    let n = pair.numel();
    let kept_of = |bins: &KeyBins| -> Vec<Kept> { sparsities.iter().map(|s| bins.kept(s.keep_count(n))).collect() };
    let map_k = Sparsity::parse(MAP_SPARSITY).expect("constant sparsity").keep_count(n);
    TensorStats {
        name: pair.name.clone(),
        n,
        candidates,
        total_d2,
        mean,
        kept: [kept_of(&scratch.bins[0]), kept_of(&scratch.bins[1])],
        map_cut: [scratch.bins[0].cut(map_k), scratch.bins[1].cut(map_k)],
    }
}

fn bin_chunk<F: Elem, B: Elem>(ft: &[u8], base: &[u8], mean: f32, mag: &mut KeyBins, fapm: &mut KeyBins) -> (u64, f64) {
    let n = ft.len() / F::SIZE;
    let (mut candidates, mut total) = (0u64, 0f64);
    for i in 0..n {
        let fb = F::bits(ft, i);
        let bb = B::bits(base, i);
        if fb == convert::<F, B>(bb) {
            continue;
        }
        let (f, p) = (F::to_f32(fb), B::to_f32(bb));
        let d = f - p;
        let d2 = if d.is_finite() { (d as f64) * (d as f64) } else { 0.0 };
        let rel = d.abs() / p.abs();
        candidates += 1;
        total += d2;
        mag.add(key(score(Metric::Magnitude, f, p, mean)), d2, rel);
        fapm.add(key(score(Metric::Fapm, f, p, mean)), d2, rel);
    }
    (candidates, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_keep_the_top_k() {
        let mut bins = KeyBins::default();
        for (s, d) in [(4.0f32, 4.0f32), (3.0, 3.0), (2.0, 2.0), (1.0, 1.0)] {
            bins.add(key(s), (d * d) as f64, d);
        }
        assert_eq!(bins.kept(0), Kept::default());
        let two = bins.kept(2);
        assert_eq!((two.d2, two.rel, two.count), (25.0, 7.0, 2.0));
        assert_eq!(bins.kept(9).d2, 30.0);
        assert!((two.norm_fraction(30.0) - (25.0f64 / 30.0).sqrt()).abs() < 1e-12);
        let cut = bins.cut(2);
        assert_eq!(cut.weight(key(3.0)), 1.0);
        assert_eq!(cut.weight(key(2.0)), 0.0);
        assert_eq!(bins.cut(0).weight(key(4.0)), 0.0);
        assert_eq!(bins.cut(10).weight(key(1.0)), 1.0);
    }

    #[test]
    fn a_shared_bin_is_taken_pro_rata() {
        let mut bins = KeyBins::default();
        bins.add(key(1.0), 1.0, 1.0);
        bins.add(key(1.0), 3.0, f32::INFINITY);
        let k = bins.kept(1);
        assert_eq!((k.d2, k.rel, k.rel_n, k.count), (2.0, 0.5, 0.5, 1.0));
        assert_eq!(bins.cut(1).frac, 0.5);
    }
}

//! The report's numbers, computed the way `prune --threshold approx` chooses: each penalty
//! strength's score keys are counted into the threshold's own [`Histogram`],
//! [`threshold::plan`] makes the cut for each charted sparsity, and a last pass sums what
//! every cut keeps, selected by [`Cut::select`] as the mask stage selects. The curves are
//! therefore what prune keeps, not an estimate from the bins.
//!
//! Every pass streams the memory-mapped tensors in chunks of [`CHUNK`] elements; what stays
//! per tensor is two histograms and a few numbers.
//!
//! The measures are extensive (sums over the kept positions, which add up over tensors and grow
//! as more is kept), so the whole model's numbers are the sums of its tensors' and a point can
//! be compared with another of a different sparsity: the task vector's energy `sum dW^2`, the
//! forgetting proxy `sum min(|dW| / |W_base|, 1)^2` (docs/PIPELINE.md, "report"), and the delta's bytes,
//! measured by encoding sampled chunks' kept positions as prune encodes them.

use std::convert::Infallible;

use fapm_stages::checkpoint::TensorRef;
use fapm_stages::dtype::{convert_chunk, DType, Elem};
use fapm_stages::format::{compress, sparse::encode_sparse, Payload};
use fapm_stages::read::{self, PairReader};
use fapm_stages::threshold::score::{mean_abs, sum_abs, Metric, Scorer, NOT_CANDIDATE};
use fapm_stages::threshold::select::{self, Cut, Histogram, Sparsity, ThresholdMode};
use fapm_stages::with_elems;

/// Elements per chunk: the per-chunk buffers (keys, kept indices, changes) stay within the
/// L2 cache of most machines.
pub const CHUNK: usize = 1 << 16;

/// The sparsities the charts compare, as exact decimals.
pub const SPARSITIES: [&str; 5] = ["0.5", "0.75", "0.9", "0.95", "0.99"];

/// The sparsity whose kept positions the heatmaps show.
pub const MAP_SPARSITY: &str = "0.9";

/// The penalty strengths λ the charts compare (SPEC section 3, `S = |dW| - λ t`), as the
/// decimals `--penalty` takes: 0 is magnitude pruning bit for bit, 1 the paper's FAPM.
pub const PENALTIES: [&str; 5] = ["0", "0.25", "0.5", "1", "2"];

/// The strengths the heatmaps' kept maps compare: magnitude and the paper's metric, as
/// indices into [`PENALTIES`].
pub const MAP_PENALTIES: [usize; 2] = [0, 3];

/// [`PENALTIES`] as the f32 the scorer multiplies by.
pub fn penalties() -> Vec<f32> {
    PENALTIES.iter().map(|l| crate::config::penalty(l).expect("constant penalty").value).collect()
}

/// Every [`BYTE_SAMPLE`]-th chunk of a tensor (the first always) has its kept positions
/// encoded and compressed as prune's encoder does, to measure the delta's bytes per kept value.
pub const BYTE_SAMPLE: u64 = 8;

/// A sampled chunk with fewer kept positions than this is counted at its encoded length,
/// uncompressed (zstd gains little on a few bytes; it saves a compression per tiny tensor).
pub const COMPRESS_MIN_KEPT: usize = 1024;

/// A floating tensor present in both checkpoints (any rank, 1-D norms and biases included),
/// with the same shape or with rows appended to the fine-tuned one (an extended tensor, SPEC
/// section 2): what is charted is the base-shaped part, the part that prune scores. `rows` is
/// its first dimension and `cols` the product of the others (1 x n for a 1-D tensor).
#[derive(Clone)]
pub struct Pair {
    /// Its name.
    pub name: String,
    /// The fine-tuned tensor.
    pub ft: TensorRef,
    /// The base tensor.
    pub base: TensorRef,
    /// Rows (outer dimension) of the base, the rows charted.
    pub rows: u64,
    /// Rows the fine-tuned tensor appends (0 unless extended): stored whole by prune.
    pub appended_rows: u64,
    /// Columns (the product of the inner dimensions).
    pub cols: u64,
    /// Its rank (the heatmaps draw 2-D tensors only).
    pub rank: usize,
}

impl Pair {
    /// The number of elements charted (the base's).
    pub fn numel(&self) -> u64 {
        self.rows * self.cols
    }

    /// Calls `f(first_element, ft_bytes, base_bytes)` for consecutive chunks of the charted
    /// part, read by the shard reader's [`PairReader`] as prune reads them.
    pub fn for_chunks(&self, mut f: impl FnMut(u64, &[u8], &[u8])) {
        let reader = PairReader::new(&self.ft, &self.base);
        for chunk in read::chunks(self.numel(), CHUNK as u64) {
            let (ft, base) = reader.chunk(chunk);
            f(chunk.start as u64, ft, base);
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

    /// A scorer of this pair for each penalty strength, given the FAPM mean.
    pub fn scorers(&self, mean: f32, penalties: &[f32]) -> Vec<Scorer> {
        let (ft, base) = self.dtypes();
        penalties.iter().map(|&penalty| Scorer { ft, base, metric: Metric::Fapm, mean, penalty }).collect()
    }
}

/// What one penalty strength keeps of one tensor (or of the whole model) at one sparsity.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Kept {
    /// Sum of `d^2` over kept positions (finite `d` only): the task-vector energy kept.
    pub d2: f64,
    /// Sum of `min(|d| / |pre|, 1)^2` over kept positions: the forgetting proxy kept.
    pub rel2: f64,
    /// How many positions are kept.
    pub count: u64,
    /// Kept positions in the chunks whose bytes were measured.
    pub sampled: u64,
    /// What those chunks' kept positions took, encoded (and compressed) as prune does.
    pub sampled_bytes: u64,
}

impl Kept {
    /// Adds another tensor's numbers (the whole-model totals).
    pub fn add(&mut self, o: &Kept) {
        self.d2 += o.d2;
        self.rel2 += o.rel2;
        self.count += o.count;
        self.sampled += o.sampled;
        self.sampled_bytes += o.sampled_bytes;
    }

    /// Counts one kept position with its `d^2` and squared relative change.
    pub fn add_position(&mut self, d2: f64, rel2: f64) {
        self.d2 += d2;
        self.rel2 += rel2;
        self.count += 1;
    }

    /// `part / whole`, or None when the whole is 0 (an unchanged tensor).
    pub fn share(part: f64, whole: f64) -> Option<f64> {
        (whole > 0.0).then(|| (part / whole).min(1.0))
    }

    /// The measured bytes per kept value (None when no kept value was measured).
    pub fn bytes_per_value(&self) -> Option<f64> {
        (self.sampled > 0).then(|| self.sampled_bytes as f64 / self.sampled as f64)
    }
}

/// The cut `prune --threshold approx` makes to keep `k` of the candidates counted in `high`.
pub fn approx_cut(high: &Histogram, k: u64) -> Cut {
    // Approx mode only ever asks for the high-bits histogram, which is already counted.
    let planned = select::plan(k, ThresholdMode::Approx, 1, |_| Ok::<_, Infallible>(Histogram::default().merge(high)));
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
        let quota = select::quotas([at_level], &mut self.quota)[0];
        self.at_level_left -= at_level;
        self.cut.select(keys, quota, Some(at_level), kept)
    }
}

/// The report's numbers for one tensor: totals, and what each penalty strength keeps.
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
    /// The forgetting proxy over every candidate (what sparsity 0 keeps).
    pub total_rel2: f64,
    /// The FAPM mean `mean(|W_base|)`.
    pub mean: f32,
    /// `kept[l][i]`: what strength `PENALTIES[l]` keeps at sparsity `sparsities[i]`.
    pub kept: Vec<Vec<Kept>>,
    /// The cut of each of [`MAP_PENALTIES`] at [`MAP_SPARSITY`].
    pub map_cut: [Cut; 2],
}

/// Per-chunk buffers, reused from chunk to chunk and tensor to tensor.
pub struct Scratch {
    /// Score keys of each scorer ([`NOT_CANDIDATE`] where nothing changed); a buffer is
    /// added the first time a pass has more scorers than there are buffers.
    pub keys: Vec<Vec<u32>>,
    /// Chunk-relative indices of kept positions.
    pub kept: Vec<u32>,
    d2: Vec<f64>,
    rel2: Vec<f64>,
    /// The chunk's base converted to the fine-tuned dtype, and the encoded block: for
    /// measuring bytes.
    out: Vec<u8>,
    /// The converted base, kept as it is while `out` is written over for each cut.
    conv: Vec<u8>,
    raw: Vec<u8>,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            keys: Vec::new(),
            kept: vec![0; CHUNK],
            d2: vec![0.0; CHUNK],
            rel2: vec![0.0; CHUNK],
            out: Vec::new(),
            conv: Vec::new(),
            raw: Vec::new(),
        }
    }
}

/// What a [`Scratch`] holds at most, in bytes, with `scorers` key buffers (for the memory
/// budget): keys, kept indices, changes, the converted chunk and the encoded block.
pub fn scratch_bytes(scorers: usize) -> u64 {
    CHUNK as u64 * (4 * scorers as u64 + 4 + 8 + 8 + 8 + 8 + 10 + 8 * 2)
}

impl Scratch {
    /// Scores one chunk with every scorer into [`Scratch::keys`]; returns the chunk length
    /// and its number of candidates (the same for every scorer: the positions that changed).
    pub fn score(&mut self, scorers: &[Scorer], ft: &[u8], base: &[u8]) -> (usize, u64) {
        let len = ft.len() / scorers[0].ft.size();
        if self.keys.len() < scorers.len() {
            self.keys.resize_with(scorers.len(), || vec![0; CHUNK]);
        }
        let mut candidates = 0;
        for (scorer, keys) in scorers.iter().zip(&mut self.keys) {
            candidates = scorer.keys(ft, base, &mut keys[..len]);
        }
        (len, candidates as u64)
    }
}

/// Three streaming passes over one pair (base mean, histograms, kept sums), reduced to the
/// numbers the charts need for each of [`PENALTIES`] at each of `sparsities`.
pub fn tensor_stats(pair: &Pair, sparsities: &[Sparsity], scratch: &mut Scratch) -> TensorStats {
    let mean = pair.base_mean();
    let scorers = pair.scorers(mean, &penalties());
    let (high, candidates) = histograms(pair, &scorers, scratch);
    let n = pair.numel();
    let cuts: Vec<Vec<Cut>> =
        high.iter().map(|h| sparsities.iter().map(|s| approx_cut(h, s.keep_count(n))).collect()).collect();
    let map_k = Sparsity::parse(MAP_SPARSITY).expect("constant sparsity").keep_count(n);
    let map_cut = MAP_PENALTIES.map(|l| approx_cut(&high[l], map_k));
    drop(high);
    let (kept, total_d2, total_rel2) = kept_sums(pair, &scorers, cuts, scratch);
    TensorStats { name: pair.name.clone(), n, candidates, total_d2, total_rel2, mean, kept, map_cut }
}

/// The first pass: each scorer's keys counted into a histogram of their high bits, as
/// `prune --threshold approx` counts them; and the number of candidates.
fn histograms(pair: &Pair, scorers: &[Scorer], scratch: &mut Scratch) -> (Vec<Histogram>, u64) {
    let mut high: Vec<Histogram> = scorers.iter().map(|_| Histogram::default()).collect();
    let mut candidates = 0;
    pair.for_chunks(|_, ft, base| {
        let (len, c) = scratch.score(scorers, ft, base);
        for (h, keys) in high.iter_mut().zip(&scratch.keys) {
            h.add_high(&keys[..len]);
        }
        candidates += c;
    });
    (high, candidates)
}

/// The last pass: what each scorer's cuts keep (`cuts[l][i]`: strength `l`, sparsity `i`),
/// selected as the mask stage selects, with the bytes of sampled chunks measured; and the
/// totals over every candidate (`sum d^2` and the forgetting proxy).
fn kept_sums(
    pair: &Pair,
    scorers: &[Scorer],
    cuts: Vec<Vec<Cut>>,
    scratch: &mut Scratch,
) -> (Vec<Vec<Kept>>, f64, f64) {
    let mut kept: Vec<Vec<Kept>> = cuts.iter().map(|c| vec![Kept::default(); c.len()]).collect();
    let mut selections: Vec<Vec<Selection>> =
        cuts.into_iter().map(|c| c.into_iter().map(Selection::new).collect()).collect();
    let (ftd, based) = pair.dtypes();
    let (mut total_d2, mut total_rel2) = (0.0, 0.0);
    let mut chunk = 0u64;
    pair.for_chunks(|_, ft, base| {
        let (len, _) = scratch.score(scorers, ft, base);
        let sampled = chunk.is_multiple_of(BYTE_SAMPLE);
        chunk += 1;
        let Scratch { keys, kept: idx, d2, rel2, out, conv, raw } = scratch;
        with_elems!(ftd, based, |F, B| changes::<F, B>(ft, base, &mut d2[..len], &mut rel2[..len]));
        for (i, &k) in keys[0][..len].iter().enumerate() {
            if k != NOT_CANDIDATE {
                total_d2 += d2[i];
                total_rel2 += rel2[i];
            }
        }
        if sampled {
            out.resize(ft.len(), 0);
            conv.resize(ft.len(), 0);
            convert_chunk(ftd, based, base, conv);
        }
        for ((keys, sels), kept) in keys.iter().zip(&mut selections).zip(&mut kept) {
            for (sel, k) in sels.iter_mut().zip(kept) {
                let count = sel.next(&keys[..len], idx);
                for &i in &idx[..count] {
                    k.add_position(d2[i as usize], rel2[i as usize]);
                }
                if sampled && count > 0 {
                    // The encoder writes the kept values over the base: from the base each time.
                    out.copy_from_slice(conv);
                    k.sampled += count as u64;
                    k.sampled_bytes += encoded_len(&idx[..count], ft, out, ftd.size(), raw);
                }
            }
        }
    });
    (kept, total_d2, total_rel2)
}

/// The bytes prune's encoder writes for the kept positions `kept` of a chunk: the sparse block,
/// compressed as prune compresses it (uncompressed below [`COMPRESS_MIN_KEPT`] positions).
fn encoded_len(kept: &[u32], ft: &[u8], out: &mut [u8], size: usize, raw: &mut Vec<u8>) -> u64 {
    encode_sparse(kept, ft, out, size, raw);
    if kept.len() < COMPRESS_MIN_KEPT {
        return raw.len() as u64;
    }
    compress(raw, Payload::Sparse).map_or(raw.len(), |z| z.len().min(raw.len())) as u64
}

/// `d^2` and the saturated squared relative change `min(|d| / |pre|, 1)^2` (both 0 where `d`
/// is not finite; 1 for a change to a base weight of 0) of every position of a chunk, from the
/// values the scores are computed from.
fn changes<F: Elem, B: Elem>(ft: &[u8], base: &[u8], d2: &mut [f64], rel2: &mut [f64]) {
    for (i, (d2, rel2)) in d2.iter_mut().zip(rel2.iter_mut()).enumerate() {
        let (f, p) = (F::to_f32(F::bits(ft, i)), B::to_f32(B::bits(base, i)));
        let d = f - p;
        (*d2, *rel2) = if d.is_finite() { ((d as f64) * (d as f64), saturated_rel2(d, p)) } else { (0.0, 0.0) };
    }
}

/// `min(|d| / |pre|, 1)^2`: a change as large as the base weight it modifies (or larger, or to
/// a weight of 0) counts 1, the most one position can count; no change counts 0.
pub fn saturated_rel2(d: f32, pre: f32) -> f64 {
    let (d, pre) = ((d as f64).abs(), (pre as f64).abs());
    if d == 0.0 {
        0.0
    } else if d >= pre {
        1.0
    } else {
        (d / pre) * (d / pre)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fapm_stages::threshold::score::key;

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

//! The streaming score with a quantile threshold: for each pruned tensor, the cut, which of
//! its candidates the masker keeps (SPEC section 3), found in a few streaming passes over the
//! memory-mapped pair. Each pass computes every chunk's task vector and scores on the worker
//! pool (`Scorer` in `score.rs`) and counts the keys into histograms; the
//! selection logic is `crate::threshold::select::plan`, which asks for the passes:
//!
//! 1. the FAPM mean `A` (FAPM only): one pass over the base;
//! 2. the floor: a strided sample's histogram guesses a key a little below the cut;
//! 3. the high pass: the keys at or above the floor, counted by their high 16 bits and
//!    gathered with their indices as hits (as far as the budget holds them);
//! 4. the low pass (exact mode, only part of the boundary bin kept): the boundary bin's keys
//!    counted by their low 16 bits, from the hits where they were kept.
//!
//! Input: [`Task`]s in output order. Output: [`ThresholdedTask`] tensors in the same order.

pub mod hits;
pub mod pack;
pub mod score;
pub mod select;

use std::time::{Duration, Instant};

use crate::dtype::DType;
use crate::format::sparse::PIECE_BYTES;
use crate::format::Mode;
use crate::hash::{ChunkHash, ChunkHasher};
use crate::{Error, Result};
use crossbeam_channel::Sender;
use rayon::prelude::*;
use score::{mean_abs, AbsSum, Metric, Scorer};
use select::{floor, plan, Bins, Cut, Gather, Histogram, Hits, ThresholdMode};

use crate::read::{chunks, Chunk, PairReader, Task, TensorReader};
use crate::run::RunControl;
use hits::{HeldHits, HitPool};

/// A task with its cut decided: the threshold stage's output.
pub struct ThresholdedTask<'p> {
    /// The tensor.
    pub task: Task,
    /// How its positions are scored (`None` for a whole tensor).
    pub scorer: Option<Scorer>,
    /// Which candidates are kept.
    pub cut: Cut,
    /// What the high pass learnt of each chunk (empty when it did not run).
    pub chunks: Vec<ChunkScan<'p>>,
    /// The blake3 of each chunk of the base tensor, computed by the mean's pass as it read
    /// them (empty when it did not run: the encoder then hashes the base chunks itself).
    /// 33 bytes per chunk, for the two or three tensors in flight: less than the block
    /// records that the budget charges for every tensor (as for `chunks`).
    pub base_hashes: Vec<ChunkHash>,
}

impl ThresholdedTask<'_> {
    /// A task whose cut needs no pass over the maps (whole, dense, or nothing kept).
    fn without_passes(task: Task, scorer: Option<Scorer>, cut: Cut) -> Self {
        ThresholdedTask { task, scorer, cut, chunks: Vec::new(), base_hashes: Vec::new() }
    }
}

/// What the high pass learnt of one chunk.
pub struct ChunkScan<'p> {
    /// The chunk's candidates.
    pub candidates: u64,
    /// The chunk's candidates from the last floor up, when the budget had room for them:
    /// the masker then selects from them instead of scoring the chunk again.
    pub hits: Option<HeldHits<'p>>,
}

/// Elements per piece of the floor-guessing sample, and the stride between pieces.
const SAMPLE_PIECE: usize = 64;
const SAMPLE_STRIDE: usize = 31;
/// How many sample pieces ahead their lines are asked for.
const SAMPLE_AHEAD: usize = 4;
/// The fewest sample pieces one worker scores into a histogram of its own (160 pieces, 10 Ki
/// keys): a histogram costs 512 KiB to zero and to merge, about what scoring 10 Ki keys costs,
/// so a small tensor's sample is not split.
const SAMPLE_MIN_PIECES: usize = 160;
/// The size from which a tensor is sampled (smaller ones gather every candidate), or four
/// blocks when the blocks are smaller (in tests).
const SAMPLE_MIN: u64 = 1 << 16;

thread_local! {
    /// Where a high pass gathers a chunk's hits before the pool is asked for a buffer.
    static GATHER: std::cell::Cell<Gather> = std::cell::Cell::new(Gather::default());
}

/// The threshold stage: one thread, its per-chunk work on the worker pool.
pub struct ThresholdStage<'a> {
    /// The metric.
    pub metric: Metric,
    /// The FAPM penalty strength `l` (1: the paper's metric).
    pub penalty: f32,
    /// Exact or approximate cut.
    pub mode: ThresholdMode,
    /// Elements per chunk.
    pub block_elems: u64,
    /// Worker threads (sets how finely passes are split).
    pub threads: usize,
    /// The worker pool.
    pub pool: &'a rayon::ThreadPool,
    /// Where gathered hits are kept.
    pub hits: &'a HitPool,
    /// Cancellation.
    pub ctl: &'a RunControl,
}

impl<'a> ThresholdStage<'a> {
    /// Decides the cut of every task, in order, and sends it on.
    pub fn run(self, input: impl IntoIterator<Item = Task>, output: Sender<ThresholdedTask<'a>>) -> Result<()> {
        // How long this stage waits for the mask + encode stage: where the time goes (`-v`).
        let mut blocked = Duration::ZERO;
        for task in input {
            self.ctl.check()?;
            let thresholded = self.threshold(task)?;
            let t0 = Instant::now();
            let sent = output.send(thresholded);
            blocked += t0.elapsed();
            if sent.is_err() {
                return Ok(()); // downstream has gone; it reports why
            }
        }
        tracing::debug!(?blocked, "threshold stage waited for the encoder");
        Ok(())
    }

    /// One tensor's cut: whole tensors keep everything, dense ones every candidate, pruned
    /// ones what the passes find.
    fn threshold(&self, task: Task) -> Result<ThresholdedTask<'a>> {
        let Some(base) = &task.base else {
            return Ok(ThresholdedTask::without_passes(task, None, Cut::All));
        };
        let (fi, bi) = (task.ft.info(), base.info());
        let mut scorer = Scorer { ft: fi.dtype, base: bi.dtype, metric: self.metric, mean: 0.0, penalty: self.penalty };
        if task.mode == Mode::Dense || task.keep == 0 {
            let cut = if task.mode == Mode::Dense { Cut::All } else { Cut::Nothing };
            return Ok(ThresholdedTask::without_passes(task, Some(scorer), cut));
        }
        // An extended tensor's appended rows are not scored: the passes go over the elements
        // it shares with its base.
        let n = task.diffed;
        let pair = PairReader::new(&task.ft, base);
        let chunks = chunks(n, self.block_elems);
        let mut base_hashes = Vec::new();
        if self.metric == Metric::Fapm && self.penalty != 0.0 {
            (scorer.mean, base_hashes) = self.fapm_mean(pair.base, bi.dtype, &chunks, n);
        }
        let floor = self.sample_floor(pair, scorer, task.keep, n);
        // Room to gather a chunk's hits: twice the kept fraction, as the floor aims at 1.125 k
        // (a chunk with more is counted but scored again by the masker).
        let room = (self.block_elems as u128 * 2 * task.keep as u128 / n as u128) as usize + 4096;
        // The room the hits are likely to take (about 1.2 k from a floor, every candidate
        // without one; a quarter more for the buffers' size classes), or the whole pool.
        let expected = if floor > 1 { task.keep + task.keep / 5 } else { n };
        self.hits.wait_for_room(Hits::bytes_for(expected as usize) / 4 * 5, self.ctl)?;
        let (mut scans, mut passes) = (Vec::new(), Vec::new());
        let cut = plan(task.keep, self.mode, floor, |bins| {
            self.ctl.check()?;
            passes.push(bins);
            Ok::<_, Error>(match bins {
                Bins::High { floor } => self.high_pass(pair, scorer, &chunks, floor, room, &mut scans),
                Bins::Low { bin } => self.low_pass(pair, scorer, &chunks, &scans, bin),
            })
        })?;
        let gathered = scans.iter().filter(|p| p.hits.is_some()).count();
        let hits: usize = scans.iter().filter_map(|p| p.hits.as_ref()).map(|h| h.hits.len()).sum();
        tracing::debug!(tensor = %fi.name, ?passes, floor, gathered, hits, keep = task.keep, chunks = chunks.len(), mean = scorer.mean, ?cut, "thresholded");
        Ok(ThresholdedTask { task, scorer: Some(scorer), cut, chunks: scans, base_hashes })
    }

    /// The FAPM mean `A = f32(sum_f64 |pre| / n)`: per-chunk partial sums added in chunk
    /// order, so that it does not depend on the number of threads. As this pass is the first
    /// to read the base tensor whole, it also hashes each chunk, a cache-sized piece at a time
    /// before summing it: blake3's work hides the wait for memory that the sum alone would
    /// spend, and the encoder does not read the base for its hash again.
    fn fapm_mean(&self, base: TensorReader, dtype: DType, chunks: &[Chunk], n: u64) -> (f32, Vec<ChunkHash>) {
        let parts: Vec<(f64, ChunkHash)> = self.pool.install(|| {
            chunks
                .par_iter()
                .map(|&c| {
                    let mut hash = ChunkHasher::new((c.start * dtype.size()) as u64, chunks.len());
                    let mut sum = AbsSum::default();
                    for piece in base.chunk(c).chunks(PIECE_BYTES) {
                        hash.update(piece);
                        sum.add(dtype, piece);
                    }
                    (sum.total(), hash.finish())
                })
                .collect()
        });
        let (partials, hashes): (Vec<f64>, Vec<ChunkHash>) = parts.into_iter().unzip();
        (mean_abs(partials, n), hashes)
    }

    /// A floor a little below the cut, guessed from a strided sample (1/31 of the tensor),
    /// so that the high pass gathers only the candidates that can be kept (about 1.25 k);
    /// 1 (every candidate) for tensors too small to sample.
    fn sample_floor(&self, pair: PairReader, scorer: Scorer, keep: u64, n: u64) -> u32 {
        if n < SAMPLE_MIN.min(4 * self.block_elems) {
            return 1;
        }
        // In parallel: the sample is the first to touch the fine-tuned tensor's pages.
        let step = SAMPLE_PIECE * SAMPLE_STRIDE;
        let pieces = (n as usize).div_ceil(step);
        let (sample, sample_n) = self.pool.install(|| {
            (0..pieces)
                .into_par_iter()
                .map(|p| p * step)
                .with_min_len((pieces / (2 * self.threads.max(1))).max(SAMPLE_MIN_PIECES))
                .fold(
                    || (Histogram::default(), 0u64),
                    |(mut h, m), start| {
                        let piece = Chunk { start, len: SAMPLE_PIECE.min(n as usize - start) };
                        let ahead = start + SAMPLE_AHEAD * step;
                        if ahead + SAMPLE_PIECE <= n as usize {
                            let (ft, base) = pair.chunk(Chunk { start: ahead, len: SAMPLE_PIECE });
                            crate::simd::prefetch(ft);
                            crate::simd::prefetch(base);
                        }
                        let (ft, base) = pair.chunk(piece);
                        scorer.for_each_keys(ft, base, |_, keys| h.add_high(keys));
                        (h, m + piece.len as u64)
                    },
                )
                .reduce_with(|(a, m), (b, k)| (a.merge(&b), m + k))
                .unwrap_or_default()
        });
        floor(keep, n, &sample, sample_n)
    }

    /// The fewest chunks one worker takes at a time in a pass.
    fn min_chunks(&self, chunks: &[Chunk]) -> usize {
        (chunks.len() / (2 * self.threads.max(1))).max(1)
    }

    /// The high pass: counts the high 16 bits of every key from `floor` up, and replaces
    /// `scans` with what it learnt of each chunk, its hits kept where the pool has room.
    fn high_pass(
        &self,
        pair: PairReader,
        scorer: Scorer,
        chunks: &[Chunk],
        floor: u32,
        room: usize,
        scans: &mut Vec<ChunkScan<'a>>,
    ) -> Histogram {
        scans.clear(); // gives the previous pass's hits back first
        let pool: &'a HitPool = self.hits;
        let (high, mut gathered) = self.pool.install(|| {
            chunks
                .par_iter()
                .enumerate()
                .with_min_len(self.min_chunks(chunks))
                .fold(
                    || (Histogram::default(), Vec::new()),
                    |(mut high, mut gathered), (i, &chunk)| {
                        let (ft, base) = pair.chunk(chunk);
                        let mut g = GATHER.take();
                        g.start(room.min(chunk.len));
                        let candidates = scorer.for_each_keys(ft, base, |at, keys| g.add(keys, floor, at, &mut high));
                        let hits = if g.finish(&mut high) { pool.hold(&g) } else { None };
                        GATHER.set(g);
                        gathered.push((i, ChunkScan { candidates, hits }));
                        (high, gathered)
                    },
                )
                .reduce_with(|(a, mut ga), (b, gb)| {
                    ga.extend(gb);
                    (a.merge(&b), ga)
                })
                .unwrap_or_default()
        });
        gathered.sort_unstable_by_key(|g| g.0);
        scans.extend(gathered.into_iter().map(|g| g.1));
        high
    }

    /// The low pass: counts the low 16 bits of the keys in the boundary `bin`, from each
    /// chunk's hits where they were kept, else from its keys computed again.
    fn low_pass(&self, pair: PairReader, scorer: Scorer, chunks: &[Chunk], scans: &[ChunkScan], bin: u32) -> Histogram {
        self.pool.install(|| {
            chunks
                .par_iter()
                .zip(scans)
                .with_min_len(self.min_chunks(chunks))
                .fold(Histogram::default, |mut low, (&chunk, scan)| {
                    match &scan.hits {
                        Some(held) => low.add_low(bin, &held.hits.keys),
                        None => {
                            let (ft, base) = pair.chunk(chunk);
                            scorer.for_each_keys(ft, base, |_, keys| low.add_low(bin, keys));
                        }
                    }
                    low
                })
                .reduce_with(|a, b| a.merge(&b))
                .unwrap_or_default()
        })
    }
}

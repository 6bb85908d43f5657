//! `prune`: base + fine-tuned checkpoints in, sparse delta out.
//!
//! Stages, each on its own thread, joined by bounded channels:
//!
//! ```text
//! tasks -> [plan: FAPM mean, threshold passes] -> [mask + encode, chunk windows] -> [write] -> manifest
//! ```
//!
//! Planning and encoding both run their per-chunk work on the shared worker pool, so while
//! one tensor is being encoded the next one's threshold passes use the other core. Chunks
//! are fixed-size, results are collected in order, and the writer is single: the delta's
//! bytes do not depend on `--threads`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use fapm_stages::checkpoint::{is_safe_relative, Checkpoint, Layout, TensorRef};
use fapm_stages::dtype::convert_chunk;
use fapm_stages::encode::encode_sparse_in_pieces;
use fapm_stages::format::{
    block_sizes, compress, Block, DeltaWriter, Extended, Manifest, Mode, PartRecord, Payload, ShardRecord, SideFile,
    Source, SparsityRule, TensorRecord, MAX_BLOCK_ELEMS, RAW_BLOCK_BYTES, VERSION,
};
use fapm_stages::hash::{self, Part, PartHasher};
use fapm_stages::partition::{layout_hash, split};
use fapm_stages::score::{mean_abs, sum_abs, Metric, Scorer};
use fapm_stages::threshold::{floor, plan, quotas, Bins, Cut, Gather, Histogram, Hits};
use fapm_stages::{Error, Result};
use rayon::prelude::*;

use super::{first_error, join, pool, Ctl};
use crate::config::PruneConfig;
use crate::output::Staged;

/// What a prune run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PruneSummary {
    /// The delta written.
    pub output: PathBuf,
    /// Tensors pruned.
    pub pruned: usize,
    /// Diffable tensors not selected (every change kept).
    pub dense: usize,
    /// Tensors stored whole.
    pub whole: usize,
    /// Pruned or dense tensors that extend their base tensor with appended rows.
    pub extended: usize,
    /// Tensors only the base has (ignored).
    pub base_only: usize,
    /// Elements of pruned and dense tensors.
    pub elements: u64,
    /// Changed elements of pruned and dense tensors.
    pub candidates: u64,
    /// Elements kept.
    pub kept: u64,
    /// Side files carried.
    pub side_files: usize,
    /// The path of every side file carried, in the delta's order.
    pub embedded_side_files: Vec<String>,
    /// Side files left out (over 64 MiB).
    pub skipped_side_files: Vec<String>,
    /// Bytes of both input checkpoints' shards (of a part: of its tensors and their base
    /// tensors).
    pub input_bytes: u64,
    /// Bytes of the fine-tuned checkpoint's shards (of a part: of its tensors).
    pub finetuned_bytes: u64,
    /// Bytes of the delta.
    pub delta_bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// One output tensor and how to treat it.
struct Task {
    ft: TensorRef,
    base: Option<TensorRef>,
    mode: Mode,
    keep: u64,
    /// Elements diffed against the base: the base's element count (the fine-tuned tensor's
    /// too, unless it is extended); 0 for a whole tensor.
    diffed: u64,
}

impl Task {
    /// Whether the fine-tuned tensor extends its base with appended rows (SPEC section 2).
    fn extended(&self) -> bool {
        self.base.as_ref().is_some_and(|b| b.info().shape != self.ft.info().shape)
    }
}

/// A task with its threshold decided.
struct Planned<'b> {
    task: Task,
    block_elems: u64,
    scorer: Option<Scorer>,
    cut: Cut,
    /// What the threshold passes learnt of each chunk (empty when they did not run).
    chunks: Vec<ChunkPlan<'b>>,
}

/// What the threshold passes learnt of one chunk.
struct ChunkPlan<'b> {
    candidates: u64,
    /// The chunk's candidates from the last floor up, when the budget had room for them:
    /// the encode pass then masks the chunk from them instead of scoring it again.
    hits: Option<Held<'b>>,
}

/// Memory for gathered hits. The planner's workers copy a chunk's hits into a buffer from
/// here when the budget has room; the encoder hands each buffer back when it is done with
/// the chunk, for reuse (allocating fresh buffers instead cost 10% of prune's time in page
/// faults). Buffers count against the budget for as long as they exist.
struct HitBudget {
    left: AtomicU64,
    spare: Mutex<Vec<Hits>>,
}

impl HitBudget {
    fn new(bytes: u64) -> Self {
        HitBudget { left: AtomicU64::new(bytes), spare: Mutex::new(Vec::new()) }
    }

    fn take(&self, bytes: u64) -> bool {
        self.left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(bytes)).is_ok()
    }

    /// A copy of what `gather` holds, or `None` when the budget has no room for it.
    fn hold(&self, gather: &Gather) -> Option<Held<'_>> {
        if gather.is_empty() {
            return Some(Held { hits: Hits::default(), budget: self });
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
        Some(Held { hits, budget: self })
    }
}

/// Rounds a buffer size up to one of 4 to 8 sizes per octave, so that buffers made for one
/// chunk fit the chunks of similar tensors, at most 25% larger than needed.
fn size_class(n: usize) -> usize {
    let n = n.max(1 << 12);
    let q = (n - 1).ilog2() - 2;
    ((n - 1) >> q).wrapping_add(1) << q
}

/// A chunk's hits, held against the budget; the buffer goes back to it when dropped.
struct Held<'b> {
    hits: Hits,
    budget: &'b HitBudget,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let hits = std::mem::take(&mut self.hits);
        if hits.capacity_bytes() > 0 {
            self.budget.spare.lock().unwrap_or_else(|e| e.into_inner()).push(hits);
        }
    }
}

/// One encoded block on its way to the writer.
struct Encoded {
    compressed: Vec<u8>,
    raw_len: u64,
    out: Part,
    base: Option<Part>,
    candidates: u64,
    kept: u64,
    /// Positions stored in an extended tensor's appended rows.
    appended: u64,
}

/// Elements per piece of the floor-guessing sample, and the stride between pieces.
const SAMPLE_PIECE: usize = 64;
const SAMPLE_STRIDE: usize = 31;
/// The fewest sample pieces one worker scores into a histogram of its own (160 pieces, 10 Ki
/// keys): a histogram costs 512 KiB to zero and to merge, about what scoring 10 Ki keys costs,
/// so smaller tensors' samples are not split (splitting them was 9% of pruning a model of
/// many small tensors).
const SAMPLE_MIN_PIECES: usize = 160;
/// The size from which a tensor is sampled (smaller ones gather every candidate), or four
/// blocks when the blocks are smaller (in tests).
const SAMPLE_MIN: u64 = 1 << 16;

/// The bytes of the reconstructed chunk built at a time: 64 KiB, in a core's L2 cache with
/// the base bytes it comes from.
const PIECE_BYTES: usize = 64 << 10;

/// Per-worker buffers reused from chunk to chunk (allocating and zeroing them per chunk
/// showed up as 6% of prune's time).
#[derive(Default)]
struct Scratch {
    keys: Vec<u32>,
    kept: Vec<u32>,
    /// A piece of the reconstructed chunk.
    piece: Vec<u8>,
    raw: Vec<u8>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
    /// Where a threshold pass gathers a chunk's hits before the budget is asked for them.
    static GATHER: std::cell::Cell<Gather> = std::cell::Cell::new(Gather::default());
}

/// Writer input: the blocks of a tensor, then the tensor itself.
enum Out<'b> {
    Block(Encoded),
    End(Planned<'b>),
}

/// Prunes `cfg.finetuned` against `cfg.base` into the delta `cfg.output`.
pub fn prune(cfg: &PruneConfig, ctl: &Ctl) -> Result<PruneSummary> {
    let start = Instant::now();
    let base = Checkpoint::open_within(&cfg.base, cfg.memory_budget)?;
    let ft = Checkpoint::open_within(&cfg.finetuned, cfg.memory_budget)?;
    if let Some(s) = ft.shards.iter().find(|s| ft.layout == Layout::Directory && !is_safe_relative(&s.name)) {
        return Err(Error::invalid(&s.path, "this shard name cannot be stored in a delta (non-UTF-8 or '\\')"));
    }
    let (mut tasks, base_only) = classify(cfg, &base, &ft);
    let total_tensors = tasks.len() as u64;
    // A part prunes its own run of the tensors; part 1 also carries the side files.
    let (first, carries_side_files) = match cfg.part {
        Some(p) => {
            let sizes: Vec<u64> = tasks.iter().map(|t| t.ft.info().byte_len()).collect();
            let run = split(&sizes, p.count).swap_remove(p.index as usize - 1);
            tasks.truncate(run.end);
            tasks.drain(..run.start);
            (run.start as u64, p.index == 1)
        }
        None => (0, true),
    };
    let (side, skipped) = if ft.layout == Layout::Directory && carries_side_files {
        super::side::side_files(&ft.root, &cfg.output)?
    } else {
        Default::default()
    };
    let total: u64 =
        tasks.iter().map(|t| t.ft.info().byte_len() + t.base.as_ref().map_or(0, |b| b.info().byte_len())).sum();
    ctl.total.store(total, std::sync::atomic::Ordering::Relaxed);

    let mut summary = PruneSummary {
        output: cfg.output.clone(),
        base_only: base_only.len(),
        skipped_side_files: skipped,
        // A part reads only its own tensors and their base tensors.
        input_bytes: if cfg.part.is_some() { total } else { shard_bytes(&base) + shard_bytes(&ft) },
        finetuned_bytes: if cfg.part.is_some() {
            tasks.iter().map(|t| t.ft.info().byte_len()).sum()
        } else {
            shard_bytes(&ft)
        },
        ..Default::default()
    };
    for t in &tasks {
        match t.mode {
            Mode::Pruned => summary.pruned += 1,
            Mode::Dense => summary.dense += 1,
            Mode::Whole => summary.whole += 1,
        }
        summary.extended += t.extended() as usize;
    }

    let staged = Staged::new(&cfg.output, cfg.overwrite)?;
    let file = staged.create_file(staged.path())?;
    let mut writer = DeltaWriter::new(file, &cfg.output)?;
    let pool = pool(cfg.threads)?;
    if !cfg.block_elems.is_power_of_two() || !(512..=MAX_BLOCK_ELEMS).contains(&cfg.block_elems) {
        return Err(Error::Config(format!(
            "block size {} is not a power of two in 512..={MAX_BLOCK_ELEMS}",
            cfg.block_elems
        )));
    }
    let window = window(cfg.threads, cfg.memory_budget, cfg.block_elems);
    let hit_budget = HitBudget::new(hit_budget(cfg.threads, cfg.memory_budget, cfg.block_elems));

    let records = thread::scope(|s| {
        let (plan_tx, plan_rx) = bounded::<Planned>(1);
        let (out_tx, out_rx) = bounded::<Out>(window);
        let planner = s.spawn(|| stage(ctl, || plan_stage(cfg, tasks, &pool, &hit_budget, plan_tx, ctl)));
        let encoder = s.spawn(|| stage(ctl, || encode_stage(plan_rx, out_tx, &pool, window, ctl)));
        let writer = s.spawn(|| stage(ctl, || write_stage(&mut writer, out_rx, ctl)));
        let (p, e, w) = (join(planner), join(encoder), join(writer));
        let (records, w) = match w {
            Ok(records) => (Some(records), Ok(())),
            Err(err) => (None, Err(err)),
        };
        // The writer's failure (a full disk) counts like any stage's: the first real error wins
        // over the cancellations it caused.
        first_error([p.map(|_| ()), e.map(|_| ()), w])?;
        records.ok_or(Error::Cancelled) // only None when `w` was an error, returned just above
    })?;
    ctl.check()?;

    let mut side_records = Vec::with_capacity(side.len());
    for f in &side {
        side_records.push(write_side_file(&mut writer, &f.rel, &f.path)?);
    }
    for r in &records {
        if r.mode != Mode::Whole {
            summary.elements += r.diffed_numel();
            summary.candidates += r.candidates;
            summary.kept += r.kept;
        }
    }
    summary.side_files = side_records.len();
    summary.embedded_side_files = side_records.iter().map(|f| f.path.clone()).collect();
    let manifest = Manifest {
        format: "fapm-delta".into(),
        version: VERSION,
        tool: format!("fapm {}", env!("CARGO_PKG_VERSION")),
        metric: cfg.metric,
        penalty: cfg.penalty.text.clone(),
        sparsity: cfg.sparsity.to_decimal(),
        sparsity_for: cfg
            .sparsity_for
            .iter()
            .map(|r| SparsityRule { pattern: r.pattern.as_str().to_owned(), sparsity: r.sparsity.to_decimal() })
            .collect(),
        threshold: cfg.threshold,
        include: cfg.include.iter().map(|r| r.as_str().to_owned()).collect(),
        exclude: cfg.exclude.iter().map(|r| r.as_str().to_owned()).collect(),
        block_elems: cfg.block_elems,
        raw_block_bytes: RAW_BLOCK_BYTES,
        source: if ft.layout == Layout::File { Source::File } else { Source::Directory },
        index: ft.indexed,
        shards: ft.shards.iter().map(|s| ShardRecord { name: s.name.clone(), header: s.header.clone() }).collect(),
        tensors: records,
        side_files: side_records,
        base_only,
        part: cfg.part.map(|p| PartRecord {
            index: p.index,
            count: p.count,
            first,
            total: total_tensors,
            base: layout_hash(base.shards.iter().map(|s| (s.name.as_str(), s.header.as_str()))),
            finetuned: layout_hash(ft.shards.iter().map(|s| (s.name.as_str(), s.header.as_str()))),
        }),
    };
    summary.delta_bytes = writer.finish(&manifest)?;
    ctl.check()?;
    staged.commit()?;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// Runs a stage body; a real failure cancels the other stages.
fn stage<T>(ctl: &Ctl, body: impl FnOnce() -> Result<T>) -> Result<T> {
    let r = body();
    if matches!(r, Err(ref e) if !matches!(e, Error::Cancelled)) {
        ctl.cancel();
    }
    r
}

/// How many chunks are in flight in the encode stage (and queued for the writer): up to four
/// per thread, as the budget allows (4 with two threads and the default budget; 1 with 64M).
fn window(threads: usize, budget: u64, block_elems: u64) -> usize {
    // Each worker keeps scratch buffers: keys of a chunk without hits (4 B/elem), kept
    // indices (4 B/elem) and the raw block (<= 18 B/elem at worst): 26 B/elem, and a 64 KiB
    // piece of the reconstructed chunk. Each chunk in flight holds its compressed block (<=
    // 18 B/elem at worst, about 0.5 B/elem in practice). Half the budget is for this.
    let scratch = threads as u64 * (block_elems * 26 + PIECE_BYTES as u64);
    let fit = ((budget / 2).saturating_sub(scratch) / (block_elems * 18)) as usize;
    fit.clamp(1, 4 * threads)
}

/// Memory for gathered hits: the half of the budget that [`window`] leaves, less the
/// threshold passes' own buffers (per worker: a chunk's worth of hits being gathered and
/// two histograms).
fn hit_budget(threads: usize, budget: u64, block_elems: u64) -> u64 {
    (budget / 2).saturating_sub(threads as u64 * (block_elems * 8 + (2 << 20)))
}

fn shard_bytes(c: &Checkpoint) -> u64 {
    c.shards.iter().map(|s| s.data_len + s.header.len() as u64 + 8).sum()
}

/// Decides each fine-tuned tensor's mode (SPEC section 2); also returns base-only names.
fn classify(cfg: &PruneConfig, base: &Checkpoint, ft: &Checkpoint) -> (Vec<Task>, Vec<String>) {
    let tasks = ft
        .tensors()
        .map(|t| {
            let info = t.info();
            let b = base.get(&info.name).filter(|b| {
                let bi = b.info();
                bi.dtype.is_diffable()
                    && info.dtype.is_diffable()
                    && (bi.shape == info.shape || extends(&bi.shape, &info.shape))
            });
            let mode = match b {
                Some(_) if cfg.selects(&info.name) => Mode::Pruned,
                Some(_) => Mode::Dense,
                None => Mode::Whole,
            };
            let diffed = b.as_ref().map_or(0, |b| b.info().numel());
            let keep = cfg.sparsity_of(&info.name).keep_count(diffed);
            Task { ft: t, base: b, mode, keep, diffed }
        })
        .collect();
    let base_only = base.tensors().map(|t| t.info().name.clone()).filter(|n| ft.get(n).is_none()).collect();
    (tasks, base_only)
}

/// Whether a fine-tuned shape extends a base shape (SPEC section 2, a resized vocabulary):
/// same rank >= 1, same sizes in every dimension but the first, the fine-tuned first larger.
fn extends(base: &[u64], ft: &[u64]) -> bool {
    !base.is_empty() && base.len() == ft.len() && base[1..] == ft[1..] && base[0] < ft[0]
}

/// Element ranges of a diffable tensor's blocks.
fn elem_chunks(n: u64, block_elems: u64) -> Vec<(usize, usize)> {
    block_sizes(n, block_elems).map(|(s, l)| (s as usize, l as usize)).collect()
}

/// Stage: the FAPM mean and the cut of each tensor, in order.
fn plan_stage<'b>(
    cfg: &PruneConfig,
    tasks: Vec<Task>,
    pool: &rayon::ThreadPool,
    budget: &'b HitBudget,
    tx: Sender<Planned<'b>>,
    ctl: &Ctl,
) -> Result<()> {
    // How long the planner waits for the encoder: where the time goes (`-v`).
    let mut blocked = std::time::Duration::ZERO;
    for task in tasks {
        ctl.check()?;
        let planned = plan_tensor(cfg, task, pool, budget, ctl)?;
        let t0 = Instant::now();
        let sent = tx.send(planned);
        blocked += t0.elapsed();
        if sent.is_err() {
            return Ok(()); // downstream has gone; it reports why
        }
    }
    tracing::debug!(?blocked, "planner waited for the encoder");
    Ok(())
}

fn plan_tensor<'b>(
    cfg: &PruneConfig,
    task: Task,
    pool: &rayon::ThreadPool,
    budget: &'b HitBudget,
    ctl: &Ctl,
) -> Result<Planned<'b>> {
    let planned = |task, scorer, cut, chunks| Planned { task, block_elems: cfg.block_elems, scorer, cut, chunks };
    let Some(base) = &task.base else {
        return Ok(planned(task, None, Cut::All, Vec::new()));
    };
    let (fi, bi) = (task.ft.info(), base.info());
    let n = task.diffed;
    let mut scorer = Scorer { ft: fi.dtype, base: bi.dtype, metric: cfg.metric, mean: 0.0, penalty: cfg.penalty.value };
    if task.mode == Mode::Dense || task.keep == 0 {
        let cut = if task.mode == Mode::Dense { Cut::All } else { Cut::Nothing };
        return Ok(planned(task, Some(scorer), cut, Vec::new()));
    }
    let chunks = elem_chunks(n, cfg.block_elems);
    let (fs, bs) = (fi.dtype.size(), bi.dtype.size());
    let (ft_bytes, base_bytes) = (task.ft.bytes(), base.bytes());
    if cfg.metric == Metric::Fapm && cfg.penalty.value != 0.0 {
        let partials: Vec<f64> = pool.install(|| {
            chunks.par_iter().map(|&(s, l)| sum_abs(bi.dtype, &base_bytes[s * bs..(s + l) * bs])).collect()
        });
        scorer.mean = mean_abs(partials, n);
    }
    let slice = |s: usize, l: usize| (&ft_bytes[s * fs..(s + l) * fs], &base_bytes[s * bs..(s + l) * bs]);
    // A strided sample (1/31 of the tensor) guesses a floor a little below the cut, so that
    // the first pass gathers only the candidates that can be kept (about 1.25 k).
    let min_len = (chunks.len() / (2 * cfg.threads.max(1))).max(1);
    let floor = if n >= SAMPLE_MIN.min(4 * cfg.block_elems) {
        // In parallel: the sample is the first to touch the fine-tuned tensor's pages.
        let step = SAMPLE_PIECE * SAMPLE_STRIDE;
        let pieces = (n as usize).div_ceil(step);
        let (sample, sample_n) = pool.install(|| {
            (0..pieces)
                .into_par_iter()
                .map(|p| p * step)
                .with_min_len((pieces / (2 * cfg.threads.max(1))).max(SAMPLE_MIN_PIECES))
                .fold(
                    || (Histogram::default(), 0u64),
                    |(mut h, m), s| {
                        let l = SAMPLE_PIECE.min(n as usize - s);
                        let (ft, base) = slice(s, l);
                        scorer.for_each_keys(ft, base, |_, keys| h.add_high(keys));
                        (h, m + l as u64)
                    },
                )
                .reduce_with(|(a, m), (b, k)| (a.merge(&b), m + k))
                .unwrap_or_default()
        });
        floor(task.keep, n, &sample, sample_n)
    } else {
        1
    };
    // Room to gather a chunk's hits: twice the kept fraction, as the floor aims at 1.125 k
    // (a chunk with more is counted but scored again in the encode stage).
    let room = (cfg.block_elems as u128 * 2 * task.keep as u128 / n as u128) as usize + 4096;
    let mut plans: Vec<ChunkPlan<'b>> = Vec::new();
    let mut passes = Vec::new();
    let cut = plan(task.keep, cfg.threshold, floor, |bins| {
        ctl.check()?;
        passes.push(bins);
        Ok::<_, Error>(match bins {
            Bins::High { floor } => {
                plans.clear(); // gives the previous pass's hits back first
                let (high, mut gathered) = pool.install(|| {
                    chunks
                        .par_iter()
                        .enumerate()
                        .with_min_len(min_len)
                        .fold(
                            || (Histogram::default(), Vec::new()),
                            |(mut high, mut gathered), (i, &(s, l))| {
                                let (ft, base) = slice(s, l);
                                let mut g = GATHER.take();
                                g.start(room.min(l));
                                let candidates =
                                    scorer.for_each_keys(ft, base, |at, keys| g.add(keys, floor, at, &mut high));
                                let hits = if g.finish(&mut high) { budget.hold(&g) } else { None };
                                GATHER.set(g);
                                gathered.push((i, ChunkPlan { candidates, hits }));
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
                plans = gathered.into_iter().map(|g| g.1).collect();
                high
            }
            Bins::Low { bin } => pool.install(|| {
                chunks
                    .par_iter()
                    .zip(&plans)
                    .with_min_len(min_len)
                    .fold(Histogram::default, |mut low, (&(s, l), plan)| {
                        match &plan.hits {
                            Some(held) => low.add_low(bin, &held.hits.keys),
                            None => {
                                let (ft, base) = slice(s, l);
                                scorer.for_each_keys(ft, base, |_, keys| low.add_low(bin, keys));
                            }
                        }
                        low
                    })
                    .reduce_with(|a, b| a.merge(&b))
                    .unwrap_or_default()
            }),
        })
    })?;
    let gathered = plans.iter().filter(|p| p.hits.is_some()).count();
    let hits: usize = plans.iter().filter_map(|p| p.hits.as_ref()).map(|h| h.hits.len()).sum();
    tracing::debug!(tensor = %fi.name, ?passes, floor, gathered, hits, keep = task.keep, chunks = chunks.len(), mean = scorer.mean, ?cut, "planned");
    Ok(planned(task, Some(scorer), cut, plans))
}

/// Stage: mask and encode every chunk, a sliding window of chunks at a time, in order.
fn encode_stage<'b>(
    rx: Receiver<Planned<'b>>,
    tx: Sender<Out<'b>>,
    pool: &rayon::ThreadPool,
    window: usize,
    ctl: &Ctl,
) -> Result<()> {
    let mut starved = std::time::Duration::ZERO;
    loop {
        let t0 = Instant::now();
        let Ok(mut planned) = rx.recv() else { break };
        starved += t0.elapsed();
        ctl.set_current(&planned.task.ft.info().name);
        let chunks = std::mem::take(&mut planned.chunks);
        let blocks = match planned.scorer {
            Some(scorer) => encode_diffable(&planned, scorer, chunks, pool, window, &tx, ctl)?,
            None => encode_whole(&planned.task.ft, pool, window, &tx, ctl)?,
        };
        // Unmap as we go, on this thread, rather than all at exit.
        planned.task.ft.release();
        planned.task.base.iter().for_each(TensorRef::release);
        if !blocks || tx.send(Out::End(planned)).is_err() {
            return Ok(());
        }
    }
    tracing::debug!(?starved, "encoder waited for the planner");
    Ok(())
}

/// Encodes a pruned or dense tensor; `false` when the writer has gone. Chunks whose hits
/// were gathered are masked from them; the others are scored again.
fn encode_diffable<'b>(
    p: &Planned,
    scorer: Scorer,
    plans: Vec<ChunkPlan>,
    pool: &rayon::ThreadPool,
    window: usize,
    tx: &Sender<Out<'b>>,
    ctl: &Ctl,
) -> Result<bool> {
    let base = p.task.base.as_ref().expect("diffable tensors have a base");
    let (fi, bi) = (p.task.ft.info(), base.info());
    let (fs, bs) = (fi.dtype.size(), bi.dtype.size());
    let (ft_bytes, base_bytes) = (p.task.ft.bytes(), base.bytes());
    // The blocks cover the whole tensor; an extended tensor's elements past the base's
    // (`diffed`) are scored by no one: every non-zero one is kept, on a base of zero bits.
    let diffed = p.task.diffed as usize;
    let slice = |s: usize, l: usize| {
        let (s, l) = (s.min(diffed), l.min(diffed.saturating_sub(s)));
        (&ft_bytes[s * fs..(s + l) * fs], &base_bytes[s * bs..(s + l) * bs])
    };
    let chunks = elem_chunks(fi.numel(), p.block_elems);
    let base_chunks = diffed.div_ceil(p.block_elems as usize);
    let mut plans: Vec<Option<ChunkPlan>> = plans.into_iter().map(Some).collect();
    plans.resize_with(chunks.len(), || None);
    // When only some of the boundary is kept, each chunk's share comes from the boundary
    // counts of the chunks before it: count them all first (from the hits where there are).
    let quota = if p.cut.is_partial() {
        let at_level: Vec<u64> = pool.install(|| {
            chunks
                .par_iter()
                .zip(&plans)
                .map(|(&(s, l), plan)| match plan.as_ref().and_then(|c| c.hits.as_ref()) {
                    Some(held) => p.cut.at_level_in(&held.hits.keys),
                    None => {
                        let (ft, base) = slice(s, l);
                        let mut n = 0;
                        scorer.for_each_keys(ft, base, |_, keys| n += p.cut.at_level_in(keys));
                        n
                    }
                })
                .collect()
        });
        let mut remaining = match p.cut {
            Cut::Level { take, .. } => take,
            _ => 0,
        };
        quotas(at_level.iter().copied(), &mut remaining).into_iter().zip(at_level).map(|(q, a)| (q, Some(a))).collect()
    } else {
        vec![(u64::MAX, None); chunks.len()]
    };
    let items = chunks.iter().zip(plans).zip(quota);
    let job = |((&(s, l), plan), (quota, at_level)): (_, (u64, Option<u64>))| -> std::io::Result<Encoded> {
        let plan: Option<ChunkPlan> = plan;
        let (ft, base) = slice(s, l);
        let diffed_here = ft.len() / fs;
        let mut scratch = SCRATCH.take();
        let Scratch { keys, kept, piece, raw } = &mut scratch;
        kept.resize(kept.len().max(l), 0);
        let (candidates, n) = match plan {
            Some(ChunkPlan { candidates, hits: Some(held) }) => {
                (candidates, p.cut.select_hits(&held.hits, quota, at_level, kept))
            }
            _ => {
                keys.resize(diffed_here, 0);
                let c = scorer.keys(ft, base, keys);
                (c as u64, p.cut.select(keys, quota, at_level, kept))
            }
        };
        let ft = &ft_bytes[s * fs..(s + l) * fs];
        let appended = keep_appended(ft, fs, diffed_here, n, kept);
        // The reconstructed chunk is built, and it and the base are hashed, a cache-sized
        // piece at a time: the base is read from memory once.
        piece.resize(PIECE_BYTES, 0);
        let (mut out_hash, mut base_hash) =
            (PartHasher::new((s * fs) as u64, chunks.len()), PartHasher::new((s * bs) as u64, base_chunks));
        let fill = |start: usize, out: &mut [u8]| {
            let start = start.min(diffed_here);
            let from_base = (out.len() / fs).min(diffed_here - start);
            let b = &base[start * bs..(start + from_base) * bs];
            base_hash.update(b);
            convert_chunk(fi.dtype, bi.dtype, b, &mut out[..from_base * fs]);
            out[from_base * fs..].fill(0);
        };
        let len = encode_sparse_in_pieces(&kept[..n + appended], ft, fs, raw, piece, fill, |out| out_hash.update(out));
        let compressed = compress(&raw[..len], Payload::Sparse);
        let encoded = compressed.map(|compressed| Encoded {
            compressed,
            raw_len: len as u64,
            out: out_hash.finish(),
            base: (diffed_here > 0).then(|| base_hash.finish()),
            candidates,
            kept: n as u64,
            appended: appended as u64,
        });
        SCRATCH.set(scratch);
        encoded
    };
    let chunk_bytes = |l: usize| (l * (fs + bs)) as u64;
    let mut sent = chunks.iter();
    super::ordered(pool, items, window, ctl, job, |e| {
        let e = e.map_err(|e| Error::tensor(&p.task.ft.shard.path, &fi.name, format!("compression failed: {e}")))?;
        ctl.advance(sent.next().map_or(0, |&(_, l)| chunk_bytes(l)));
        Ok(tx.send(Out::Block(e)).is_ok())
    })
}

/// Appends to `kept[..n]` the positions from `from` on of a chunk of an extended tensor's
/// fine-tuned bytes `ft` whose bits are not zero (the appended rows, stored whole against a
/// base of zero bits); returns how many.
fn keep_appended(ft: &[u8], size: usize, from: usize, n: usize, kept: &mut [u32]) -> usize {
    let mut at = n;
    for (i, e) in ft.chunks_exact(size).enumerate().skip(from) {
        if e.iter().any(|&b| b != 0) {
            kept[at] = i as u32;
            at += 1;
        }
    }
    at - n
}

/// Encodes a whole tensor as raw blocks; `false` when the writer has gone.
fn encode_whole(
    t: &TensorRef,
    pool: &rayon::ThreadPool,
    window: usize,
    tx: &Sender<Out<'_>>,
    ctl: &Ctl,
) -> Result<bool> {
    let bytes = t.bytes();
    let chunks: Vec<(u64, u64)> = block_sizes(bytes.len() as u64, RAW_BLOCK_BYTES).collect();
    let job = |&(s, l): &(u64, u64)| -> std::io::Result<Encoded> {
        let raw = &bytes[s as usize..(s + l) as usize];
        Ok(Encoded {
            compressed: compress(raw, Payload::Bytes)?,
            raw_len: l,
            out: hash::part(raw, s, chunks.len()),
            base: None,
            candidates: 0,
            kept: 0,
            appended: 0,
        })
    };
    super::ordered(pool, &chunks, window, ctl, job, |e| {
        let e = e.map_err(|e| Error::tensor(&t.shard.path, &t.info().name, format!("compression failed: {e}")))?;
        ctl.advance(e.raw_len);
        Ok(tx.send(Out::Block(e)).is_ok())
    })
}

/// Stage: appends blocks to the delta and builds each tensor's record.
fn write_stage(writer: &mut DeltaWriter, rx: Receiver<Out>, ctl: &Ctl) -> Result<Vec<TensorRecord>> {
    let mut records = Vec::new();
    let (mut blocks, mut outs, mut bases) = (Vec::<Block>::new(), Vec::<Part>::new(), Vec::<Part>::new());
    let (mut candidates, mut kept, mut appended) = (0u64, 0u64, 0u64);
    for msg in rx {
        ctl.check()?;
        match msg {
            Out::Block(e) => {
                blocks.push(writer.block(&e.compressed, e.raw_len)?);
                outs.push(e.out);
                bases.extend(e.base);
                candidates += e.candidates;
                kept += e.kept;
                appended += e.appended;
            }
            Out::End(p) => {
                let info = p.task.ft.info();
                let base = p.task.base.as_ref();
                let whole = p.task.mode == Mode::Whole;
                records.push(TensorRecord {
                    name: info.name.clone(),
                    shard: p.task.ft.shard.position,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    mode: p.task.mode,
                    extended: p.task.extended().then(|| Extended {
                        base_shape: base.map(|b| b.info().shape.clone()).unwrap_or_default(),
                        stored: appended,
                    }),
                    base_dtype: base.map(|b| b.info().dtype),
                    base_hash: base.map(|_| hash::merge(&bases)),
                    out_hash: hash::merge(&outs),
                    candidates: if whole { info.numel() } else { candidates },
                    kept: if whole { info.numel() } else { kept },
                    blocks: std::mem::take(&mut blocks),
                });
                outs.clear();
                bases.clear();
                candidates = 0;
                kept = 0;
                appended = 0;
            }
        }
    }
    Ok(records)
}

fn write_side_file(writer: &mut DeltaWriter, rel: &str, path: &Path) -> Result<SideFile> {
    let data = super::side::read(path)?;
    let mut blocks = Vec::new();
    for (s, l) in block_sizes(data.len() as u64, RAW_BLOCK_BYTES) {
        let raw = &data[s as usize..(s + l) as usize];
        let packed = compress(raw, Payload::Bytes).map_err(|e| Error::io(path, e))?;
        blocks.push(writer.block(&packed, l)?);
    }
    Ok(SideFile { path: rel.to_owned(), size: data.len() as u64, hash: blake3::hash(&data).into(), blocks })
}

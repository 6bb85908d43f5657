//! `prune`: base + fine-tuned checkpoints in, sparse delta out. The graph, wired here in
//! `run_stages`: each stage on its own thread, joined by bounded channels; the threshold and
//! mask + encode stages run their per-chunk work on the shared worker pool.
//!
//! ```text
//! read ──tasks──► threshold ──bounded(1)──► mask_encode ──bounded(window)──► write ──► manifest
//! ```
//!
//! While one tensor is masked and encoded, the next one's threshold passes use the other
//! core. Chunks are fixed-size, results are passed on in order and the writer is single: the
//! delta's bytes do not depend on `--threads` or on the memory budget.

use std::path::PathBuf;
use std::thread;
use std::time::Instant;

use crate::config::PruneConfig;
use crate::output::{Kind, Staged};
use crossbeam_channel::bounded;
use fapm_stages::bounded_json as json;
use fapm_stages::checkpoint::{Checkpoint, Layout};
use fapm_stages::format::{
    Block, DeltaWriter, Manifest, Mode, PartRecord, ShardRecord, SideFile, Source, SparsityRule, TensorRecord,
    MAX_BLOCK_ELEMS, RAW_BLOCK_BYTES, VERSION,
};
use fapm_stages::mask_encode::{MaskEncodeStage, ToWriter};
use fapm_stages::paths;
use fapm_stages::read::ahead::{Position, ReadAhead};
use fapm_stages::read::partition::{content_sample, layout_hash};
use fapm_stages::read::{classify, keep_part, side, Task, Tasks};
use fapm_stages::run::runner::{first_error, join, pool, stage};
use fapm_stages::run::{Budget, RunControl};
use fapm_stages::threshold::hits::HitPool;
use fapm_stages::threshold::{ThresholdStage, ThresholdedTask};
use fapm_stages::write::{write_side_file, WriteStage};
use fapm_stages::{Error, Result};

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
    /// Side files left out for being over 64 MiB.
    pub skipped_side_files: Vec<String>,
    /// Every file of the fine-tuned directory left out of the delta (hidden, weight or pickle
    /// format, over 64 MiB, ...), with the reason for each.
    pub left_out_side_files: Vec<side::LeftOut>,
    /// The side files carried that are code (`.py`, ...; `paths::is_code`).
    pub code_files: Vec<String>,
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

/// Tensors decided by the threshold stage ahead of the one being encoded: one, so that the
/// threshold stage works on tensor i + 1 while tensor i is encoded.
const THRESHOLD_AHEAD: usize = 1;

/// Prunes `cfg.finetuned` against `cfg.base` into the delta `cfg.output` (or, with
/// `cfg.part`, into one part of it).
pub fn prune(cfg: &PruneConfig, ctl: &RunControl) -> Result<PruneSummary> {
    let start = Instant::now();
    // One budget: the checkpoints' headers and the records the delta will hold take at most
    // half of it; the stages' buffers get what they leave.
    let memory = json::RunMemory::new(cfg.memory_budget);
    let base = Checkpoint::open_within(&cfg.base, cfg.memory_budget, ctl)?;
    let ft = Checkpoint::open_within(&cfg.finetuned, cfg.memory_budget, ctl)?;
    for s in ft.shards.iter().filter(|_| ft.layout == Layout::Directory) {
        if let Err(why) = paths::check(&s.name) {
            return Err(Error::invalid(&s.path, format!("this shard name cannot be stored in a delta: it {why}")));
        }
    }
    let Tasks { mut tasks, base_only } = classify(&|name| cfg.pruning(name), &base, &ft);
    let total_tensors = tasks.len() as u64;
    // A part prunes its own run of the tensors; part 1 also carries the side files.
    let first = cfg.part.map_or(0, |p| keep_part(&mut tasks, p));
    json::charge(records_cost(&tasks, &ft, cfg.block_elems)).map_err(|_| {
        Error::Config(format!(
            "the headers of these checkpoints and the records of their {} tensors need more than half of the \
             memory budget ({} MiB); raise --memory-budget",
            tasks.len(),
            cfg.memory_budget >> 20
        ))
    })?;
    let (side, skipped) = if ft.layout == Layout::Directory && cfg.part.is_none_or(|p| p.index == 1) {
        let shards: Vec<&str> = ft.shards.iter().map(|s| s.name.as_str()).collect();
        side::side_files(&ft.root, &cfg.output, &shards)?
    } else {
        Default::default()
    };
    let mut summary = PruneSummary::new(cfg, &base, &ft, &tasks, base_only.len(), skipped);
    ctl.set_total(summary.read_bytes(&tasks));

    let staged = Staged::new(&cfg.output, Kind::File, cfg.overwrite)?;
    let file = staged.create_file(staged.path())?;
    let mut writer = DeltaWriter::new(file, &cfg.output)?;
    let records = run_stages(cfg, memory.working(), tasks, &mut writer, ctl)?;
    ctl.check()?;

    let mut side_records = Vec::with_capacity(side.len());
    for f in &side {
        side_records.push(write_side_file(&mut writer, &f.rel, &f.path)?);
    }
    summary.count_kept(&records);
    summary.side_files = side_records.len();
    summary.embedded_side_files = side_records.iter().map(|f| f.path.clone()).collect();
    summary.code_files = summary.embedded_side_files.iter().filter(|p| paths::is_code(p)).cloned().collect();
    let mut manifest = manifest(cfg, &ft, records, side_records, base_only);
    manifest.part = cfg.part.map(|p| PartRecord {
        index: p.index,
        count: p.count,
        first,
        total: total_tensors,
        base: layout_hash(base.shards.iter().map(|s| (s.name.as_str(), s.header.as_str()))),
        finetuned: layout_hash(ft.shards.iter().map(|s| (s.name.as_str(), s.header.as_str()))),
        finetuned_sample: Some(content_sample(
            ft.shards
                .iter()
                .flat_map(|s| s.tensors.iter().enumerate().map(move |(i, t)| (t.name.as_str(), s.tensor_bytes(i)))),
        )),
    });
    summary.delta_bytes = writer.finish(&manifest)?;
    ctl.check()?;
    staged.commit()?;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// The manifest of a delta (of a whole one: a part adds its record).
fn manifest(
    cfg: &PruneConfig,
    ft: &Checkpoint,
    tensors: Vec<TensorRecord>,
    side_files: Vec<SideFile>,
    base_only: Vec<String>,
) -> Manifest {
    Manifest {
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
        tensors,
        side_files,
        base_only,
        part: None,
        base_repo: cfg.base_repo.clone(),
        finetuned_repo: cfg.finetuned_repo.clone(),
    }
}

/// What a prune keeps per tensor until the manifest is written, besides the checkpoints'
/// parsed headers: the task, the tensor's record (its name, shape and a record per block) and
/// the fine-tuned shards' header texts, which the manifest carries.
fn records_cost(tasks: &[Task], ft: &Checkpoint, block_elems: u64) -> u64 {
    let per_tensor = |t: &Task| {
        let info = t.ft.info();
        let blocks = info.numel().div_ceil(block_elems).max(info.byte_len().div_ceil(RAW_BLOCK_BYTES)).max(1);
        (std::mem::size_of::<Task>() + std::mem::size_of::<TensorRecord>()) as u64
            + json::string_cost(info.name.len())
            + 8 * info.shape.len() as u64
            + blocks * std::mem::size_of::<Block>() as u64
    };
    let headers: u64 = ft.shards.iter().map(|s| json::string_cost(s.header.len())).sum();
    tasks.iter().map(per_tensor).sum::<u64>() + headers
}

/// Runs the stages over `tasks` within `memory_budget` bytes (what the run's metadata leaves
/// of the budget), the blocks appended to `writer`; returns the tensor records.
fn run_stages(
    cfg: &PruneConfig,
    memory_budget: u64,
    tasks: Vec<Task>,
    writer: &mut DeltaWriter,
    ctl: &RunControl,
) -> Result<Vec<TensorRecord>> {
    let pool = pool(cfg.threads)?;
    if !cfg.block_elems.is_power_of_two() || !(512..=MAX_BLOCK_ELEMS).contains(&cfg.block_elems) {
        return Err(Error::Config(format!(
            "block size {} is not a power of two in 512..={MAX_BLOCK_ELEMS}",
            cfg.block_elems
        )));
    }
    let budget = Budget::new(memory_budget, cfg.threads, cfg.block_elems);
    let window = budget.encode_window();
    let hits = HitPool::new(budget.hit_bytes());
    let threshold = ThresholdStage {
        metric: cfg.metric,
        penalty: cfg.penalty.value,
        mode: cfg.threshold,
        block_elems: cfg.block_elems,
        threads: cfg.threads,
        pool: &pool,
        hits: &hits,
        ctl,
    };
    let mask_encode = MaskEncodeStage { block_elems: cfg.block_elems, window, pool: &pool, ctl };
    let write = WriteStage { writer, ctl };
    // The reader thread: brings each task's tensors into memory ahead of the threshold
    // stage, the first to read them (`read::ahead`).
    let ahead = ReadAhead::prune(&tasks);
    let at = Position::default();
    let tasks = tasks.into_iter().enumerate().map(|(i, task)| {
        at.at(i);
        task
    });

    // read ──tasks──► threshold ──bounded(1)──► mask_encode ──bounded(window)──► write
    ahead.beside(&at, ctl, || {
        thread::scope(|s| {
            let (thresholded_tx, thresholded_rx) = bounded::<ThresholdedTask>(THRESHOLD_AHEAD);
            let (blocks_tx, blocks_rx) = bounded::<ToWriter>(window);
            let threshold = s.spawn(|| stage(ctl, || threshold.run(tasks, thresholded_tx)));
            let mask_encode = s.spawn(|| stage(ctl, || mask_encode.run(thresholded_rx, blocks_tx)));
            let write = s.spawn(|| stage(ctl, || write.run(blocks_rx)));
            let (t, m, w) = (join(threshold), join(mask_encode), join(write));
            let (records, w) = match w {
                Ok(records) => (Some(records), Ok(())),
                Err(err) => (None, Err(err)),
            };
            // The writer's failure (a full disk) counts like any stage's: the first real error wins
            // over the cancellations it caused.
            first_error([t, m, w])?;
            records.ok_or(Error::Cancelled) // only None when `w` was an error, returned just above
        })
    })
}

impl PruneSummary {
    fn new(
        cfg: &PruneConfig,
        base: &Checkpoint,
        ft: &Checkpoint,
        tasks: &[Task],
        base_only: usize,
        left_out: Vec<side::LeftOut>,
    ) -> Self {
        let over = left_out.iter().filter(|l| l.reason == side::OVER_64_MIB).map(|l| l.path.clone()).collect();
        let mut summary = PruneSummary {
            output: cfg.output.clone(),
            base_only,
            skipped_side_files: over,
            left_out_side_files: left_out,
            input_bytes: shard_bytes(base) + shard_bytes(ft),
            finetuned_bytes: shard_bytes(ft),
            ..Default::default()
        };
        if cfg.part.is_some() {
            // A part reads only its own tensors and their base tensors.
            summary.input_bytes = summary.read_bytes(tasks);
            summary.finetuned_bytes = tasks.iter().map(|t| t.ft.info().byte_len()).sum();
        }
        for t in tasks {
            match t.mode {
                Mode::Pruned => summary.pruned += 1,
                Mode::Dense => summary.dense += 1,
                Mode::Whole => summary.whole += 1,
            }
            summary.extended += t.extended() as usize;
        }
        summary
    }

    /// The bytes of the tasks' tensors and their base tensors.
    fn read_bytes(&self, tasks: &[Task]) -> u64 {
        tasks.iter().map(|t| t.ft.info().byte_len() + t.base.as_ref().map_or(0, |b| b.info().byte_len())).sum()
    }

    fn count_kept(&mut self, records: &[TensorRecord]) {
        for r in records.iter().filter(|r| r.mode != Mode::Whole) {
            self.elements += r.diffed_numel();
            self.candidates += r.candidates;
            self.kept += r.kept;
        }
    }
}

fn shard_bytes(c: &Checkpoint) -> u64 {
    c.shards.iter().map(|s| s.data_len + s.header.len() as u64 + 8).sum()
}

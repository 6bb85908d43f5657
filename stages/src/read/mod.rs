//! The shard reader: goes through the fine-tuned tensors in shard and data order, pairs each
//! with its base tensor, decides how to treat it, and reads both a chunk of elements at a
//! time.
//!
//! Nothing is copied: a chunk is a pair of views into the memory maps, so what the reader
//! hands on is the page cache itself, and the stages after it read each chunk straight from
//! there on the worker that needs it.

pub mod ahead;
mod chunk;
pub mod partition;
pub mod side;

pub use chunk::{chunks, Chunk, PairReader, TensorReader};

use crate::checkpoint::{Checkpoint, TensorInfo, TensorRef};
use crate::format::{Manifest, Mode, TensorRecord};
use crate::threshold::select::Sparsity;
use crate::{Error, Result};
use partition::{split, PartSpec};

/// One fine-tuned tensor and how to treat it: the reader's output, in output order.
pub struct Task {
    /// The fine-tuned tensor.
    pub ft: TensorRef,
    /// Its base tensor, for a diffable tensor (pruned or dense).
    pub base: Option<TensorRef>,
    /// Pruned, dense or whole (SPEC section 2).
    pub mode: Mode,
    /// How many positions a pruned tensor keeps, `floor(n (1 - s))`, its sparsity `s` the
    /// first matching `--sparsity-for` rule's or `--sparsity` (a dense tensor: all `diffed`).
    pub keep: u64,
    /// Elements diffed against the base: the base's element count (the fine-tuned tensor's
    /// too, unless it is extended); 0 for a whole tensor.
    pub diffed: u64,
}

impl Task {
    /// Whether the fine-tuned tensor extends its base with appended rows (SPEC section 2).
    pub fn extended(&self) -> bool {
        self.base.as_ref().is_some_and(|b| b.info().shape != self.ft.info().shape)
    }
}

/// The tasks of a prune run, and the names of the tensors only the base has.
pub struct Tasks {
    /// Every fine-tuned tensor, in shard and data order.
    pub tasks: Vec<Task>,
    /// Tensors only the base has (ignored, counted in the summary).
    pub base_only: Vec<String>,
}

/// Decides what to do with each fine-tuned tensor (SPEC section 2). `pruning` says how a
/// diffable tensor is treated, by name: pruned at a sparsity, or dense (`None`).
pub fn classify(pruning: &dyn Fn(&str) -> Option<Sparsity>, base: &Checkpoint, ft: &Checkpoint) -> Tasks {
    let tasks = ft.tensors().map(|t| task(pruning, base, t)).collect();
    let base_only = base.tensors().map(|t| t.info().name.clone()).filter(|n| ft.get(n).is_none()).collect();
    Tasks { tasks, base_only }
}

/// The task of one fine-tuned tensor: diffable against its base (pruned when selected,
/// else dense) or whole, and its keep count.
fn task(pruning: &dyn Fn(&str) -> Option<Sparsity>, base: &Checkpoint, ft: TensorRef) -> Task {
    let info = ft.info();
    let base = base.get(&info.name).filter(|b| diffable(b.info(), info));
    let diffed = base.as_ref().map_or(0, |b| b.info().numel());
    let (mode, keep) = match (&base, pruning(&info.name)) {
        (Some(_), Some(sparsity)) => (Mode::Pruned, sparsity.keep_count(diffed)),
        (Some(_), None) => (Mode::Dense, diffed),
        (None, _) => (Mode::Whole, 0),
    };
    Task { ft, base, mode, keep, diffed }
}

/// Keeps only the tasks of one part of a partitioned prune (SPEC section 7): the tasks, in
/// output order, split into `part.count` contiguous runs of nearly equal bytes. Returns the
/// index of the part's first tensor.
pub fn keep_part(tasks: &mut Vec<Task>, part: PartSpec) -> u64 {
    let sizes: Vec<u64> = tasks.iter().map(|t| t.ft.info().byte_len()).collect();
    let run = split(&sizes, part.count).swap_remove(part.index as usize - 1);
    tasks.truncate(run.end);
    tasks.drain(..run.start);
    run.start as u64
}

/// Whether a fine-tuned tensor is diffed against a base tensor: both dtypes floating, and
/// the same shape or an extended one.
pub fn diffable(base: &TensorInfo, ft: &TensorInfo) -> bool {
    base.dtype.is_diffable() && ft.dtype.is_diffable() && (base.shape == ft.shape || extends(&base.shape, &ft.shape))
}

/// Whether a fine-tuned shape extends a base shape (SPEC section 2, a resized vocabulary):
/// same rank >= 1, same sizes in every dimension but the first, the fine-tuned first larger.
fn extends(base: &[u64], ft: &[u64]) -> bool {
    !base.is_empty() && base.len() == ft.len() && base[1..] == ft[1..] && base[0] < ft[0]
}

/// apply and verify: the base tensor of every record of a delta ([`base_tensor`]).
pub fn base_tensors(m: &Manifest, base: &Checkpoint) -> Result<Vec<Option<TensorRef>>> {
    m.tensors.iter().map(|t| base_tensor(base, t)).collect()
}

/// The base tensor of a pruned or dense record of a delta, checked for name, dtype and shape
/// (`None` for a whole tensor, which needs no base).
pub fn base_tensor(base: &Checkpoint, t: &TensorRecord) -> Result<Option<TensorRef>> {
    let Some(dtype) = t.base_dtype else { return Ok(None) };
    let b = base.get(&t.name).ok_or_else(|| {
        Error::tensor(
            &base.root,
            &t.name,
            "missing from the base checkpoint (is this the base the delta was made from?)",
        )
    })?;
    let shape = t.extended.as_ref().map_or(&t.shape, |e| &e.base_shape);
    if b.info().dtype != dtype || b.info().shape != *shape {
        return Err(Error::tensor(
            &b.shard.path,
            &t.name,
            format!(
                "base is {} {:?}, but the delta was made against {dtype} {:?}",
                b.info().dtype,
                b.info().shape,
                shape
            ),
        ));
    }
    Ok(Some(b))
}

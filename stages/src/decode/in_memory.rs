//! One tensor of a delta in memory, for callers that hold tensors rather than files (the
//! Python package): rebuilt from its base into a caller's buffer, patched into (and reverted
//! out of) a buffer that holds the base, or listed as kept positions and fine-tuned values.
//! `apply` writes the same bytes to disk.
//!
//! Everything goes through the decoder's kernel ([`decode_block`]) and tensor check
//! ([`TensorCheck`]) on the decoder's driver ([`ordered_window`]): a window of blocks on the
//! worker pool, sized by the memory budget, straight into the caller's buffer, stopped by the
//! [`RunControl`] (the Python package cancels it on Ctrl-C). Every buffer's length is checked
//! against the record, and a base against the record's dtype and shape, before any block is
//! read.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use super::{
    base_mismatch, corrupt, decode_block, read_block, tensor_spans, BlockSpan, DecodedBlock, Onto, TensorCheck,
};
use crate::checkpoint::{Checkpoint, TensorRef};
use crate::format::sparse::{revert_sparse, Sparse};
use crate::format::{DeltaReader, Mode, TensorRecord};
use crate::hash;
use crate::run::runner::{ordered_window, pool};
use crate::run::{Budget, RunControl};
use crate::{Error, Result};

/// A delta opened for in-memory use, its tensors found by name.
pub struct Delta {
    /// The opened, verified delta.
    pub reader: DeltaReader,
    by_name: HashMap<String, usize>,
    pool: rayon::ThreadPool,
    window: usize,
}

impl Delta {
    /// Opens a delta and checks its manifest (blocks are read when used) within
    /// `memory_budget`, for work on `threads` worker threads; opening stops once `ctl` is
    /// cancelled. A part of a partitioned prune is refused, as `apply` refuses it.
    pub fn open(path: &Path, memory_budget: u64, threads: usize, ctl: &RunControl) -> Result<Self> {
        let reader = DeltaReader::open_within(path, memory_budget, ctl)?;
        reader.refuse_part()?;
        let by_name = reader.manifest.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let window =
            Budget::new(memory_budget, threads, reader.manifest.block_elems).decode_window(reader.block_memory());
        Ok(Delta { reader, by_name, pool: pool(threads)?, window })
    }

    /// The record of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<&TensorRecord> {
        self.index(name).map(|i| &self.reader.manifest.tensors[i])
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.by_name.get(name).copied().ok_or_else(|| Error::tensor(&self.reader.path, name, "not in this delta"))
    }

    /// The base tensor of a pruned or dense record in `base`, checked for dtype and shape
    /// ([`crate::read::base_tensor`]).
    pub fn base_of(&self, base: &Checkpoint, t: &TensorRecord) -> Result<Option<TensorRef>> {
        crate::read::base_tensor(base, t)
    }

    /// Checks that `base` holds the bytes the delta was made from, for tensor `name`;
    /// `base_path` names where they came from in the error.
    pub fn check_base(&self, name: &str, base: &[u8], base_path: &Path, ctl: &RunControl) -> Result<()> {
        let (i, t) = (self.index(name)?, self.tensor(name)?);
        let (Some(dtype), Some(want)) = (t.base_dtype, t.base_hash) else {
            return Err(Error::tensor(&self.reader.path, &t.name, "is stored whole: it has no base"));
        };
        let bs = dtype.size() as u64;
        expect_len(t, "base", base.len(), t.diffed_numel() * bs)?;
        let m = &self.reader.manifest;
        let blocks = t.diffed_numel().div_ceil(m.block_elems) as usize;
        let spans = tensor_spans(m, i).take(blocks);
        let job = |s: BlockSpan| {
            let end = ((s.start + s.len) * bs).min(base.len() as u64);
            hash::hash_chunk(&base[(s.start * bs) as usize..end as usize], s.start * bs, blocks)
        };
        let mut parts = Vec::with_capacity(blocks);
        ordered_window(&self.pool, spans, self.window, ctl, job, |h| {
            parts.push(h);
            Ok(true)
        })?;
        let got = hash::merge(&parts);
        if got != want {
            return Err(base_mismatch(base_path, t, &got));
        }
        Ok(())
    }

    /// Rebuilds tensor `name` into `out` (its bytes, `numel * dtype size`). A pruned or dense
    /// tensor needs the base tensor's bytes `base` (of the base dtype; `base_path` names them
    /// in errors); a whole tensor needs none.
    pub fn reconstruct(
        &self,
        name: &str,
        base: Option<&[u8]>,
        base_path: &Path,
        out: &mut [u8],
        ctl: &RunControl,
    ) -> Result<()> {
        let (i, t) = (self.index(name)?, self.tensor(name)?);
        expect_len(t, "output", out.len(), t.numel() * t.dtype.size() as u64)?;
        if let Some(dtype) = t.base_dtype {
            let base =
                base.ok_or_else(|| Error::tensor(&self.reader.path, &t.name, "needs its base tensor to be rebuilt"))?;
            expect_len(t, "base", base.len(), t.diffed_numel() * dtype.size() as u64)?;
        }
        let chunks = self.out_chunks(i, out);
        let job = |(span, c): (BlockSpan, &mut [u8])| {
            decode_block(&self.reader, &span, &read_block(&self.reader, &span)?, Onto::Base(base), c, true, true)
        };
        let mut check = TensorCheck::default();
        self.drive(chunks, ctl, job, &mut check)?;
        check.finish(&self.reader, t, Some(base_path), true)
    }

    /// Rebuilds tensor `name` in place: `target` holds the base tensor, whose dtype must be the
    /// fine-tuned one, and ends up holding the fine-tuned tensor. With `check_base` the base
    /// hash is checked too, on the way. All or nothing: on any failure (a corrupt block, a
    /// hash mismatch, a cancellation) the blocks already decoded are reverted and `target`
    /// holds the base again.
    pub fn patch(
        &self,
        name: &str,
        target: &mut [u8],
        check_base: bool,
        base_path: &Path,
        ctl: &RunControl,
    ) -> Result<()> {
        let (i, t) = (self.index(name)?, self.tensor(name)?);
        self.expect_in_place(t, target.len())?;
        let n = t.blocks.len();
        // A block is changed only when it decodes (decoding checks every position first).
        let applied: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
        let result = {
            let chunks = self.out_chunks(i, target);
            let job = |(span, c): (BlockSpan, &mut [u8])| {
                let raw = read_block(&self.reader, &span)?;
                let d = decode_block(&self.reader, &span, &raw, Onto::InPlace, c, true, check_base)?;
                applied[span.block].store(true, Ordering::Relaxed);
                Ok(d)
            };
            let mut check = TensorCheck::default();
            self.drive(chunks, ctl, job, &mut check)
                .and_then(|()| check.finish(&self.reader, t, check_base.then_some(base_path), true))
        };
        if let Err(e) = result {
            let applied: Vec<bool> = applied.iter().map(|a| a.load(Ordering::Relaxed)).collect();
            return match self.revert_blocks(i, target, &applied) {
                Ok(()) => Err(e),
                Err(r) => Err(Error::tensor(
                    &self.reader.path,
                    &t.name,
                    format!("{e}; then restoring the base failed, the tensor is corrupt: {r}"),
                )),
            };
        }
        Ok(())
    }

    /// Undoes [`Delta::patch`]: `target` holds the fine-tuned tensor and gets back the base
    /// bits at every kept position (the delta's values are differences, so nothing needs to
    /// be kept). Positions the delta does not keep are not touched. Never interrupted.
    pub fn revert(&self, name: &str, target: &mut [u8]) -> Result<()> {
        let (i, t) = (self.index(name)?, self.tensor(name)?);
        self.expect_in_place(t, target.len())?;
        self.revert_blocks(i, target, &vec![true; t.blocks.len()])
    }

    /// Writes the kept positions of tensor `name` (flat, ascending) into `indices` and the
    /// fine-tuned values there into `values`, both sized by the record's `kept`. The values are
    /// rebuilt from the base tensor's bytes `base`: the delta stores differences from the base,
    /// not values. Checks the base and the whole reconstruction like [`Delta::reconstruct`];
    /// memory beyond the outputs is a window of blocks.
    pub fn patches(
        &self,
        name: &str,
        base: &[u8],
        base_path: &Path,
        indices: &mut [i64],
        values: &mut [u8],
        ctl: &RunControl,
    ) -> Result<()> {
        let (i, t) = (self.index(name)?, self.tensor(name)?);
        let Some(dtype) = t.base_dtype else {
            return Err(Error::tensor(&self.reader.path, &t.name, "is stored whole: it has no patches"));
        };
        not_extended(&self.reader, t)?;
        let size = t.dtype.size();
        expect_len(t, "base", base.len(), t.numel() * dtype.size() as u64)?;
        expect_len(t, "indices", indices.len() * 8, t.kept * 8)?;
        expect_len(t, "values", values.len(), t.kept * size as u64)?;
        // A block's kept positions and the fine-tuned values there, rebuilt in a chunk of its own.
        let job = |span: BlockSpan| -> Result<(BlockSpan, DecodedBlock, Vec<usize>, Vec<u8>)> {
            let raw = read_block(&self.reader, &span)?;
            let mut out = vec![0u8; span.out_bytes(t)];
            let d = decode_block(&self.reader, &span, &raw, Onto::Base(Some(base)), &mut out, true, true)?;
            // It decoded, so its payload parses.
            let sparse = Sparse::parse(&raw, span.len, size).map_err(|e| corrupt(&self.reader, t, span.block, e))?;
            Ok((span, d, sparse.positions().collect(), out))
        };
        let (mut check, mut at) = (TensorCheck::default(), 0usize);
        let too_many = || {
            Error::tensor(
                &self.reader.path,
                &t.name,
                format!("blocks hold more kept values than the record's {}", t.kept),
            )
        };
        let m = &self.reader.manifest;
        ordered_window(&self.pool, tensor_spans(m, i), self.window, ctl, job, |r| {
            let (span, d, positions, out) = r?;
            let end = at.checked_add(positions.len()).filter(|&e| e <= indices.len()).ok_or_else(too_many)?;
            for ((p, i), v) in
                positions.iter().zip(&mut indices[at..end]).zip(values[at * size..end * size].chunks_exact_mut(size))
            {
                *i = (span.start + *p as u64) as i64;
                v.copy_from_slice(&out[p * size..(p + 1) * size]);
            }
            at = end;
            check.add(d);
            Ok(true)
        })?;
        check.finish(&self.reader, t, Some(base_path), true)
    }

    /// Runs `job` on every block of a tensor, each with its chunk of the output, and adds the
    /// results to `check` in order.
    fn drive<'o>(
        &self,
        chunks: Vec<(BlockSpan, &'o mut [u8])>,
        ctl: &RunControl,
        job: impl Fn((BlockSpan, &'o mut [u8])) -> Result<DecodedBlock> + Sync,
        check: &mut TensorCheck,
    ) -> Result<()> {
        ordered_window(&self.pool, chunks, self.window, ctl, job, |d| {
            check.add(d?);
            Ok(true)
        })
        .map(|_| ())
    }

    /// `out` cut into the output chunks of tensor `i`'s blocks, each with its block.
    fn out_chunks<'o>(&self, i: usize, out: &'o mut [u8]) -> Vec<(BlockSpan, &'o mut [u8])> {
        let t = &self.reader.manifest.tensors[i];
        let mut rest = out;
        tensor_spans(&self.reader.manifest, i)
            .map(|span| {
                let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(span.out_bytes(t));
                rest = tail;
                (span, chunk)
            })
            .collect()
    }

    /// Reverts the blocks of tensor `i` marked in `which`, in parallel; never interrupted.
    fn revert_blocks(&self, i: usize, target: &mut [u8], which: &[bool]) -> Result<()> {
        let t = &self.reader.manifest.tensors[i];
        let chunks = self.out_chunks(i, target);
        self.pool.install(|| {
            chunks.into_par_iter().filter(|(span, _)| which[span.block]).try_for_each(|(span, c)| {
                let raw = self.reader.block(&t.blocks[span.block], &t.name)?;
                revert_sparse(&raw, c, t.dtype.size()).map(|_| ()).map_err(|e| corrupt(&self.reader, t, span.block, e))
            })
        })
    }

    /// Checks that `t` can be patched in place in a buffer of `len` bytes.
    fn expect_in_place(&self, t: &TensorRecord, len: usize) -> Result<()> {
        not_extended(&self.reader, t)?;
        if t.base_dtype != Some(t.dtype) || t.mode == Mode::Whole {
            let what = match t.base_dtype {
                None => "is stored whole".to_string(),
                Some(b) => format!("changes dtype ({b} to {})", t.dtype),
            };
            return Err(Error::tensor(&self.reader.path, &t.name, format!("{what}: it cannot be patched in place")));
        }
        expect_len(t, "target", len, t.numel() * t.dtype.size() as u64)
    }
}

/// Refuses an extended tensor (a resized vocabulary) where the base's buffer would have to
/// grow: it is rebuilt into a new buffer by [`Delta::reconstruct`] instead.
fn not_extended(delta: &DeltaReader, t: &TensorRecord) -> Result<()> {
    match &t.extended {
        Some(e) => Err(Error::tensor(
            &delta.path,
            &t.name,
            format!(
                "grows from the base's shape {:?} to {:?} (added tokens): it cannot be patched in place; \
                 resize the model's embeddings and load the tensor with load_file or safe_open",
                e.base_shape, t.shape
            ),
        )),
        None => Ok(()),
    }
}

fn expect_len(t: &TensorRecord, what: &str, len: usize, want: u64) -> Result<()> {
    if len as u64 != want {
        return Err(Error::Config(format!("tensor '{}': {what} buffer has {len} bytes, the tensor {want}", t.name)));
    }
    Ok(())
}

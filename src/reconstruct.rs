//! One tensor of a delta in memory, for callers that hold tensors rather than files (the
//! Python package): rebuilt from its base into a caller's buffer, patched into (and reverted
//! out of) a buffer that holds the base, or listed as kept positions and fine-tuned values.
//! `apply` writes the same bytes to disk.
//!
//! Every function checks what `apply` checks: each block's hash before it is decoded, the
//! base tensor's hash and the reconstructed tensor's hash before it returns. Work goes a block
//! at a time, a wave of blocks in parallel on rayon's pool, straight into the caller's buffer;
//! between waves the caller's `between` runs (the Python package checks for Ctrl-C there)
//! and may stop the work with an error.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use fapm_stages::checkpoint::{Checkpoint, TensorRef};
use fapm_stages::dtype::convert_chunk;
use fapm_stages::encode::{decode_sparse, revert_sparse, Sparse};
use fapm_stages::format::{block_sizes, DeltaReader, Hash, Mode, TensorRecord};
use fapm_stages::hash::{self, ChunkHash};
use fapm_stages::{Error, Result};
use rayon::prelude::*;

/// Runs between two waves of blocks; an error stops the work.
pub type BetweenWaves<'a> = &'a mut dyn FnMut() -> Result<()>;

/// A delta opened for in-memory use, its tensors found by name.
pub struct Delta {
    /// The opened, verified delta.
    pub reader: DeltaReader,
    by_name: HashMap<String, usize>,
}

/// One decoded block of a diffable tensor: its kept count and its parts of the base and
/// output hashes.
struct DecodedBlock {
    kept: u64,
    base: Option<ChunkHash>,
    out: ChunkHash,
}

impl Delta {
    /// Opens a delta and checks its manifest (blocks are read when used).
    pub fn open(path: &Path) -> Result<Self> {
        let reader = DeltaReader::open(path)?;
        let by_name = reader.manifest.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(Delta { reader, by_name })
    }

    /// The record of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<&TensorRecord> {
        self.by_name
            .get(name)
            .map(|&i| &self.reader.manifest.tensors[i])
            .ok_or_else(|| Error::tensor(&self.reader.path, name, "not in this delta"))
    }

    /// The base tensor of a pruned or dense record in `base`, checked for dtype and shape
    /// ([`read::base_tensor`](crate::pipeline::stages::read::base_tensor)).
    pub fn base_of(&self, base: &Checkpoint, t: &TensorRecord) -> Result<Option<TensorRef>> {
        crate::pipeline::stages::read::base_tensor(base, t)
    }

    /// Checks that `base` holds the bytes the delta was made from, for tensor `t`; `base_path`
    /// names where they came from in the error.
    pub fn check_base(&self, t: &TensorRecord, base: &[u8], base_path: &Path, between: BetweenWaves) -> Result<()> {
        let (Some(dtype), Some(want)) = (t.base_dtype, t.base_hash) else {
            return Err(Error::tensor(&self.reader.path, &t.name, "is stored whole: it has no base"));
        };
        let bs = dtype.size() as u64;
        expect_len(&t.name, "base", base.len(), t.diffed_numel() * bs)?;
        let spans: Vec<(u64, u64)> = block_sizes(t.diffed_numel(), self.reader.manifest.block_elems).collect();
        let mut chunks: Vec<&[u8]> =
            spans.iter().map(|&(s, l)| &base[(s * bs) as usize..((s + l) * bs) as usize]).collect();
        let n = chunks.len();
        let parts = collect_waves(&mut chunks, between, |i, c| Ok(hash::hash_chunk(c, spans[i].0 * bs, n)))?;
        if hash::merge(&parts) != want {
            return Err(base_mismatch(base_path, &t.name));
        }
        Ok(())
    }

    /// Rebuilds tensor `t` into `out` (its bytes, `numel * dtype size`). A pruned or dense
    /// tensor needs the base tensor's bytes `base` (of the base dtype; `base_path` names them in
    /// errors); a whole tensor needs none.
    pub fn reconstruct(
        &self,
        t: &TensorRecord,
        base: Option<&[u8]>,
        base_path: &Path,
        out: &mut [u8],
        between: BetweenWaves,
    ) -> Result<()> {
        let size = t.dtype.size() as u64;
        expect_len(&t.name, "output", out.len(), t.numel() * size)?;
        if t.mode == Mode::Whole {
            let mut chunks: Vec<&mut [u8]> = out.chunks_mut(self.reader.manifest.raw_block_bytes as usize).collect();
            let n = chunks.len();
            let parts = collect_waves(&mut chunks, between, |i, c| {
                let offset = i as u64 * self.reader.manifest.raw_block_bytes;
                c.copy_from_slice(&self.reader.block(&t.blocks[i], &t.name)?);
                Ok(hash::hash_chunk(c, offset, n))
            })?;
            return self.check_out(t, &parts);
        }
        let (Some(dtype), Some(base)) = (t.base_dtype, base) else {
            return Err(Error::tensor(&self.reader.path, &t.name, "needs its base tensor to be rebuilt"));
        };
        let bs = dtype.size() as u64;
        // An extended tensor's appended elements (past the base's) are decoded onto zero bits.
        let diffed = t.diffed_numel();
        expect_len(&t.name, "base", base.len(), diffed * bs)?;
        let base_blocks = diffed.div_ceil(self.reader.manifest.block_elems) as usize;
        let spans = self.spans(t);
        let mut chunks = self.out_chunks(t, out);
        let n = chunks.len();
        let decoded = collect_waves(&mut chunks, between, |i, c| {
            let (start, len) = spans[i];
            let from_base = len.min(diffed.saturating_sub(start));
            let b = &base[(start.min(diffed) * bs) as usize..((start.min(diffed) + from_base) * bs) as usize];
            let (converted, appended) = c.split_at_mut((from_base * size) as usize);
            convert_chunk(t.dtype, dtype, b, converted);
            appended.fill(0);
            let kept = self.decode(t, i, c)?;
            let base = (from_base > 0).then(|| hash::hash_chunk(b, start * bs, base_blocks));
            Ok(DecodedBlock { kept, base, out: hash::hash_chunk(c, start * size, n) })
        })?;
        self.check_decoded(t, &decoded, base_path)
    }

    /// Rebuilds tensor `t` in place: `target` holds the base tensor, whose dtype must be the
    /// fine-tuned one, and ends up holding the fine-tuned tensor. With `check_base` the base
    /// hash is checked too, on the way. All or nothing: on any failure (a corrupt block, a
    /// hash mismatch, `between` stopping it) the blocks already decoded are reverted and
    /// `target` holds the base again.
    pub fn patch(
        &self,
        t: &TensorRecord,
        target: &mut [u8],
        check_base: bool,
        base_path: &Path,
        between: BetweenWaves,
    ) -> Result<()> {
        self.expect_in_place(t, target.len())?;
        let size = t.dtype.size() as u64;
        let spans = self.spans(t);
        let mut chunks = self.out_chunks(t, target);
        let n = chunks.len();
        // A block is changed only when it decodes (decoding checks every position first).
        let applied: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
        let result = collect_waves(&mut chunks, between, |i, c| {
            let start = spans[i].0;
            let base = check_base.then(|| hash::hash_chunk(c, start * size, n));
            let kept = self.decode(t, i, c)?;
            applied[i].store(true, Ordering::Relaxed);
            Ok(DecodedBlock { kept, base, out: hash::hash_chunk(c, start * size, n) })
        })
        .and_then(|decoded| self.check_decoded(t, &decoded, base_path));
        if let Err(e) = result {
            let applied: Vec<bool> = applied.iter().map(|a| a.load(Ordering::Relaxed)).collect();
            return match self.revert_chunks(t, &mut chunks, &applied) {
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
    /// be kept). Positions the delta does not keep are not touched.
    pub fn revert(&self, t: &TensorRecord, target: &mut [u8]) -> Result<()> {
        self.expect_in_place(t, target.len())?;
        let mut chunks = self.out_chunks(t, target);
        let all = vec![true; chunks.len()];
        self.revert_chunks(t, &mut chunks, &all)
    }

    /// Writes the kept positions of tensor `t` (flat, ascending) into `indices` and the
    /// fine-tuned values there into `values`, both sized by the record's `kept`. The values are
    /// rebuilt from the base tensor's bytes `base`: the delta stores differences from the base,
    /// not values. Checks the base and the whole reconstruction like [`Delta::reconstruct`];
    /// memory beyond the outputs is a wave of blocks.
    pub fn patches(
        &self,
        t: &TensorRecord,
        base: &[u8],
        base_path: &Path,
        indices: &mut [i64],
        values: &mut [u8],
        between: BetweenWaves,
    ) -> Result<()> {
        let Some(dtype) = t.base_dtype else {
            return Err(Error::tensor(&self.reader.path, &t.name, "is stored whole: it has no patches"));
        };
        not_extended(self, t)?;
        let (size, bs) = (t.dtype.size(), dtype.size() as u64);
        expect_len(&t.name, "base", base.len(), t.numel() * bs)?;
        expect_len(&t.name, "indices", indices.len() * 8, t.kept * 8)?;
        expect_len(&t.name, "values", values.len(), t.kept * size as u64)?;
        let spans = self.spans(t);
        let n = spans.len();
        let mut blocks: Vec<usize> = (0..n).collect();
        let (mut decoded, mut at) = (Vec::with_capacity(n), 0usize);
        let too_many = || {
            Error::tensor(
                &self.reader.path,
                &t.name,
                format!("blocks hold more kept values than the record's {}", t.kept),
            )
        };
        let job = |_: usize, &mut i: &mut usize| {
            let (start, len) = spans[i];
            let b = &base[(start * bs) as usize..((start + len) * bs) as usize];
            let mut out = vec![0u8; len as usize * size];
            convert_chunk(t.dtype, dtype, b, &mut out);
            let raw = self.reader.block(&t.blocks[i], &t.name)?;
            let kept = decode_sparse(&raw, &mut out, size).map_err(|e| self.corrupt(t, i, e))?;
            let positions: Vec<usize> =
                Sparse::parse(&raw, len, size).map_err(|e| self.corrupt(t, i, e))?.positions().collect();
            let d = DecodedBlock {
                kept,
                base: Some(hash::hash_chunk(b, start * bs, n)),
                out: hash::hash_chunk(&out, start * size as u64, n),
            };
            Ok((d, start, positions, out))
        };
        waves(&mut blocks, between, job, |(d, start, positions, out)| {
            let end = at.checked_add(positions.len()).filter(|&e| e <= indices.len()).ok_or_else(too_many)?;
            for ((p, i), v) in
                positions.iter().zip(&mut indices[at..end]).zip(values[at * size..end * size].chunks_exact_mut(size))
            {
                *i = (start + *p as u64) as i64;
                v.copy_from_slice(&out[p * size..(p + 1) * size]);
            }
            at = end;
            decoded.push(d);
            Ok(())
        })?;
        self.check_decoded(t, &decoded, base_path)
    }

    /// The element spans `(start, len)` of the blocks of a pruned or dense tensor.
    fn spans(&self, t: &TensorRecord) -> Vec<(u64, u64)> {
        block_sizes(t.numel(), self.reader.manifest.block_elems).collect()
    }

    /// `out` cut into the byte ranges of a pruned or dense tensor's blocks.
    fn out_chunks<'o>(&self, t: &TensorRecord, out: &'o mut [u8]) -> Vec<&'o mut [u8]> {
        let per = self.reader.manifest.block_elems as usize * t.dtype.size();
        out.chunks_mut(per).collect()
    }

    /// Reads block `i` of `t` and decodes it onto `out`; returns the positions it set.
    fn decode(&self, t: &TensorRecord, i: usize, out: &mut [u8]) -> Result<u64> {
        let raw = self.reader.block(&t.blocks[i], &t.name)?;
        decode_sparse(&raw, out, t.dtype.size()).map_err(|e| self.corrupt(t, i, e))
    }

    fn corrupt(&self, t: &TensorRecord, block: usize, e: String) -> Error {
        Error::tensor(&self.reader.path, &t.name, format!("corrupt block {block}: {e}"))
    }

    /// Reverts the blocks marked in `which`, in parallel; never interrupted.
    fn revert_chunks(&self, t: &TensorRecord, chunks: &mut [&mut [u8]], which: &[bool]) -> Result<()> {
        chunks.par_iter_mut().zip(which).enumerate().filter(|(_, (_, &w))| w).try_for_each(|(i, (c, _))| {
            let raw = self.reader.block(&t.blocks[i], &t.name)?;
            revert_sparse(&raw, c, t.dtype.size()).map(|_| ()).map_err(|e| self.corrupt(t, i, e))
        })
    }

    /// Checks that `t` can be patched in place in a buffer of `len` bytes.
    fn expect_in_place(&self, t: &TensorRecord, len: usize) -> Result<()> {
        not_extended(self, t)?;
        if t.base_dtype != Some(t.dtype) {
            let what = match t.base_dtype {
                None => "is stored whole".to_string(),
                Some(b) => format!("changes dtype ({b} to {})", t.dtype),
            };
            return Err(Error::tensor(&self.reader.path, &t.name, format!("{what}: it cannot be patched in place")));
        }
        expect_len(&t.name, "target", len, t.numel() * t.dtype.size() as u64)
    }

    /// Checks a finished diffable tensor: kept count, base hash (where computed), out hash.
    fn check_decoded(&self, t: &TensorRecord, decoded: &[DecodedBlock], base_path: &Path) -> Result<()> {
        let kept: u64 = decoded.iter().map(|d| d.kept).sum();
        let recorded = t.kept + t.extended.as_ref().map_or(0, |e| e.stored);
        if kept != recorded {
            return Err(Error::tensor(
                &self.reader.path,
                &t.name,
                format!("blocks hold {kept} kept values, the record says {recorded}"),
            ));
        }
        // Blocks wholly past an extended tensor's base have no base part.
        let base: Option<Vec<ChunkHash>> = match t.extended {
            Some(_) => Some(decoded.iter().filter_map(|d| d.base).collect()),
            None => decoded.iter().map(|d| d.base).collect(),
        };
        if let (Some(base), Some(want)) = (base, t.base_hash) {
            if hash::merge(&base) != want {
                return Err(base_mismatch(base_path, &t.name));
            }
        }
        let out: Vec<ChunkHash> = decoded.iter().map(|d| d.out).collect();
        self.check_out(t, &out)
    }

    fn check_out(&self, t: &TensorRecord, parts: &[ChunkHash]) -> Result<()> {
        check_hash(hash::merge(parts), t.out_hash, || {
            Error::tensor(&self.reader.path, &t.name, "reconstructed tensor does not match its recorded hash")
        })
    }
}

/// Refuses an extended tensor (a resized vocabulary) where the base's buffer would have to
/// grow: it is rebuilt into a new buffer by [`Delta::reconstruct`] instead.
fn not_extended(d: &Delta, t: &TensorRecord) -> Result<()> {
    match &t.extended {
        Some(e) => Err(Error::tensor(
            &d.reader.path,
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

fn check_hash(got: Hash, want: Hash, err: impl FnOnce() -> Error) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(err())
    }
}

/// The error for a base tensor whose bytes are not the ones the delta was made from.
pub fn base_mismatch(base_path: &Path, name: &str) -> Error {
    Error::tensor(
        base_path,
        name,
        "base tensor differs from the one the delta was made from (blake3 mismatch): wrong or corrupt base model",
    )
}

fn expect_len(name: &str, what: &str, len: usize, want: u64) -> Result<()> {
    if len as u64 != want {
        return Err(Error::Config(format!("tensor '{name}': {what} buffer has {len} bytes, the tensor {want}")));
    }
    Ok(())
}

/// Blocks processed in parallel between two calls of `between`: a few per worker, so that
/// memory stays a few blocks per worker and Ctrl-C is seen within a few blocks' time.
fn wave_len() -> usize {
    2 * rayon::current_num_threads()
}

/// Runs `job(i, item)` on every item, a wave at a time on rayon's pool, calling `between`
/// before each wave and handing the results to `sink` in order after it; stops at the first
/// error met.
fn waves<T: Send, R: Send>(
    items: &mut [T],
    between: BetweenWaves,
    job: impl Fn(usize, &mut T) -> Result<R> + Sync,
    mut sink: impl FnMut(R) -> Result<()>,
) -> Result<()> {
    for (w, wave) in items.chunks_mut(wave_len()).enumerate() {
        between()?;
        let first = w * wave_len();
        let results: Vec<Result<R>> = wave.par_iter_mut().enumerate().map(|(i, x)| job(first + i, x)).collect();
        results.into_iter().try_for_each(|r| sink(r?))?;
    }
    Ok(())
}

/// [`waves`], the results collected.
fn collect_waves<T: Send, R: Send>(
    items: &mut [T],
    between: BetweenWaves,
    job: impl Fn(usize, &mut T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let mut out = Vec::with_capacity(items.len());
    waves(items, between, job, |r| {
        out.push(r);
        Ok(())
    })?;
    Ok(out)
}

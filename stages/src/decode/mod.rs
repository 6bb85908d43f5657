//! The decoder of `apply`, `verify` and the in-memory rebuild (the Python package): one
//! kernel per block, one check per tensor, one driver.
//!
//! - [`decode_block`], the kernel: reads a block, checks its hash, decompresses it, lays the
//!   base chunk (converted to the fine-tuned dtype) into the caller's output chunk, decodes the
//!   kept values onto it, and hashes the base and the output chunk.
//! - [`TensorCheck`], the check: once a tensor's blocks are all in, the kept count, the base
//!   hash (a wrong base is named by its tensor) and the output hash.
//! - The driver is [`ordered_window`]: a window of blocks on the worker pool, results taken in
//!   order, cancelled through the [`RunControl`].
//!
//! [`DecodeStage`] runs them over a whole delta, writing each chunk at its place in the output
//! shards (`pwrite`, so jobs need no ordering); [`in_memory`] runs them over one tensor into a
//! buffer its caller owns. The two differ only in who owns the output chunk.
//!
//! Input: the delta, and the base tensor of each record (from the reader). Output: the
//! output model's tensor data, written in place.

pub mod in_memory;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::checkpoint::TensorRef;
use crate::dtype::convert_chunk;
use crate::format::sparse::decode_sparse;
use crate::format::{block_sizes, DeltaReader, Hash, Manifest, Mode, TensorRecord};
use crate::hash::{self, ChunkHash};
use crate::run::runner::ordered_window;
use crate::run::RunControl;
use crate::{Error, Result};

/// One block of one tensor record: a job of the decoder.
#[derive(Debug, Clone, Copy)]
pub struct BlockSpan {
    /// The tensor record's index in the manifest.
    pub tensor: usize,
    /// The block's index in the record.
    pub block: usize,
    /// First element (pruned, dense) or byte (whole) of the block, and how many.
    pub start: u64,
    /// How many elements (pruned, dense) or bytes (whole).
    pub len: u64,
    /// How many blocks the tensor has (for the chunk hashes).
    pub blocks: usize,
}

impl BlockSpan {
    /// Bytes of the block's output chunk: `len` elements of the fine-tuned dtype, or `len`
    /// bytes of a whole tensor.
    pub fn out_bytes(&self, t: &TensorRecord) -> usize {
        match t.mode {
            Mode::Whole => self.len as usize,
            _ => self.len as usize * t.dtype.size(),
        }
    }

    /// Byte offset of the block's output chunk in its tensor.
    pub fn out_offset(&self, t: &TensorRecord) -> u64 {
        match t.mode {
            Mode::Whole => self.start,
            _ => self.start * t.dtype.size() as u64,
        }
    }
}

/// The blocks of tensor record `tensor`, in order.
pub fn tensor_spans(m: &Manifest, tensor: usize) -> impl Iterator<Item = BlockSpan> {
    let t = &m.tensors[tensor];
    let (len, per) = match t.mode {
        Mode::Whole => (t.numel() * t.dtype.size() as u64, m.raw_block_bytes),
        _ => (t.numel(), m.block_elems),
    };
    let blocks = len.div_ceil(per) as usize;
    block_sizes(len, per).enumerate().map(move |(block, (start, len))| BlockSpan { tensor, block, start, len, blocks })
}

/// What a block's output chunk holds before its kept values are decoded onto it.
#[derive(Clone, Copy)]
pub enum Onto<'a> {
    /// The base tensor's bytes (of its own dtype, all of them), of which the block's part is
    /// converted to the fine-tuned dtype; elements past an extended tensor's base are zero
    /// bits. `None`: no base (verify alone), zero bits everywhere.
    Base(Option<&'a [u8]>),
    /// The chunk already holds the base in the fine-tuned dtype (a tensor patched in place).
    InPlace,
}

/// What the kernel found in one block.
#[derive(Debug, Clone, Copy)]
pub struct DecodedBlock {
    /// The output chunk's hash, when asked for.
    pub out: Option<ChunkHash>,
    /// The base chunk's hash, when asked for and the block has a base part.
    pub base: Option<ChunkHash>,
    /// Positions the block set.
    pub kept: u64,
}

/// Reads block `span` of its tensor: its bytes, hash-checked and decompressed.
pub fn read_block(delta: &DeltaReader, span: &BlockSpan) -> Result<Vec<u8>> {
    let t = &delta.manifest.tensors[span.tensor];
    delta.block(&t.blocks[span.block], &t.name)
}

/// The decoder's kernel: rebuilds block `span` of its tensor from its payload `raw`
/// ([`read_block`]) into `out` (its output chunk, [`BlockSpan::out_bytes`] long), and hashes
/// the output chunk (`hash_out`) and the base chunk (`hash_base`).
pub fn decode_block(
    delta: &DeltaReader,
    span: &BlockSpan,
    raw: &[u8],
    onto: Onto<'_>,
    out: &mut [u8],
    hash_out: bool,
    hash_base: bool,
) -> Result<DecodedBlock> {
    let t = &delta.manifest.tensors[span.tensor];
    let offset = span.out_offset(t);
    if t.mode == Mode::Whole {
        // The reader checked that the block decompresses to exactly the chunk's bytes.
        out.copy_from_slice(raw);
        return Ok(whole_block(span, t, out, hash_out));
    }
    let size = t.dtype.size();
    let mut base_hash = None;
    match onto {
        Onto::Base(base) => {
            // An extended tensor's appended elements (past the base's) are decoded onto zero bits.
            let diffed = t.diffed_numel();
            let from_base = span.len.min(diffed.saturating_sub(span.start));
            let (converted, appended) = out.split_at_mut(from_base as usize * size);
            appended.fill(0);
            match (base, t.base_dtype) {
                (Some(b), Some(dtype)) if from_base > 0 => {
                    let bs = dtype.size() as u64;
                    let b = &b[(span.start * bs) as usize..((span.start + from_base) * bs) as usize];
                    convert_chunk(t.dtype, dtype, b, converted);
                    let base_blocks = diffed.div_ceil(delta.manifest.block_elems) as usize;
                    base_hash = hash_base.then(|| hash::hash_chunk(b, span.start * bs, base_blocks));
                }
                _ => converted.fill(0),
            }
        }
        Onto::InPlace => base_hash = hash_base.then(|| hash::hash_chunk(out, offset, span.blocks)),
    }
    let kept = decode_sparse(raw, out, size).map_err(|e| corrupt(delta, t, span.block, e))?;
    let out_hash = hash_out.then(|| hash::hash_chunk(out, offset, span.blocks));
    Ok(DecodedBlock { out: out_hash, base: base_hash, kept })
}

/// A block of a whole tensor is the tensor's bytes: `chunk`, the block's payload or a copy of
/// it, hashed when asked.
pub fn whole_block(span: &BlockSpan, t: &TensorRecord, chunk: &[u8], hash_out: bool) -> DecodedBlock {
    let out = hash_out.then(|| hash::hash_chunk(chunk, span.out_offset(t), span.blocks));
    DecodedBlock { out, base: None, kept: 0 }
}

/// The error for a block whose payload does not decode.
pub fn corrupt(delta: &DeltaReader, t: &TensorRecord, block: usize, e: String) -> Error {
    Error::tensor(&delta.path, &t.name, format!("corrupt block {block}: {e}"))
}

/// The error for a base tensor whose bytes (of hash `got`) are not the ones the delta was made
/// from; bytes that hash as the tensor the delta rebuilds are said to be that result already.
pub fn base_mismatch(base_path: &Path, t: &TensorRecord, got: &Hash) -> Error {
    if *got == t.out_hash {
        return Error::tensor(
            base_path,
            &t.name,
            "this model already holds the delta's result (the fine-tuned tensor), not the base the delta was \
             made from: it was patched already, or it is the fine-tuned model",
        );
    }
    Error::tensor(
        base_path,
        &t.name,
        "base tensor differs from the one the delta was made from (blake3 mismatch): wrong or corrupt base model",
    )
}

/// The decoded blocks of one tensor, checked once they are all in.
#[derive(Default)]
pub struct TensorCheck {
    outs: Vec<ChunkHash>,
    bases: Vec<ChunkHash>,
    kept: u64,
}

impl TensorCheck {
    /// Adds the next block of the tensor.
    pub fn add(&mut self, block: DecodedBlock) {
        self.outs.extend(block.out);
        self.bases.extend(block.base);
        self.kept += block.kept;
    }

    /// Checks tensor `t`, whose blocks are all in: the kept count; with `base` (where the base
    /// bytes came from, to name in the error), the base hash of the blocks' base parts; with
    /// `out`, the output hash. Then starts afresh for the next tensor.
    pub fn finish(&mut self, delta: &DeltaReader, t: &TensorRecord, base: Option<&Path>, out: bool) -> Result<()> {
        let (outs, bases, kept) = (std::mem::take(&mut self.outs), std::mem::take(&mut self.bases), self.kept);
        self.kept = 0;
        let recorded = t.kept + t.extended.as_ref().map_or(0, |e| e.stored);
        if t.mode != Mode::Whole && kept != recorded {
            return Err(Error::tensor(
                &delta.path,
                &t.name,
                format!("blocks hold {kept} kept values, the record says {recorded}"),
            ));
        }
        if let (Some(path), Some(want)) = (base, t.base_hash) {
            let got = hash::merge(&bases);
            if got != want {
                return Err(base_mismatch(path, t, &got));
            }
        }
        if out && hash::merge(&outs) != t.out_hash {
            return Err(Error::tensor(&delta.path, &t.name, "reconstructed tensor does not match its recorded hash"));
        }
        Ok(())
    }
}

/// The files of the output model, headers written and data sized: where decoded tensors go.
pub struct ModelFiles {
    /// The destination, to name in errors.
    pub dest: PathBuf,
    /// One per shard.
    pub files: Vec<File>,
    /// Per shard: byte offset of the data buffer in the file.
    pub data_start: Vec<u64>,
    /// Per tensor record: byte offset of the tensor in its shard's data buffer.
    pub begin: Vec<u64>,
}

impl ModelFiles {
    /// Writes `bytes` at `byte_start` of tensor record `tensor` (in shard `shard`), and starts
    /// their write-back to disk.
    fn write(&self, shard: usize, tensor: usize, byte_start: u64, bytes: &[u8]) -> Result<()> {
        let offset = self.data_start[shard] + self.begin[tensor] + byte_start;
        let file = &self.files[shard];
        file.write_all_at(bytes, offset).map_err(|e| Error::io(&self.dest, e))?;
        crate::writeback::start(file, offset, bytes.len() as u64);
        Ok(())
    }
}

/// What the decoder did.
#[derive(Debug, Default)]
pub struct DecodeTotals {
    /// Tensors rebuilt or checked.
    pub tensors: usize,
    /// Tensors whose base hash was checked.
    pub base_tensors_checked: usize,
    /// Blocks whose hash was checked.
    pub blocks: usize,
    /// Bytes of tensor data written or checked.
    pub tensor_bytes: u64,
}

/// The decoder stage: every block of every tensor, a window of them at a time on the worker
/// pool, results taken in order.
pub struct DecodeStage<'a> {
    /// The delta.
    pub delta: &'a DeltaReader,
    /// The base tensor of each record (`None` for whole tensors); `None` to check the delta
    /// alone.
    pub bases: Option<&'a [Option<TensorRef>]>,
    /// Where to write the model (`None`: check only).
    pub output: Option<&'a ModelFiles>,
    /// Blocks in flight at a time ([`crate::run::Budget::decode_window`]).
    pub window: usize,
    /// The worker pool.
    pub pool: &'a rayon::ThreadPool,
    /// Cancellation and progress.
    pub ctl: &'a RunControl,
}

impl DecodeStage<'_> {
    /// Decodes every block (onto the base when given), writes and hashes it, and checks every
    /// tensor.
    pub fn run(self) -> Result<DecodeTotals> {
        let m = &self.delta.manifest;
        self.ctl.set_total(m.tensors.iter().map(|t| t.numel() * t.dtype.size() as u64).sum());
        let mut totals = DecodeTotals { tensors: m.tensors.len(), blocks: m.blocks().count(), ..Default::default() };
        let with_base = self.bases.is_some();
        let spans = (0..m.tensors.len()).flat_map(|i| tensor_spans(m, i));
        let job = |span: BlockSpan| {
            let t = &m.tensors[span.tensor];
            let base = self.bases.and_then(|b| b[span.tensor].as_ref());
            let decoded = read_block(self.delta, &span).and_then(|raw| {
                // A whole tensor's payload is its output chunk: written as it is, not copied.
                let (out, decoded) = if t.mode == Mode::Whole {
                    // Whole tensors' hashes need no base: verify checks them too.
                    let d = whole_block(&span, t, &raw, true);
                    (raw, d)
                } else {
                    let mut out = vec![0u8; span.out_bytes(t)];
                    let onto = Onto::Base(base.map(|b| b.bytes()));
                    let d = decode_block(self.delta, &span, &raw, onto, &mut out, with_base, true)?;
                    (out, d)
                };
                if let Some(o) = self.output {
                    o.write(t.shard, span.tensor, span.out_offset(t), &out)?;
                }
                Ok(decoded)
            });
            (span, decoded)
        };
        let (mut check, mut next) = (TensorCheck::default(), 0);
        ordered_window(self.pool, spans, self.window, self.ctl, job, |(span, decoded)| {
            let t = &m.tensors[span.tensor];
            self.ctl.set_current(&t.name);
            // Every tensor before this one has all its blocks in (tensors without elements none).
            self.finish_before(span.tensor, &mut next, &mut check, &mut totals)?;
            check.add(decoded?);
            self.ctl.advance(span.out_bytes(t) as u64);
            Ok(true)
        })?;
        self.finish_before(m.tensors.len(), &mut next, &mut check, &mut totals)?;
        Ok(totals)
    }

    /// Checks every tensor from `next` to before `upto`, whose blocks are all in, and unmaps
    /// its base.
    fn finish_before(
        &self,
        upto: usize,
        next: &mut usize,
        check: &mut TensorCheck,
        totals: &mut DecodeTotals,
    ) -> Result<()> {
        for i in *next..upto {
            self.finish_tensor(check, i, totals)?;
        }
        *next = upto.max(*next);
        Ok(())
    }

    /// Checks tensor record `i`, whose blocks are all in, and unmaps its base.
    fn finish_tensor(&self, check: &mut TensorCheck, i: usize, totals: &mut DecodeTotals) -> Result<()> {
        let t = &self.delta.manifest.tensors[i];
        let base = self.bases.and_then(|b| b[i].as_ref());
        let with_base = self.bases.is_some();
        check.finish(self.delta, t, base.map(|b| b.shard.path.as_path()), with_base || t.mode == Mode::Whole)?;
        // Unmap as we go rather than all at exit.
        if let Some(b) = base {
            b.release();
        }
        totals.base_tensors_checked += base.is_some() as usize;
        totals.tensor_bytes += t.numel() * t.dtype.size() as u64;
        Ok(())
    }
}

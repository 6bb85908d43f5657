//! The decoder of `apply` and `verify`: every block of every tensor is one job on the worker
//! pool, a sliding window of them at a time. A job ([`decode_block`]) reads its block,
//! checks its hash, decompresses it, decodes the kept values onto the base chunk converted to
//! the fine-tuned dtype, writes the result at its own offset of its output shard (`pwrite`,
//! so jobs need no ordering) and hashes the base and the output chunk. Results are taken in
//! order, and each tensor is checked as soon as its last block is in: the kept count, the
//! base hash (a wrong base is named by its first differing tensor) and the output hash.
//!
//! Input: the delta, and the base tensor of each record (from the reader). Output: the
//! output model's tensor data, written in place.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use fapm_stages::checkpoint::TensorRef;
use fapm_stages::dtype::convert_chunk;
use fapm_stages::encode::decode_sparse;
use fapm_stages::format::{block_sizes, DeltaReader, Manifest, Mode, TensorRecord};
use fapm_stages::hash::{self, ChunkHash};
use fapm_stages::{Error, Result};

use super::read::{Chunk, TensorReader};
use crate::pipeline::runner::ordered_window;
use crate::pipeline::RunControl;

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
        fapm_stages::writeback::start(file, offset, bytes.len() as u64);
        Ok(())
    }
}

/// One block of one tensor: a job of the decoder.
#[derive(Clone, Copy)]
struct BlockJob {
    tensor: usize,
    block: usize,
    /// First element (diffable) or byte (whole) of the block, and how many.
    start: u64,
    len: u64,
    /// How many blocks the tensor has (for the chunk hashes).
    blocks: usize,
}

/// What a job produced.
struct DecodedBlock {
    out: Option<ChunkHash>,
    base: Option<ChunkHash>,
    kept: u64,
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

/// The decoder stage: its jobs on the worker pool, results taken in order.
pub struct DecodeStage<'a> {
    /// The delta.
    pub delta: &'a DeltaReader,
    /// The base tensor of each record (`None` for whole tensors); `None` to check the delta
    /// alone.
    pub bases: Option<&'a [Option<TensorRef>]>,
    /// Where to write the model (`None`: check only).
    pub output: Option<&'a ModelFiles>,
    /// Blocks in flight at a time ([`crate::pipeline::Budget::decode_window`]).
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
        let jobs = block_jobs(m);
        self.ctl.set_total(m.tensors.iter().map(|t| t.numel() * t.dtype.size() as u64).sum());
        let mut checks = TensorChecks::new(self.delta, self.bases);
        checks.decoded.tensors = m.tensors.len();
        checks.decoded.blocks = m.blocks().count();
        let job = |job: &BlockJob| {
            let base = self.bases.and_then(|b| b[job.tensor].as_ref());
            (*job, decode_block(self.delta, job, base, self.bases.is_some(), self.output))
        };
        ordered_window(self.pool, &jobs, self.window, self.ctl, job, |(job, decoded)| {
            let t = &m.tensors[job.tensor];
            self.ctl.set_current(&t.name);
            checks.finish_before(job.tensor)?;
            checks.add(decoded?);
            let unit = if t.mode == Mode::Whole { 1 } else { t.dtype.size() as u64 };
            self.ctl.advance(job.len * unit);
            Ok(true)
        })?;
        checks.finish_before(m.tensors.len())?;
        Ok(checks.decoded)
    }
}

/// Every block of every tensor, in order.
fn block_jobs(m: &Manifest) -> Vec<BlockJob> {
    let mut jobs = Vec::new();
    for (tensor, t) in m.tensors.iter().enumerate() {
        let sizes: Vec<(u64, u64)> = match t.mode {
            Mode::Whole => block_sizes(t.numel() * t.dtype.size() as u64, m.raw_block_bytes).collect(),
            _ => block_sizes(t.numel(), m.block_elems).collect(),
        };
        let blocks = sizes.len();
        jobs.extend(sizes.into_iter().enumerate().map(|(block, (start, len))| BlockJob {
            tensor,
            block,
            start,
            len,
            blocks,
        }));
    }
    jobs
}

/// The decoder's kernel: rebuilds one block's chunk, writes it and hashes it.
fn decode_block(
    delta: &DeltaReader,
    job: &BlockJob,
    base: Option<&TensorRef>,
    with_base: bool,
    output: Option<&ModelFiles>,
) -> Result<DecodedBlock> {
    let t = &delta.manifest.tensors[job.tensor];
    let raw = delta.block(&t.blocks[job.block], &t.name)?;
    let size = t.dtype.size() as u64;
    let (bytes, byte_start, kept, base_hash) = if t.mode == Mode::Whole {
        (raw, job.start, 0, None)
    } else {
        let mut out = vec![0u8; (job.len * size) as usize];
        let mut base_hash = None;
        // An extended tensor's appended elements (past the base's) are decoded onto zero bits.
        let diffed = t.diffed_numel();
        let chunk = Chunk { start: job.start as usize, len: job.len as usize }.before(diffed as usize);
        if let (Some(b), true) = (base, chunk.len > 0) {
            let bytes = TensorReader::new(b).chunk(chunk);
            convert_chunk(t.dtype, b.info().dtype, bytes, &mut out[..chunk.len * size as usize]);
            let base_blocks = diffed.div_ceil(delta.manifest.block_elems) as usize;
            base_hash = Some(hash::hash_chunk(bytes, job.start * b.info().dtype.size() as u64, base_blocks));
        }
        let kept = decode_sparse(&raw, &mut out, size as usize)
            .map_err(|e| Error::tensor(&delta.path, &t.name, format!("corrupt block {}: {e}", job.block)))?;
        (out, job.start * size, kept, base_hash)
    };
    if let Some(o) = output {
        o.write(t.shard, job.tensor, byte_start, &bytes)?;
    }
    // Whole tensors' hashes need no base: verify checks them too.
    let out = (with_base || t.mode == Mode::Whole).then(|| hash::hash_chunk(&bytes, byte_start, job.blocks));
    Ok(DecodedBlock { out, base: base_hash, kept })
}

/// The decoded blocks of the tensor being checked, and what was checked so far.
struct TensorChecks<'a> {
    delta: &'a DeltaReader,
    bases: Option<&'a [Option<TensorRef>]>,
    /// The next tensor to check.
    next: usize,
    outs: Vec<ChunkHash>,
    base_hashes: Vec<ChunkHash>,
    kept: u64,
    decoded: DecodeTotals,
}

impl<'a> TensorChecks<'a> {
    fn new(delta: &'a DeltaReader, bases: Option<&'a [Option<TensorRef>]>) -> Self {
        TensorChecks {
            delta,
            bases,
            next: 0,
            outs: Vec::new(),
            base_hashes: Vec::new(),
            kept: 0,
            decoded: DecodeTotals::default(),
        }
    }

    fn add(&mut self, block: DecodedBlock) {
        self.outs.extend(block.out);
        self.base_hashes.extend(block.base);
        self.kept += block.kept;
    }

    /// Checks every tensor before `upto`, whose blocks are all in.
    fn finish_before(&mut self, upto: usize) -> Result<()> {
        while self.next < upto {
            let t = &self.delta.manifest.tensors[self.next];
            let base = self.bases.and_then(|b| b[self.next].as_ref());
            check_tensor(self.delta, t, base, self.bases.is_some(), &self.outs, &self.base_hashes, self.kept)?;
            // Unmap as we go rather than all at exit.
            if let Some(b) = base {
                b.release();
            }
            self.decoded.base_tensors_checked += base.is_some() as usize;
            self.decoded.tensor_bytes += t.numel() * t.dtype.size() as u64;
            self.outs.clear();
            self.base_hashes.clear();
            self.kept = 0;
            self.next += 1;
        }
        Ok(())
    }
}

/// Checks a finished tensor's hashes and kept count.
fn check_tensor(
    delta: &DeltaReader,
    t: &TensorRecord,
    base: Option<&TensorRef>,
    with_base: bool,
    outs: &[ChunkHash],
    base_hashes: &[ChunkHash],
    kept: u64,
) -> Result<()> {
    let recorded = t.kept + t.extended.as_ref().map_or(0, |e| e.stored);
    if t.mode != Mode::Whole && kept != recorded {
        return Err(Error::tensor(
            &delta.path,
            &t.name,
            format!("blocks hold {kept} kept values, the record says {recorded}"),
        ));
    }
    if let (Some(b), Some(want)) = (base, t.base_hash) {
        if hash::merge(base_hashes) != want {
            return Err(Error::tensor(
                &b.shard.path,
                &t.name,
                "base tensor differs from the one the delta was made from (blake3 mismatch): wrong or corrupt base model",
            ));
        }
    }
    if (with_base || t.mode == Mode::Whole) && hash::merge(outs) != t.out_hash {
        return Err(Error::tensor(&delta.path, &t.name, "reconstructed tensor does not match its recorded hash"));
    }
    Ok(())
}

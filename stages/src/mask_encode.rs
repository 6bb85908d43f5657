//! The masker and the sparse delta encoder, fused into one per-chunk kernel
//! ([`mask_encode_chunk`]): for each chunk, select the kept positions (from the hits the
//! threshold stage gathered, or from the task vector's keys computed again), rebuild the
//! chunk (the base converted to the fine-tuned dtype, the kept fine-tuned values written over
//! it), encode it as a sparse block, compress it and hash the rebuilt and the base chunk.
//!
//! Fused, because each step reads what the previous one just wrote: done chunk by chunk on
//! one worker, the chunk's base and fine-tuned bytes, its keys and its rebuilt pieces stay in
//! that core's cache. As separate stages, every step would write a chunk-sized buffer to
//! memory and the next would read it back.
//!
//! Input: [`ThresholdedTask`] tensors in output order. Output: each tensor's [`EncodedBlock`]s in
//! order, then the tensor itself ([`ToWriter`]).

use std::io;
use std::time::{Duration, Instant};

use crate::checkpoint::TensorRef;
use crate::dtype::convert_chunk;
use crate::format::sparse::{encode_sparse_in_pieces, PIECE_BYTES};
use crate::format::{block_sizes, compress, Payload, RAW_BLOCK_BYTES};
use crate::hash::{self, ChunkHash, ChunkHasher};
use crate::threshold::score::Scorer;
use crate::threshold::select::{quotas, Cut};
use crate::{Error, Result};
use crossbeam_channel::{Receiver, Sender};
use rayon::prelude::*;

use crate::read::{chunks, Chunk, PairReader, Task};
use crate::run::runner::ordered_window;
use crate::run::RunControl;
use crate::threshold::{ChunkScan, ThresholdedTask};

/// One encoded block on its way to the writer.
pub struct EncodedBlock {
    /// The compressed block.
    pub compressed: Vec<u8>,
    /// Its length before compression.
    pub raw_len: u64,
    /// The hash of the chunk of the output tensor it rebuilds.
    pub out: ChunkHash,
    /// The hash of the base chunk it was encoded against (diffable tensors).
    pub base: Option<ChunkHash>,
    /// The chunk's candidates.
    pub candidates: u64,
    /// The positions it keeps.
    pub kept: u64,
    /// Positions it stores in an extended tensor's appended rows.
    pub appended: u64,
}

/// What the writer receives: the blocks of a tensor, then the tensor itself.
pub enum ToWriter {
    /// The next block of the current tensor.
    Block(EncodedBlock),
    /// The current tensor, all of its blocks sent.
    TensorEnd(Task),
}

/// Per-worker buffers reused from chunk to chunk, rather than allocated and zeroed for each.
#[derive(Default)]
struct Scratch {
    keys: Vec<u32>,
    kept: Vec<u32>,
    /// A piece of the rebuilt chunk.
    piece: Vec<u8>,
    raw: Vec<u8>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// The mask + encode stage: one thread, its per-chunk work on the worker pool.
pub struct MaskEncodeStage<'a> {
    /// Elements per chunk of a diffable tensor.
    pub block_elems: u64,
    /// Chunks in flight at a time ([`crate::run::Budget::encode_window`]).
    pub window: usize,
    /// The worker pool.
    pub pool: &'a rayon::ThreadPool,
    /// Cancellation and progress.
    pub ctl: &'a RunControl,
}

impl MaskEncodeStage<'_> {
    /// Encodes every tensor, a sliding window of chunks at a time, in order.
    pub fn run(self, input: Receiver<ThresholdedTask>, output: Sender<ToWriter>) -> Result<()> {
        // How long this stage waits for the threshold stage: where the time goes (`-v`).
        let mut starved = Duration::ZERO;
        loop {
            let t0 = Instant::now();
            let Ok(mut tensor) = input.recv() else { break };
            starved += t0.elapsed();
            self.ctl.set_current(&tensor.task.ft.info().name);
            let scans = std::mem::take(&mut tensor.chunks);
            let sent = match tensor.scorer {
                Some(scorer) => self.encode_diffable(&tensor, scorer, scans, &output)?,
                None => self.encode_whole(&tensor.task.ft, &output)?,
            };
            // Unmap as we go, on this thread, rather than all at exit.
            tensor.task.ft.release();
            tensor.task.base.iter().for_each(TensorRef::release);
            if !sent || output.send(ToWriter::TensorEnd(tensor.task)).is_err() {
                return Ok(());
            }
        }
        tracing::debug!(?starved, "encoder waited for the threshold stage");
        Ok(())
    }

    /// Encodes a pruned or dense tensor; `false` when the writer has gone.
    fn encode_diffable(
        &self,
        tensor: &ThresholdedTask,
        scorer: Scorer,
        scans: Vec<ChunkScan>,
        output: &Sender<ToWriter>,
    ) -> Result<bool> {
        let (ft, base) = (&tensor.task.ft, tensor.task.base.as_ref().expect("diffable tensors have a base"));
        let chunks = chunks(ft.info().numel(), self.block_elems);
        let diffed = tensor.task.diffed as usize;
        let mask = TensorMask {
            cut: tensor.cut,
            scorer,
            pair: PairReader::new(ft, base),
            chunks: chunks.len(),
            diffed,
            base_chunks: diffed.div_ceil(self.block_elems as usize),
        };
        let mut scans: Vec<Option<ChunkScan>> = scans.into_iter().map(Some).collect();
        scans.resize_with(chunks.len(), || None);
        let quotas = boundary_quotas(&mask, &chunks, &scans, self.pool);
        let mut base_hashes = tensor.base_hashes.iter().copied();
        let jobs = chunks.iter().zip(scans).zip(quotas).map(|((&chunk, scan), quota)| ChunkJob {
            chunk,
            scan,
            quota,
            base_hash: base_hashes.next(),
        });
        // Input bytes a chunk reads: the fine-tuned elements, and the base's where there is a
        // base element (not in the rows an extended tensor adds), as the total counts them.
        let chunk_bytes = |c: Chunk| {
            let with_base = (c.start + c.len).min(diffed).saturating_sub(c.start);
            (c.len * scorer.ft.size() + with_base * scorer.base.size()) as u64
        };
        let mut sent = chunks.iter();
        let job = |job| mask_encode_chunk(&mask, job);
        ordered_window(self.pool, jobs, self.window, self.ctl, job, |block| {
            let block = block.map_err(|e| compression_failed(ft, e))?;
            self.ctl.advance(sent.next().map_or(0, |&c| chunk_bytes(c)));
            Ok(output.send(ToWriter::Block(block)).is_ok())
        })
    }

    /// Encodes a whole tensor as raw blocks; `false` when the writer has gone.
    fn encode_whole(&self, t: &TensorRef, output: &Sender<ToWriter>) -> Result<bool> {
        let bytes = t.bytes();
        let blocks: Vec<(u64, u64)> = block_sizes(bytes.len() as u64, RAW_BLOCK_BYTES).collect();
        let job = |&(s, l): &(u64, u64)| -> io::Result<EncodedBlock> {
            let raw = &bytes[s as usize..(s + l) as usize];
            Ok(EncodedBlock {
                compressed: compress(raw, Payload::Bytes)?,
                raw_len: l,
                out: hash::hash_chunk(raw, s, blocks.len()),
                base: None,
                candidates: 0,
                kept: 0,
                appended: 0,
            })
        };
        ordered_window(self.pool, &blocks, self.window, self.ctl, job, |block| {
            let block = block.map_err(|e| compression_failed(t, e))?;
            self.ctl.advance(block.raw_len);
            Ok(output.send(ToWriter::Block(block)).is_ok())
        })
    }
}

fn compression_failed(t: &TensorRef, e: io::Error) -> Error {
    Error::tensor(&t.shard.path, &t.info().name, format!("compression failed: {e}"))
}

/// What the kernel needs of a diffable tensor.
struct TensorMask<'t> {
    cut: Cut,
    scorer: Scorer,
    pair: PairReader<'t>,
    /// How many chunks the tensor has (for the output's chunk hashes).
    chunks: usize,
    /// Elements diffed against the base: all of them, but for an extended tensor's appended
    /// rows, which are scored by no one: every non-zero one is kept, on a base of zero bits.
    diffed: usize,
    /// How many chunks the base has (for its chunk hashes).
    base_chunks: usize,
}

/// How many of the boundary level's candidates a chunk may keep: all of them, or a quota.
#[derive(Clone, Copy)]
struct Quota {
    /// At most this many (`u64::MAX`: all).
    take: u64,
    /// The chunk's boundary candidates, when they were counted.
    at_level: Option<u64>,
}

impl Quota {
    /// Every boundary candidate.
    const ALL: Quota = Quota { take: u64::MAX, at_level: None };
}

/// One chunk's work for the kernel.
struct ChunkJob<'p> {
    chunk: Chunk,
    scan: Option<ChunkScan<'p>>,
    quota: Quota,
    /// The blake3 of the chunk's base elements, when the threshold stage computed it.
    base_hash: Option<ChunkHash>,
}

/// Each chunk's share of the boundary level. When only some of the level is kept, the
/// first ones in index order are, so every chunk's count at the level is needed first
/// (counted in its hits where there are, else from its keys computed again).
fn boundary_quotas(
    mask: &TensorMask,
    chunks: &[Chunk],
    scans: &[Option<ChunkScan>],
    pool: &rayon::ThreadPool,
) -> Vec<Quota> {
    let (Cut::Level { take, .. }, true) = (mask.cut, mask.cut.is_partial()) else {
        return vec![Quota::ALL; chunks.len()];
    };
    let at_level: Vec<u64> = pool.install(|| {
        chunks
            .par_iter()
            .zip(scans)
            .map(|(&chunk, scan)| match scan.as_ref().and_then(|s| s.hits.as_ref()) {
                Some(held) => mask.cut.at_level_in(&held.hits.keys),
                None => {
                    let (ft, base) = mask.pair.chunk(chunk.before(mask.diffed));
                    let mut n = 0;
                    mask.scorer.for_each_keys(ft, base, |_, keys| n += mask.cut.at_level_in(keys));
                    n
                }
            })
            .collect()
    });
    let mut remaining = take;
    let takes = quotas(at_level.iter().copied(), &mut remaining);
    takes.into_iter().zip(at_level).map(|(take, at_level)| Quota { take, at_level: Some(at_level) }).collect()
}

/// The kernel: masks one chunk and encodes it, top to bottom on one worker.
fn mask_encode_chunk(mask: &TensorMask, job: ChunkJob) -> io::Result<EncodedBlock> {
    let ChunkJob { chunk, scan, quota, base_hash: hashed } = job;
    let (ft_dtype, base_dtype) = (mask.scorer.ft, mask.scorer.base);
    let (fs, bs) = (ft_dtype.size(), base_dtype.size());
    // The part of the chunk diffed against the base (all of it but an extended tensor's rows).
    let (ft_diffed, base) = mask.pair.chunk(chunk.before(mask.diffed));
    let diffed = ft_diffed.len() / fs;
    let ft = mask.pair.ft.chunk(chunk);
    let mut scratch = SCRATCH.take();
    let Scratch { keys, kept, piece, raw } = &mut scratch;

    // Mask: the kept positions, from the gathered hits (whose buffer goes back to the pool
    // here), or from the diff and scores of the chunk computed again; then an extended
    // tensor's appended positions whose bits are not zero.
    kept.resize(kept.len().max(chunk.len), 0);
    let (candidates, n) = match scan {
        Some(ChunkScan { candidates, hits: Some(held) }) => {
            (candidates, mask.cut.select_hits(&held.hits, quota.take, quota.at_level, kept))
        }
        _ => {
            keys.resize(diffed, 0);
            let c = mask.scorer.keys(ft_diffed, base, keys);
            (c as u64, mask.cut.select(keys, quota.take, quota.at_level, kept))
        }
    };
    let appended = keep_appended(ft, fs, diffed, n, kept);

    // Rebuild and encode, a cache-sized piece at a time: each piece of the base is hashed
    // and converted to the fine-tuned dtype (zero bits past the base), the kept fine-tuned
    // values are written over it (and into the block), and the rebuilt piece is hashed. The
    // base is read from memory once.
    piece.resize(PIECE_BYTES, 0);
    let mut out_hash = ChunkHasher::new((chunk.start * fs) as u64, mask.chunks);
    let mut base_hash = hashed.is_none().then(|| ChunkHasher::new((chunk.start * bs) as u64, mask.base_chunks));
    let fill = |start: usize, out: &mut [u8]| {
        let start = start.min(diffed);
        let from_base = (out.len() / fs).min(diffed - start);
        let b = &base[start * bs..(start + from_base) * bs];
        if let Some(h) = &mut base_hash {
            h.update(b);
        }
        if ft_dtype == base_dtype && b.len() == out.len() {
            return Some(b); // the encoder copies it as it goes
        }
        convert_chunk(ft_dtype, base_dtype, b, &mut out[..from_base * fs]);
        out[from_base * fs..].fill(0);
        None
    };
    let len = encode_sparse_in_pieces(&kept[..n + appended], ft, fs, raw, piece, fill, |out| out_hash.update(out));

    // Compress.
    let compressed = compress(&raw[..len], Payload::Sparse);
    let block = compressed.map(|compressed| EncodedBlock {
        compressed,
        raw_len: len as u64,
        out: out_hash.finish(),
        base: (diffed > 0).then(|| hashed.unwrap_or_else(|| base_hash.as_ref().expect("hashed here").finish())),
        candidates,
        kept: n as u64,
        appended: appended as u64,
    });
    SCRATCH.set(scratch);
    block
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

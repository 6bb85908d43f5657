//! The writer: appends each encoded block to the delta as it arrives, in order, and builds
//! each tensor's record (its blocks, the kept count, and its base and output hashes merged
//! from the chunk hashes). Single, so the delta's bytes do not depend on the threads.
//!
//! Input: [`ToWriter`] messages. Output: the tensor records, for the manifest.

use std::path::Path;

use crate::format::{
    block_sizes, compress, Block, DeltaWriter, Extended, Mode, Payload, SideFile, TensorRecord, RAW_BLOCK_BYTES,
};
use crate::hash::{self, ChunkHash};
use crate::{Error, Result};
use crossbeam_channel::Receiver;

use crate::mask_encode::{EncodedBlock, ToWriter};
use crate::read::Task;
use crate::run::RunControl;

/// The writer stage: one thread.
pub struct WriteStage<'a> {
    /// The delta being written.
    pub writer: &'a mut DeltaWriter,
    /// Cancellation.
    pub ctl: &'a RunControl,
}

impl WriteStage<'_> {
    /// Appends every block and returns the records of the tensors, in order.
    pub fn run(self, input: Receiver<ToWriter>) -> Result<Vec<TensorRecord>> {
        let mut records = Vec::new();
        let mut tensor = TensorBlocks::default();
        for msg in input {
            self.ctl.check()?;
            match msg {
                ToWriter::Block(block) => {
                    let written = self.writer.block(&block.compressed, block.raw_len)?;
                    tensor.add(written, block);
                }
                ToWriter::TensorEnd(t) => records.push(tensor.finish(&t)),
            }
        }
        Ok(records)
    }
}

/// The blocks of the tensor being written, and their hashes and counts.
#[derive(Default)]
struct TensorBlocks {
    blocks: Vec<Block>,
    outs: Vec<ChunkHash>,
    bases: Vec<ChunkHash>,
    candidates: u64,
    kept: u64,
    appended: u64,
}

impl TensorBlocks {
    fn add(&mut self, written: Block, block: EncodedBlock) {
        self.blocks.push(written);
        self.outs.push(block.out);
        self.bases.extend(block.base);
        self.candidates += block.candidates;
        self.kept += block.kept;
        self.appended += block.appended;
    }

    /// The record of the tensor whose blocks were added; starts on the next one.
    fn finish(&mut self, t: &Task) -> TensorRecord {
        let info = t.ft.info();
        let base = t.base.as_ref();
        let whole = t.mode == Mode::Whole;
        let record = TensorRecord {
            name: info.name.clone(),
            shard: t.ft.shard.position,
            dtype: info.dtype,
            shape: info.shape.clone(),
            mode: t.mode,
            extended: t.extended().then(|| Extended {
                base_shape: base.map(|b| b.info().shape.clone()).unwrap_or_default(),
                stored: self.appended,
            }),
            base_dtype: base.map(|b| b.info().dtype),
            base_hash: base.map(|_| hash::merge(&self.bases)),
            out_hash: hash::merge(&self.outs),
            candidates: if whole { info.numel() } else { self.candidates },
            kept: if whole { info.numel() } else { self.kept },
            blocks: std::mem::take(&mut self.blocks),
        };
        self.outs.clear();
        self.bases.clear();
        (self.candidates, self.kept, self.appended) = (0, 0, 0);
        record
    }
}

/// Appends the side file `path` to the delta as `rel`.
pub fn write_side_file(writer: &mut DeltaWriter, rel: &str, path: &Path) -> Result<SideFile> {
    let data = crate::read::side::read(path)?;
    let mut blocks = Vec::new();
    for (s, l) in block_sizes(data.len() as u64, RAW_BLOCK_BYTES) {
        let raw = &data[s as usize..(s + l) as usize];
        let packed = compress(raw, Payload::Bytes).map_err(|e| Error::io(path, e))?;
        blocks.push(writer.block(&packed, l)?);
    }
    Ok(SideFile { path: rel.to_owned(), size: data.len() as u64, hash: blake3::hash(&data).into(), blocks })
}

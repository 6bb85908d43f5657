//! Writing a delta in one pass: preamble, blocks as they come, then manifest and footer.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{preamble, Block, Hash, Manifest, END_MAGIC, FOOTER_LEN, PREAMBLE_LEN, VERSION, ZSTD_LEVEL};
use crate::error::{Error, Result};

/// Appends blocks to a delta file and finishes it with the manifest and footer.
pub struct DeltaWriter {
    out: BufWriter<File>,
    path: PathBuf,
    offset: u64,
    writeback: crate::writeback::SequentialWriteback,
}

impl DeltaWriter {
    /// Starts a delta in `file` (empty, opened for writing); `path` names it in errors.
    pub fn new(file: File, path: &Path) -> Result<Self> {
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&preamble(VERSION)).map_err(|e| Error::io(path, e))?;
        Ok(DeltaWriter { out, path: path.to_path_buf(), offset: PREAMBLE_LEN, writeback: Default::default() })
    }

    /// Appends one compressed block of `raw_len` decompressed bytes.
    pub fn block(&mut self, compressed: &[u8], raw_len: u64) -> Result<Block> {
        self.out.write_all(compressed).map_err(|e| Error::io(&self.path, e))?;
        let block =
            Block { offset: self.offset, len: compressed.len() as u64, raw_len, hash: blake3::hash(compressed).into() };
        self.offset += compressed.len() as u64;
        let flushed = self.offset - self.out.buffer().len() as u64;
        self.writeback.written(self.out.get_ref(), flushed);
        Ok(block)
    }

    /// Writes the manifest and the footer, flushes and syncs; returns the file's size.
    pub fn finish(mut self, manifest: &Manifest) -> Result<u64> {
        let json = serde_json::to_vec(manifest).expect("a manifest always serializes");
        let packed = zstd::bulk::compress(&json, ZSTD_LEVEL).map_err(|e| Error::io(&self.path, e))?;
        let mut footer = Vec::with_capacity(FOOTER_LEN as usize);
        footer.extend_from_slice(&self.offset.to_le_bytes());
        footer.extend_from_slice(&(packed.len() as u64).to_le_bytes());
        footer.extend_from_slice(&(json.len() as u64).to_le_bytes());
        let hash = footer_hash(&preamble(VERSION), &packed, &footer);
        footer.extend_from_slice(&hash.0);
        footer.extend_from_slice(&END_MAGIC);
        let io = |e| Error::io(&self.path, e);
        self.out.write_all(&packed).map_err(io)?;
        self.out.write_all(&footer).map_err(io)?;
        let file = self.out.into_inner().map_err(|e| Error::io(&self.path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok(self.offset + packed.len() as u64 + FOOTER_LEN)
    }
}

/// The footer's hash: blake3 over the preamble, the compressed manifest, and the footer's
/// first 24 bytes (manifest offset, length, raw length).
pub(super) fn footer_hash(preamble: &[u8], packed_manifest: &[u8], footer_head: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(preamble);
    h.update(packed_manifest);
    h.update(&footer_head[..24]);
    h.finalize().into()
}

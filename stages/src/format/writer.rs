//! Writing a delta in one pass: preamble, blocks as they come, then manifest and footer.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{preamble, Block, Manifest, END_MAGIC, FOOTER_LEN, PREAMBLE_LEN, VERSION, ZSTD_LEVEL};
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
    ///
    /// The manifest's text is never held whole (a model of many tensors makes it hundreds of
    /// MB): it is serialized once to count its bytes, then again into a zstd stream told that
    /// count in advance (the frame header records it, as a one-shot compression's does), whose
    /// output goes to the file through the footer's hash. For a manifest of one zstd block (128
    /// KiB of text) the frame is the one `zstd::bulk::compress` makes; larger ones may differ in
    /// bytes (not in what they decompress to) from what fapm wrote before.
    pub fn finish(mut self, manifest: &Manifest) -> Result<u64> {
        let path = self.path.clone();
        let io = |e: std::io::Error| Error::io(&path, e);
        let mut counted = Counted { inner: std::io::sink(), hasher: None, len: 0 };
        serde_json::to_writer(&mut counted, manifest).expect("a manifest always serializes");
        let raw_len = counted.len;
        // The footer's hash: the preamble, the compressed manifest as it is written, then the
        // footer's first 24 bytes (the reader's `footer_hash` over the same bytes).
        let mut hasher = blake3::Hasher::new();
        hasher.update(&preamble(VERSION));
        let packed = Counted { inner: &mut self.out, hasher: Some(hasher), len: 0 };
        let mut zstd = zstd::stream::Encoder::new(packed, ZSTD_LEVEL).map_err(io)?;
        zstd.set_pledged_src_size(Some(raw_len)).map_err(io)?;
        zstd.include_contentsize(true).map_err(io)?;
        let mut text = std::io::BufWriter::with_capacity(1 << 16, zstd);
        serde_json::to_writer(&mut text, manifest).map_err(|e| io(e.into()))?;
        let packed = text.into_inner().map_err(|e| io(e.into_error()))?.finish().map_err(io)?;
        let (packed_len, mut hasher) = (packed.len, packed.hasher.expect("hashed"));
        let mut footer = Vec::with_capacity(FOOTER_LEN as usize);
        footer.extend_from_slice(&self.offset.to_le_bytes());
        footer.extend_from_slice(&packed_len.to_le_bytes());
        footer.extend_from_slice(&raw_len.to_le_bytes());
        hasher.update(&footer);
        footer.extend_from_slice(hasher.finalize().as_bytes());
        footer.extend_from_slice(&END_MAGIC);
        self.out.write_all(&footer).map_err(io)?;
        let file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(self.offset + packed_len + FOOTER_LEN)
    }
}

/// A writer that counts what passes through it and, with a hasher, hashes it.
struct Counted<W> {
    inner: W,
    hasher: Option<blake3::Hasher>,
    len: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

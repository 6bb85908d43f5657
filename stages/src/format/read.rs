//! Opening a delta: footer, manifest hash, and a structural check of every record before any
//! block is trusted; then verified block reads.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::write::footer_hash;
use super::{
    block_sizes, Block, Manifest, Mode, Source, TensorRecord, END_MAGIC, FOOTER_LEN, MAGIC, MAX_BLOCK_ELEMS,
    MAX_MANIFEST_LEN, OLDEST_VERSION, PREAMBLE_LEN, VERSION,
};
use crate::checkpoint::{is_safe_relative, parse_header, INDEX_FILE};
use crate::encode::max_sparse_len;
use crate::error::{Error, Result};

/// The largest ratio of decompressed to compressed manifest bytes a reader accepts (above
/// the first MiB). Real manifests of many similar tensors reach about 70:1 (3,000 tensors);
/// a bomb of a few hundred bytes that claims megabytes is in the tens of thousands.
pub const MAX_MANIFEST_RATIO: u64 = 4096;

/// The largest side file a delta may carry (SPEC section 4).
pub const MAX_SIDE_FILE: u64 = 64 << 20;

/// An opened delta whose manifest has been verified and checked for consistency.
pub struct DeltaReader {
    /// The delta's path.
    pub path: PathBuf,
    /// The verified manifest.
    pub manifest: Manifest,
    /// The file's size.
    pub size: u64,
    file: File,
}

impl DeltaReader {
    /// Opens `path`, checks preamble, footer and manifest hash, and validates the manifest.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::invalid(path, msg);
        // Checked before opening: opening a FIFO would block.
        if !std::fs::metadata(path).map_err(|e| Error::io(path, e))?.is_file() {
            return Err(bad("not a regular file".into()));
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        let size = meta.len();
        if size < PREAMBLE_LEN + FOOTER_LEN {
            return Err(bad(format!("{size} bytes is too short for a fapm delta")));
        }
        let read = |offset: u64, len: u64| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset).map_err(|e| Error::io(path, e))?;
            Ok(buf)
        };
        let pre = read(0, PREAMBLE_LEN)?;
        if pre[..8] != MAGIC {
            return Err(bad("not a fapm delta (bad magic)".into()));
        }
        let version = u32::from_le_bytes(pre[8..12].try_into().unwrap());
        if version > VERSION {
            return Err(bad(format!(
                "delta format version {version} is newer than this fapm reads ({VERSION}); upgrade fapm"
            )));
        }
        if version < OLDEST_VERSION || pre[12..16] != [0; 4] {
            return Err(bad(format!("corrupt preamble (version {version})")));
        }
        let footer = read(size - FOOTER_LEN, FOOTER_LEN)?;
        if footer[56..] != END_MAGIC {
            return Err(bad("truncated or corrupt delta (no end marker)".into()));
        }
        let word = |i: usize| u64::from_le_bytes(footer[8 * i..8 * i + 8].try_into().unwrap());
        let (m_off, m_len, m_raw) = (word(0), word(1), word(2));
        if m_off < PREAMBLE_LEN || m_off.checked_add(m_len) != Some(size - FOOTER_LEN) {
            return Err(bad("corrupt footer (manifest position)".into()));
        }
        if m_raw > MAX_MANIFEST_LEN {
            return Err(bad(format!("manifest of {m_raw} bytes exceeds the {MAX_MANIFEST_LEN}-byte limit")));
        }
        // A real manifest compresses well, but not thousands of times over: a far higher
        // claimed ratio is a decompression bomb, refused before allocating for it.
        if m_raw > MAX_MANIFEST_RATIO.saturating_mul(m_len).max(1 << 20) {
            return Err(bad(format!(
                "manifest of {m_raw} bytes from {m_len} compressed exceeds the {MAX_MANIFEST_RATIO}:1 limit"
            )));
        }
        let packed = read(m_off, m_len)?;
        if footer_hash(&pre, &packed, &footer).0[..] != footer[24..56] {
            return Err(bad("manifest hash mismatch: the delta is corrupt".into()));
        }
        let json = zstd::bulk::decompress(&packed, m_raw as usize)
            .map_err(|e| bad(format!("manifest does not decompress: {e}")))?;
        if json.len() as u64 != m_raw {
            return Err(bad("manifest has the wrong length".into()));
        }
        let manifest: Manifest = serde_json::from_slice(&json).map_err(|e| bad(format!("malformed manifest: {e}")))?;
        if manifest.version != version {
            return Err(bad(format!("manifest version {} in a version {version} file", manifest.version)));
        }
        validate(path, &manifest, m_off)?;
        Ok(DeltaReader { path: path.to_path_buf(), manifest, size, file })
    }

    /// Reads one block's compressed bytes and checks their hash; `what` names it in errors.
    pub fn packed_block(&self, block: &Block, what: &str) -> Result<Vec<u8>> {
        let mut packed = vec![0u8; block.len as usize];
        self.file.read_exact_at(&mut packed, block.offset).map_err(|e| Error::io(&self.path, e))?;
        if blake3::hash(&packed).as_bytes() != &block.hash.0 {
            return Err(Error::tensor(
                &self.path,
                what,
                format!("block at byte {} is corrupt (hash mismatch)", block.offset),
            ));
        }
        Ok(packed)
    }

    /// Reads one block, checks its hash and decompresses it; `what` names it in errors.
    pub fn block(&self, block: &Block, what: &str) -> Result<Vec<u8>> {
        let packed = self.packed_block(block, what)?;
        let raw = zstd::bulk::decompress(&packed, block.raw_len as usize)
            .map_err(|e| Error::tensor(&self.path, what, format!("block does not decompress: {e}")))?;
        if raw.len() as u64 != block.raw_len {
            return Err(Error::tensor(&self.path, what, "block has the wrong length"));
        }
        Ok(raw)
    }
}

/// Checks the fields of one tensor record against each other; the reason when they disagree.
fn check_record(t: &TensorRecord) -> std::result::Result<(), &'static str> {
    let n = t.numel();
    let diffable = t.mode != Mode::Whole;
    let typed_ok = match t.base_dtype {
        Some(b) => diffable && b.is_diffable() && t.dtype.is_diffable() && t.base_hash.is_some(),
        None => !diffable && t.base_hash.is_none(),
    };
    if !typed_ok || t.kept > t.candidates || t.candidates > n || (!diffable && t.kept != n) {
        return Err("has inconsistent fields");
    }
    if let Some(e) = &t.extended {
        // SPEC section 2: same rank >= 1, same sizes but the first, the fine-tuned one larger.
        let b = &e.base_shape;
        let extends =
            diffable && !b.is_empty() && b.len() == t.shape.len() && b[1..] == t.shape[1..] && b[0] < t.shape[0];
        if !extends || t.candidates > t.diffed_numel() || e.stored > n - t.diffed_numel() {
            return Err("has a base shape that it does not extend");
        }
    }
    Ok(())
}

/// Checks that a manifest describes a consistent delta whose blocks tile the file.
fn validate(path: &Path, m: &Manifest, blocks_end: u64) -> Result<()> {
    let bad = |msg: String| Error::invalid(path, format!("inconsistent manifest: {msg}"));
    if m.format != "fapm-delta" || !m.version_fields_ok() {
        return Err(bad(format!("format '{}' version {}", m.format, m.version)));
    }
    // Blocks are hashed as blake3 subtrees: a power of two of at least 1 KiB each.
    let pow2 = |x: u64, lo: u64, hi: u64| x.is_power_of_two() && (lo..=hi).contains(&x);
    if !pow2(m.block_elems, 512, MAX_BLOCK_ELEMS) || !pow2(m.raw_block_bytes, 1024, MAX_SIDE_FILE) {
        return Err(bad("block sizes out of range".into()));
    }
    if m.source == Source::File && (m.shards.len() != 1 || !m.side_files.is_empty()) {
        return Err(bad("a single-file delta must have one shard and no side files".into()));
    }
    let mut names = HashSet::new();
    for s in &m.shards {
        // The index is regenerated by apply: nothing else may be written under its name.
        if !is_safe_relative(&s.name) || s.name == INDEX_FILE || !names.insert(s.name.as_str()) {
            return Err(bad(format!("bad shard name '{}'", s.name)));
        }
    }
    let mut next = PREAMBLE_LEN;
    let mut check_block = |b: &Block, max_raw: u64, exact: bool, what: &str| {
        if b.offset != next || b.raw_len > max_raw || (exact && b.raw_len != max_raw) {
            return Err(bad(format!("block of '{what}' out of place")));
        }
        next = b
            .offset
            .checked_add(b.len)
            .filter(|&e| e <= blocks_end)
            .ok_or_else(|| bad(format!("block of '{what}' past the end")))?;
        Ok(())
    };
    // A part holds the records of a contiguous run of the shard headers' tensors.
    let (first, total) = match &m.part {
        Some(p) if p.index >= 1 && p.index <= p.count && p.first <= p.total => (p.first, p.total),
        Some(_) => return Err(bad("bad part numbers".into())),
        None => (0, u64::MAX),
    };
    let mut records = m.tensors.iter();
    let mut tensor_names = HashSet::new();
    let mut position = 0u64;
    for (si, shard) in m.shards.iter().enumerate() {
        for info in parse_header(path, &shard.header, u64::MAX)? {
            position += 1;
            if position <= first || position - first > m.tensors.len() as u64 {
                continue;
            }
            let t = records.next().ok_or_else(|| bad(format!("no record for tensor '{}'", info.name)))?;
            if t.name != info.name || t.shard != si || t.dtype != info.dtype || t.shape != info.shape {
                return Err(bad(format!("record '{}' disagrees with its shard header", t.name)));
            }
            if !tensor_names.insert(t.name.as_str()) {
                return Err(bad(format!("tensor '{}' appears twice", t.name)));
            }
            check_record(t).map_err(|why| bad(format!("record '{}' {why}", t.name)))?;
            let size = t.dtype.size() as u64;
            let diffable = t.mode != Mode::Whole;
            let sizes: Vec<(u64, u64)> = if diffable {
                block_sizes(t.numel(), m.block_elems).collect()
            } else {
                block_sizes(t.numel() * size, m.raw_block_bytes).collect()
            };
            if sizes.len() != t.blocks.len() {
                return Err(bad(format!(
                    "tensor '{}' has {} blocks, expected {}",
                    t.name,
                    t.blocks.len(),
                    sizes.len()
                )));
            }
            for (b, &(_, len)) in t.blocks.iter().zip(&sizes) {
                let (max, exact) = if diffable { (max_sparse_len(len, size as usize), false) } else { (len, true) };
                check_block(b, max, exact, &t.name)?;
            }
        }
    }
    if m.part.is_some() && position != total {
        return Err(bad(format!("the part says {total} tensors in all, the shard headers {position}")));
    }
    if records.next().is_some() {
        return Err(bad("more tensor records than shard headers declare".into()));
    }
    let mut paths = HashSet::new();
    for f in &m.side_files {
        if !is_safe_relative(&f.path)
            || f.size > MAX_SIDE_FILE
            || f.path == INDEX_FILE
            || names.contains(f.path.as_str())
            || !paths.insert(f.path.as_str())
        {
            return Err(bad(format!("bad side file '{}'", f.path)));
        }
        let sizes: Vec<_> = block_sizes(f.size, m.raw_block_bytes).collect();
        if sizes.len() != f.blocks.len() {
            return Err(bad(format!("side file '{}' has the wrong number of blocks", f.path)));
        }
        for (b, &(_, len)) in f.blocks.iter().zip(&sizes) {
            check_block(b, len, true, &f.path)?;
        }
    }
    if next != blocks_end {
        return Err(bad("blocks do not fill the file".into()));
    }
    Ok(())
}

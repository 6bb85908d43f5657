//! Opening a delta: footer, manifest hash, and a structural check of every record before any
//! block is trusted; then verified block reads.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{
    block_sizes, Block, Manifest, Mode, ShardRecord, SideFile, Source, SparsityRule, TensorRecord, END_MAGIC,
    FOOTER_LEN, MAGIC, MAX_BLOCK_ELEMS, MAX_MANIFEST_LEN, OLDEST_VERSION, PREAMBLE_LEN, VERSION,
};
use crate::bounded_json as json;
use crate::checkpoint::{parse_header, parsed_cost, INDEX_FILE, MAX_SHARDS};
use crate::error::{Error, Result};
use crate::format::sparse::max_sparse_len;
use crate::options;
use crate::paths;
use crate::run::RunControl;
use crate::threshold::select::Sparsity;
use crate::DEFAULT_MEMORY_BUDGET;

/// The largest ratio of decompressed to compressed manifest bytes a reader accepts (above
/// the first MiB): zstd's own ceiling, [`MAX_BLOCK_RATIO`]. Real manifests of many similar
/// tensors reach about 70:1 (3,000 tensors), but one that holds a shard header with a long
/// repetitive `__metadata__` value approaches the ceiling (20 MiB of one letter: 29,000:1 at
/// level 1), and what `prune` writes its readers accept. A claim past the ceiling cannot
/// decompress to what it says; below it, the memory the text takes is bounded by the budget.
pub const MAX_MANIFEST_RATIO: u64 = MAX_BLOCK_RATIO;

/// The largest ratio of a block's raw length to its compressed length: zstd's own ceiling. A
/// zstd block holds at most 128 KiB and is never shorter than 4 bytes (an RLE block: a 3-byte
/// header and the repeated byte), so no frame decompresses to more than 32768 times its
/// length; level 1 compresses 4 MiB of zero bytes to about 150 bytes (about 28,000:1). A block
/// that claims more is a bomb: whatever its contents, it cannot decompress to what it says.
pub const MAX_BLOCK_RATIO: u64 = 128 << 10 >> 2;

/// The appended zero elements an extended tensor may have beyond its base tensor's and its
/// stored elements (tiny tensors): 32 KiB of f64 at most, less than its one block of at least
/// 10 bytes could hold at zstd's ceiling.
pub const ZERO_SLACK: u64 = 4096;

/// The largest side file a delta may carry (SPEC section 4).
pub const MAX_SIDE_FILE: u64 = 64 << 20;

/// The most side files a delta may carry: each is a file `apply` creates.
pub const MAX_SIDE_FILES: usize = 10_000;

/// An opened delta whose manifest has been verified and checked for consistency.
pub struct DeltaReader {
    /// The delta's path.
    pub path: PathBuf,
    /// The verified manifest.
    pub manifest: Manifest,
    /// The file's size.
    pub size: u64,
    file: File,
    block_memory: u64,
}

impl DeltaReader {
    /// Opens `path`, checks preamble, footer and manifest hash, and validates the manifest,
    /// within [`DEFAULT_MEMORY_BUDGET`], never cancelled (see [`DeltaReader::open_within`]).
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_within(path, DEFAULT_MEMORY_BUDGET, &RunControl::default())
    }

    /// [`DeltaReader::open`], with the memory that reading the manifest takes at its peak
    /// (its compressed and decompressed text, what it is parsed into, and the shard headers
    /// parsed to check it) bounded by `memory_budget`; parsing and validation stop with
    /// [`Error::Cancelled`] soon after `ctl` is cancelled.
    pub fn open_within(path: &Path, memory_budget: u64, ctl: &RunControl) -> Result<Self> {
        let (file, size) = open_regular(path)?;
        let pre = read_at(&file, path, 0, PREAMBLE_LEN)?;
        let version = check_preamble(path, &pre)?;
        let footer = read_at(&file, path, size - FOOTER_LEN, FOOTER_LEN)?;
        let place = ManifestPlace::from_footer(path, &footer, size)?;
        // Both texts are held while the manifest is parsed; what it is parsed into, and the
        // shard headers `validate` parses, are charged to what is left of the budget.
        let text = place.len + place.raw_len;
        let _allowance = json::Allowance::new(memory_budget);
        json::charge(text).map_err(|_| place.error(path, json::OVER_BUDGET))?;
        let manifest = {
            let _watch = json::Watch::new(ctl);
            read_manifest(&file, path, &pre, &footer, place)?
        };
        if manifest.version != version {
            let msg = format!("manifest version {} in a version {version} file", manifest.version);
            return Err(Error::invalid(path, msg));
        }
        json::refund(text);
        ctl.check()?;
        let block_memory = validate(path, &manifest, place.offset, ctl)?;
        Ok(DeltaReader { path: path.to_path_buf(), manifest, size, file, block_memory })
    }

    /// Refuses a part of a partitioned prune where a whole delta is needed (`apply`, the
    /// Python package): its tensors are only some of the model's.
    pub fn refuse_part(&self) -> Result<()> {
        match &self.manifest.part {
            Some(p) => Err(Error::invalid(
                &self.path,
                format!(
                    "this is part {} of {} of a partitioned prune, not a whole delta: join all {} parts with \
                     `fapm merge PART... --output DELTA`, then use DELTA",
                    p.index, p.count, p.count
                ),
            )),
            None => Ok(()),
        }
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

    /// The most memory decoding one block of this delta takes: its compressed and raw bytes
    /// and, for a pruned or dense tensor, the output chunk it is decoded onto. Windows of
    /// blocks in flight are sized from this (and the budget), not from this build's block
    /// sizes: a delta may declare blocks of up to 64 MiB.
    pub fn block_memory(&self) -> u64 {
        self.block_memory
    }
}

/// Opens `path` if it is a regular file long enough to be a delta; the file and its size.
fn open_regular(path: &Path) -> Result<(File, u64)> {
    let not_regular = || Error::invalid(path, "not a regular file");
    // Checked before opening: opening a FIFO would block.
    if !std::fs::metadata(path).map_err(|e| Error::io(path, e))?.is_file() {
        return Err(not_regular());
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    let size = meta.len();
    if size < PREAMBLE_LEN + FOOTER_LEN {
        return Err(Error::invalid(path, format!("{size} bytes is too short for a fapm delta")));
    }
    Ok((file, size))
}

/// `len` bytes of `file` (at `path`) from `offset`.
fn read_at(file: &File, path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset).map_err(|e| Error::io(path, e))?;
    Ok(buf)
}

/// Checks the preamble's magic and version; returns the format version.
fn check_preamble(path: &Path, pre: &[u8]) -> Result<u32> {
    if pre[..8] != MAGIC {
        // A safetensors file: an 8-byte header length, then the JSON header's `{`.
        let header_len = u64::from_le_bytes(pre[..8].try_into().unwrap());
        if pre[8] == b'{' && header_len <= crate::checkpoint::MAX_HEADER_LEN {
            return Err(Error::invalid(
                path,
                "is a safetensors checkpoint, not a fapm delta (were the base and the delta swapped?)",
            ));
        }
        return Err(Error::invalid(path, "not a fapm delta (bad magic)"));
    }
    let version = u32::from_le_bytes(pre[8..12].try_into().unwrap());
    if version > VERSION {
        return Err(Error::invalid(
            path,
            format!("delta format version {version} is newer than this fapm reads ({VERSION}); upgrade fapm"),
        ));
    }
    if version < OLDEST_VERSION || pre[12..16] != [0; 4] {
        return Err(Error::invalid(path, format!("corrupt preamble (version {version})")));
    }
    Ok(version)
}

/// Where the footer says the manifest is, and how long it is once decompressed.
#[derive(Debug, Clone, Copy)]
struct ManifestPlace {
    /// Offset of the compressed manifest, which is also where the blocks end.
    offset: u64,
    /// Its compressed length.
    len: u64,
    /// Its decompressed length.
    raw_len: u64,
}

impl ManifestPlace {
    /// Reads the footer of a file of `size` bytes and checks the manifest's place and lengths
    /// against the file and the limits, before anything is allocated for it.
    fn from_footer(path: &Path, footer: &[u8], size: u64) -> Result<Self> {
        let bad = |msg: String| Error::invalid(path, msg);
        if footer[56..] != END_MAGIC {
            return Err(bad("truncated or corrupt delta (no end marker)".into()));
        }
        let word = |i: usize| u64::from_le_bytes(footer[8 * i..8 * i + 8].try_into().unwrap());
        let place = ManifestPlace { offset: word(0), len: word(1), raw_len: word(2) };
        let (m_len, m_raw) = (place.len, place.raw_len);
        if place.offset < PREAMBLE_LEN || place.offset.checked_add(m_len) != Some(size - FOOTER_LEN) {
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
        Ok(place)
    }

    /// An error about the manifest that names its lengths.
    fn error(&self, path: &Path, msg: &str) -> Error {
        Error::invalid(path, format!("manifest of {} bytes ({} compressed): {msg}", self.raw_len, self.len))
    }
}

/// Reads the manifest at `place`, checks its hash against the footer (which covers the
/// preamble `pre` too), decompresses and parses it, charging what it is parsed into to the
/// current [`json::Allowance`].
fn read_manifest(file: &File, path: &Path, pre: &[u8], footer: &[u8], place: ManifestPlace) -> Result<Manifest> {
    let bad = |msg: String| Error::invalid(path, msg);
    let packed = read_at(file, path, place.offset, place.len)?;
    if footer_hash(pre, &packed, footer).0[..] != footer[24..56] {
        return Err(bad("manifest hash mismatch: the delta is corrupt".into()));
    }
    let json = zstd::bulk::decompress(&packed, place.raw_len as usize)
        .map_err(|e| bad(format!("manifest does not decompress: {e}")))?;
    if json.len() as u64 != place.raw_len {
        return Err(bad("manifest has the wrong length".into()));
    }
    serde_json::from_slice(&json).map_err(|e| {
        if e.to_string().starts_with(json::CANCELLED) {
            Error::Cancelled
        } else if e.to_string().starts_with(json::OVER_BUDGET) {
            place.error(path, json::OVER_BUDGET)
        } else {
            bad(format!("malformed manifest: {e}"))
        }
    })
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
        // The appended elements not stored come back as zero bits, from no byte of the delta:
        // at most as many as the base tensor's and the stored ones together (and a few, for
        // tiny tensors), so that the output is bounded by the base and by what the blocks
        // hold (real resized vocabularies add far fewer rows than they had, and store nearly
        // every appended element: new rows are initialised non-zero).
        let zeros = n - t.diffed_numel() - e.stored;
        if zeros > t.diffed_numel().saturating_add(e.stored).saturating_add(ZERO_SLACK) {
            return Err("appends more zero elements than its base tensor and its stored ones together");
        }
    }
    Ok(())
}

impl json::Heap for Block {}

impl json::Heap for ShardRecord {
    fn heap(&self) -> u64 {
        json::string_cost(self.name.capacity()) + json::string_cost(self.header.capacity())
    }
}

impl json::Heap for TensorRecord {
    fn heap(&self) -> u64 {
        json::string_cost(self.name.capacity()) // shape and blocks were charged as parsed
    }
}

impl json::Heap for SparsityRule {
    fn heap(&self) -> u64 {
        json::string_cost(self.pattern.capacity()) + json::string_cost(self.sparsity.capacity())
    }
}

impl json::Heap for SideFile {
    fn heap(&self) -> u64 {
        json::string_cost(self.path.capacity())
    }
}

/// Checks that a manifest describes a consistent delta whose blocks tile the file, before
/// anything is allocated from its counts; returns the most memory one block needs.
fn validate(path: &Path, m: &Manifest, blocks_end: u64, ctl: &RunControl) -> Result<u64> {
    let bad = |msg: String| inconsistent(path, msg);
    check_layout(m).map_err(bad)?;
    check_options(m, ctl)?.map_err(bad)?;
    let mut tiling = Tiling { next: PREAMBLE_LEN, end: blocks_end, block_memory: 0 };
    check_tensor_records(path, m, &mut tiling, ctl)?;
    check_side_file_records(path, m, &mut tiling, ctl)?;
    if tiling.next != blocks_end {
        return Err(bad("blocks do not fill the file".into()));
    }
    Ok(tiling.block_memory)
}

/// The error for a manifest whose records disagree.
fn inconsistent(path: &Path, msg: String) -> Error {
    Error::invalid(path, format!("inconsistent manifest: {msg}"))
}

/// Checks the manifest's format, block sizes, counts and paths.
fn check_layout(m: &Manifest) -> std::result::Result<(), String> {
    if m.format != "fapm-delta" || !m.version_fields_ok() {
        return Err(format!("format '{}' version {}", json::clip(&m.format, 32), m.version));
    }
    for (what, r) in [("base", &m.base_repo), ("fine-tuned", &m.finetuned_repo)] {
        if let Some(why) = r.as_ref().and_then(|r| r.check().err()) {
            return Err(format!("the {what} checkpoint's repository record: {why}"));
        }
    }
    // Blocks are hashed as blake3 subtrees: a power of two of at least 1 KiB each.
    let pow2 = |x: u64, lo: u64, hi: u64| x.is_power_of_two() && (lo..=hi).contains(&x);
    if !pow2(m.block_elems, 512, MAX_BLOCK_ELEMS) || !pow2(m.raw_block_bytes, 1024, MAX_SIDE_FILE) {
        return Err("block sizes out of range".into());
    }
    if m.shards.is_empty() {
        return Err("no shards".into());
    }
    if m.source == Source::File && (m.shards.len() != 1 || !m.side_files.is_empty() || m.index) {
        return Err("a single-file delta must have one shard, no side files and no index".into());
    }
    if m.shards.len() > MAX_SHARDS || m.side_files.len() > MAX_SIDE_FILES {
        return Err(format!(
            "{} shards and {} side files; at most {MAX_SHARDS} and {MAX_SIDE_FILES}",
            m.shards.len(),
            m.side_files.len()
        ));
    }
    check_paths(m)
}

/// Checks the options the delta records with the parsers `prune` checks its flags with: a
/// delta shows no option that a prune could not have used (NaN, a negative penalty, a regex
/// that does not compile). The outer result is cancellation, the inner the reason.
fn check_options(m: &Manifest, ctl: &RunControl) -> Result<std::result::Result<(), String>> {
    let clip = |s: &str| json::clip(s, 200).into_owned();
    // Every parser's message quotes its text: too long a text is refused before it is copied.
    let sparsity = |s: &str| match s.len() > options::MAX_NUMBER_LEN {
        true => Err(format!("a sparsity of {} bytes", s.len())),
        false => Sparsity::parse(s).map(|_| ()),
    };
    if let Err(e) = sparsity(&m.sparsity) {
        return Ok(Err(format!("recorded sparsity: {}", clip(&e))));
    }
    if let Err(e) = options::penalty(&m.penalty) {
        return Ok(Err(format!("recorded penalty: {}", clip(&e))));
    }
    let rules = m.sparsity_for.iter().map(|r| ("sparsity rule", &r.pattern, Some(&r.sparsity)));
    let filters = m.include.iter().chain(&m.exclude).map(|p| ("include/exclude", p, None));
    for (kind, pattern, rule_sparsity) in rules.chain(filters) {
        ctl.check()?;
        if let Some(Err(e)) = rule_sparsity.map(|s| sparsity(s)) {
            return Ok(Err(format!("recorded {kind}: {}", clip(&e))));
        }
        if let Err(e) = options::regex(pattern) {
            return Ok(Err(format!("recorded {kind} pattern '{}': {}", clip(pattern), clip(&e))));
        }
    }
    Ok(Ok(()))
}

/// The blocks checked so far, which must follow each other from the preamble to `end`.
struct Tiling {
    /// Where the next block must start.
    next: u64,
    /// Where the blocks end (the manifest's offset).
    end: u64,
    /// The most memory one block checked so far needs.
    block_memory: u64,
}

impl Tiling {
    /// Checks block `b` of `what`: in place, at most `max_raw` bytes decompressed (exactly
    /// that with `exact`), no longer than its contents can compress to; `out` is the bytes of
    /// the output chunk a sparse block is decoded onto (0 for raw bytes).
    fn check(&mut self, b: &Block, max_raw: u64, exact: bool, out: u64, what: &str) -> std::result::Result<(), String> {
        if b.offset != self.next || b.raw_len > max_raw || (exact && b.raw_len != max_raw) {
            return Err(format!("block of '{}' out of place", json::clip(what, 200)));
        }
        // No compressor writes more than this (max_raw is at most ~75 MB, so it fits).
        if b.len > zstd::zstd_safe::compress_bound(b.raw_len as usize) as u64 {
            return Err(format!("block of '{}' is longer than its contents can compress to", json::clip(what, 200)));
        }
        if b.raw_len > b.len.saturating_mul(MAX_BLOCK_RATIO) {
            return Err(format!(
                "block of '{}' claims {} bytes from {} compressed, past zstd's {MAX_BLOCK_RATIO}:1",
                json::clip(what, 200),
                b.raw_len,
                b.len
            ));
        }
        self.next = b
            .offset
            .checked_add(b.len)
            .filter(|&e| e <= self.end)
            .ok_or_else(|| format!("block of '{}' past the end", json::clip(what, 200)))?;
        self.block_memory = self.block_memory.max(b.len + b.raw_len + out);
        Ok(())
    }
}

/// Checks the tensor records against the shard headers, in order (a part holds the records
/// of a contiguous run of the headers' tensors), and tiles their blocks.
fn check_tensor_records(path: &Path, m: &Manifest, tiling: &mut Tiling, ctl: &RunControl) -> Result<()> {
    let bad = |msg: String| inconsistent(path, msg);
    let (first, total) = match &m.part {
        Some(p) if p.index >= 1 && p.index <= p.count && p.first <= p.total => (p.first, p.total),
        Some(_) => return Err(bad("bad part numbers".into())),
        None => (0, u64::MAX),
    };
    let mut records = m.tensors.iter();
    let mut tensor_names = HashSet::new();
    let mut position = 0u64;
    for (si, shard) in m.shards.iter().enumerate() {
        ctl.check()?;
        let infos = parse_header(path, &shard.header, u64::MAX)?;
        for info in &infos {
            ctl.check()?;
            position += 1;
            if position <= first || position - first > m.tensors.len() as u64 {
                continue;
            }
            let t = records.next().ok_or_else(|| bad(format!("no record for tensor '{}'", info.name)))?;
            if t.name != info.name || t.shard != si || t.dtype != info.dtype || t.shape != info.shape {
                return Err(bad(format!("record '{}' disagrees with its shard header", json::clip(&t.name, 200))));
            }
            if !tensor_names.insert(t.name.as_str()) {
                return Err(bad(format!("tensor '{}' appears twice", json::clip(&t.name, 200))));
            }
            check_record(t).map_err(|why| bad(format!("record '{}' {why}", json::clip(&t.name, 200))))?;
            check_tensor_blocks(m, t, info.byte_len(), tiling).map_err(bad)?;
        }
        json::refund(parsed_cost(&infos));
    }
    if m.part.is_some() && position != total {
        return Err(bad(format!("the part says {total} tensors in all, the shard headers {position}")));
    }
    if records.next().is_some() {
        return Err(bad("more tensor records than shard headers declare".into()));
    }
    Ok(())
}

/// Checks the number of blocks of tensor `t` (of `byte_len` bytes, which the header check
/// proved fits in a u64) and tiles them.
fn check_tensor_blocks(
    m: &Manifest,
    t: &TensorRecord,
    byte_len: u64,
    tiling: &mut Tiling,
) -> std::result::Result<(), String> {
    let size = t.dtype.size() as u64;
    let n = byte_len / size;
    let diffable = t.mode != Mode::Whole;
    // Counted, not listed: a record may claim a tensor of 2^60 elements.
    let (len, per) = if diffable { (n, m.block_elems) } else { (n * size, m.raw_block_bytes) };
    if t.blocks.len() as u64 != len.div_ceil(per) {
        return Err(format!(
            "tensor '{}' has {} blocks, expected {}",
            json::clip(&t.name, 200),
            t.blocks.len(),
            len.div_ceil(per)
        ));
    }
    for (b, (_, len)) in t.blocks.iter().zip(block_sizes(len, per)) {
        let (max, exact, out) =
            if diffable { (max_sparse_len(len, size as usize), false, len * size) } else { (len, true, 0) };
        tiling.check(b, max, exact, out, &t.name)?;
    }
    Ok(())
}

/// Checks the side file records (sizes, numbers of blocks) and tiles their blocks.
fn check_side_file_records(path: &Path, m: &Manifest, tiling: &mut Tiling, ctl: &RunControl) -> Result<()> {
    let bad = |msg: String| inconsistent(path, msg);
    for f in &m.side_files {
        ctl.check()?;
        if f.size > MAX_SIDE_FILE {
            return Err(bad(format!("side file '{}' is over 64 MiB", json::clip(&f.path, 200))));
        }
        if f.blocks.len() as u64 != f.size.div_ceil(m.raw_block_bytes) {
            return Err(bad(format!("side file '{}' has the wrong number of blocks", json::clip(&f.path, 200))));
        }
        for (b, (_, len)) in f.blocks.iter().zip(block_sizes(f.size, m.raw_block_bytes)) {
            tiling.check(b, len, true, 0, &f.path).map_err(bad)?;
        }
    }
    Ok(())
}

/// Checks every path the delta names (shards, side files, and the index `apply` writes)
/// (SPEC section 4): each by the rules of [`paths::check`] (for a directory delta: a
/// single-file delta's shard name is never a path), no side file in a weight or pickle
/// format, no two paths equal, and none inside another (`a` as a file and `a/b`). So `apply`
/// never writes one file twice, nor a hidden file, nor weights beside the verified shards.
/// The cost is one pass over each path and a sort of the paths (n log n comparisons, each
/// linear in the shorter path): the old check hashed every prefix of every path, which made
/// one path of a million components take minutes.
fn check_paths(m: &Manifest) -> std::result::Result<(), String> {
    let shards = m.shards.iter().map(|s| ("shard", s.name.as_str()));
    let side = m.side_files.iter().map(|f| ("side file", f.path.as_str()));
    let mut all: Vec<Named> = Vec::with_capacity(m.shards.len() + m.side_files.len() + 1);
    all.push(("index", INDEX_FILE));
    for (kind, p) in shards.chain(side) {
        if m.source == Source::Directory {
            paths::check(p).map_err(|why| format!("{kind} path '{}' {why}", shown(p)))?;
        }
        if kind == "side file" {
            if let Some(ext) = paths::weight_format(p) {
                return Err(format!(
                    "side file '{}' is in a weight or pickle format (.{}): side files are data, never weights",
                    shown(p),
                    shown(ext)
                ));
            }
        }
        all.push((kind, p));
    }
    match first_clash(&mut all) {
        Some(((first, outer), (kind, p))) if p == outer => {
            Err(format!("path '{}' is named twice ({first} and {kind})", shown(p)))
        }
        Some(((_, outer), (kind, p))) => {
            Err(format!("{kind} path '{}' is inside the file '{}'", shown(p), shown(outer)))
        }
        None => Ok(()),
    }
}

/// Sorts `paths` (kind, path) and returns the first two that clash: equal, or the second
/// inside the first (`a` and `a/b`). Sorted as if each ended in '/', a path comes right
/// before every path inside it (`a/` < `a/b/` < `a-b/`, where plain byte order puts `a-b`
/// between `a` and `a/b`), and equal paths are neighbours: comparing neighbours finds every
/// clash. n log n comparisons, each a `memcmp` of the shorter path.
fn first_clash<'a>(paths: &mut [Named<'a>]) -> Option<(Named<'a>, Named<'a>)> {
    paths.sort_unstable_by(|a, b| cmp_as_directories(a.1.as_bytes(), b.1.as_bytes()));
    paths.windows(2).map(|w| (w[0], w[1])).find(|&((_, outer), (_, p))| {
        p.strip_prefix(outer).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// A path of a delta and what it is ("shard", "side file", "index").
type Named<'a> = (&'static str, &'a str);

/// Compares `a` + "/" with `b` + "/", byte by byte, without building either.
fn cmp_as_directories(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    use std::cmp::Ordering::{Equal, Greater, Less};
    let n = a.len().min(b.len());
    match a[..n].cmp(&b[..n]) {
        Equal => {}
        o => return o,
    }
    // One is a prefix of the other: the shorter one's '/' meets the longer one's next byte.
    match (a.get(n), b.get(n)) {
        (None, None) => Equal,
        (None, Some(&c)) => b'/'.cmp(&c).then(Less),
        (Some(&c), _) => c.cmp(&b'/').then(Greater),
    }
}

/// A path from a delta as an error shows it: at most 200 characters.
fn shown(p: &str) -> std::borrow::Cow<'_, str> {
    json::clip(p, 200)
}

/// The footer's hash: blake3 over the preamble, the compressed manifest, and the footer's
/// first 24 bytes (manifest offset, length, raw length).
fn footer_hash(preamble: &[u8], packed_manifest: &[u8], footer_head: &[u8]) -> super::Hash {
    let mut h = blake3::Hasher::new();
    h.update(preamble);
    h.update(packed_manifest);
    h.update(&footer_head[..24]);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clashes_are_found_between_neighbours() {
        let clash = |list: &[&'static str]| {
            let mut v: Vec<Named> = list.iter().map(|p| ("side file", *p)).collect();
            first_clash(&mut v).map(|(a, b)| (a.1, b.1))
        };
        assert_eq!(clash(&["a", "a-b", "a/b"]), Some(("a", "a/b")));
        assert_eq!(clash(&["a/b", "a.json", "a"]), Some(("a", "a/b")));
        assert_eq!(clash(&["x/y", "x", "x/y"]), Some(("x", "x/y")));
        assert_eq!(clash(&["b/c", "a", "b/c"]), Some(("b/c", "b/c")));
        assert_eq!(clash(&["a/b/c", "a/b"]), Some(("a/b", "a/b/c")));
        assert_eq!(clash(&["a", "ab", "a"]), Some(("a", "a")));
        assert_eq!(clash(&["a", "ab", "a-b/c", "a0/b", "b/a", "c/a/b", "c/ab"]), None);
        assert_eq!(clash(&["sub/model.safetensors", "config.json", INDEX_FILE, "sub/x"]), None);
    }
}

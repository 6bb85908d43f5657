//! The sparse delta file, version 3 (versions 1 and 2 are still read): a preamble, independently
//! decodable zstd blocks, a zstd-compressed JSON manifest, and a fixed footer. Written in one streaming pass; every
//! byte is covered by a blake3 hash. The byte-level description is docs/FORMAT.md.

mod reader;
pub mod sparse;
mod writer;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use reader::{DeltaReader, MAX_BLOCK_RATIO, MAX_MANIFEST_RATIO, MAX_SIDE_FILE, MAX_SIDE_FILES};
pub use writer::DeltaWriter;

use crate::dtype::DType;
use crate::threshold::score::Metric;
use crate::threshold::select::ThresholdMode;

/// The first 8 bytes of every delta file.
pub const MAGIC: [u8; 8] = *b"FAPMDLTA";
/// The last 8 bytes of every delta file.
pub const END_MAGIC: [u8; 8] = *b"FAPMEND1";
/// The format version this build writes (and the newest it reads).
pub const VERSION: u32 = 3;
/// The oldest format version this build reads: version 1 lacks extended tensors, per-tensor
/// sparsity, the penalty and partitions, version 2 the inputs' repositories and a part's
/// content sample; both read as if those were absent.
pub const OLDEST_VERSION: u32 = 1;
/// Bytes before the first block: magic, version, reserved zero.
pub const PREAMBLE_LEN: u64 = 16;
/// Bytes of the footer: manifest offset, length, raw length, hash, end magic.
pub const FOOTER_LEN: u64 = 64;
/// The largest decompressed manifest a reader accepts.
pub const MAX_MANIFEST_LEN: u64 = 1 << 30;
/// Elements per block of a pruned or dense tensor.
pub const BLOCK_ELEMS: u64 = 1 << 20;
/// The largest block of a pruned or dense tensor a delta may declare: it bounds the memory
/// one block needs when read (output chunk and decompressed payload).
pub const MAX_BLOCK_ELEMS: u64 = 1 << 22;
/// Bytes per block of a whole tensor or side file.
pub const RAW_BLOCK_BYTES: u64 = 4 << 20;
/// The zstd level of every block and of the manifest.
pub const ZSTD_LEVEL: i32 = 1;
/// The log2 of the match table for sparse blocks (level 1 uses 14): on task-vector blocks a
/// 1024-entry table, which stays in the L1 cache, compresses both faster and smaller. Whole
/// tensors and side files (text compresses worse with it) keep level 1's own.
const SPARSE_HASH_LOG: u32 = 10;

/// What a block holds, which chooses the compressor's parameters (readers need not know).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// A pruned or dense tensor's kept positions and values.
    Sparse,
    /// The raw bytes of a whole tensor or a side file.
    Bytes,
}

thread_local! {
    static COMPRESSORS: std::cell::RefCell<[Option<zstd::bulk::Compressor<'static>>; 2]> =
        const { std::cell::RefCell::new([None, None]) };
}

/// Compresses one block at [`ZSTD_LEVEL`], reusing this thread's zstd context for `payload`.
pub fn compress(raw: &[u8], payload: Payload) -> std::io::Result<Vec<u8>> {
    COMPRESSORS.with(|c| {
        let slot = &mut c.borrow_mut()[payload as usize];
        if slot.is_none() {
            let mut z = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
            if payload == Payload::Sparse {
                z.set_parameter(zstd::zstd_safe::CParameter::HashLog(SPARSE_HASH_LOG))?;
            }
            *slot = Some(z);
        }
        slot.as_mut().expect("just set").compress(raw)
    })
}

/// The preamble of a delta of format `version`.
pub fn preamble(version: u32) -> [u8; PREAMBLE_LEN as usize] {
    let mut p = [0u8; PREAMBLE_LEN as usize];
    p[..8].copy_from_slice(&MAGIC);
    p[8..12].copy_from_slice(&version.to_le_bytes());
    p
}

/// A blake3 hash, written as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Hash(pub [u8; 32]);

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Hash(*h.as_bytes())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = crate::bounded_json::Str::deserialize(d)?.0;
        let bad = || serde::de::Error::custom("a hash must be 64 lowercase hex digits");
        if s.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = s.get(2 * i..2 * i + 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        if Hash(out).to_string() != s {
            return Err(bad());
        }
        Ok(Hash(out))
    }
}

/// Whether the fine-tuned checkpoint was one file or a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// One `.safetensors` file: `apply` writes one file.
    File,
    /// A directory: `apply` writes a directory.
    Directory,
}

/// How a tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Diffable and selected: only the top-k candidates are kept.
    Pruned,
    /// Diffable, not selected: every candidate is kept.
    Dense,
    /// Stored as the fine-tuned bytes.
    Whole,
}

impl Mode {
    /// The mode's name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pruned => "pruned",
            Mode::Dense => "dense",
            Mode::Whole => "whole",
        }
    }
}

/// One encoded block: where it is and what it hashes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Block {
    /// Byte offset in the delta file.
    pub offset: u64,
    /// Compressed length.
    pub len: u64,
    /// Decompressed length.
    pub raw_len: u64,
    /// blake3 of the compressed bytes.
    pub hash: Hash,
}

/// One output shard: its name and header, as in the fine-tuned checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardRecord {
    /// File name relative to the output directory.
    pub name: String,
    /// The header JSON text, written back verbatim.
    pub header: String,
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorRecord {
    /// Name.
    pub name: String,
    /// Index into [`Manifest::shards`].
    pub shard: usize,
    /// The fine-tuned (and output) dtype.
    pub dtype: DType,
    /// Shape.
    #[serde(deserialize_with = "crate::bounded_json::vec")]
    pub shape: Vec<u64>,
    /// How it is stored.
    pub mode: Mode,
    /// Set for an extended tensor (a resized vocabulary, SPEC section 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extended: Option<Extended>,
    /// The base tensor's dtype, for pruned and dense tensors.
    pub base_dtype: Option<DType>,
    /// blake3 of the base tensor's bytes, for pruned and dense tensors.
    pub base_hash: Option<Hash>,
    /// blake3 of the reconstructed tensor's bytes.
    pub out_hash: Hash,
    /// Positions whose bits differ from the (converted) base.
    pub candidates: u64,
    /// Positions stored (for a whole tensor: every element).
    pub kept: u64,
    /// The blocks, in order.
    #[serde(deserialize_with = "crate::bounded_json::vec")]
    pub blocks: Vec<Block>,
}

impl TensorRecord {
    /// The number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The elements that are diffed against the base: all of a pruned or dense tensor, the
    /// prefix of the base's shape of an extended one, none of a whole tensor.
    pub fn diffed_numel(&self) -> u64 {
        match (&self.extended, self.mode) {
            (_, Mode::Whole) => 0,
            (Some(e), _) => e.base_shape.iter().product(),
            (None, _) => self.numel(),
        }
    }
}

/// What an extended tensor adds to its record. Its blocks cover the whole tensor like a
/// pruned or dense tensor's; the elements past the base's prefix (the appended rows) are
/// encoded against a base of zero bits with every non-zero element kept, so that they come
/// back whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extended {
    /// The base tensor's shape: the row-major prefix that is pruned or dense.
    #[serde(deserialize_with = "crate::bounded_json::vec")]
    pub base_shape: Vec<u64>,
    /// Positions stored in the appended rows (their non-zero elements).
    pub stored: u64,
}

/// A non-weight file of a checkpoint directory (config, tokenizer, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SideFile {
    /// Path relative to the directory, '/'-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// blake3 of the contents.
    pub hash: Hash,
    /// The blocks, in order.
    #[serde(deserialize_with = "crate::bounded_json::vec")]
    pub blocks: Vec<Block>,
}

/// A `--sparsity-for RE=S` rule: tensors whose name matches `pattern` are pruned at
/// `sparsity` (the first matching rule wins).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparsityRule {
    /// The regex, as given.
    #[serde(deserialize_with = "crate::bounded_json::string")]
    pub pattern: String,
    /// The sparsity, as the decimal given.
    #[serde(deserialize_with = "crate::bounded_json::string")]
    pub sparsity: String,
}

/// What makes a delta one part of a partitioned prune (SPEC section 7), and what `merge`
/// checks: the part's place, and the identity of the inputs it was computed from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartRecord {
    /// This part's number, from 1.
    pub index: u32,
    /// How many parts there are.
    pub count: u32,
    /// The position of this part's first tensor in the whole delta's tensor list.
    pub first: u64,
    /// How many tensors the whole delta has.
    pub total: u64,
    /// blake3 of the base checkpoint's layout (shard names and headers).
    pub base: Hash,
    /// blake3 of the fine-tuned checkpoint's layout (shard names and headers).
    pub finetuned: Hash,
    /// blake3 of a sample of the fine-tuned checkpoint's contents (`read::partition::
    /// content_sample`), so that parts of two fine-tunes with one layout are told apart
    /// (version 3; absent before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetuned_sample: Option<Hash>,
}

/// Where an input checkpoint came from, when it was named by a Hugging Face Hub repo id
/// (version 3): what `apply` and `verify` use to find the base when none is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoRecord {
    /// The commit the revision resolved to: 40 hexadecimal digits.
    #[serde(deserialize_with = "crate::bounded_json::string")]
    pub commit: String,
    /// The repo id, `namespace/name` (`repo::check_id`).
    #[serde(deserialize_with = "crate::bounded_json::string")]
    pub repo: String,
    /// The revision as it was named ("main" when none was).
    #[serde(deserialize_with = "crate::bounded_json::string")]
    pub revision: String,
}

impl RepoRecord {
    /// What is wrong with the record, if anything.
    pub fn check(&self) -> Result<(), String> {
        crate::repo::check_id(&self.repo).map_err(|why| format!("repo id {why}"))?;
        crate::repo::check_revision(&self.revision).map_err(|why| format!("revision {why}"))?;
        if !crate::repo::is_commit(&self.commit) {
            return Err("commit is not 40 hexadecimal digits".into());
        }
        Ok(())
    }
}

impl fmt::Display for RepoRecord {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}@{}", self.repo, self.commit)
    }
}

/// The self-describing header of a delta, stored at its end. Its lists and strings are
/// parsed through [`crate::bounded_json`], so reading one is charged to a memory allowance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always "fapm-delta".
    #[serde(deserialize_with = "crate::bounded_json::string")]
    pub format: String,
    /// The format version (also in the preamble).
    pub version: u32,
    /// The program that wrote it, e.g. "fapm 0.1.0".
    #[serde(deserialize_with = "crate::bounded_json::string")]
    pub tool: String,
    /// The metric used to score.
    pub metric: Metric,
    /// The FAPM penalty strength, as the decimal given ("1" in version 1).
    #[serde(default = "default_penalty", deserialize_with = "crate::bounded_json::string")]
    pub penalty: String,
    /// The sparsity, as the decimal given.
    #[serde(deserialize_with = "crate::bounded_json::string")]
    pub sparsity: String,
    /// `--sparsity-for` rules, in the order given.
    #[serde(default, deserialize_with = "crate::bounded_json::vec")]
    pub sparsity_for: Vec<SparsityRule>,
    /// The threshold mode.
    pub threshold: ThresholdMode,
    /// `--include` patterns.
    #[serde(deserialize_with = "crate::bounded_json::vec")]
    pub include: Vec<String>,
    /// `--exclude` patterns.
    #[serde(deserialize_with = "crate::bounded_json::vec")]
    pub exclude: Vec<String>,
    /// Elements per block of pruned and dense tensors.
    pub block_elems: u64,
    /// Bytes per block of whole tensors and side files.
    pub raw_block_bytes: u64,
    /// File or directory.
    pub source: Source,
    /// Whether the fine-tuned directory had a `model.safetensors.index.json` (`apply`
    /// writes a regenerated one).
    pub index: bool,
    /// Output shards.
    #[serde(deserialize_with = "crate::bounded_json::vec")]
    pub shards: Vec<ShardRecord>,
    /// Output tensors, shard by shard in data order.
    #[serde(deserialize_with = "crate::bounded_json::vec")]
    pub tensors: Vec<TensorRecord>,
    /// Side files.
    #[serde(deserialize_with = "crate::bounded_json::vec")]
    pub side_files: Vec<SideFile>,
    /// Names of the tensors only the base has (ignored).
    #[serde(deserialize_with = "crate::bounded_json::vec")]
    pub base_only: Vec<String>,
    /// Set in a part of a partitioned prune, which `merge` turns into a whole delta.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<PartRecord>,
    /// The base's repository, when it was named by repo id (version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_repo: Option<RepoRecord>,
    /// The fine-tuned checkpoint's repository, when it was named by repo id (version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetuned_repo: Option<RepoRecord>,
}

fn default_penalty() -> String {
    "1".into()
}

impl Manifest {
    /// Whether the version is one this build reads and the fields the version has agree
    /// with it (version 1 has no penalty, per-tensor sparsity, partitions or extended tensors;
    /// versions 1 and 2 no repositories or content samples, which every part of version 3 has).
    pub fn version_fields_ok(&self) -> bool {
        let sample = self.part.as_ref().map(|p| p.finetuned_sample.is_some());
        let no_v3 = sample != Some(true) && self.base_repo.is_none() && self.finetuned_repo.is_none();
        match self.version {
            VERSION => sample != Some(false),
            2 => no_v3,
            1 => {
                no_v3
                    && self.penalty == "1"
                    && self.sparsity_for.is_empty()
                    && self.part.is_none()
                    && self.tensors.iter().all(|t| t.extended.is_none())
            }
            _ => false,
        }
    }

    /// Every block of the file, in file order.
    pub fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.tensors.iter().flat_map(|t| &t.blocks).chain(self.side_files.iter().flat_map(|f| &f.blocks))
    }
}

/// How many blocks, and the size of block `i`, for `len` units split `per` at a time.
pub fn block_sizes(len: u64, per: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..len.div_ceil(per)).map(move |i| (i * per, per.min(len - i * per)))
}

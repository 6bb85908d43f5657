//! Safetensors checkpoints: shard discovery, header validation, memory maps, name routing.
//!
//! A checkpoint is one `.safetensors` file or a directory of shards (named by
//! `model.safetensors.index.json` when present, else every `*.safetensors` file in it).
//! Everything read from a file is validated here before any view of it is handed out, so
//! the rest of fapm can slice tensor bytes without further checks.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::{Deserializer, Error as _, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::bounded_json as json;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::DEFAULT_MEMORY_BUDGET;

/// The largest safetensors header fapm accepts (SPEC section 1).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The name of the shard index file in a sharded checkpoint directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The most shards a checkpoint (and so a delta) may have: each is a file `apply` creates.
pub const MAX_SHARDS: usize = 10_000;

/// A read-only memory map of a whole file.
pub struct Mmap {
    map: Option<memmap2::Mmap>,
}

impl Mmap {
    /// Maps `file`, which is `path` and `len` bytes long, read-only.
    ///
    /// # Safety
    ///
    /// The map is shared (`MAP_SHARED`, as memmap2 maps), not a private copy: for as long as
    /// it lives, a write to the file by anyone shows through it, and a truncation makes
    /// reading the pages past the new end raise SIGBUS. Rust assumes the bytes behind a
    /// `&[u8]` never change, so the caller must make sure that nobody modifies or truncates
    /// the file while the map (or a slice of it) is in use.
    unsafe fn map(path: &Path, file: &File, len: u64) -> Result<Self> {
        if len == 0 {
            return Ok(Mmap { map: None });
        }
        // SAFETY: passed on to our caller (see `# Safety`).
        let map = unsafe { memmap2::Mmap::map(file) }.map_err(|e| Error::io(path, e))?;
        Ok(Mmap { map: Some(map) })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Drops the page-table entries of the pages inside `range`, which the caller will not
    /// read again soon, rather than unmapping them all at exit, on one thread, after
    /// everything else is done. The file's pages stay in the page cache. The range is rounded
    /// inward to 4 KiB; where pages are larger the kernel's rounding may take in a page of a
    /// neighbouring tensor, which is harmless (see below).
    #[cfg(unix)]
    fn release(&self, range: std::ops::Range<usize>) {
        const PAGE: usize = 4096;
        let (Some(map), true) = (&self.map, range.end <= self.bytes().len()) else { return };
        let start = (map.as_ptr() as usize + range.start).next_multiple_of(PAGE) - map.as_ptr() as usize;
        let end = (map.as_ptr() as usize + range.end) / PAGE * PAGE - map.as_ptr() as usize;
        if start < end {
            // SAFETY: the map is a shared read-only file mapping, so MADV_DONTNEED discards no
            // data: it drops our page-table entries, the pages stay in the page cache, and a
            // later read of these bytes (by any thread, even at the same time) maps the same
            // file pages again. It is advice; a failure changes nothing and is ignored.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    }

    #[cfg(not(unix))]
    fn release(&self, _range: std::ops::Range<usize>) {}
}

/// One tensor as declared in a shard header, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: Vec<u64>,
    /// Start of its bytes, relative to the shard's data buffer.
    pub begin: u64,
    /// End (exclusive) of its bytes, relative to the data buffer.
    pub end: u64,
}

impl TensorInfo {
    /// The number of elements (1 for a scalar).
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The number of bytes.
    pub fn byte_len(&self) -> u64 {
        self.end - self.begin
    }
}

/// One validated safetensors file.
pub struct Shard {
    /// Where it is on disk.
    pub path: PathBuf,
    /// Its name relative to the checkpoint directory (or its file name for a single file).
    pub name: String,
    /// Its position among the checkpoint's shards.
    pub position: usize,
    /// The header's JSON text, exactly as in the file (padding included).
    pub header: String,
    /// Length of the data buffer that follows the header.
    pub data_len: u64,
    /// Tensors in data order (by `begin`, then header order).
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    map: Mmap,
}

impl Shard {
    /// Opens, maps and validates one safetensors file. See [`Checkpoint::open`] for the
    /// contract of its memory map.
    pub fn open(path: &Path, name: String) -> Result<Self> {
        // Checked before opening too: opening a FIFO would block.
        if !std::fs::metadata(path).map_err(|e| Error::io(path, e))?.is_file() {
            return Err(Error::invalid(path, "not a regular file"));
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::invalid(path, "not a regular file"));
        }
        // SAFETY: fapm cannot stop other processes from changing its input files; the map's
        // contract (`Mmap::map`) is passed on to fapm's user, who promises that checkpoints do
        // not change while fapm reads them (`Checkpoint::open`, docs/SECURITY.md). What breaks
        // the promise is contained as far as a process can: a truncation raises SIGBUS, which
        // the binary turns into a clean error (src/sigbus.rs), and bytes rewritten in place
        // are caught by the delta's hashes when applied.
        let map = unsafe { Mmap::map(path, &file, meta.len()) }?;
        let (header, data_start, tensors) = parse_shard(path, map.bytes())?;
        let data_len = (map.bytes().len() - data_start) as u64;
        Ok(Shard { path: path.to_path_buf(), name, position: 0, header, data_len, tensors, data_start, map })
    }

    /// The bytes of tensor `i` of this shard.
    pub fn tensor_bytes(&self, i: usize) -> &[u8] {
        let t = &self.tensors[i];
        // Offsets were validated against the data buffer when the shard was opened.
        &self.map.bytes()[self.data_start + t.begin as usize..self.data_start + t.end as usize]
    }
}

/// Parses and validates a whole safetensors file held in `bytes`.
///
/// Returns the header text, where the data buffer starts, and the tensors in data order.
pub fn parse_shard(path: &Path, bytes: &[u8]) -> Result<(String, usize, Vec<TensorInfo>)> {
    let len_bytes: [u8; 8] = bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| {
        Error::invalid(path, format!("file is {} bytes, too short for a safetensors header", bytes.len()))
    })?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_LEN {
        return Err(Error::invalid(
            path,
            format!("header length {header_len} exceeds the {MAX_HEADER_LEN}-byte limit"),
        ));
    }
    let data_start = 8 + header_len as usize;
    let header_bytes = bytes.get(8..data_start).ok_or_else(|| {
        Error::invalid(path, format!("header length {header_len} runs past the end of the {}-byte file", bytes.len()))
    })?;
    let header =
        std::str::from_utf8(header_bytes).map_err(|e| Error::invalid(path, format!("header is not UTF-8: {e}")))?;
    let data_len = (bytes.len() - data_start) as u64;
    let tensors = parse_header(path, header, data_len)?;
    json::charge(json::string_cost(header.len())).map_err(|e| Error::invalid(path, e))?;
    Ok((header.to_owned(), data_start, tensors))
}

/// One tensor entry of a header, as written.
#[derive(Deserialize)]
struct RawTensor<'a> {
    #[serde(borrow)]
    dtype: json::Str<'a>,
    #[serde(deserialize_with = "json::vec")]
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

impl json::Heap for TensorInfo {
    fn heap(&self) -> u64 {
        json::string_cost(self.name.capacity()) // the shape was charged as it was parsed
    }
}

/// What [`parse_header`] charged to the allowance for `tensors` (and keeps charged).
pub(crate) fn parsed_cost(tensors: &Vec<TensorInfo>) -> u64 {
    let each: u64 = tensors.iter().map(|t| json::Heap::heap(t) + (t.shape.capacity() * size_of::<u64>()) as u64).sum();
    each + (tensors.capacity() * size_of::<TensorInfo>()) as u64
}

/// What the header parser was reading when it stopped, to word the error.
enum Failure {
    /// The JSON itself, or its top level.
    Json,
    /// The `__metadata__` entry.
    Metadata,
    /// A tensor entry, and why it is refused (empty: the JSON of the entry is malformed).
    Tensor(String, String),
}

/// Parses a header's top-level object into its tensors, in header order.
struct HeaderVisitor<'f> {
    data_len: u64,
    failure: &'f mut Failure,
}

impl<'de> Visitor<'de> for HeaderVisitor<'_> {
    type Value = Vec<TensorInfo>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
        let fail = |failure: &mut Failure, name: &str, msg: String| {
            *failure = Failure::Tensor(name.to_owned(), msg);
            A::Error::custom("invalid tensor entry")
        };
        let mut tensors = Vec::new();
        let mut metadata = false;
        while let Some(json::Str(name)) = map.next_key()? {
            if name == "__metadata__" {
                *self.failure = Failure::Metadata;
                if std::mem::replace(&mut metadata, true) {
                    return Err(A::Error::custom("duplicate key '__metadata__'"));
                }
                map.next_value::<Metadata>()?;
                *self.failure = Failure::Json;
                continue;
            }
            *self.failure = Failure::Tensor(name.to_string(), String::new());
            let raw: RawTensor = map.next_value()?;
            let dtype = DType::parse(&raw.dtype.0).ok_or_else(|| {
                fail(self.failure, &name, format!("unknown dtype '{}'", json::clip(&raw.dtype.0, 32)))
            })?;
            let (begin, end) = raw.data_offsets;
            if begin > end || end > self.data_len {
                let buffer = if self.data_len == u64::MAX { String::new() } else { format!("{}-byte ", self.data_len) };
                let msg = format!("data_offsets [{begin}, {end}] outside the {buffer}data buffer");
                return Err(fail(self.failure, &name, msg));
            }
            let expected = raw.shape.iter().try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d));
            let Some(expected) = expected else { return Err(fail(self.failure, &name, "shape is too large".into())) };
            if end - begin != expected {
                let rank = raw.shape.len();
                let shape = if rank > 8 { format!("of rank {rank}") } else { format!("{:?}", raw.shape) };
                let msg =
                    format!("data_offsets span {} bytes but shape {shape} of {dtype} needs {expected}", end - begin);
                return Err(fail(self.failure, &name, msg));
            }
            let info = TensorInfo { name: name.into_owned(), dtype, shape: raw.shape, begin, end };
            json::push(&mut tensors, info).map_err(A::Error::custom)?;
            *self.failure = Failure::Json;
        }
        Ok(tensors)
    }
}

/// The `__metadata__` entry: checked to map strings to strings, kept nowhere (the header
/// text is kept verbatim).
struct Metadata;

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Metadata;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Metadata, A::Error> {
                while map.next_entry::<IgnoredAny, json::AnyStr>()?.is_some() {}
                Ok(Metadata)
            }
        }
        d.deserialize_map(V)
    }
}

/// Validates a safetensors header against a data buffer of `data_len` bytes: the tensors,
/// sorted by their offsets, must tile the buffer from 0 to its end without gap or overlap
/// (the rule of the `safetensors` library). `data_len` is `u64::MAX` for a header recorded in
/// a delta, whose data buffer is then the tensors' tiling. The parse allocates only what it
/// returns (charged to the current [`json::Allowance`]) and a list of indices.
pub fn parse_header(path: &Path, header: &str, data_len: u64) -> Result<Vec<TensorInfo>> {
    let mut failure = Failure::Json;
    let mut de = serde_json::Deserializer::from_str(header);
    let parsed =
        de.deserialize_map(HeaderVisitor { data_len, failure: &mut failure }).and_then(|t| de.end().map(|_| t));
    let mut tensors = match (parsed, failure) {
        (Ok(tensors), _) => tensors,
        (Err(e), _) if e.to_string().starts_with(json::OVER_BUDGET) => {
            return Err(Error::invalid(path, format!("header of {} bytes: {}", header.len(), json::OVER_BUDGET)));
        }
        (Err(e), Failure::Json) => return Err(Error::invalid(path, format!("malformed header JSON: {e}"))),
        (Err(e), Failure::Metadata) => {
            return Err(Error::invalid(path, format!("__metadata__ must map strings to strings: {e}")));
        }
        (Err(e), Failure::Tensor(name, msg)) if msg.is_empty() => {
            return Err(Error::tensor(path, name, format!("malformed header entry: {e}")));
        }
        (Err(_), Failure::Tensor(name, msg)) => return Err(Error::tensor(path, name, msg)),
    };
    let refuse = |tensors: &[TensorInfo], i: usize, msg: String| Err(Error::tensor(path, &tensors[i].name, msg));
    // Indices in name order, then in (begin, end) order: 4 bytes per tensor, no copies.
    let over = |e| Error::invalid(path, e);
    json::charge(4 * tensors.len() as u64).map_err(over)?;
    let mut order: Vec<u32> = (0..tensors.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| tensors[a as usize].name.cmp(&tensors[b as usize].name));
    if let Some(w) = order.windows(2).find(|w| tensors[w[0] as usize].name == tensors[w[1] as usize].name) {
        return refuse(&tensors, w[1] as usize, "duplicate key in the header".into());
    }
    order.sort_unstable_by_key(|&i| (tensors[i as usize].begin, tensors[i as usize].end, i));
    let mut pos = 0;
    for (k, &i) in order.iter().enumerate() {
        let t = &tensors[i as usize];
        if t.begin < pos {
            let prev = &tensors[order[k - 1] as usize].name;
            return refuse(&tensors, i as usize, format!("data overlaps tensor '{prev}'"));
        }
        if t.begin > pos {
            let msg = format!("starts at byte {} of the data buffer, leaving {} bytes before it that no tensor covers (tensors must tile the buffer from 0)", t.begin, t.begin - pos);
            return refuse(&tensors, i as usize, msg);
        }
        pos = t.end;
    }
    json::refund(4 * tensors.len() as u64);
    drop(order);
    if data_len != u64::MAX && pos != data_len {
        return Err(Error::invalid(
            path,
            format!(
                "the last {} bytes of the data buffer belong to no tensor (tensors must tile it to its end)",
                data_len - pos
            ),
        ));
    }
    tensors.sort_by_key(|t| t.begin); // stable: header order among equal starts
    Ok(tensors)
}

/// How a checkpoint was given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One `.safetensors` file.
    File,
    /// A directory of shards, with or without an index file.
    Directory,
}

/// A tensor of a checkpoint: its shard and position there. Cheap to clone.
#[derive(Clone)]
pub struct TensorRef {
    /// The shard holding it.
    pub shard: Arc<Shard>,
    /// Its position in `shard.tensors`.
    pub index: usize,
}

impl TensorRef {
    /// The tensor's header entry.
    pub fn info(&self) -> &TensorInfo {
        &self.shard.tensors[self.index]
    }

    /// The tensor's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.shard.tensor_bytes(self.index)
    }

    /// Tells the kernel that this tensor's bytes will not be read again soon (see
    /// [`Mmap::release`]); reading them again still works.
    pub fn release(&self) {
        let t = &self.shard.tensors[self.index];
        let start = self.shard.data_start + t.begin as usize;
        self.shard.map.release(start..self.shard.data_start + t.end as usize);
    }
}

/// An opened, validated checkpoint.
pub struct Checkpoint {
    /// The path given.
    pub root: PathBuf,
    /// File or directory.
    pub layout: Layout,
    /// Whether a directory had a `model.safetensors.index.json`.
    pub indexed: bool,
    /// Shards in name order.
    pub shards: Vec<Arc<Shard>>,
    by_name: HashMap<String, (usize, usize)>,
}

impl Checkpoint {
    /// Opens a `.safetensors` file or a checkpoint directory and validates every shard,
    /// reading its headers within [`DEFAULT_MEMORY_BUDGET`] (see [`Checkpoint::open_within`]).
    ///
    /// # Memory maps
    ///
    /// Shards are memory-mapped, shared and read-only (`Mmap::map`): the caller promises
    /// that nobody modifies or truncates them while the checkpoint is in use. Truncation
    /// raises SIGBUS in the reading thread, which the `fapm` binary turns into a clean error;
    /// a library user that maps files it does not control must handle SIGBUS itself.
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_within(root, DEFAULT_MEMORY_BUDGET)
    }

    /// [`Checkpoint::open`], with the memory that parsing the index and the shard headers
    /// may take (what the checkpoint keeps of them, and what the parse needs on the way)
    /// bounded by `memory_budget`: a hostile header is refused before it can exhaust memory.
    pub fn open_within(root: &Path, memory_budget: u64) -> Result<Self> {
        let _allowance = json::Allowance::new(memory_budget);
        let meta = std::fs::metadata(root).map_err(|e| Error::io(root, e))?;
        // The index is read once: it names the shards and is checked against them.
        let index = if meta.is_dir() { read_index(root)? } else { None };
        let (layout, names) = if meta.is_dir() {
            (Layout::Directory, shard_names(root, index.as_deref())?)
        } else {
            let name = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            (Layout::File, vec![name])
        };
        let mut shards: Vec<Arc<Shard>> = Vec::with_capacity(names.len());
        let mut by_name: HashMap<String, (usize, usize)> = HashMap::new();
        for name in names {
            let path = if layout == Layout::File { root.to_path_buf() } else { root.join(&name) };
            let mut shard = Shard::open(&path, name)?;
            shard.position = shards.len();
            // The name map: a copy of each name and a hash-table slot.
            let names: u64 = shard.tensors.iter().map(|t| json::string_cost(t.name.len()) + 48).sum();
            json::charge(names).map_err(|e| Error::invalid(&path, e))?;
            for (i, t) in shard.tensors.iter().enumerate() {
                if let Some(&(other, _)) = by_name.get(&t.name) {
                    let other = &shards[other];
                    return Err(Error::tensor(
                        &path,
                        &t.name,
                        format!("also present in shard {}", other.path.display()),
                    ));
                }
                by_name.insert(t.name.clone(), (shards.len(), i));
            }
            shards.push(Arc::new(shard));
        }
        let ckpt = Checkpoint { root: root.to_path_buf(), layout, indexed: index.is_some(), shards, by_name };
        if let Some(map) = index {
            ckpt.check_index(map)?;
        }
        Ok(ckpt)
    }

    /// Every tensor, shard by shard in data order.
    pub fn tensors(&self) -> impl Iterator<Item = TensorRef> + '_ {
        self.shards
            .iter()
            .flat_map(|s| (0..s.tensors.len()).map(move |index| TensorRef { shard: Arc::clone(s), index }))
    }

    /// The tensor called `name`, if any.
    pub fn get(&self, name: &str) -> Option<TensorRef> {
        self.by_name.get(name).map(|&(s, index)| TensorRef { shard: Arc::clone(&self.shards[s]), index })
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are no tensors at all.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Checks that every tensor the index names is in the shard it names.
    fn check_index(&self, map: Vec<(String, String)>) -> Result<()> {
        let index_path = self.root.join(INDEX_FILE);
        for (tensor, shard) in map {
            match self.by_name.get(&tensor) {
                Some(&(s, _)) if self.shards[s].name == shard => {}
                _ => {
                    return Err(Error::tensor(&index_path, tensor, format!("not found in shard '{shard}'")));
                }
            }
        }
        Ok(())
    }
}

/// The largest index file fapm reads.
pub const MAX_INDEX_LEN: u64 = MAX_HEADER_LEN;

/// The `weight_map` of a directory's index file, or `None` when there is no index.
fn read_index(dir: &Path) -> Result<Option<Vec<(String, String)>>> {
    let path = dir.join(INDEX_FILE);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    if !meta.is_file() {
        return Err(Error::invalid(&path, "not a regular file"));
    }
    if meta.len() > MAX_INDEX_LEN {
        return Err(Error::invalid(&path, format!("{} bytes exceeds the {MAX_INDEX_LEN}-byte limit", meta.len())));
    }
    json::charge(meta.len()).map_err(|e| Error::invalid(&path, e))?;
    let mut text = Vec::with_capacity(meta.len() as usize);
    let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_INDEX_LEN + 1), &mut text)
        .map_err(|e| Error::io(&path, e))?;
    if text.len() as u64 > MAX_INDEX_LEN {
        return Err(Error::invalid(&path, format!("exceeds the {MAX_INDEX_LEN}-byte limit")));
    }
    let index: IndexFile =
        serde_json::from_slice(&text).map_err(|e| Error::invalid(&path, format!("malformed JSON: {e}")))?;
    json::refund(meta.len());
    let map = index.weight_map.ok_or_else(|| Error::invalid(&path, "no \"weight_map\" object"))?.0;
    for (tensor, shard) in &map {
        if !is_safe_relative(shard) {
            let msg = format!("shard path '{shard}' is outside the directory or not a plain relative path");
            return Err(Error::tensor(&path, tensor, msg));
        }
    }
    Ok(Some(map))
}

/// An index file: only `weight_map` is read; `metadata` and anything else is skipped
/// without being kept.
#[derive(Deserialize)]
struct IndexFile {
    weight_map: Option<WeightMap>,
}

/// `weight_map`: tensor name to shard path, in file order.
struct WeightMap(Vec<(String, String)>);

impl json::Heap for (String, String) {
    fn heap(&self) -> u64 {
        self.0.heap() + self.1.heap()
    }
}

impl<'de> Deserialize<'de> for WeightMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = WeightMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of tensor names to shard paths")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<WeightMap, A::Error> {
                let mut out = Vec::new();
                while let Some((json::Str(tensor), json::Str(shard))) = map.next_entry()? {
                    json::push(&mut out, (tensor.into_owned(), shard.into_owned())).map_err(A::Error::custom)?;
                }
                Ok(WeightMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The shard names of a checkpoint directory (those of its index, when it has one), sorted.
fn shard_names(dir: &Path, index: Option<&[(String, String)]>) -> Result<Vec<String>> {
    let mut names: Vec<String> = match index {
        Some(map) => {
            let mut names: Vec<String> = map.iter().map(|(_, s)| s.clone()).collect();
            names.sort();
            names.dedup();
            for name in &names {
                if !dir.join(name).is_file() {
                    return Err(Error::invalid(
                        dir.join(INDEX_FILE),
                        format!("names shard '{name}', which does not exist"),
                    ));
                }
            }
            names
        }
        None => {
            let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            let mut names = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| Error::io(dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".safetensors") && entry.path().is_file() {
                    names.push(name);
                }
            }
            names
        }
    };
    names.sort();
    if names.is_empty() {
        return Err(Error::invalid(dir, "no *.safetensors files in this directory"));
    }
    if names.len() > MAX_SHARDS {
        return Err(Error::invalid(dir, format!("{} shards, more than the {MAX_SHARDS} fapm handles", names.len())));
    }
    Ok(names)
}

/// Whether `p` is a path in the one spelling a delta stores (SPEC section 4): relative,
/// `/`-separated, every component non-empty and neither `.` nor `..`, no `\\` and no control
/// character. So "a/b.json", but not "", "/x", "../x", "a//b", "a/./b", "a/" or "a\\b": two
/// different strings that pass never name the same file.
pub fn is_safe_relative(p: &str) -> bool {
    !p.is_empty()
        && !p.chars().any(|c| c == '\\' || c.is_control())
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard_bytes(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    fn parse(header: &str, data: &[u8]) -> Result<Vec<TensorInfo>> {
        parse_shard(Path::new("x.safetensors"), &shard_bytes(header, data)).map(|(_, _, t)| t)
    }

    #[test]
    fn accepts_unaligned_tensors_in_data_order() {
        let h = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},"a":{"dtype":"F16","shape":[1],"data_offsets":[3,5]}}"#;
        let t = parse(h, &[0; 5]).unwrap();
        assert_eq!(t.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        assert_eq!(t[1].begin, 3);
    }

    #[test]
    fn rejects_each_malformation() {
        let cases: &[(&str, usize, &str)] = &[
            (r#"{"a":{"dtype":"X9","shape":[1],"data_offsets":[0,1]}}"#, 1, "unknown dtype"),
            (r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,1]}}"#, 1, "needs 2"),
            (r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,9]}}"#, 1, "outside"),
            (
                r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#,
                3,
                "overlaps",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                2,
                "duplicate key",
            ),
            (r#"{"a":{"dtype":"U8","shape":[4294967296,4294967296,16],"data_offsets":[0,1]}}"#, 1, "too large"),
            (r#"{"__metadata__":{"x":1}}"#, 0, "__metadata__"),
            (r#"[1,2]"#, 0, "malformed header"),
            (r#"{"a":{"dtype":"U8","shape":[1]}}"#, 1, "malformed header entry"),
            (r#"{"__metadata__":{},"__metadata__":{}}"#, 0, "duplicate key '__metadata__'"),
            // Tiling from 0 to the end, as the safetensors library requires.
            (r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[4,5]}}"#, 5, "leaving 4 bytes before it"),
            (
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}"#,
                3,
                "leaving 1 bytes before it",
            ),
            (r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, 3, "last 2 bytes of the data buffer"),
            (r#"{}"#, 1, "last 1 bytes"),
            (r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} x"#, 1, "malformed header JSON"),
        ];
        for (header, data_len, needle) in cases {
            let err = parse(header, &vec![0; *data_len]).unwrap_err().to_string();
            assert!(err.contains(needle), "{header}: {err}");
        }
    }

    #[test]
    fn empty_tensors_may_share_an_offset_in_either_order() {
        for h in [
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"z":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#,
            r#"{"z":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#,
        ] {
            let t = parse(h, &[0; 2]).unwrap();
            assert_eq!(t.len(), 2, "{h}");
        }
        assert!(parse("{}", &[]).unwrap().is_empty());
        // A header recorded in a delta: no buffer to fill, but still tiled from 0.
        let h = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        let err = parse_header(Path::new("d"), h, u64::MAX).unwrap_err().to_string();
        assert!(err.contains("leaving 1 bytes before it"), "{err}");
        let h = r#"{"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,18446744073709551615]}}"#;
        let err = parse_header(Path::new("d"), h, u64::MAX).unwrap_err().to_string();
        assert!(err.contains("too large"), "{err}");
    }

    /// A header of a few MB that a generic JSON value would have parsed into gigabytes is
    /// refused within its allowance, and the parse charges what it keeps.
    #[test]
    fn header_memory_is_charged_to_the_allowance() {
        let shape = format!("[{}1]", "1,".repeat((4 << 20) - 1));
        let h = format!(r#"{{"a":{{"dtype":"U8","shape":{shape},"data_offsets":[0,1]}}}}"#);
        {
            let _a = json::Allowance::new(16 << 20);
            let err = parse(&h, &[0]).unwrap_err().to_string();
            assert!(err.contains("memory budget"), "{err}");
        }
        let _a = json::Allowance::new(64 << 20);
        assert_eq!(parse(&h, &[0]).unwrap()[0].shape.len(), 4 << 20);
        // Many small entries: about 100 bytes each, with the list's growth.
        let many: Vec<String> = (0..10_000)
            .map(|i| format!(r#""t{i}":{{"dtype":"U8","shape":[],"data_offsets":[{i},{}]}}"#, i + 1))
            .collect();
        let h = format!("{{{}}}", many.join(","));
        let _b = json::Allowance::new(1 << 20);
        let err = parse(&h, &[0; 10_000]).unwrap_err().to_string();
        assert!(err.contains("memory budget"), "{err}");
    }

    #[test]
    fn rejects_bad_header_lengths() {
        assert!(parse_shard(Path::new("x"), &[1, 2, 3]).unwrap_err().to_string().contains("too short"));
        let mut b = 1000u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert!(parse_shard(Path::new("x"), &b).unwrap_err().to_string().contains("past the end"));
        let b = (MAX_HEADER_LEN + 1).to_le_bytes();
        assert!(parse_shard(Path::new("x"), &b).unwrap_err().to_string().contains("limit"));
    }

    #[test]
    fn safe_relative_paths() {
        for ok in ["a.json", "tok/vocab.txt"] {
            assert!(is_safe_relative(ok), "{ok}");
        }
        for bad in [
            "",
            "../a",
            "/etc/passwd",
            "a/../../b",
            "./a",
            "a\\..\\b",
            "a//b",
            "a/./b",
            "a/",
            "a/.",
            "a\u{1b}b",
            "a\nb",
        ] {
            assert!(!is_safe_relative(bad), "{bad}");
        }
    }
}

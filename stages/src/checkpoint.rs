//! Safetensors checkpoints: shard discovery, header validation, memory maps, name routing.
//!
//! A checkpoint is one `.safetensors` file or a directory of shards (named by
//! `model.safetensors.index.json` when present, else every `*.safetensors` file in it).
//! Everything read from a file is validated here before any view of it is handed out, so
//! the rest of fapm can slice tensor bytes without further checks.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// The largest safetensors header fapm accepts (SPEC section 1).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The name of the shard index file in a sharded checkpoint directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A read-only memory map of a whole file.
pub struct Mmap {
    map: Option<memmap2::Mmap>,
}

impl Mmap {
    /// Maps `file`, which is `path`, read-only.
    ///
    /// # Safety contract
    /// A memory map is only sound while nobody truncates or rewrites the file. fapm maps
    /// checkpoints it only reads, documents that they must not change during a run, and
    /// guards against truncation with a SIGBUS handler in the binary (see docs/SECURITY.md).
    fn open(path: &Path, file: &File, len: u64) -> Result<Self> {
        if len == 0 {
            return Ok(Mmap { map: None });
        }
        // SAFETY: the map is read-only and private to this process; the file is an input
        // that must not be modified while fapm runs (see the contract above).
        let map = unsafe { memmap2::Mmap::map(file) }.map_err(|e| Error::io(path, e))?;
        Ok(Mmap { map: Some(map) })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Drops the page-table entries of the pages inside `range`, which the caller will not
    /// read again soon: unmapping at exit cost 0.1 s per 3 GB mapped, on one thread, after
    /// everything else was done. The file's pages stay in the page cache. The range is rounded
    /// inward to 4 KiB; where pages are larger the kernel's rounding may take in a page of a
    /// neighbouring tensor, which is harmless (see below).
    #[cfg(unix)]
    fn release(&self, range: std::ops::Range<usize>) {
        const PAGE: usize = 4096;
        let (Some(map), true) = (&self.map, range.end <= self.bytes().len()) else { return };
        let start = (map.as_ptr() as usize + range.start).next_multiple_of(PAGE) - map.as_ptr() as usize;
        let end = (map.as_ptr() as usize + range.end) / PAGE * PAGE - map.as_ptr() as usize;
        if start < end {
            // SAFETY: the map is a read-only file mapping, so MADV_DONTNEED discards no data:
            // a later read of these bytes (by anyone, even at the same time) maps the same
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
    /// Opens, maps and validates one safetensors file.
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
        let map = Mmap::open(path, &file, meta.len())?;
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
    let header = std::str::from_utf8(header_bytes)
        .map_err(|e| Error::invalid(path, format!("header is not UTF-8: {e}")))?
        .to_owned();
    let data_len = (bytes.len() - data_start) as u64;
    let tensors = parse_header(path, &header, data_len)?;
    Ok((header, data_start, tensors))
}

#[derive(Deserialize)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// A JSON object's entries in file order, with duplicate keys reported instead of merged.
struct OrderedObject(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for OrderedObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<OrderedObject, A::Error> {
                let mut entries = Vec::new();
                let mut seen = std::collections::HashSet::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!("duplicate key '{k}'")));
                    }
                    entries.push((k, v));
                }
                Ok(OrderedObject(entries))
            }
        }
        d.deserialize_map(V)
    }
}

/// Validates a safetensors header against a data buffer of `data_len` bytes.
pub fn parse_header(path: &Path, header: &str, data_len: u64) -> Result<Vec<TensorInfo>> {
    let object: OrderedObject =
        serde_json::from_str(header).map_err(|e| Error::invalid(path, format!("malformed header JSON: {e}")))?;
    let mut tensors = Vec::with_capacity(object.0.len());
    for (name, value) in object.0 {
        if name == "__metadata__" {
            let ok = value.as_object().is_some_and(|m| m.values().all(|v| v.is_string()));
            if !ok {
                return Err(Error::invalid(path, "__metadata__ must map strings to strings"));
            }
            continue;
        }
        let raw: RawTensor = serde_json::from_value(value)
            .map_err(|e| Error::tensor(path, &name, format!("malformed header entry: {e}")))?;
        let dtype = DType::parse(&raw.dtype)
            .ok_or_else(|| Error::tensor(path, &name, format!("unknown dtype '{}'", raw.dtype)))?;
        let (begin, end) = raw.data_offsets;
        if begin > end || end > data_len {
            return Err(Error::tensor(
                path,
                &name,
                format!("data_offsets [{begin}, {end}] outside the {data_len}-byte data buffer"),
            ));
        }
        let expected = raw
            .shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::tensor(path, &name, "shape is too large"))?;
        if end - begin != expected {
            return Err(Error::tensor(
                path,
                &name,
                format!(
                    "data_offsets span {} bytes but shape {:?} of {dtype} needs {expected}",
                    end - begin,
                    raw.shape
                ),
            ));
        }
        tensors.push(TensorInfo { name, dtype, shape: raw.shape, begin, end });
    }
    tensors.sort_by_key(|t| t.begin); // stable: header order among equal starts
    for pair in tensors.windows(2) {
        if pair[1].begin < pair[0].end {
            return Err(Error::tensor(path, &pair[1].name, format!("data overlaps tensor '{}'", pair[0].name)));
        }
    }
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
    /// Opens a `.safetensors` file or a checkpoint directory and validates every shard.
    pub fn open(root: &Path) -> Result<Self> {
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

/// The `weight_map` of a directory's index file, or `None` when there is no index.
fn read_index(dir: &Path) -> Result<Option<Vec<(String, String)>>> {
    let path = dir.join(INDEX_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| Error::invalid(&path, format!("malformed JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::invalid(&path, "no \"weight_map\" object"))?;
    let mut out = Vec::with_capacity(map.len());
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| Error::tensor(&path, tensor, "weight_map value is not a string"))?;
        if !is_safe_relative(shard) {
            return Err(Error::tensor(&path, tensor, format!("shard path '{shard}' is outside the directory")));
        }
        out.push((tensor.clone(), shard.to_owned()));
    }
    Ok(Some(out))
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
    Ok(names)
}

/// Whether `p` is a relative path that stays inside its base directory ("a/b.json", not
/// "../x", "/x", "a/../../x" or "").
pub fn is_safe_relative(p: &str) -> bool {
    !p.is_empty()
        && !p.contains('\\')
        && !p.contains('\0')
        && Path::new(p).components().all(|c| matches!(c, Component::Normal(_)))
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
        ];
        for (header, data_len, needle) in cases {
            let err = parse(header, &vec![0; *data_len]).unwrap_err().to_string();
            assert!(err.contains(needle), "{header}: {err}");
        }
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
        for bad in ["", "../a", "/etc/passwd", "a/../../b", "./a", "a\\..\\b"] {
            assert!(!is_safe_relative(bad), "{bad}");
        }
    }
}

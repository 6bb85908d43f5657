//! Safetensors checkpoints: a `.safetensors` file or a directory of shards (named by
//! `model.safetensors.index.json` when present, else every `*.safetensors` file in it),
//! each shard memory-mapped and validated, and tensors found by name.
//!
//! Everything read from a file is validated before any view of it is handed out, so the
//! rest of fapm can slice tensor bytes without further checks. The parts: [`mmap`] (the
//! memory maps and their contract), [`header`] (a shard's header, parsed within the memory
//! allowance and checked), [`index`] (the index file and shard discovery).

pub mod header;
pub mod index;
pub mod mmap;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::bounded_json as json;
use crate::error::{Error, Result};
use crate::run::RunControl;
use crate::DEFAULT_MEMORY_BUDGET;
pub use header::{parse_header, parse_shard, parsed_cost, TensorInfo, MAX_HEADER_LEN};
pub use index::INDEX_FILE;
use index::{read_index, shard_names};
use mmap::Mmap;

/// The most shards a checkpoint (and so a delta) may have: each is a file `apply` creates.
pub const MAX_SHARDS: usize = 10_000;

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
        // The header is read with pread before the file is mapped, so a file truncated while
        // it is opened gives an I/O error, never a SIGBUS (which a library host such as the
        // Python interpreter would die of); the map serves only tensor data.
        let (header, data_start, tensors) = read_header(path, &file, meta.len())?;
        let map = unsafe { Mmap::map(path, &file, meta.len()) }?;
        let data_len = (map.bytes().len() as u64).saturating_sub(data_start as u64);
        if data_len != meta.len() - data_start as u64 {
            return Err(Error::invalid(path, "the file changed while it was opened"));
        }
        Ok(Shard { path: path.to_path_buf(), name, position: 0, header, data_len, tensors, data_start, map })
    }

    /// The bytes of tensor `i` of this shard.
    pub fn tensor_bytes(&self, i: usize) -> &[u8] {
        let t = &self.tensors[i];
        // Offsets were validated against the data buffer when the shard was opened.
        &self.map.bytes()[self.data_start + t.begin as usize..self.data_start + t.end as usize]
    }
}

/// The header of the safetensors file `file` of `file_len` bytes, read with pread and parsed
/// as [`parse_shard`] parses it from memory: its text, where the data starts, its tensors.
fn read_header(path: &Path, file: &File, file_len: u64) -> Result<(String, usize, Vec<TensorInfo>)> {
    use std::os::unix::fs::FileExt;
    let mut len_bytes = [0u8; 8];
    if file_len >= 8 {
        file.read_exact_at(&mut len_bytes, 0).map_err(|e| Error::io(path, e))?;
    }
    let end = header::header_end(path, file_len, len_bytes)?;
    json::charge(json::string_cost(end as usize - 8)).map_err(|e| Error::invalid(path, e))?;
    let mut text = vec![0u8; end as usize - 8];
    file.read_exact_at(&mut text, 8).map_err(|e| Error::io(path, e))?;
    let header = String::from_utf8(text)
        .map_err(|e| Error::invalid(path, format!("header is not UTF-8: {}", e.utf8_error())))?;
    let tensors = parse_header(path, &header, file_len - end)?;
    Ok((header, end as usize, tensors))
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

    /// Brings `range` of this tensor's bytes into memory ahead of the stages that will read
    /// them (see [`Mmap::populate`]).
    pub fn populate(&self, range: std::ops::Range<usize>) {
        let start = self.shard.data_start + self.shard.tensors[self.index].begin as usize;
        self.shard.map.populate(start + range.start..start + range.end);
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
        Self::open_within(root, DEFAULT_MEMORY_BUDGET, &RunControl::default())
    }

    /// [`Checkpoint::open`], with the memory that parsing the index and the shard headers
    /// may take (what the checkpoint keeps of them, and what the parse needs on the way)
    /// bounded by `memory_budget`: a hostile header is refused before it can exhaust memory.
    /// Opening stops with [`Error::Cancelled`] soon after `ctl` is cancelled: between shards,
    /// and inside the parse of a large header or index.
    pub fn open_within(root: &Path, memory_budget: u64, ctl: &RunControl) -> Result<Self> {
        let _watch = json::Watch::new(ctl);
        // A parse stopped by the watch fails as malformed JSON would: named for what it was.
        Self::open_watched(root, memory_budget, ctl).map_err(|e| if ctl.is_cancelled() { Error::Cancelled } else { e })
    }

    fn open_watched(root: &Path, memory_budget: u64, ctl: &RunControl) -> Result<Self> {
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
            ctl.check()?;
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

    /// A delta given where a checkpoint goes is named as one, not as a bad header length.
    #[test]
    fn a_delta_is_not_a_checkpoint() {
        let mut b = crate::format::MAGIC.to_vec();
        b.extend_from_slice(&[0; 100]);
        let err = parse_shard(Path::new("d.fapm"), &b).unwrap_err().to_string();
        assert_eq!(err, "d.fapm: is a fapm delta, not a safetensors checkpoint (were the base and the delta swapped?)");
    }

    /// A cancelled run stops opening: before each shard, and inside a long header's parse.
    #[test]
    fn opening_stops_once_cancelled() {
        let many: Vec<String> = (0..10_000)
            .map(|i| format!(r#""t{i}":{{"dtype":"U8","shape":[],"data_offsets":[{i},{}]}}"#, i + 1))
            .collect();
        let h = format!("{{{}}}", many.join(","));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, shard_bytes(&h, &[0; 10_000])).unwrap();
        let ctl = RunControl::default();
        assert_eq!(Checkpoint::open_within(&path, 1 << 30, &ctl).unwrap().len(), 10_000);
        ctl.cancel();
        assert!(matches!(Checkpoint::open_within(&path, 1 << 30, &ctl), Err(Error::Cancelled)));
        let _watch = json::Watch::new(&ctl);
        let err = parse(&h, &[0; 10_000]).unwrap_err().to_string();
        assert!(err.contains(json::CANCELLED), "{err}");
    }
}

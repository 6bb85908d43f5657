//! Which files are a directory's shards: those the index file `model.safetensors.index.json`
//! names (its `weight_map`, parsed within the memory allowance), else every `*.safetensors`
//! file in the directory.

use std::fs::File;
use std::path::Path;

use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::Deserialize;

use super::header::MAX_HEADER_LEN;
use super::MAX_SHARDS;
use crate::bounded_json as json;
use crate::error::{Error, Result};
use crate::paths::is_safe_relative;

/// The name of the shard index file in a sharded checkpoint directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The largest index file fapm reads.
pub const MAX_INDEX_LEN: u64 = MAX_HEADER_LEN;

/// The `weight_map` of a directory's index file, or `None` when there is no index.
pub(super) fn read_index(dir: &Path) -> Result<Option<Vec<(String, String)>>> {
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

/// The shard files a checkpoint directory lacks: those its index names that are not there, or
/// `*.safetensors` when it has no index and no shard (what a partly fetched Hugging Face
/// snapshot lacks). The index is read within `memory_budget`.
pub fn missing_shards(dir: &Path, memory_budget: u64) -> Result<Vec<String>> {
    let _allowance = json::Allowance::new(memory_budget);
    Ok(match read_index(dir)? {
        Some(map) => {
            let mut names: Vec<String> = map.into_iter().map(|(_, s)| s).filter(|s| !dir.join(s).is_file()).collect();
            names.sort();
            names.dedup();
            names
        }
        None => match shard_names(dir, None) {
            Ok(_) => Vec::new(),
            Err(_) => vec!["*.safetensors".into()],
        },
    })
}

/// The shard names of a checkpoint directory (those of its index, when it has one), sorted.
pub(super) fn shard_names(dir: &Path, index: Option<&[(String, String)]>) -> Result<Vec<String>> {
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

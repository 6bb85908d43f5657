//! Side files: the non-weight files of a checkpoint directory (config, tokenizer, ...) that
//! travel inside the delta so the rebuilt directory loads like the fine-tuned one.
//!
//! Decisions (docs/FORMAT.md): regular files found recursively, symlinks followed (Hugging
//! Face cache snapshots are symlinks); `*.safetensors` files and the top-level index are not
//! side files; names starting with '.' are skipped (`.git`, `.cache`); files over 64 MiB are
//! left out with a warning.

use std::path::{Path, PathBuf};

use fapm_stages::checkpoint::INDEX_FILE;
use fapm_stages::{Error, Result};

/// The largest side file carried inside a delta (SPEC section 4).
pub const MAX_SIDE_FILE: u64 = 64 << 20;

/// A side file found in the fine-tuned directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideSource {
    /// Path relative to the directory, '/'-separated.
    pub rel: String,
    /// Where it is.
    pub path: PathBuf,
    /// Its size when found.
    pub size: u64,
}

/// Side files of a checkpoint directory, sorted by relative path, and the
/// relative paths of those left out for being over 64 MiB.
pub fn side_files(root: &Path) -> Result<(Vec<SideSource>, Vec<String>)> {
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    walk(root, "", 0, &mut found, &mut skipped)?;
    found.sort_by(|a, b| a.rel.cmp(&b.rel));
    skipped.sort();
    Ok((found, skipped))
}

fn walk(dir: &Path, rel: &str, depth: usize, found: &mut Vec<SideSource>, skipped: &mut Vec<String>) -> Result<()> {
    if depth > 16 {
        return Err(Error::invalid(dir, "directories nested too deeply (a symlink loop?)"));
    }
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            tracing::warn!(file = %entry.path().display(), "side file with a non-UTF-8 name left out of the delta");
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        if name.contains('\\') {
            tracing::warn!(file = %entry.path().display(), "side file with a '\\' in its name left out of the delta");
            continue;
        }
        let path = entry.path();
        let relname = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
        let Ok(meta) = std::fs::metadata(&path) else { continue }; // dangling symlink
        if meta.is_dir() {
            walk(&path, &relname, depth + 1, found, skipped)?;
        } else if meta.is_file() && !name.ends_with(".safetensors") && !(rel.is_empty() && name == INDEX_FILE) {
            if meta.len() > MAX_SIDE_FILE {
                tracing::warn!(file = %relname, size = meta.len(), "side file over 64 MiB left out of the delta");
                skipped.push(relname);
            } else {
                found.push(SideSource { rel: relname, path, size: meta.len() });
            }
        }
    }
    Ok(())
}

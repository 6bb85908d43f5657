//! Side files: the non-weight files of a checkpoint directory (config, tokenizer, ...) that
//! travel inside the delta so the rebuilt directory loads like the fine-tuned one.
//!
//! Decisions (docs/FORMAT.md): regular files found recursively, symlinks followed (Hugging
//! Face cache snapshots are symlinks); `*.safetensors` files and the top-level index are not
//! side files; names starting with '.' are skipped (`.git`, `.cache`); files over 64 MiB are
//! left out with a warning.

use std::os::unix::fs::MetadataExt;
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
    let mut walk_state = Walk { ancestors: Vec::new(), dirs: 0 };
    walk_state.walk(root, "", &mut found, &mut skipped)?;
    found.sort_by(|a, b| a.rel.cmp(&b.rel));
    skipped.sort();
    Ok((found, skipped))
}

/// The largest number of directories visited while looking for side files: symlinked
/// directories can make a small tree look exponentially large.
const MAX_DIRS: usize = 10_000;

/// A depth-first walk that follows symlinks but refuses loops and runaway trees.
struct Walk {
    /// (device, inode) of the directories from the root to the current one.
    ancestors: Vec<(u64, u64)>,
    /// Directories visited so far.
    dirs: usize,
}

impl Walk {
    fn walk(&mut self, dir: &Path, rel: &str, found: &mut Vec<SideSource>, skipped: &mut Vec<String>) -> Result<()> {
        let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
        let id = (meta.dev(), meta.ino());
        if self.ancestors.len() > 16 || self.ancestors.contains(&id) {
            return Err(Error::invalid(dir, "directories nested too deeply or a symlink loop"));
        }
        self.dirs += 1;
        if self.dirs > MAX_DIRS {
            return Err(Error::invalid(dir, format!("more than {MAX_DIRS} directories (symlinked directories?)")));
        }
        self.ancestors.push(id);
        let r = self.entries(dir, rel, found, skipped);
        self.ancestors.pop();
        r
    }

    fn entries(&mut self, dir: &Path, rel: &str, found: &mut Vec<SideSource>, skipped: &mut Vec<String>) -> Result<()> {
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
                self.walk(&path, &relname, found, skipped)?;
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
}

//! Outputs that appear whole or not at all: everything is written under a temporary name
//! beside the destination and renamed into place only when complete.

use std::fs;
use std::path::{Path, PathBuf};

use fapm_stages::{Error, Result};

/// A temporary file or directory that becomes `dest` on [`Staged::commit`] and is removed
/// if dropped first (after an error or an interruption).
pub struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl Staged {
    /// Reserves a temporary name beside `dest`. Fails if `dest` exists and `overwrite` is off.
    pub fn new(dest: &Path, overwrite: bool) -> Result<Self> {
        if !overwrite && fs::symlink_metadata(dest).is_ok() {
            return Err(Error::invalid(dest, "already exists (use --overwrite to replace it)"));
        }
        let name =
            dest.file_name().ok_or_else(|| Error::invalid(dest, "not a file or directory name"))?.to_string_lossy();
        let tmp = dest.with_file_name(format!(".{name}.fapm-tmp.{}", std::process::id()));
        if fs::symlink_metadata(&tmp).is_ok() {
            remove(&tmp);
        }
        Ok(Staged { tmp, dest: dest.to_path_buf(), committed: false })
    }

    /// The temporary path to write to.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the finished output into place, replacing an existing one.
    pub fn commit(mut self) -> Result<()> {
        if let Ok(meta) = fs::symlink_metadata(&self.dest) {
            if meta.is_dir() || self.tmp.is_dir() {
                // rename cannot replace a directory: move it aside first.
                let old = self.tmp.with_extension("old");
                fs::rename(&self.dest, &old).map_err(|e| Error::io(&self.dest, e))?;
                fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
                remove(&old);
                self.committed = true;
                return Ok(());
            }
        }
        fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            remove(&self.tmp);
        }
    }
}

fn remove(path: &Path) {
    let _ = fs::remove_dir_all(path).or_else(|_| fs::remove_file(path));
}

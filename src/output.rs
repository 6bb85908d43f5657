//! Outputs that appear whole or not at all: everything is written under a temporary name
//! beside the destination and renamed into place only when complete.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fapm_stages::{Error, Result};

use crate::sigbus::{self, Registration};

/// A temporary file or directory that becomes `dest` on [`Staged::commit`] and is removed
/// if dropped first (after an error or an interruption). The temporary path, and every path
/// given to [`Staged::track`], is registered with the SIGBUS guard (src/sigbus.rs) until then.
pub struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
    guards: Mutex<Vec<Registration>>,
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
        let guards = Mutex::new(vec![sigbus::register(&tmp)]);
        Ok(Staged { tmp, dest: dest.to_path_buf(), committed: false, guards })
    }

    /// Registers a file or directory created inside a temporary directory with the SIGBUS
    /// guard, so that it is removed too if the process dies of SIGBUS.
    pub fn track(&self, path: &Path) {
        if let Ok(mut g) = self.guards.lock() {
            g.push(sigbus::register(path));
        }
    }

    /// Creates the temporary path as a new file (never following a symlink planted there).
    pub fn create_file(&self, path: &Path) -> Result<fs::File> {
        fs::OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(|e| Error::io(&self.dest, e))
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
                self.untrack();
                return Ok(());
            }
        }
        fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.committed = true;
        self.untrack();
        Ok(())
    }

    fn untrack(&self) {
        if let Ok(mut g) = self.guards.lock() {
            g.clear();
        }
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

//! Outputs that appear whole or not at all: everything is written under a temporary name
//! beside the destination and renamed into place only when complete.
//!
//! Temporary names carry the host and the process id (`.NAME.fapm-tmp.HOST.PID`), so two
//! runs never share one, and a run removes the temporaries of its destination left by a
//! process of the same host that no longer exists (killed before it could clean up).
//!
//! Committing is crash-safe: every staged file and directory is synced before the rename, the
//! destination's directory after it. Without `--overwrite` the rename itself refuses an existing
//! destination (`renameat2(RENAME_NOREPLACE)`), so something that appeared there while fapm ran
//! is never replaced; with it, a directory is swapped with the old output atomically
//! (`renameat2(RENAME_EXCHANGE)`) and the old one, then at the temporary name, is removed.

use std::fs;
use std::io::Write;
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
    kind: Kind,
    overwrite: bool,
    committed: bool,
    guards: Mutex<Vec<Registration>>,
}

/// What an output is: a file (a delta, a single-file model) or a directory (a model, a report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A file.
    File,
    /// A directory.
    Directory,
}

impl Kind {
    /// `--overwrite` replaces an earlier output of the same kind only: a delta file never
    /// replaces a directory (and whatever it holds), nor a model directory a file.
    fn check_replaces(self, dest: &Path) -> Result<()> {
        let is_dir = fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir());
        match (self, is_dir) {
            (Kind::File, true) => Err(Error::invalid(dest, "is a directory: --overwrite replaces a file output only")),
            (Kind::Directory, false) if fs::symlink_metadata(dest).is_ok() => {
                Err(Error::invalid(dest, "is not a directory: --overwrite replaces a directory output only"))
            }
            _ => Ok(()),
        }
    }
}

impl Staged {
    /// Reserves a temporary name beside `dest` for an output of `kind`. Fails if `dest` exists
    /// and `overwrite` is off, or if it is of the other kind.
    pub fn new(dest: &Path, kind: Kind, overwrite: bool) -> Result<Self> {
        if !overwrite && fs::symlink_metadata(dest).is_ok() {
            return Err(Error::invalid(dest, "already exists (use --overwrite to replace it)"));
        }
        kind.check_replaces(dest)?;
        if dest.file_name().is_none() {
            return Err(Error::invalid(dest, "not a file or directory name"));
        }
        remove_stale(dest);
        let tmp = sibling(dest, TMP, std::process::id());
        if fs::symlink_metadata(&tmp).is_ok() {
            remove(&tmp); // left by an earlier process with our id
        }
        let guards = Mutex::new(vec![sigbus::register(&tmp)]);
        Ok(Staged { tmp, dest: dest.to_path_buf(), kind, overwrite, committed: false, guards })
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

    /// Syncs the finished output (every file, then every directory once its entries are in)
    /// and moves it into place, then syncs the destination's directory. Without `overwrite`,
    /// anything at the destination now (it appeared while the run ran) is an error and is left
    /// untouched, and the temporary is removed. With it, an old output is replaced; when it
    /// cannot be, it is left where it was.
    pub fn commit(mut self) -> Result<()> {
        sync_tree(&self.tmp).map_err(|e| Error::io(&self.dest, e))?;
        let old = if self.overwrite { self.replace()? } else { self.place_new().map(|()| None)? };
        self.committed = true;
        self.untrack();
        let synced = sync_dir(parent(&self.dest));
        if let Some(old) = old {
            remove(&old); // a SIGKILL here leaves it at a temporary name, removed by the next run
        }
        synced.map_err(|e| Error::io(&self.dest, e))
    }

    /// Renames the temporary to a destination that must not exist, atomically where the
    /// file system can (`RENAME_NOREPLACE`), else by a check and a rename.
    fn place_new(&self) -> Result<()> {
        let appeared = || {
            Error::invalid(
                &self.dest,
                "appeared while fapm was running and was left as it is (use --overwrite to replace it)",
            )
        };
        match renameat2(&self.tmp, &self.dest, RenameFlag::NoReplace) {
            Ok(true) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(appeared()),
            Err(e) => Err(Error::io(&self.dest, e)),
            Ok(false) => {
                // No atomic way here: a destination created between the check and the rename
                // is replaced if it is a file or an empty directory (docs/SECURITY.md).
                if fs::symlink_metadata(&self.dest).is_ok() {
                    return Err(appeared());
                }
                fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))
            }
        }
    }

    /// Moves the temporary into place over whatever is at the destination; returns where the
    /// old output now is when it still has to be removed.
    fn replace(&self) -> Result<Option<PathBuf>> {
        self.kind.check_replaces(&self.dest)?;
        let existing = fs::symlink_metadata(&self.dest).ok();
        if existing.is_some_and(|m| m.is_dir() || self.tmp.is_dir()) {
            // rename cannot replace a directory: swap the two atomically where the system can
            // (the old output then sits at the temporary name), else move the old one aside.
            match renameat2(&self.tmp, &self.dest, RenameFlag::Exchange) {
                Ok(true) => return Ok(Some(self.tmp.clone())),
                Ok(false) => {
                    let old = sibling(&self.dest, OLD, std::process::id());
                    replace_by_renames(&self.tmp, &self.dest, &old).map_err(|e| Error::io(&self.dest, e))?;
                    return Ok(None);
                }
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&self.dest, e)),
                Err(_) => {} // the old output went away meanwhile: nothing to swap with
            }
        }
        fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        Ok(None)
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

/// Writes `contents` to `path`, which must not exist yet: inside a staged directory, a path
/// written twice (or a symlink) is an error, never an overwrite.
pub fn write_new(path: &Path, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    fs::OpenOptions::new().write(true).create_new(true).open(path)?.write_all(contents.as_ref())
}

/// The kinds of temporary beside a destination: the output being written, and (where an
/// atomic swap is not available) the old output moved aside while the new one takes its place.
const TMP: &str = "fapm-tmp";
const OLD: &str = "fapm-old";

/// The temporary name process `pid` of this host uses while it writes `dest`.
pub fn temporary(dest: &Path, pid: u32) -> PathBuf {
    sibling(dest, TMP, pid)
}

fn sibling(dest: &Path, kind: &str, pid: u32) -> PathBuf {
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    dest.with_file_name(format!(".{name}.{kind}.{}.{pid}", host()))
}

/// This machine's name, reduced to characters safe in a file name: temporaries on a shared
/// file system are only ever judged stale by a process of the host that wrote them.
fn host() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let len = if ok { buf.iter().position(|&b| b == 0).unwrap_or(buf.len()) } else { 0 };
    let name: String = buf[..len.min(64)]
        .iter()
        .map(|&b| if b.is_ascii_alphanumeric() || b == b'-' { b as char } else { '_' })
        .collect();
    if name.is_empty() {
        "host".into()
    } else {
        name
    }
}

/// Removes the temporaries of `dest` left by processes of this host that no longer exist.
/// A moved-aside old output is only removed when `dest` exists (the swap finished).
fn remove_stale(dest: &Path) {
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    let host = host();
    let Ok(entries) = fs::read_dir(parent(dest)) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        for kind in [TMP, OLD] {
            let prefix = format!(".{name}.{kind}.{host}.");
            let Some(pid) = file.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else { continue };
            if pid != std::process::id() && !alive(pid) && (kind == TMP || fs::symlink_metadata(dest).is_ok()) {
                remove(&entry.path());
            }
        }
    }
}

/// Whether process `pid` exists on this host.
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only asks whether the process exists; it is sent to nobody.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The two uses of `renameat2`.
#[derive(Clone, Copy)]
enum RenameFlag {
    /// Fail with `EEXIST` if the destination exists.
    NoReplace,
    /// Swap the two paths.
    Exchange,
}

/// Renames `a` to `b` with `flag`, atomically; `Ok(false)` when the system or the file system
/// does not offer it (then nothing was done).
fn renameat2(a: &Path, b: &Path, flag: RenameFlag) -> std::io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
        let (a, b) = (c(a)?, c(b)?);
        let flags = match flag {
            RenameFlag::NoReplace => libc::RENAME_NOREPLACE,
            RenameFlag::Exchange => libc::RENAME_EXCHANGE,
        };
        // SAFETY: both paths are NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::syscall(libc::SYS_renameat2, libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags)
        };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::ENOTSUP)) {
            return Err(e);
        }
    }
    let _ = (a, b, flag);
    Ok(false)
}

/// Syncs `path` to disk: a file, or a directory after everything in it (depth first). Symlinks
/// are never followed (fapm creates none in an output).
fn sync_tree(path: &Path) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            let entry = entry?;
            if !entry.file_type()?.is_symlink() {
                sync_tree(&entry.path())?;
            }
        }
        return sync_dir(path);
    }
    if !meta.is_file() {
        return Ok(());
    }
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?.sync_all()
}

/// Syncs a directory, so the entries created, renamed or removed in it last; a file system that
/// cannot sync directories (`EINVAL`) has nothing to sync.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(dir)?;
    match f.sync_all() {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        r => r,
    }
}

/// The directory that holds `dest`.
fn parent(dest: &Path) -> &Path {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Replaces `dest` with `tmp` by moving `dest` aside to `old` first; if `tmp` cannot take
/// its place, `old` is moved back, so the old output is never lost.
fn replace_by_renames(tmp: &Path, dest: &Path, old: &Path) -> std::io::Result<()> {
    if fs::symlink_metadata(old).is_ok() {
        remove(old);
    }
    fs::rename(dest, old)?;
    if let Err(e) = fs::rename(tmp, dest) {
        let _ = fs::rename(old, dest);
        return Err(e);
    }
    remove(old);
    Ok(())
}

fn remove(path: &Path) {
    let _ = fs::remove_dir_all(path).or_else(|_| fs::remove_file(path));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_replacement_keeps_the_old_output() {
        let dir = tempfile::tempdir().unwrap();
        let (dest, old) = (dir.path().join("out"), dir.path().join(".out.old"));
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("a"), b"old").unwrap();
        // The new output is missing: the second rename fails.
        assert!(replace_by_renames(&dir.path().join("missing"), &dest, &old).is_err());
        assert_eq!(fs::read(dest.join("a")).unwrap(), b"old");
        assert!(!old.exists());
        let tmp = dir.path().join("new");
        fs::create_dir(&tmp).unwrap();
        replace_by_renames(&tmp, &dest, &old).unwrap();
        assert!(!dest.join("a").exists() && !old.exists() && !tmp.exists());
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("d.fapm");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap(); // reaped: no process has this id any more
        let stale = temporary(&dest, dead_pid);
        fs::create_dir(&stale).unwrap();
        fs::write(stale.join("x"), b"partial").unwrap();
        let old_aside = sibling(&dest, OLD, dead_pid);
        fs::write(&old_aside, b"previous output").unwrap();
        let other = dir.path().join(format!(".other.fapm-tmp.{}.{dead_pid}", host()));
        fs::write(&other, b"another destination's").unwrap();
        let staged = Staged::new(&dest, Kind::File, false).unwrap();
        assert!(!stale.exists(), "a dead process's temporary was kept");
        // dest does not exist: the old output moved aside may be the only copy.
        assert!(old_aside.exists() && other.exists());
        assert_eq!(staged.path(), temporary(&dest, std::process::id()));
        fs::write(staged.path(), b"new").unwrap();
        staged.commit().unwrap();
        let _ = Staged::new(&dest, Kind::File, true).unwrap();
        assert!(!old_aside.exists(), "once dest exists, an old output moved aside is stale");
        // A live process's temporary stays.
        let live = sibling(&dest, TMP, 1);
        fs::write(&live, b"init's").unwrap();
        let _ = Staged::new(&dest, Kind::File, true).unwrap();
        assert!(live.exists());
    }

    #[test]
    fn committing_a_directory_over_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("old"), b"1").unwrap();
        let staged = Staged::new(&dest, Kind::Directory, true).unwrap();
        fs::create_dir(staged.path()).unwrap();
        fs::write(staged.path().join("new"), b"2").unwrap();
        staged.commit().unwrap();
        assert_eq!(fs::read(dest.join("new")).unwrap(), b"2");
        assert!(!dest.join("old").exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "a temporary was left");
    }

    /// `prune --output X --overwrite` with a directory at X deleted the directory and all it
    /// held: --overwrite replaces an earlier output of the same kind only, checked at the start
    /// and again at the commit.
    #[test]
    fn overwrite_never_replaces_the_other_kind() {
        let dir = tempfile::tempdir().unwrap();
        let (a_dir, a_file) = (dir.path().join("a_dir"), dir.path().join("a_file"));
        fs::create_dir(&a_dir).unwrap();
        fs::write(a_dir.join("keep"), b"1").unwrap();
        fs::write(&a_file, b"keep").unwrap();
        let err = Staged::new(&a_dir, Kind::File, true).err().unwrap().to_string();
        assert!(err.contains("is a directory"), "{err}");
        let err = Staged::new(&a_file, Kind::Directory, true).err().unwrap().to_string();
        assert!(err.contains("is not a directory"), "{err}");
        // A directory that appears where a file output goes, while the run runs.
        let late = dir.path().join("late");
        let staged = Staged::new(&late, Kind::File, true).unwrap();
        fs::write(staged.path(), b"new").unwrap();
        fs::create_dir(&late).unwrap();
        fs::write(late.join("keep"), b"1").unwrap();
        assert!(staged.commit().unwrap_err().to_string().contains("is a directory"));
        assert_eq!(fs::read(a_dir.join("keep")).unwrap(), b"1");
        assert_eq!(fs::read(&a_file).unwrap(), b"keep");
        assert_eq!(fs::read(late.join("keep")).unwrap(), b"1");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3, "a temporary was left");
    }

    #[test]
    fn a_destination_that_appears_before_the_commit_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        let appear: [fn(&Path); 3] = [
            |p| fs::write(p, b"theirs").unwrap(),
            |p| fs::create_dir(p).unwrap(),
            |p| std::os::unix::fs::symlink("elsewhere", p).unwrap(),
        ];
        for (i, make) in appear.into_iter().enumerate() {
            for staged_is_dir in [false, true] {
                let kind = if staged_is_dir { Kind::Directory } else { Kind::File };
                let staged = Staged::new(&dest, kind, false).unwrap();
                if staged_is_dir {
                    fs::create_dir(staged.path()).unwrap();
                    fs::create_dir(staged.path().join("sub")).unwrap();
                    fs::write(staged.path().join("sub/new"), b"2").unwrap();
                } else {
                    fs::write(staged.path(), b"new").unwrap();
                }
                make(&dest);
                let err = staged.commit().unwrap_err().to_string();
                assert!(err.contains("appeared while fapm was running"), "{err}");
                let meta = fs::symlink_metadata(&dest).unwrap();
                assert!([meta.is_file(), meta.is_dir(), meta.file_type().is_symlink()][i]);
                match i {
                    0 => assert_eq!(fs::read(&dest).unwrap(), b"theirs"),
                    1 => assert_eq!(fs::read_dir(&dest).unwrap().count(), 0),
                    _ => assert_eq!(fs::read_link(&dest).unwrap(), Path::new("elsewhere")),
                }
                assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "a temporary was left");
                remove(&dest);
            }
        }
    }
}

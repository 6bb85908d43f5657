//! Side files: the non-weight files of a checkpoint directory (config, tokenizer, ...) that
//! travel inside the delta so the rebuilt directory loads like the fine-tuned one.
//!
//! Decisions (docs/FORMAT.md, docs/SECURITY.md): regular files found recursively, symlinks
//! followed (Hugging Face cache snapshots are symlinks into the repository's `blobs/`);
//! the checkpoint's shards and the top-level index are not side files. Side files are data,
//! never code runners or weights in disguise (SPEC section 4), so these are left out, each
//! with a warning that names it and in the list [`side_files`] returns: names starting with
//! '.' (`.git/`, `.cache/`, `.gitattributes`; a hidden directory is named once, with a
//! trailing '/', and never entered), files in a weight or pickle format
//! ([`paths::WEIGHT_EXTENSIONS`]: a fine-tune's `training_args.bin` is a pickle), names a
//! delta cannot hold ([`paths::check`]), and files over 64 MiB. Side files are what people
//! publish without looking, so: only regular files of real file systems are read (never a
//! device, FIFO, socket or `/proc` entry, whatever a symlink points at), each with a bounded
//! read; a symlink that leaves the directory is named in a warning with its target; fapm
//! deltas (a delta saved inside the directory) and the output itself are left out; and
//! `prune` names every file it embeds, and every code file among them.

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::checkpoint::INDEX_FILE;
use crate::error::printable;
pub use crate::format::{MAX_SIDE_FILE, MAX_SIDE_FILES};
use crate::paths;
use crate::{Error, Result};
use walkdir::WalkDir;

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

/// A file (or hidden directory) of the checkpoint directory left out of the delta, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeftOut {
    /// Path relative to the directory, '/'-separated; a directory ends in '/'.
    pub path: String,
    /// Why, lowercase: [`HIDDEN`], [`OVER_64_MIB`], "a weight or pickle format (.bin)", ...
    pub reason: String,
}

/// The reason of a [`LeftOut`] whose name starts with '.'.
pub const HIDDEN: &str = "a name starting with '.'";

/// The reason of a [`LeftOut`] over 64 MiB.
pub const OVER_64_MIB: &str = "over 64 MiB";

/// Side files of the checkpoint directory `root`, sorted by relative path, and what was left
/// out (sorted by path, with the reason for each). `shards` (relative paths) are the
/// checkpoint's own shards, and `output` the delta being written: neither is a side file.
pub fn side_files(root: &Path, output: &Path, shards: &[&str]) -> Result<(Vec<SideSource>, Vec<LeftOut>)> {
    let real_root = fs::canonicalize(root).map_err(|e| Error::io(root, e))?;
    let left_out = RefCell::new(Vec::new());
    let mut walk = Walk {
        root,
        blobs: hf_blobs(&real_root),
        output: real_path(output),
        real_root,
        shards,
        dirs: Vec::new(),
        dirs_seen: 0,
        found: Vec::new(),
        left_out: &left_out,
    };
    // Depth first, in the order the directories list their entries; walkdir refuses a
    // symlink back to a directory above the current one (a loop).
    let entries = WalkDir::new(root).follow_links(true).into_iter().filter_entry(|entry| {
        entry.depth() == 0 || wanted_name(root, entry.path(), entry.file_type().is_dir(), &left_out)
    });
    for entry in entries {
        match entry {
            Ok(entry) => walk.entry(&entry)?,
            Err(e) => walk.error(e)?,
        }
    }
    let mut found = walk.found;
    found.sort_by(|a, b| a.rel.cmp(&b.rel));
    let mut left_out = left_out.into_inner();
    left_out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((found, left_out))
}

/// Reads the side file at `path` whole: a regular file of a real file system, at most
/// 64 MiB and exactly as long as it says (a bounded read, whatever the file claims).
pub fn read(path: &Path) -> Result<Vec<u8>> {
    let (file, size) = open_regular(path)?
        .ok_or_else(|| Error::invalid(path, "side file is no longer a regular file of a real file system"))?;
    let mut data = Vec::with_capacity(size.min(MAX_SIDE_FILE) as usize);
    file.take(MAX_SIDE_FILE + 1).read_to_end(&mut data).map_err(|e| Error::io(path, e))?;
    if data.len() as u64 > MAX_SIDE_FILE {
        return Err(Error::invalid(path, "side file grew over 64 MiB while fapm ran"));
    }
    if data.len() as u64 != size {
        return Err(Error::invalid(path, "side file changed while fapm read it"));
    }
    Ok(data)
}

/// The largest number of directories visited while looking for side files: symlinked
/// directories can make a small tree look exponentially large.
const MAX_DIRS: usize = 10_000;

/// The deepest a directory may lie below the checkpoint directory.
const MAX_DEPTH: usize = 16;

/// What a symlink loop or a too deep tree is refused with.
const TOO_DEEP: &str = "directories nested too deeply or a symlink loop";

/// The state of the walk for side files: what was found, and the limits on runaway trees.
struct Walk<'a> {
    /// The directory, as given.
    root: &'a Path,
    /// The directory, with every symlink resolved.
    real_root: PathBuf,
    /// The `blobs/` folder of the Hugging Face cache repository `real_root` is a snapshot of.
    blobs: Option<PathBuf>,
    /// The output's path, with every symlink resolved.
    output: Option<PathBuf>,
    /// The checkpoint's shards, relative to `root`.
    shards: &'a [&'a str],
    /// The directories from the root to the one being listed, by depth.
    dirs: Vec<PathBuf>,
    /// Directories visited so far.
    dirs_seen: usize,
    found: Vec<SideSource>,
    /// What was left out, and why (shared with the walk's name filter).
    left_out: &'a RefCell<Vec<LeftOut>>,
}

impl Walk<'_> {
    /// Considers an entry whose name passed [`wanted_name`]: `file_type` is that of what a
    /// symlink points at.
    fn entry(&mut self, entry: &walkdir::DirEntry) -> Result<()> {
        let path = entry.path();
        let rel = relative(self.root, path);
        let kind = entry.file_type();
        if kind.is_dir() {
            if entry.depth() > 0 {
                self.check_link(path, &rel, "directory");
            }
            if entry.depth() > MAX_DEPTH {
                return Err(Error::invalid(path, TOO_DEEP));
            }
            self.dirs_seen += 1;
            if self.dirs_seen > MAX_DIRS {
                return Err(Error::invalid(path, format!("more than {MAX_DIRS} directories (symlinked directories?)")));
            }
            self.dirs.truncate(entry.depth());
            self.dirs.push(path.to_path_buf());
        } else if !kind.is_file() {
            leave_out(self.left_out, rel, "not a regular file (a device, FIFO or socket)".into());
        } else if self.shards.contains(&rel.as_str()) || rel == INDEX_FILE {
            // The checkpoint itself: its shards, and the index `apply` writes anew.
        } else if let Some(ext) = paths::weight_format(&rel) {
            let why = format!("a weight or pickle format (.{ext}): side files are data, never weights");
            leave_out(self.left_out, rel, why);
        } else if let Err(why) = paths::check(&rel) {
            leave_out(self.left_out, rel, format!("a path a delta cannot hold: it {why}"));
        } else {
            self.file(path.to_path_buf(), rel)?;
        }
        Ok(())
    }

    /// Handles what the walk could not look at: an entry that cannot be `stat`ed (a dangling
    /// symlink) is passed over like one with an unwanted name; a loop and a directory that
    /// cannot be read are errors.
    fn error(&self, e: walkdir::Error) -> Result<()> {
        if let Some(path) = e.path() {
            if e.depth() > 0 && !wanted_name(self.root, path, false, self.left_out) {
                return Ok(());
            }
            if e.loop_ancestor().is_some() {
                return Err(Error::invalid(path, TOO_DEEP));
            }
            if fs::metadata(path).is_err() {
                return Ok(());
            }
        }
        // Without a path, a directory's listing broke off or a symlinked directory could
        // not be opened: name the directory that holds it.
        let dir = match e.path() {
            Some(p) => p.to_path_buf(),
            None => self.dirs.get(e.depth().saturating_sub(1)).map_or_else(|| self.root.to_path_buf(), PathBuf::clone),
        };
        let source = e.into_io_error().unwrap_or_else(|| std::io::Error::other(TOO_DEEP));
        Err(Error::io(dir, source))
    }

    /// Considers the regular file (as `stat` says) `path`.
    fn file(&mut self, path: PathBuf, rel: String) -> Result<()> {
        if self.output.is_some() && real_path(&path) == self.output {
            return Ok(()); // the delta being written, or the one it replaces
        }
        let Some((mut file, size)) = open_regular(&path)? else {
            leave_out(self.left_out, rel, "not a regular file of a real file system".into());
            return Ok(());
        };
        let mut magic = [0u8; 8];
        if size >= magic.len() as u64 && file.read_exact(&mut magic).is_ok() && magic == crate::format::MAGIC {
            leave_out(self.left_out, rel, "it is a fapm delta".into());
            return Ok(());
        }
        self.check_link(&path, &rel, "side file");
        if size > MAX_SIDE_FILE {
            leave_out(self.left_out, rel, OVER_64_MIB.into());
            return Ok(());
        }
        if self.found.len() == MAX_SIDE_FILES {
            return Err(Error::invalid(
                &self.real_root,
                format!("more than {MAX_SIDE_FILES} side files; a delta carries at most {MAX_SIDE_FILES}"),
            ));
        }
        self.found.push(SideSource { rel, path, size });
        Ok(())
    }

    /// Warns when `path` is a symlink whose target is outside the directory (and not in the
    /// `blobs/` folder of the same Hugging Face cache repository): what it points at goes
    /// into the delta.
    fn check_link(&self, path: &Path, rel: &str, what: &str) {
        if !fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            return;
        }
        let Ok(target) = fs::canonicalize(path) else { return };
        let inside = target.starts_with(&self.real_root) || self.blobs.as_ref().is_some_and(|b| target.starts_with(b));
        if !inside {
            let (link, target) = (printable(rel), printable(&target.display().to_string()).into_owned());
            tracing::warn!(
                "{what} {link} is a symlink to {target}, outside the fine-tuned directory: what it points at goes into the delta"
            );
        }
    }
}

/// Whether the entry at `path` (below `root`; a directory if `dir`) is looked at, by its
/// name: a name that starts with '.', is not UTF-8, or breaks another rule of
/// [`paths::check_component`] (a `\`, a control or invisible character) is left out, with a
/// warning, and the walk does not enter it.
fn wanted_name(root: &Path, path: &Path, dir: bool, left_out: &RefCell<Vec<LeftOut>>) -> bool {
    let mut rel = relative(root, path);
    if dir {
        rel.push('/');
    }
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        leave_out(left_out, rel, "its name is not UTF-8".into());
        return false;
    };
    match paths::check_component(name) {
        Ok(()) => true,
        Err(paths::PathProblem::Hidden) => {
            leave_out(left_out, rel, HIDDEN.into());
            false
        }
        Err(why) => {
            leave_out(left_out, rel, format!("a name a delta cannot hold: it {why}"));
            false
        }
    }
}

/// Records that `rel` is left out of the delta for `reason`, with a warning that names it.
fn leave_out(left_out: &RefCell<Vec<LeftOut>>, rel: String, reason: String) {
    let file = printable(&rel);
    tracing::warn!("side file {file} left out of the delta: {reason}");
    left_out.borrow_mut().push(LeftOut { path: rel, reason });
}

/// `path` relative to `root`, '/'-separated (the walk descends only into UTF-8 names).
fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).to_string_lossy().into_owned()
}

/// The `blobs/` folder of the Hugging Face cache repository whose snapshot `dir` is
/// (`.../models--ORG--NAME/snapshots/REV`), if it is one.
fn hf_blobs(dir: &Path) -> Option<PathBuf> {
    let snapshots = dir.parent()?;
    let repo = snapshots.parent()?;
    let name = repo.file_name()?.to_str()?;
    let is_repo = ["models--", "datasets--", "spaces--"].iter().any(|p| name.starts_with(p));
    (snapshots.file_name()? == "snapshots" && is_repo).then(|| repo.join("blobs"))
}

/// `path` with every symlink resolved, also when its last component does not exist yet.
fn real_path(path: &Path) -> Option<PathBuf> {
    fs::canonicalize(path).ok().or_else(|| {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Some(fs::canonicalize(parent).ok()?.join(path.file_name()?))
    })
}

/// Opens `path` for reading if it is (once opened, by its descriptor) a regular file on a
/// file system of stored data; `None` for anything else. Opening never blocks (a FIFO put in
/// its place after a `stat`), and `/proc`, `/sys` and the like are refused: their files claim
/// sizes that have nothing to do with what reading them returns.
fn open_regular(path: &Path) -> Result<Option<(File, u64)>> {
    let file = match fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Err(Error::io(path, e)),
        Err(_) => return Ok(None),
    };
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() || pseudo_file_system(&file) {
        return Ok(None);
    }
    Ok(Some((file, meta.len())))
}

/// Whether `file` lives on a kernel pseudo file system (proc, sysfs, debugfs, ...).
#[cfg(target_os = "linux")]
fn pseudo_file_system(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    const PSEUDO: [i64; 9] = [
        0x9fa0,      // proc
        0x6265_6572, // sysfs
        0x6462_6720, // debugfs
        0x7472_6163, // tracefs
        0x7363_6673, // securityfs
        0x0027_e0eb, // cgroup
        0x6367_7270, // cgroup2
        0x6265_6570, // configfs
        0xde5e_81e4, // efivarfs
    ];
    // SAFETY: fstatfs writes one statfs into `st`, which a zeroed value initialises.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    PSEUDO.contains(&(st.f_type as i64))
}

#[cfg(not(target_os = "linux"))]
fn pseudo_file_system(_file: &File) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_snapshots_have_blobs() {
        let snap = Path::new("/c/hub/models--org--m/snapshots/abc123");
        assert_eq!(hf_blobs(snap), Some(PathBuf::from("/c/hub/models--org--m/blobs")));
        assert_eq!(hf_blobs(Path::new("/home/me/snapshots/abc")), None);
        assert_eq!(hf_blobs(Path::new("/c/hub/models--org--m/blobs")), None);
    }

    /// What the walk takes and leaves: hidden names, weights, the top-level index (a nested
    /// one is a side file), dangling symlinks, names with a '\\'; files sorted by path, and
    /// what is left out named with its reason.
    #[test]
    fn side_files_are_found_recursively_and_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ft");
        for d in ["sub/deeper", ".git", "tok"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in ["config.json", "model.safetensors", INDEX_FILE, ".hidden", ".git/HEAD", "sub/deeper/b.txt"] {
            fs::write(root.join(f), b"{}").unwrap();
        }
        for f in ["sub/a.safetensors", "sub/model.safetensors.index.json", "tok/x\\y.json", "tok/vocab.txt"] {
            fs::write(root.join(f), b"{}").unwrap();
        }
        std::os::unix::fs::symlink("missing", root.join("dangling")).unwrap();
        std::os::unix::fs::symlink("sub", root.join("linked")).unwrap();
        let (found, left_out) = side_files(&root, &dir.path().join("d.fapm"), &["model.safetensors"]).unwrap();
        let rels: Vec<&str> = found.iter().map(|f| f.rel.as_str()).collect();
        let expected = [
            "config.json",
            "linked/deeper/b.txt",
            "linked/model.safetensors.index.json",
            "sub/deeper/b.txt",
            "sub/model.safetensors.index.json",
            "tok/vocab.txt",
        ];
        assert_eq!(rels, expected);
        let left: Vec<(&str, &str)> = left_out.iter().map(|l| (l.path.as_str(), l.reason.as_str())).collect();
        assert_eq!(
            left.iter().map(|l| l.0).collect::<Vec<_>>(),
            [".git/", ".hidden", "linked/a.safetensors", "sub/a.safetensors", "tok/x\\y.json"]
        );
        assert_eq!((left[0].1, left[1].1), (HIDDEN, HIDDEN));
        assert!(left[2].1.contains("weight or pickle format (.safetensors)"), "{left:?}");
        assert!(left[4].1.contains("'\\'"), "{left:?}");
        assert!(found.iter().all(|f| f.size == 2 && f.path.starts_with(&root)));
    }

    #[test]
    fn symlink_loops_and_deep_trees_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ft");
        fs::create_dir_all(root.join("a")).unwrap();
        std::os::unix::fs::symlink("..", root.join("a/up")).unwrap();
        let e = side_files(&root, &dir.path().join("d.fapm"), &[]).unwrap_err().to_string();
        assert!(e.contains("symlink loop") && e.contains("up"), "{e}");
        // A hidden link is never followed, so it is no loop.
        fs::rename(root.join("a/up"), root.join("a/.up")).unwrap();
        assert!(side_files(&root, &dir.path().join("d.fapm"), &[]).is_ok());

        let deep = (0..=MAX_DEPTH).fold(root.clone(), |p, i| p.join(format!("d{i}")));
        fs::create_dir_all(&deep).unwrap();
        let e = side_files(&root, &dir.path().join("d.fapm"), &[]).unwrap_err().to_string();
        assert!(e.contains("nested too deeply"), "{e}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn proc_files_are_not_regular_files_of_stored_data() {
        // /proc/self/environ stats as an empty regular file, yet reading it returns data.
        assert!(open_regular(Path::new("/proc/self/environ")).unwrap().is_none());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.json");
        fs::write(&f, b"{}").unwrap();
        assert_eq!(open_regular(&f).unwrap().map(|(_, n)| n), Some(2));
        assert!(open_regular(dir.path()).unwrap().is_none());
    }
}

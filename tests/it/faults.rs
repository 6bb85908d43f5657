//! Faults (docs/SECURITY.md): an unwritable destination, a full disk, interruption, inputs
//! truncated under their memory maps, special files, symlink loops, hostile names. Exit 1, one
//! `error:` line, nothing left behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use fapm_stages::dtype::DType;

use crate::util::*;

/// An output that cannot be created is a clean error naming it.
#[test]
fn unwritable_destinations_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let blocker = dir.path().join("file");
    fs::write(&blocker, b"x").unwrap();
    for dest in [dir.path().join("missing/d.fapm"), blocker.join("d.fapm")] {
        let o = run(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&dest), "-q"]);
        assert_error(&o, &[s(&dest)], "unwritable prune output");
    }
    let delta = dir.path().join("d.fapm");
    assert!(run(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&delta), "-q"]).status.success());
    let dest = blocker.join("out.safetensors");
    let o = run(&["apply", "--base", s(&base), "--delta", s(&delta), "-o", s(&dest), "-q"]);
    assert_error(&o, &[s(&dest)], "unwritable apply output");
    assert_eq!(leftovers(dir.path(), &["base.safetensors", "ft.safetensors", "file", "d.fapm"]), Vec::<String>::new());
}

/// A tmpfs of `kib` KiB mounted at a new directory under `parent`, unmounted on drop; `None`
/// (with a note) when mounting is not permitted.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(parent: &Path, kib: u64) -> Option<Tmpfs> {
        let dir = parent.join("small");
        fs::create_dir(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs", s(&dir)])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|st| st.success());
        if !ok {
            eprintln!("note: cannot mount a tmpfs here (not root?); disk-full test skipped");
            return None;
        }
        Some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Random (incompressible) F32 tensors of `n` elements, base and fine-tuned.
fn random_pair(dir: &Path, n: usize, seed: u64) -> (PathBuf, PathBuf) {
    let mut rng = Rng(seed);
    let b: Vec<u8> = (0..n).flat_map(|_| (rng.next() as u32).to_le_bytes()).collect();
    let f: Vec<u8> = (0..n).flat_map(|_| (rng.next() as u32).to_le_bytes()).collect();
    let (base, ft) = (dir.join("base.safetensors"), dir.join("ft.safetensors"));
    write_safetensors(&base, &[T::new("w", DType::F32, &[n as u64], b)]);
    write_safetensors(&ft, &[T::new("w", DType::F32, &[n as u64], f)]);
    (base, ft)
}

/// A full disk while writing the delta or the model: exit 1 naming the output, nothing left.
#[test]
fn a_full_disk_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = random_pair(dir.path(), 256 * 1024, 7);
    let Some(small) = Tmpfs::mount(dir.path(), 200) else { return };
    let delta = small.0.join("d.fapm");
    let o = run(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&delta), "-q", "--sparsity", "0"]);
    assert_error(&o, &["d.fapm", "No space left"], "prune onto a full disk");
    assert_eq!(leftovers(&small.0, &[]), Vec::<String>::new());
    let big = dir.path().join("d.fapm");
    assert!(run(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&big), "-q"]).status.success());
    let out = small.0.join("out.safetensors");
    let o = run(&["apply", "--base", s(&base), "--delta", s(&big), "-o", s(&out), "-q"]);
    assert_error(&o, &["out.safetensors", "No space left"], "apply onto a full disk");
    assert_eq!(leftovers(&small.0, &[]), Vec::<String>::new());
}

/// Waits until process `pid` has `path` memory-mapped (so it is past start-up and reading),
/// then `delay` more.
fn wait_mapped(pid: u32, path: &Path, delay: Duration) {
    let path = fs::canonicalize(path).unwrap();
    let start = std::time::Instant::now();
    while !fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default().contains(s(&path)) {
        assert!(start.elapsed() < Duration::from_secs(30), "{} never mapped", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(delay);
}

/// Sends `signal` to a child once it maps `input`, after `delay`; returns its output.
fn interrupt(mut cmd: Command, input: &Path, signal: libc::c_int, delay: Duration) -> Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_mapped(child.id(), input, delay);
    // SAFETY: kill on the pid of our own child, which has not been waited for yet.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    child.wait_with_output().unwrap()
}

/// SIGINT or SIGTERM in the middle of prune or apply: exit 1, no output, no temporaries.
#[test]
fn interruption_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = big_pair(dir.path());
    let delta = dir.path().join("d.fapm");
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let mut cmd = fapm();
        cmd.args(["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&delta), "-q", "--threads", "1"]);
        let o = interrupt(cmd, &ft, signal, Duration::from_millis(10));
        assert_error(&o, &["interrupted"], "interrupted prune");
        assert_eq!(leftovers(dir.path(), &["base.safetensors", "ft.safetensors"]), Vec::<String>::new());
    }
    let o = run(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&delta), "-q", "--sparsity", "0.5"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("out.safetensors");
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let mut cmd = fapm();
        cmd.args(["apply", "--base", s(&base), "--delta", s(&delta), "-o", s(&out), "-q", "--threads", "1"]);
        let o = interrupt(cmd, &base, signal, Duration::from_millis(10));
        assert_error(&o, &["interrupted"], "interrupted apply");
        assert_eq!(leftovers(dir.path(), &["base.safetensors", "ft.safetensors", "d.fapm"]), Vec::<String>::new());
    }
}

/// SIGKILL leaves a temporary behind (no handler runs): the next run for that destination
/// removes it. A moved-aside old output of an earlier run (`.out.fapm-tmp.old`, a name every
/// process once shared) does not make `--overwrite` fail after the work is done.
#[test]
fn a_killed_runs_temporaries_are_removed_by_the_next_run() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = big_pair(dir.path());
    let delta = dir.path().join("d.fapm");
    let child = fapm()
        .args(["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&delta), "-q", "--threads", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !leftovers(dir.path(), &[]).iter().any(|n| n.starts_with(".d.fapm.fapm-tmp")) {
        assert!(start.elapsed() < Duration::from_secs(30), "no temporary appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: kill on the pid of our own child, which has not been waited for yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.signal(), Some(libc::SIGKILL));
    assert_eq!(leftovers(dir.path(), &["base.safetensors", "ft.safetensors"]).len(), 1);
    let o = run(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&delta), "-q", "--sparsity", "0.5"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(leftovers(dir.path(), &["base.safetensors", "ft.safetensors", "d.fapm"]), Vec::<String>::new());

    let (base_dir, ft_dir) = (dir.path().join("base"), dir.path().join("ft"));
    let (b, f) = small_pair(dir.path());
    for (file, d) in [(&b, &base_dir), (&f, &ft_dir)] {
        fs::create_dir(d).unwrap();
        fs::rename(file, d.join("model.safetensors")).unwrap();
    }
    let small = dir.path().join("small.fapm");
    let o =
        run(&["prune", "--base", s(&base_dir), "--finetuned", s(&ft_dir), "-o", s(&small), "-q", "--sparsity", "0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("out");
    let stale = dir.path().join(".out.fapm-tmp.old");
    fs::create_dir(&stale).unwrap();
    fs::write(stale.join("x"), b"left by a killed run").unwrap();
    for _ in 0..2 {
        let o = run(&["apply", "--base", s(&base_dir), "--delta", s(&small), "-o", s(&out), "-q", "--overwrite"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(fs::read(out.join("model.safetensors")).unwrap(), fs::read(ft_dir.join("model.safetensors")).unwrap());
}

/// A shard truncated while fapm reads it through its memory map: the SIGBUS guard prints
/// one error line, removes the temporary output and exits 1 (not a signal death).
#[test]
fn a_shard_truncated_under_the_map_is_a_clean_error() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = big_pair(dir.path());
    let delta = dir.path().join("d.fapm");
    let child = fapm()
        .args(["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&delta), "-q", "--threads", "2"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_mapped(child.id(), &ft, Duration::ZERO);
    fs::OpenOptions::new().write(true).open(&ft).unwrap().set_len(4096).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_error(&o, &["memory-mapped input file changed or was truncated"], "truncated shard");
    assert_eq!(leftovers(dir.path(), &["base.safetensors", "ft.safetensors"]), Vec::<String>::new());
}

/// Runs `args` and kills the process if it has not finished after 20 s (a hang).
fn run_or_kill(args: &[&str]) -> Output {
    let mut child = fapm().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            panic!("fapm {args:?} hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A FIFO or a directory given as a checkpoint file or a delta is refused without blocking.
#[test]
fn special_files_are_refused_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let fifo = dir.path().join("pipe.safetensors");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let d = dir.path().join("d.fapm");
    let o = run_or_kill(&["prune", "--base", s(&base), "--finetuned", s(&fifo), "-o", s(&d), "-q"]);
    assert_error(&o, &["pipe.safetensors", "not a regular file"], "a FIFO as a checkpoint");
    let o = run_or_kill(&["verify", s(&fifo)]);
    assert_error(&o, &["pipe.safetensors", "not a regular file"], "a FIFO as a delta");
    let o = run_or_kill(&["apply", "--base", s(&base), "--delta", s(dir.path()), "-o", s(&d), "-q"]);
    // A directory is a delta folder (`fapm card`): this one holds no delta.
    assert_error(&o, &["holds no .fapm delta"], "a directory without a delta as a delta");
    assert!(!d.exists());
    let _ = ft;
}

/// A base shard truncated while `apply` reads it into a directory: the SIGBUS guard removes
/// the temporary directory's files and the directory itself.
#[test]
fn a_base_truncated_during_apply_leaves_no_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = big_pair(dir.path());
    let (base_dir, ft_dir) = (dir.path().join("base"), dir.path().join("ft"));
    for (file, d) in [(&base, &base_dir), (&ft, &ft_dir)] {
        fs::create_dir_all(d.join("sub")).unwrap();
        fs::rename(file, d.join("sub/model.safetensors")).unwrap();
        fs::write(d.join("model.safetensors.index.json"), br#"{"weight_map":{"w":"sub/model.safetensors"}}"#).unwrap();
    }
    let delta = dir.path().join("d.fapm");
    let o =
        run(&["prune", "--base", s(&base_dir), "--finetuned", s(&ft_dir), "-o", s(&delta), "-q", "--sparsity", "0.5"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("out");
    let child = fapm()
        .args(["apply", "--base", s(&base_dir), "--delta", s(&delta), "-o", s(&out), "-q", "--threads", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_mapped(child.id(), &base_dir.join("sub/model.safetensors"), Duration::ZERO);
    fs::OpenOptions::new().write(true).open(base_dir.join("sub/model.safetensors")).unwrap().set_len(4096).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_error(&o, &["memory-mapped input file changed or was truncated"], "truncated base");
    assert_eq!(leftovers(dir.path(), &["base", "ft", "d.fapm"]), Vec::<String>::new());
}

/// Symlinked directories in a fine-tuned checkpoint (a loop, or a tree that looks
/// exponentially large through links) end in a clean error, not a hang.
#[test]
fn symlinked_directory_loops_are_refused_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let ft_dir = dir.path().join("ftdir");
    fs::create_dir(&ft_dir).unwrap();
    fs::rename(&ft, ft_dir.join("model.safetensors")).unwrap();
    for name in ["a", "b", "c"] {
        std::os::unix::fs::symlink(".", ft_dir.join(name)).unwrap();
    }
    let d = dir.path().join("d.fapm");
    let o = run_or_kill(&["prune", "--base", s(&base), "--finetuned", s(&ft_dir), "-o", s(&d), "-q"]);
    assert_error(&o, &["ftdir", "symlink loop"], "a symlink loop");
    // No loop, but 2^14 paths through links: refused by the directory budget.
    for name in ["a", "b", "c"] {
        fs::remove_file(ft_dir.join(name)).unwrap();
    }
    let mut prev = ft_dir.join("l0");
    fs::create_dir(&prev).unwrap();
    for i in 1..14 {
        let next = ft_dir.join(format!("l{i}"));
        fs::create_dir(&next).unwrap();
        std::os::unix::fs::symlink(&next, prev.join("x")).unwrap();
        std::os::unix::fs::symlink(&next, prev.join("y")).unwrap();
        prev = next;
    }
    let o = run_or_kill(&["prune", "--base", s(&base), "--finetuned", s(&ft_dir), "-o", s(&d), "-q"]);
    assert_error(&o, &["ftdir", "directories"], "an exponential tree of links");
    assert!(!d.exists());
}

/// A hostile tensor name (line breaks, a terminal escape) still gives one clean error line.
#[test]
fn hostile_names_cannot_forge_output_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = small_pair(dir.path());
    let bad = dir.path().join("bad.safetensors");
    let name = "evil\nerror: fake\r\u{1b}[2Jx";
    let header =
        format!(r#"{{{}:{{"dtype":"F7","shape":[1],"data_offsets":[0,1]}}}}"#, serde_json::to_string(name).unwrap());
    fs::write(&bad, raw_shard(&header, &[0])).unwrap();
    let d = dir.path().join("d.fapm");
    let o = run(&["prune", "--base", s(&base), "--finetuned", s(&bad), "-o", s(&d), "-q"]);
    let stderr = assert_error(&o, &["bad.safetensors", "unknown dtype"], "a hostile tensor name");
    assert!(!stderr.contains('\u{1b}') && !stderr.contains('\r'), "{stderr:?}");
    // A valid checkpoint with such a name: `inspect` escapes it too.
    let ft = dir.path().join("named.safetensors");
    write_safetensors(&ft, &[T::new(name, DType::F32, &[1], f32s([1.0]))]);
    let o = run(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&d), "-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["inspect", s(&d)]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && stdout.contains("evil") && !stdout.contains('\u{1b}'), "{stdout:?}");
}

/// Ctrl-C during `fapm report` stops it, with no output and no temporary directory left.
#[cfg(feature = "report")]
#[test]
fn interrupted_report_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = big_pair_shaped(dir.path(), &[5 << 10, 5 << 10]);
    let out = dir.path().join("report");
    let mut cmd = fapm();
    cmd.args(["report", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&out), "-q"]);
    let o = interrupt(cmd, &ft, libc::SIGINT, Duration::from_millis(100));
    assert_error(&o, &["interrupted"], "interrupted report");
    assert_eq!(leftovers(dir.path(), &["base.safetensors", "ft.safetensors"]), Vec::<String>::new());
}

/// Output to a pipe whose reader goes away (`fapm inspect | head -1`) ends the process
/// quietly, as for other Unix tools, instead of panicking.
#[test]
fn a_closed_output_pipe_is_not_a_panic() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    // Enough tensors that the table is larger than a pipe's buffer.
    let (_, d) = many_tiny_tensors(dir.path());
    let mut child = fapm().args(["inspect", s(&d)]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap(); // then the pipe closes
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert!(out.status.success() || out.status.signal() == Some(libc::SIGPIPE), "{:?}", out.status);
}

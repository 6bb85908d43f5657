//! Crash safety (docs/SECURITY.md, "Crash safety"): `prune`, `apply` and `merge` killed with
//! SIGKILL at seeded random points leave at the output either nothing, the old output byte for
//! byte, or the complete new one, and a rerun succeeds; and a destination that appears while a
//! run without `--overwrite` is going is left alone at commit.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fapm_stages::dtype::DType;

use crate::util::*;

/// Kill points per command and starting state (fresh output, old output with `--overwrite`).
const POINTS: usize = 15;

/// A whole output as found on disk: every file's path (relative to the output, `""` for a
/// single file) and bytes, directories as `path/`; `None` when there is nothing at the path.
type Tree = Option<BTreeMap<String, Vec<u8>>>;

fn tree(path: &Path) -> Tree {
    fn walk(path: &Path, rel: &str, into: &mut BTreeMap<String, Vec<u8>>) {
        let meta = fs::symlink_metadata(path).unwrap();
        if meta.is_dir() {
            into.insert(format!("{rel}/"), Vec::new());
            let mut names: Vec<_> = fs::read_dir(path).unwrap().map(|e| e.unwrap().file_name()).collect();
            names.sort();
            for n in names {
                let n = n.to_str().unwrap();
                walk(&path.join(n), &if rel.is_empty() { n.to_string() } else { format!("{rel}/{n}") }, into);
            }
        } else if meta.file_type().is_symlink() {
            into.insert(format!("{rel} -> "), fs::read_link(path).unwrap().into_os_string().into_encoded_bytes());
        } else {
            into.insert(rel.to_string(), fs::read(path).unwrap());
        }
    }
    fs::symlink_metadata(path).ok()?;
    let mut map = BTreeMap::new();
    walk(path, "", &mut map);
    Some(map)
}

/// Writes `tree` at `path`, which must not exist.
fn plant(path: &Path, tree: &BTreeMap<String, Vec<u8>>) {
    for (rel, bytes) in tree {
        let p = path.join(rel.trim_end_matches('/'));
        if rel.ends_with('/') {
            fs::create_dir_all(p).unwrap();
        } else if rel.is_empty() {
            fs::write(path, bytes).unwrap();
        } else {
            fs::write(p, bytes).unwrap();
        }
    }
}

fn remove(path: &Path) {
    let _ = fs::remove_dir_all(path).or_else(|_| fs::remove_file(path));
}

/// A sharded pair (two shards each, an index, side files in a subdirectory) of a few MB of F32,
/// so a run lasts long enough to be killed in the middle: (base dir, fine-tuned dir).
fn sharded_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let mut rng = Rng(0x5eed);
    let n = 1 << 18;
    let (base, ft) = (dir.join("base"), dir.join("ft"));
    let b: Vec<Vec<f32>> = (0..3).map(|_| (0..n).map(|_| (rng.normal() * 0.02) as f32).collect()).collect();
    let f: Vec<Vec<f32>> = b
        .iter()
        .map(|w| w.iter().map(|&x| if rng.below(3) == 0 { x + (rng.normal() * 1e-3) as f32 } else { x }).collect())
        .collect();
    for (root, w) in [(&base, &b), (&ft, &f)] {
        fs::create_dir(root).unwrap();
        let t = |name: &str, i: usize| T::new(name, DType::F32, &[512, n as u64 / 512], f32s(w[i].iter().copied()));
        write_safetensors(&root.join("model-00001-of-00002.safetensors"), &[t("a.weight", 0), t("b.weight", 1)]);
        write_safetensors(&root.join("model-00002-of-00002.safetensors"), &[t("c.weight", 2)]);
        let index = r#"{"metadata":{},"weight_map":{"a.weight":"model-00001-of-00002.safetensors",
            "b.weight":"model-00001-of-00002.safetensors","c.weight":"model-00002-of-00002.safetensors"}}"#;
        fs::write(root.join("model.safetensors.index.json"), index).unwrap();
        fs::write(root.join("config.json"), br#"{"model_type":"test"}"#).unwrap();
    }
    fs::create_dir(ft.join("tokenizer")).unwrap();
    fs::write(ft.join("tokenizer/special_tokens_map.json"), br#"{"eos_token":"</s>"}"#).unwrap();
    fs::write(ft.join("tokenizer.json"), vec![b'x'; 4096]).unwrap();
    (base, ft)
}

/// Runs `args` to completion; asserts success.
fn run_ok(args: &[&str]) -> Duration {
    let start = Instant::now();
    let o = run(args);
    assert!(o.status.success(), "fapm {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    start.elapsed()
}

/// What a kill left at the output.
#[derive(Debug, Default)]
struct Outcomes {
    absent: usize,
    old: usize,
    new: usize,
    finished: usize,
}

/// Kills `fapm args -o out` with SIGKILL at `POINTS` seeded random moments in [0, 1.2 x the
/// time of an uninterrupted run], starting each time from `old` at `out` (with `--overwrite`)
/// or from nothing. After each kill, `out` must hold nothing or the old output (untouched, byte
/// for byte) or the complete new one, and nothing beside it but the run's temporaries; then a
/// rerun must succeed, give the new output and leave no temporary.
fn kill_at_many_points(args: &[&str], out: &Path, old: Option<&BTreeMap<String, Vec<u8>>>, seed: u64) -> Outcomes {
    let parent = out.parent().unwrap();
    let name = out.file_name().unwrap().to_str().unwrap();
    let mut args: Vec<&str> = args.to_vec();
    args.extend(["-o", s(out), "-q"]);
    if old.is_some() {
        args.push("--overwrite");
    }
    let set_up = || {
        remove(out);
        if let Some(old) = old {
            plant(out, old);
        }
    };
    // The new output, and how long an uninterrupted run takes: the median of five, as a busy
    // machine makes a run now and then much slower.
    let mut times: Vec<Duration> = (0..5)
        .map(|_| {
            set_up();
            run_ok(&args)
        })
        .collect();
    times.sort();
    let took = times[2];
    let new = tree(out);
    assert!(new.is_some() && new.as_ref() != old, "{args:?}: no new output");
    let mut rng = Rng(seed);
    let mut seen = Outcomes::default();
    for point in 0..POINTS {
        set_up();
        let delay = took.mul_f64(1.2 * rng.unit());
        let what = format!("fapm {args:?} killed after {delay:?} (point {point}, seed {seed:#x})");
        let child = fapm().args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        std::thread::sleep(delay);
        // SAFETY: kill on the pid of our own child, which has not been waited for yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
        let o = child.wait_with_output().unwrap();
        let status = o.status;
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(status.success() || status.signal() == Some(libc::SIGKILL), "{what}: {status:?} {stderr}");
        let found = tree(out);
        if status.success() {
            seen.finished += 1;
            assert!(found == new, "{what}: finished, but the output is not the new one");
        } else if found.is_none() {
            seen.absent += 1;
            assert!(old.is_none(), "{what}: the old output is gone");
        } else if found == new {
            seen.new += 1;
        } else {
            assert!(old.is_some() && found.as_ref() == old, "{what}: the output is neither the old nor the new one");
            seen.old += 1;
        }
        let temporary = format!(".{name}.fapm-tmp.");
        for n in leftovers(parent, &[name]) {
            assert!(n.starts_with(&temporary), "{what}: left {n} beside the output");
        }
        // The rerun, with --overwrite whenever something is at the output.
        let mut rerun = args.clone();
        if found.is_some() && old.is_none() {
            rerun.push("--overwrite");
        }
        let o = run(&rerun);
        assert!(o.status.success(), "{what}: the rerun failed: {}", String::from_utf8_lossy(&o.stderr));
        assert!(tree(out) == new, "{what}: the rerun's output is not the new one");
        assert_eq!(leftovers(parent, &[name]), Vec::<String>::new(), "{what}: the rerun left temporaries");
    }
    eprintln!("fapm {}{}: uninterrupted {took:?}; {seen:?}", args[0], if old.is_some() { " --overwrite" } else { "" });
    seen
}

/// Kills `args` from a fresh output and over `old`; checks that the points spanned the run:
/// some kills came before the commit, some after it.
fn kill_both_ways(args: &[&str], out: &Path, old: &BTreeMap<String, Vec<u8>>, seed: u64) {
    let fresh = kill_at_many_points(args, out, None, seed);
    let over = kill_at_many_points(args, out, Some(old), seed ^ 0xff);
    let (before, after) = (fresh.absent + over.old, fresh.new + fresh.finished + over.new + over.finished);
    assert!(before > 0 && after > 0, "fapm {}: the kills missed the run: {fresh:?} {over:?}", args[0]);
    remove(out);
}

/// SIGKILL at many points of `prune`, `apply` and `merge`, each from a fresh output and over
/// an old one with `--overwrite`: the output is absent, old or new, never a mix; reruns succeed.
#[test]
fn sigkill_at_any_point_leaves_the_old_output_or_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = sharded_pair(dir.path());
    let work = dir.path().join("work");
    fs::create_dir(&work).unwrap();
    let (delta, p1, p2) = (work.join("d.fapm"), work.join("p1.fapm"), work.join("p2.fapm"));
    for (d, part) in [(&delta, None), (&p1, Some("1/2")), (&p2, Some("2/2"))] {
        let mut args = vec!["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(d), "-q", "--sparsity", "0.5"];
        args.extend(part.iter().flat_map(|p| ["--part", *p]));
        run_ok(&args);
    }
    // Old outputs of the same kind as the new ones but other contents: a file for a delta, a
    // directory (with a subdirectory, and a name the new output also has) for a model.
    let old_file = BTreeMap::from([(String::new(), b"an older delta".repeat(1000))]);
    let old_dir = BTreeMap::from([
        ("/".to_string(), Vec::new()),
        ("config.json".to_string(), b"{}".to_vec()),
        ("only-old.safetensors".to_string(), vec![7; 5000]),
        ("tokenizer/".to_string(), Vec::new()),
        ("tokenizer/special_tokens_map.json".to_string(), b"old".to_vec()),
    ]);
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let prune = ["prune", "--base", s(&base), "--finetuned", s(&ft), "--sparsity", "0.5", "--threads", "1"];
    let apply = ["apply", "--base", s(&base), "--delta", s(&delta), "--threads", "1"];
    let merge = ["merge", s(&p1), s(&p2)];
    for (i, (args, dest, old)) in
        [(&prune[..], "d.fapm", &old_file), (&apply[..], "model", &old_dir), (&merge[..], "m.fapm", &old_file)]
            .into_iter()
            .enumerate()
    {
        kill_both_ways(args, &out.join(dest), old, 0x0c4a_5e00 + i as u64);
    }
}

/// Makes something at a path.
type Make = fn(&Path);

/// A destination that appears while `apply` (or `prune`) runs without `--overwrite`, after the
/// check at start: the commit fails with exit 1 naming it, leaves what appeared untouched and
/// removes the temporary output. The run is stopped (SIGSTOP) while the thing is created, so
/// it is certain to appear between the start and the commit.
#[test]
fn an_output_that_appears_during_the_run_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = sharded_pair(dir.path());
    let delta = dir.path().join("d.fapm");
    run_ok(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&delta), "-q", "--sparsity", "0.5"]);
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let appears: [(&str, Make); 3] = [
        ("a directory", |p| {
            fs::create_dir(p).unwrap();
            fs::write(p.join("model-00001-of-00002.safetensors"), b"someone else's").unwrap();
        }),
        ("a file", |p| fs::write(p, b"someone else's file").unwrap()),
        ("a symlink", |p| std::os::unix::fs::symlink("nowhere", p).unwrap()),
    ];
    let (model, d) = (out_dir.join("model"), out_dir.join("d.fapm"));
    let apply = ["apply", "--base", s(&base), "--delta", s(&delta), "-o", s(&model), "-q", "--threads", "1"];
    let prune = ["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&d), "-q", "--threads", "1"];
    let cases = appears.iter().map(|&(what, make)| (&apply, &model, what, make));
    for (args, out, what, make) in cases.chain([(&prune, &d, appears[1].0, appears[1].1)]) {
        let name = out.file_name().unwrap().to_str().unwrap();
        let what = format!("{what} at {name} during {}", args[0]);
        let mut attempts = 0;
        let o = loop {
            attempts += 1;
            assert!(attempts <= 20, "{what}: never caught the run before its commit");
            let child = fapm().args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
            let pid = child.id() as libc::pid_t;
            let temporary = format!(".{name}.fapm-tmp.");
            let start = Instant::now();
            while !leftovers(&out_dir, &[]).iter().any(|n| n.starts_with(&temporary)) {
                assert!(start.elapsed() < Duration::from_secs(30), "{what}: no temporary appeared");
                std::thread::sleep(Duration::from_micros(200));
            }
            // SAFETY: signals to our own child, which has not been waited for yet.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            let caught = leftovers(&out_dir, &[]).iter().any(|n| n.starts_with(&temporary)) && !out.exists();
            if caught {
                make(out);
            }
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
            let o = child.wait_with_output().unwrap();
            if caught {
                break o;
            }
            remove(out); // the run committed before it was stopped: try again
        };
        assert_error(&o, &[s(out), "appeared while fapm was running"], &what);
        let reference = dir.path().join("reference");
        make(&reference); // made the same way, to compare with
        assert!(tree(out) == tree(&reference), "{what}: what appeared was changed");
        remove(&reference);
        assert_eq!(leftovers(&out_dir, &[name]), Vec::<String>::new(), "{what}: a temporary was left");
        remove(out);
    }
}

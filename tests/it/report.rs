//! `fapm report` and `prune` through the binary: their memory on a checkpoint of very many tiny
//! tensors (issue: 400,000 of them once took 1.36 GB), `--memory-budget`, and `report.json`.
#![cfg(feature = "report")]

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{raw_shard, s};

/// Writes a pair of checkpoints of `n` F32 tensors of 2 elements each, by hand (the header
/// alone is tens of MB): the fine-tuned one changes one element of every third tensor.
fn many_tiny_pair(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    let write = |path: &Path, changed: bool| {
        let mut header = String::with_capacity(n * 64);
        header.push('{');
        let mut data = Vec::with_capacity(n * 8);
        for i in 0..n {
            if i > 0 {
                header.push(',');
            }
            let at = i * 8;
            header.push_str(&format!(
                "\"l.{i}.w\":{{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[{at},{}]}}",
                at + 8
            ));
            let second = if changed && i % 3 == 0 { 1.5f32 + (i + 1) as f32 * 1e-6 } else { 1.5 };
            data.extend_from_slice(&1.0f32.to_le_bytes());
            data.extend_from_slice(&second.to_le_bytes());
        }
        header.push('}');
        std::fs::write(path, raw_shard(&header, &data)).unwrap();
    };
    let (base, ft) = (dir.join("base.safetensors"), dir.join("ft.safetensors"));
    write(&base, false);
    write(&ft, true);
    (base, ft)
}

/// Runs fapm with `args` and returns its exit status, its own peak resident memory in bytes,
/// and its stderr (its stdout is dropped). Through a small Python process that starts it and reads `wait4`'s
/// `ru_maxrss`: a process started straight from this one would count this test binary's own
/// peak (other tests' memory) in its `ru_maxrss`, which Linux carries over from the forked copy
/// into the exec'd program; Python's is a few MB.
fn run_with_peak(args: &[&str]) -> (i32, u64, String) {
    const PEAK: &str = "import os, sys\n\
        quiet = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]\n\
        pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ, file_actions=quiet)\n\
        _, status, usage = os.wait4(pid, 0)\n\
        print(usage.ru_maxrss)\n\
        sys.exit(os.waitstatus_to_exitcode(status))\n";
    let o = Command::new("python3")
        .args(["-c", PEAK, env!("CARGO_BIN_EXE_fapm")])
        .args(args)
        .output()
        .expect("python3 runs fapm");
    let peak_kb: u64 = String::from_utf8_lossy(&o.stdout).trim().parse().expect("the peak in KiB");
    (o.status.code().unwrap_or(-1), peak_kb * 1024, String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Runs `args` with the memory budget `refused.0`, which must fail (exit 1, the stderr naming
/// each of `refused.1`, nothing at `out`), then with `within.0`, which must succeed with a peak
/// below `within.1` bytes.
fn refused_then_within(args: &[&str], out: &Path, refused: (&str, &[&str]), within: (&str, u64)) {
    let with_budget = |budget| [args, &["--memory-budget", budget]].concat();
    let (code, _, err) = run_with_peak(&with_budget(refused.0));
    assert_eq!(code, 1, "{err}");
    assert!(refused.1.iter().all(|m| err.contains(m)), "{err}");
    assert!(!out.exists());
    let (code, peak, err) = run_with_peak(&with_budget(within.0));
    assert_eq!(code, 0, "{err}");
    eprintln!("fapm {} within {}: peak RSS {} MB", args[0], within.0, peak >> 20);
    assert!(peak < within.1, "peak RSS {} MB", peak >> 20);
}

/// 400,000 tiny tensors: one budget holds the run. Their two headers need more than half of
/// 256M, which is refused up front (exit 1, nothing written); with 512M the report runs and its
/// peak stays within the budget (1.36 GB once); the page shows 48 of them one by one and says
/// so, and the whole-model numbers count them all.
#[test]
fn report_on_400000_tiny_tensors_stays_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let n = 400_000;
    let (base, ft) = many_tiny_pair(dir.path(), n);
    let out = dir.path().join("report");
    let args = ["report", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&out), "-q"];
    refused_then_within(&args, &out, ("256M", &["ft.safetensors", "memory budget"]), ("512M", 512 << 20));
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(html.contains(&format!("the 48 largest of the {n} tensors")), "the page says which tensors it shows");
    assert!(html.len() < 2 << 20, "the page is {} bytes", html.len());
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(v["tensors"], n);
    assert_eq!(v["candidates"], n.div_ceil(3));
    assert_eq!(v["unchanged_tensors"], n - n.div_ceil(3));
}

/// 400,000 tiny tensors pruned: the headers and the records the delta will hold need more than
/// half of 512M, which is refused before anything is written; with 1G the prune runs within it
/// (816 MB with the default 256M before one budget held the run), and the delta applies.
#[test]
fn prune_on_400000_tiny_tensors_stays_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let n = 400_000;
    let (base, ft) = many_tiny_pair(dir.path(), n);
    let delta = dir.path().join("d.fapm");
    let args = ["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&delta), "-q"];
    let refused: (_, &[_]) = ("512M", &["400000 tensors", "raise --memory-budget"]);
    refused_then_within(&args, &delta, refused, ("1G", 1 << 30));
    let o = crate::util::run(&["verify", s(&delta), "--base", s(&base), "--memory-budget", "1G", "-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `--memory-budget` is checked like the other commands' (bad value: exit 1, nothing written),
/// and `report.json` is written beside the page with the layout docs/PIPELINE.md gives.
#[test]
fn report_takes_a_memory_budget_and_writes_report_json() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = crate::util::small_pair(dir.path());
    let out = dir.path().join("report");
    let o = crate::util::run(&[
        "report",
        "--base",
        s(&base),
        "--finetuned",
        s(&ft),
        "-o",
        s(&out),
        "--memory-budget",
        "1M",
    ]);
    crate::util::assert_error(&o, &["memory"], "a budget below the minimum");
    assert!(!out.exists());
    let o = crate::util::run(&[
        "report",
        "--base",
        s(&base),
        "--finetuned",
        s(&ft),
        "-o",
        s(&out),
        "--memory-budget",
        "64M",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(v["fapm_report"], 1);
    for key in ["base", "finetuned"] {
        let name = v[key].as_str().unwrap();
        assert!(!name.starts_with('/') && !name.contains(dir.path().to_str().unwrap()), "{key}: {name}");
    }
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 25);
    for p in points {
        for key in ["sparsity", "penalty"] {
            assert!(p[key].is_string(), "{p}");
        }
        for key in ["energy_kept", "forgetting"] {
            assert!(p[key].is_f64(), "{p}");
        }
        assert!(p["delta_bytes"].is_u64() && p["pareto"].is_boolean(), "{p}");
    }
    assert!(points.iter().any(|p| p["pareto"] == true));
}

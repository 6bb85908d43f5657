//! The binary on the checked-in fixtures: round trips, agreement with the independent
//! Python reference (fixtures/reference.py), exit codes, output hygiene.

use std::path::Path;
use std::process::Command;

use crate::util::{fixture, run, s};

const PAIRS: [(&str, &str); 5] = [
    ("single/base.safetensors", "single/finetuned.safetensors"),
    ("sharded/base", "sharded/finetuned"),
    ("plain/base", "plain/finetuned"),
    ("resized/bf16/base", "resized/bf16/finetuned"),
    ("resized/f32/base.safetensors", "resized/f32/finetuned.safetensors"),
];

fn ok(args: &[&str]) -> std::process::Output {
    let out = run(args);
    assert!(out.status.success(), "fapm {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Asserts two files or directory trees have identical names and bytes.
fn assert_same_tree(a: &Path, b: &Path) {
    if a.is_file() {
        assert!(std::fs::read(a).unwrap() == std::fs::read(b).unwrap(), "{} != {}", a.display(), b.display());
        return;
    }
    let names = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
        v.sort();
        v
    };
    assert_eq!(names(a), names(b), "{} vs {}", a.display(), b.display());
    for n in names(a) {
        assert_same_tree(&a.join(&n), &b.join(&n));
    }
}

/// Runs `fapm CMD --base BASE --finetuned FT -o OUT EXTRA...` on fixtures; it must succeed.
fn on_fixture(cmd: &str, base: &str, ft: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let (base, ft) = (fixture(base), fixture(ft));
    let mut args = vec![cmd, "--base", s(&base), "--finetuned", s(&ft), "-o", s(out)];
    args.extend(extra);
    ok(&args)
}

fn prune_apply(dir: &Path, base: &str, ft: &str, extra: &[&str]) -> std::path::PathBuf {
    let delta = dir.join("d.fapm");
    let out = dir.join(if fixture(ft).is_file() { "out.safetensors" } else { "out" });
    on_fixture("prune", base, ft, &delta, &[&["--quiet"], extra].concat());
    let base = fixture(base);
    ok(&["verify", s(&delta), "--base", s(&base), "-q"]);
    ok(&["apply", "--base", s(&base), "--delta", s(&delta), "-o", s(&out), "-q"]);
    out
}

/// fapm and an independent implementation of SPEC.md agree bit for bit on every fixture,
/// with several option sets.
#[test]
fn fixtures_agree_with_the_python_reference() {
    let options: [&[&str]; 4] = [
        &[],
        &["--metric", "magnitude", "--sparsity", "0.5"],
        &["--sparsity", "0.75", "--exclude", "norm|embed"],
        &["--penalty", "0.25", "--sparsity-for", "embed|lm_head=0.5", "--sparsity-for", "weight=0.8"],
    ];
    for (base, ft) in PAIRS {
        for opts in options {
            let dir = tempfile::tempdir().unwrap();
            let out = prune_apply(dir.path(), base, ft, opts);
            let reference = dir.path().join("reference");
            let status = Command::new("python3")
                .arg(fixture("reference.py"))
                .args(["--base", fixture(base).to_str().unwrap(), "--finetuned", fixture(ft).to_str().unwrap()])
                .args(["--output", reference.to_str().unwrap()])
                .args(opts)
                .stdout(std::process::Stdio::null())
                .status()
                .expect("python3 runs the reference");
            assert!(status.success());
            assert_same_tree(&out, &reference);
        }
    }
}

/// Sparsity 0 gives back the fine-tuned checkpoint: shards, side files and index.
#[test]
fn sparsity_zero_rebuilds_the_finetuned_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = prune_apply(dir.path(), "sharded/base", "sharded/finetuned", &["--sparsity", "0"]);
    let ft = fixture("sharded/finetuned");
    for entry in std::fs::read_dir(&ft).unwrap() {
        let name = entry.unwrap().file_name();
        // Dot files are not carried (docs/FORMAT.md); the index is regenerated.
        if !name.to_string_lossy().starts_with('.') && name != "model.safetensors.index.json" {
            assert_same_tree(&ft.join(&name), &out.join(&name));
        }
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    let orig: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ft.join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(index["weight_map"], orig["weight_map"]);
    assert!(!out.join(".hidden_note").exists());
}

/// The delta's bytes do not depend on --threads or on how often prune runs.
#[test]
fn deltas_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = Vec::new();
    for threads in ["1", "2", "3", "1"] {
        let delta = dir.path().join(format!("d{threads}.fapm"));
        on_fixture("prune", "sharded/base", "sharded/finetuned", &delta, &["--threads", threads, "-q", "--overwrite"]);
        bytes.push(std::fs::read(&delta).unwrap());
    }
    assert!(bytes.windows(2).all(|w| w[0] == w[1]));
}

/// Bad values exit 1 with one `error:` line naming the problem; usage errors exit 2.
#[test]
fn errors_have_exit_codes_and_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d.fapm");
    let (base, ft) = (fixture("single/base.safetensors"), fixture("single/finetuned.safetensors"));
    let (b, f, o) = (base.to_str().unwrap(), ft.to_str().unwrap(), d.to_str().unwrap());
    let cases: [(&[&str], i32, &str); 6] = [
        (&["prune", "--base", "/nonexistent/x", "--finetuned", f, "-o", o], 1, "/nonexistent/x"),
        (&["prune", "--base", b, "--finetuned", f, "-o", o, "--sparsity", "1.5"], 1, "sparsity"),
        (&["prune", "--base", b, "--finetuned", f, "-o", o, "--metric", "l2"], 1, "metric"),
        (&["prune", "--base", b, "--finetuned", f, "-o", o, "--include", "("], 1, "--include"),
        (&["prune", "--base", b, "--finetuned", f, "-o", o, "--bogus"], 2, "--bogus"),
        (&["inspect", b], 1, "not a fapm delta"),
    ];
    for (args, code, needle) in cases {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        if code == 1 {
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(stderr.starts_with("error: "), "{stderr}");
        }
        assert!(!d.exists(), "no partial output after {args:?}");
    }
}

/// An existing output is kept unless --overwrite.
#[test]
fn existing_output_is_kept_without_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d.fapm");
    std::fs::write(&d, b"precious").unwrap();
    let (base, ft) = (fixture("single/base.safetensors"), fixture("single/finetuned.safetensors"));
    let args =
        ["prune", "--base", base.to_str().unwrap(), "--finetuned", ft.to_str().unwrap(), "-o", d.to_str().unwrap()];
    let out = run(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--overwrite"));
    assert_eq!(std::fs::read(&d).unwrap(), b"precious");
    ok(&[&args[..], &["--overwrite", "-q"]].concat());
    assert_ne!(std::fs::read(&d).unwrap(), b"precious");
    let leftovers: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().file_name() != "d.fapm").collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
}

/// --json prints one parseable object on stdout; on a pipe, stderr has no escape codes.
#[test]
fn json_and_piped_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d.fapm");
    let out = on_fixture("prune", "sharded/base", "sharded/finetuned", &d, &["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["command"], "prune");
    assert!(v["kept"].as_u64().unwrap() > 0);
    assert!(v["kept"].as_u64() <= v["candidates"].as_u64());
    assert!(!out.stderr.contains(&0x1b), "escape codes on a pipe");
    assert!(String::from_utf8_lossy(&out.stderr).contains("kept"));
    let out = ok(&["inspect", d.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kept: u64 = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["mode"] != "whole")
        .map(|t| t["kept"].as_u64().unwrap())
        .sum();
    assert!(kept > 0);
    assert_eq!(v["sparsity"], "0.9");
}

/// The delta of the sharded fixture is byte-identical to the checked-in golden file, so any
/// change to the format (or to which positions are kept) is noticed. After an intended
/// change, regenerate with `FAPM_BLESS=1 cargo test --test it golden` and bump the format
/// version if the layout changed (docs/FORMAT.md).
#[test]
fn golden_delta_catches_format_drift() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d.fapm");
    on_fixture("prune", "sharded/base", "sharded/finetuned", &d, &["-q"]);
    let golden = fixture("golden/sharded-s0.9-fapm-v3.fapm");
    let got = std::fs::read(&d).unwrap();
    if std::env::var_os("FAPM_BLESS").is_some() {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::write(&golden, &got).unwrap();
    }
    let want = std::fs::read(&golden).expect("the golden delta exists (FAPM_BLESS=1 writes it)");
    assert!(got == want, "the delta of fixtures/sharded differs from {}", golden.display());
}

/// Deltas of format versions 1 and 2 (written by earlier fapm) still verify, inspect and
/// apply, to the same model as today's delta of the same inputs.
#[test]
fn older_versions_still_apply() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("sharded/base");
    let new = prune_apply(dir.path(), "sharded/base", "sharded/finetuned", &[]);
    for version in [1u64, 2] {
        let old_delta = fixture(&format!("golden/sharded-s0.9-fapm-v{version}.fapm"));
        ok(&["verify", s(&old_delta), "--base", s(&base), "-q"]);
        let v: serde_json::Value = serde_json::from_slice(&ok(&["inspect", s(&old_delta), "--json"]).stdout).unwrap();
        assert_eq!((v["version"].as_u64(), v["penalty"].as_str()), (Some(version), Some("1")));
        assert!(v["base_repo"].is_null() && v["finetuned_repo"].is_null());
        let old = dir.path().join(format!("old-v{version}"));
        ok(&["apply", "--base", s(&base), "--delta", s(&old_delta), "-o", s(&old), "-q"]);
        assert_same_tree(&old, &new);
    }
}

/// Runs `fapm report --json` on a fixture pair into `dir/report`: the report directory, its
/// JSON summary and its page.
#[cfg(feature = "report")]
fn report_on_fixture(dir: &Path, base: &str, ft: &str) -> (std::path::PathBuf, serde_json::Value, String) {
    let out = dir.join("report");
    let o = on_fixture("report", base, ft, &out, &["--json"]);
    let v = serde_json::from_slice(&o.stdout).unwrap();
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    (out, v, html)
}

/// `fapm report` writes an index.html and valid PNGs it links to, for a sharded model.
#[cfg(feature = "report")]
#[test]
fn report_writes_linked_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let (out, v, html) = report_on_fixture(dir.path(), "sharded/base", "sharded/finetuned");
    assert!(v["tensors_charted"].as_u64().unwrap() > 0);
    let mut pngs = 0;
    for entry in std::fs::read_dir(&out).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".png") {
            let bytes = std::fs::read(out.join(&name)).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{name}");
            assert!(html.contains(&name), "index.html does not show {name}");
            pngs += 1;
        }
    }
    assert!(pngs >= 4);
}

/// `fapm report` on a resized vocabulary charts the grown tensors by their base-shaped part
/// and counts them in its summary.
#[cfg(feature = "report")]
#[test]
fn report_counts_extended_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let (_, v, html) = report_on_fixture(dir.path(), "resized/bf16/base", "resized/bf16/finetuned");
    let (charted, extended) = (v["tensors_charted"].as_u64().unwrap(), v["extended_tensors"].as_u64().unwrap());
    assert!(extended >= 1 && charted > extended, "{v}");
    assert!(html.contains(&format!("{extended} tensors are extended")), "the page says which");
}

/// Built without the `report` feature, `fapm report` says so and fails like bad input.
#[cfg(not(feature = "report"))]
#[test]
fn report_says_when_it_is_not_built_in() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let (base, ft) = (fixture("single/base.safetensors"), fixture("single/finetuned.safetensors"));
    let o = run(&["report", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&out)]);
    crate::util::assert_error(&o, &["report is not built in"], "report without the feature");
    assert!(!out.exists());
}

/// One tensor larger than the memory budget (100 MB of F32 per file, budget 64M): prune,
/// verify and apply stay within the budget, by fapm's own accounting of its allocations.
#[test]
fn a_tensor_larger_than_the_budget_stays_within_it() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = crate::util::big_pair(dir.path());
    let d = dir.path().join("d.fapm");
    let out = dir.path().join("out.safetensors");
    let (b, f, o) = (base.to_str().unwrap(), ft.to_str().unwrap(), d.to_str().unwrap());
    let peak = |args: &[&str]| {
        let v: serde_json::Value = serde_json::from_slice(&ok(args).stdout).unwrap();
        v["peak_memory_bytes"].as_u64().unwrap()
    };
    let budget = 64 << 20;
    let runs = [
        peak(&["prune", "--base", b, "--finetuned", f, "-o", o, "--memory-budget", "64M", "--json", "-q"]),
        peak(&["verify", o, "--base", b, "--memory-budget", "64M", "--json", "-q"]),
        peak(&[
            "apply",
            "--base",
            b,
            "--delta",
            o,
            "-o",
            out.to_str().unwrap(),
            "--memory-budget",
            "64M",
            "--json",
            "-q",
        ]),
    ];
    for p in runs {
        assert!(p > 0 && p < budget, "peak memory {p} bytes, budget {budget}");
    }
}

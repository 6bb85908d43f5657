//! Every crash or hang the fuzz targets found (fuzz/README.md), fed through the CLI: each must
//! be a clean refusal, exit code 1 and one `error:` line naming the file.
//!
//! `fuzz/regressions/paths-*` are inputs of the `paths` target: UTF-8 lines, the first a shard
//! name and the others side-file paths. The test writes the directory delta the target builds
//! from them (hashes right, as an attacker would write it) and runs `verify` and `inspect`.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::util::{run, s};

/// The files of `fuzz/regressions/` whose names start with `prefix`.
fn regressions(prefix: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(prefix))
        .collect();
    files.sort();
    files
}

/// A delta file (format version 2) of `manifest` and no blocks: compressed manifest, footer
/// with its hash, as `fapm_fuzz::assemble` writes it.
fn delta_of(manifest: &serde_json::Value) -> Vec<u8> {
    let text = serde_json::to_vec(manifest).unwrap();
    let packed = zstd::bulk::compress(&text, 1).unwrap();
    let mut file = b"FAPMDLTA".to_vec();
    file.extend_from_slice(&2u32.to_le_bytes());
    file.extend_from_slice(&[0; 4]);
    let mut footer = Vec::new();
    for word in [16u64, packed.len() as u64, text.len() as u64] {
        footer.extend_from_slice(&word.to_le_bytes());
    }
    let mut h = blake3::Hasher::new();
    h.update(&file);
    h.update(&packed);
    h.update(&footer);
    footer.extend_from_slice(h.finalize().as_bytes());
    footer.extend_from_slice(b"FAPMEND1");
    file.extend_from_slice(&packed);
    file.extend_from_slice(&footer);
    file
}

/// The directory delta the `paths` target makes of `input`: a shard named by the first line
/// (no tensors), an empty side file at each other line.
fn paths_delta(input: &str) -> Vec<u8> {
    let lines: Vec<&str> = input.split('\n').take(9).collect();
    let empty = blake3::hash(b"").to_hex().to_string();
    let side: Vec<_> = lines[1..].iter().map(|p| json!({"path": p, "size": 0, "hash": empty, "blocks": []})).collect();
    delta_of(&json!({
        "format": "fapm-delta", "version": 2, "tool": "fuzz", "metric": "fapm", "penalty": "1",
        "sparsity": "0.9", "sparsity_for": [], "threshold": "exact", "include": [], "exclude": [],
        "block_elems": 1048576, "raw_block_bytes": 4194304, "source": "directory", "index": false,
        "shards": [{"name": lines[0], "header": "{}"}], "tensors": [], "side_files": side, "base_only": [],
    }))
}

/// Whether `out` is a clean refusal naming `needles`: exit code 1, one `error:` line.
fn refused(out: &std::process::Output, needles: &[&str]) -> bool {
    let stderr = String::from_utf8_lossy(&out.stderr);
    out.status.code() == Some(1)
        && stderr.lines().count() == 1
        && stderr.starts_with("error: ")
        && needles.iter().all(|n| stderr.contains(n))
}

/// Paths that break SPEC section 4's rule, found by the `paths` target: a component starting
/// with `.` (`.0`), 65 components, an invisible format character (U+0603) and a side file in
/// a weight format (`0.safetensors`). `is_safe_relative` accepted each, so `verify` and
/// `inspect` accepted a delta naming it. Every input is tried before the test fails, which
/// names each one accepted.
#[test]
fn paths_the_fuzzer_found_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Control: the same construction with plain paths is a delta that verifies.
    let plain = dir.path().join("plain.fapm");
    fs::write(&plain, paths_delta("model-00001-of-00001.safetensors\nconfig.json\ntokenizer/vocab.txt")).unwrap();
    let out = run(&["verify", s(&plain)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let found = regressions("paths-");
    assert!(found.len() >= 4, "{found:?}");
    let mut accepted = Vec::new();
    for input in found {
        let name = input.file_name().unwrap().to_str().unwrap();
        let delta = dir.path().join(format!("{name}.fapm"));
        fs::write(&delta, paths_delta(&fs::read_to_string(&input).unwrap())).unwrap();
        for cmd in ["verify", "inspect"] {
            let out = run(&[cmd, s(&delta)]);
            if !refused(&out, &[&format!("{name}.fapm"), "path"]) {
                let said = String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("").to_owned();
                accepted.push(format!("{cmd} {name}: exit {:?}, {said}", out.status.code()));
            }
        }
    }
    assert!(accepted.is_empty(), "not refused:\n{}", accepted.join("\n"));
}

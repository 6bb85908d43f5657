//! The path rules for names inside a delta (SPEC section 4): the input is UTF-8 lines, the
//! first a shard name and the others side-file paths (at most 8). Each goes through
//! `is_safe_relative` alone, and all of them through the manifest check of a directory delta
//! that names them (hashes right). Must hold: no panic, no hang (every check is linear); a
//! path the rule or the reader accepts keeps SPEC section 4's rule, and an accepted delta
//! names every path once.

use std::collections::HashSet;

use fapm_fuzz::{assemble, check_memory, spec_path_violation, write, BUDGET};
use fapm_stages::format::DeltaReader;
use fapm_stages::paths::is_safe_relative;
use serde_json::json;

fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let lines: Vec<&str> = text.split('\n').take(9).collect();
    let empty = blake3::hash(b"").to_hex().to_string();
    let side: Vec<_> = lines[1..].iter().map(|p| json!({"path": p, "size": 0, "hash": empty, "blocks": []})).collect();
    let manifest = json!({
        "format": "fapm-delta", "version": 2, "tool": "fuzz", "metric": "fapm", "penalty": "1",
        "sparsity": "0.9", "sparsity_for": [], "threshold": "exact", "include": [], "exclude": [],
        "block_elems": 1048576, "raw_block_bytes": 4194304, "source": "directory", "index": false,
        "shards": [{"name": lines[0], "header": "{}"}], "tensors": [], "side_files": side, "base_only": [],
    });
    let path = write("paths.fapm", &assemble(2, &serde_json::to_vec(&manifest).unwrap(), &[]));
    // Opened first: a check that is not linear in the paths shows as a hang.
    let opened = DeltaReader::open_within(&path, BUDGET, &fapm::RunControl::default());
    for p in &lines {
        if is_safe_relative(p) {
            if let Some(why) = spec_path_violation(p, false) {
                panic!("is_safe_relative accepts {p:?}: {why}");
            }
        }
    }
    let Ok(reader) = opened else { return };
    let m = &reader.manifest;
    let mut seen = HashSet::new();
    let all = m.shards.iter().map(|s| (&s.name, false)).chain(m.side_files.iter().map(|f| (&f.path, true)));
    for (p, side_file) in all {
        if let Some(why) = spec_path_violation(p, side_file) {
            panic!("a delta naming {p:?} is accepted: {why}");
        }
        assert!(seen.insert(p.as_str()), "{p:?} named twice");
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        run(data);
        check_memory();
    });
}

//! Part deltas from strangers: the input is 2 or 3 pieces `[len u32 LE][delta input]` (each a
//! delta as the `delta` target reads it, hashes recomputed), written as part files and merged.
//! Must hold: no panic, no hang, memory bounded; a merge that succeeds writes a whole delta
//! that the reader accepts.

use std::path::PathBuf;

use fapm::config::MergeConfig;
use fapm::RunControl;
use fapm_fuzz::{check_memory, delta_file, fresh_dir, pieces};
use fapm_stages::format::DeltaReader;

fn run(data: &[u8]) {
    let dir = fresh_dir("merge");
    let parts: Vec<PathBuf> = pieces(data, 3)
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let path = dir.join(format!("part{i}.fapm"));
            std::fs::write(&path, delta_file(p)).unwrap();
            path
        })
        .collect();
    if parts.len() < 2 {
        return;
    }
    let out = dir.join("out.fapm");
    let cfg = MergeConfig { parts, output: out.clone(), memory_budget: fapm_fuzz::BUDGET, overwrite: true };
    if fapm::merge(&cfg, &RunControl::default()).is_ok() {
        let merged = DeltaReader::open(&out).expect("a merged delta opens");
        assert!(merged.manifest.part.is_none(), "a merged delta is whole");
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        run(data);
        check_memory();
    });
}

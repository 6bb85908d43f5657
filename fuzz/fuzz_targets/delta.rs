//! A delta from a stranger: the bytes (see `fapm_fuzz::delta_file` for how input becomes a
//! file whose hashes are right) are opened within a small budget, described as `inspect
//! --json` does, and every block is read, decompressed and decoded as `verify` does.
//! Must hold: no panic, no hang, memory bounded; an opened manifest is self-consistent.

use fapm::config::VerifyConfig;
use fapm::RunControl;
use fapm_fuzz::{check_memory, delta_file, write, BUDGET};
use fapm_stages::format::DeltaReader;

fn run(data: &[u8]) {
    let path = write("delta.fapm", &delta_file(data));
    let Ok(reader) = DeltaReader::open_within(&path, BUDGET, &RunControl::default()) else { return };
    let m = &reader.manifest;
    // What the reader promises of a manifest it accepts (FORMAT.md, docs/SECURITY.md).
    assert!(!m.shards.is_empty() && m.shards.len() <= 10_000 && m.side_files.len() <= 10_000);
    assert!(m.tensors.iter().all(|t| t.shard < m.shards.len()));
    let mut next = 16;
    for b in m.blocks() {
        assert_eq!(b.offset, next, "blocks tile the file");
        next = b.offset + b.len;
    }
    assert!(next + 64 <= reader.size);
    let _ = fapm::json::inspect_text(&path, m, reader.size);
    let cfg = VerifyConfig {
        delta: path.clone(),
        base: None,
        delta_only: true,
        hub: fapm::hub::Env::read(|_| None),
        threads: 1,
        memory_budget: BUDGET,
    };
    let _ = fapm::verify(&cfg, &RunControl::default());
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        run(data);
        check_memory();
    });
}

//! A safetensors shard from a stranger: its bytes through the header parser and validator,
//! as a single file and, with an index, as a checkpoint directory.
//!
//! Input: `D[index len u32 LE][index JSON][shard bytes]` is a directory holding
//! `model.safetensors.index.json` and the shard as `a.safetensors`; any other first byte is
//! followed by one shard's bytes. Must hold: no panic, no hang, memory bounded; a header that
//! parses describes tensors that tile its data buffer exactly, with unique names.

use std::collections::HashSet;
use std::path::Path;

use fapm_fuzz::{check_memory, fresh_dir, pieces, write, BUDGET};
use fapm_stages::bounded_json::Allowance;
use fapm_stages::checkpoint::{parse_shard, Checkpoint};

fn shard(bytes: &[u8]) {
    let parsed = {
        let _allowance = Allowance::new(BUDGET);
        parse_shard(Path::new("fuzz.safetensors"), bytes)
    };
    if let Ok((header, start, tensors)) = &parsed {
        assert_eq!(*start, 8 + header.len());
        let data_len = (bytes.len() - start) as u64;
        let mut next = 0;
        let mut names = HashSet::new();
        for t in tensors {
            assert_eq!(t.begin, next, "tensors tile the data from 0 in order");
            assert_eq!(t.byte_len(), t.numel() * t.dtype.size() as u64);
            assert!(names.insert(&t.name), "unique names");
            next = t.end;
        }
        assert_eq!(next, data_len, "tensors end where the data does");
    }
    let path = write("fuzz.safetensors", bytes);
    let opened = Checkpoint::open_within(&path, BUDGET, &Default::default());
    assert_eq!(opened.is_ok(), parsed.is_ok(), "the file and the bytes are judged alike");
}

fn directory(rest: &[u8]) {
    let parts = pieces(rest, 1);
    let index = parts.first().copied().unwrap_or_default();
    let shard = rest.get(4 + index.len()..).unwrap_or_default();
    let dir = fresh_dir("ckpt");
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    std::fs::write(dir.join("a.safetensors"), shard).unwrap();
    if let Ok(ckpt) = Checkpoint::open_within(&dir, BUDGET, &Default::default()) {
        for t in ckpt.tensors() {
            assert_eq!(t.bytes().len() as u64, t.info().byte_len());
        }
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        match data.split_first() {
            Some((b'D', rest)) => directory(rest),
            Some((_, rest)) => shard(rest),
            None => {}
        }
        check_memory();
    });
}

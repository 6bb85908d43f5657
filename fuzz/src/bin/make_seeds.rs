//! Writes the seed corpus of every target from the repository's fixtures: the golden deltas,
//! a single-file delta and the parts of a partitioned prune (made here with `fapm::prune`),
//! each in the encodings the targets read (`fapm_fuzz::delta_file`); small shards and an index;
//! and a few path lists. Run from `fuzz/`: `cargo afl run --release --bin make-seeds`.

use std::fs;
use std::path::{Path, PathBuf};

use fapm::config::{self, PruneConfig};
use fapm_fuzz::piece;
use fapm_stages::read::partition::PartSpec;
use fapm_stages::threshold::score::Metric;
use fapm_stages::threshold::select::ThresholdMode;
use serde_json::Value;

/// The manifest text, the blocks region and the blocks' decompressed payloads of a delta.
fn unpack(file: &[u8]) -> (u32, Vec<u8>, Vec<u8>, Vec<u8>) {
    let version = u32::from_le_bytes(file[8..12].try_into().unwrap());
    let footer = &file[file.len() - 64..];
    let word = |i: usize| u64::from_le_bytes(footer[8 * i..8 * i + 8].try_into().unwrap()) as usize;
    let (offset, len, raw_len) = (word(0), word(1), word(2));
    let text = zstd::bulk::decompress(&file[offset..offset + len], raw_len).unwrap();
    let manifest: Value = serde_json::from_slice(&text).unwrap();
    let mut raw = Vec::new();
    for list in ["tensors", "side_files"] {
        for record in manifest[list].as_array().unwrap() {
            for b in record["blocks"].as_array().unwrap() {
                let (o, l) = (b["offset"].as_u64().unwrap() as usize, b["len"].as_u64().unwrap() as usize);
                let r = b["raw_len"].as_u64().unwrap() as usize;
                raw.extend(zstd::bulk::decompress(&file[o..o + l], r).unwrap());
            }
        }
    }
    (version, text, file[16..offset].to_vec(), raw)
}

/// Input of the `delta` target for `file` in encoding `mode` (`R`, `S` or `C`).
fn encode(file: &[u8], mode: u8) -> Vec<u8> {
    if mode == b'R' {
        return [&[b'R'][..], file].concat();
    }
    let (version, text, blocks, raw) = unpack(file);
    let mut v = vec![mode, version as u8];
    v.extend((text.len() as u32).to_le_bytes());
    v.extend(&text);
    v.extend(if mode == b'C' { raw } else { blocks });
    v
}

fn prune(root: &Path, pair: &str, sparsity: &str, part: Option<(u32, u32)>, out: &Path) -> Vec<u8> {
    let (base, ft) = match pair {
        "single" => (root.join("fixtures/single/base.safetensors"), root.join("fixtures/single/finetuned.safetensors")),
        p => (root.join(format!("fixtures/{p}/base")), root.join(format!("fixtures/{p}/finetuned"))),
    };
    let cfg = PruneConfig {
        base,
        finetuned: ft,
        output: out.to_path_buf(),
        sparsity: config::sparsity(sparsity).unwrap(),
        sparsity_for: vec![],
        metric: Metric::Fapm,
        penalty: config::Penalty::default(),
        threshold: ThresholdMode::Exact,
        include: vec![],
        exclude: vec![],
        threads: 1,
        memory_budget: config::DEFAULT_MEMORY_BUDGET,
        overwrite: true,
        block_elems: 512,
        part: part.map(|(index, count)| PartSpec { index, count }),
        base_repo: None,
        finetuned_repo: None,
    };
    fapm::prune(&cfg, &fapm::RunControl::default()).unwrap();
    fs::read(out).unwrap()
}

fn save(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

/// A safetensors file of `header` and `data`.
fn shard(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend(header.as_bytes());
    v.extend(data);
    v
}

fn main() {
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "..".into()));
    let corpus = PathBuf::from(std::env::args().nth(2).unwrap_or_else(|| "corpus".into()));
    let tmp = std::env::temp_dir().join(format!("fapm-seeds-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();

    // delta: the golden deltas (versions 1 and 2, a directory with side files) and a
    // single-file delta, each as it is and with hashes recomputed.
    let delta = corpus.join("delta");
    let mut files = vec![];
    for v in [1, 2] {
        let name = format!("sharded-s0.9-fapm-v{v}.fapm");
        files.push((format!("golden-v{v}"), fs::read(root.join("fixtures/golden").join(name)).unwrap()));
    }
    files.push(("single-s0.99".into(), prune(&root, "single", "0.99", None, &tmp.join("single.fapm"))));
    for (name, file) in &files {
        for mode in [b'R', b'S', b'C'] {
            save(&delta, &format!("{name}-{}", mode as char), &encode(file, mode));
        }
    }

    // merge: the parts of prunes in 2 and 3 parts of the sharded fixture.
    let merge = corpus.join("merge");
    for count in [2, 3] {
        let parts: Vec<Vec<u8>> = (1..=count)
            .map(|i| prune(&root, "sharded", "0.9", Some((i, count)), &tmp.join(format!("p{i}of{count}.fapm"))))
            .collect();
        for mode in [b'S', b'C'] {
            let input: Vec<u8> = parts.iter().flat_map(|p| piece(&encode(p, mode))).collect();
            save(&merge, &format!("parts{count}-{}", mode as char), &input);
        }
        if count == 2 {
            save(&delta, "part1of2-S", &encode(&parts[0], b'S'));
        }
    }

    // header: the smallest fixture shards, hand-made ones, and a directory with an index.
    let header = corpus.join("header");
    for (name, rel) in [
        ("sharded-ft-2", "fixtures/sharded/finetuned/model-00002-of-00003.safetensors"),
        ("sharded-ft-3", "fixtures/sharded/finetuned/model-00003-of-00003.safetensors"),
    ] {
        save(&header, name, &[&[b'F'][..], &fs::read(root.join(rel)).unwrap()].concat());
    }
    let tiny = shard(
        r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},"a":{"dtype":"F16","shape":[1],"data_offsets":[3,5]},"c":{"dtype":"BF16","shape":[0,2],"data_offsets":[5,5]}}"#,
        &[1, 2, 3, 4, 5],
    );
    save(&header, "tiny", &[&[b'F'][..], &tiny].concat());
    let index =
        r#"{"metadata":{"total_size":5},"weight_map":{"a":"a.safetensors","b":"a.safetensors","c":"a.safetensors"}}"#;
    save(&header, "dir-index", &[&[b'D'][..], &piece(index.as_bytes()), &tiny].concat());

    // paths: a shard name, then side-file paths.
    let paths = corpus.join("paths");
    save(&paths, "plain", b"model-00001-of-00002.safetensors\nconfig.json\ntokenizer/vocab.txt");
    save(&paths, "nested", b"sub/model.safetensors\nsub/b/c/d.json\nREADME.md\ncode/modeling.py");
    save(&paths, "unicode", "m\u{e9}.safetensors\nt\u{f6}k/\u{4e2d}.txt".as_bytes());
    let deep: String = (0..60).map(|i| format!("d{i}")).collect::<Vec<_>>().join("/");
    save(&paths, "deep", format!("model.safetensors\n{deep}").as_bytes());

    fs::remove_dir_all(&tmp).unwrap();
}

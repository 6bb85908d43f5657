//! Hostile input (docs/SECURITY.md): malformed checkpoints, corrupted and crafted deltas, the
//! wrong base, random mutations. No panic, no partial output, every corruption caught.

use std::fs;
use std::path::{Path, PathBuf};

use fapm::config::{self, ApplyConfig};
use fapm::Ctl;
use fapm_stages::checkpoint::Checkpoint;
use fapm_stages::dtype::DType;
use fapm_stages::format::{DeltaReader, DeltaWriter, Manifest};
use proptest::prelude::*;

use crate::util::*;

/// A malformed checkpoint: how to lay it out, and what the error must name.
struct Case {
    name: &'static str,
    /// Files to write under the case directory: (relative path, bytes).
    files: Vec<(&'static str, Vec<u8>)>,
    /// The checkpoint path, relative to the case directory ("" for the directory itself).
    path: &'static str,
    /// Substrings of the error line (besides the case directory).
    needles: Vec<&'static str>,
}

fn malformed_checkpoints() -> Vec<Case> {
    let good = safetensors_bytes(&[T::new("w", DType::F32, &[4], f32s([1.0, 2.0, 3.0, 4.0]))], None);
    let tensor = |header: &str, data_len: usize| raw_shard(header, &vec![0; data_len]);
    let one = |name, bytes: Vec<u8>, needles: Vec<&'static str>| Case {
        name,
        files: vec![("m.safetensors", bytes)],
        path: "m.safetensors",
        needles: [vec!["m.safetensors"], needles].concat(),
    };
    let mut huge_len = good.clone();
    huge_len[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut past_end = good.clone();
    past_end[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let index = |map: &str| format!(r#"{{"metadata":{{}},"weight_map":{map}}}"#).into_bytes();
    vec![
        one("empty file", vec![], vec!["too short"]),
        one("three bytes", vec![1, 2, 3], vec!["too short"]),
        one("truncated data", good[..good.len() - 3].to_vec(), vec!["'w'", "outside"]),
        one("truncated header", good[..20].to_vec(), vec!["past the end"]),
        one("header length u64::MAX", huge_len, vec!["limit"]),
        one("header length past the end", past_end, vec!["past the end"]),
        one("header not JSON", raw_shard("{not json", &[]), vec!["malformed header"]),
        one(
            "header not UTF-8",
            raw_shard("{\"\u{ff}\":1}", &[]).iter().map(|&b| if b == 0xc3 { 0xff } else { b }).collect(),
            vec!["UTF-8"],
        ),
        one("header deeply nested", raw_shard(&deep, &[]), vec!["malformed header"]),
        one("header a list", raw_shard("[1]", &[]), vec!["malformed header"]),
        one(
            "unknown dtype",
            tensor(r#"{"w":{"dtype":"F7","shape":[1],"data_offsets":[0,1]}}"#, 1),
            vec!["'w'", "dtype"],
        ),
        one(
            "shape disagrees with offsets",
            tensor(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, 4),
            vec!["'w'", "needs 8"],
        ),
        one(
            "offsets out of range",
            tensor(r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#, 4),
            vec!["'w'", "outside"],
        ),
        one(
            "offsets reversed",
            tensor(r#"{"w":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#, 4),
            vec!["'w'", "outside"],
        ),
        one(
            "offsets negative",
            tensor(r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}}"#, 4),
            vec!["'w'", "malformed header entry"],
        ),
        one(
            "overlapping tensors",
            tensor(
                r#"{"v":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"w":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                6,
            ),
            vec!["'w'", "overlaps"],
        ),
        one(
            "shape overflows",
            tensor(r#"{"w":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#, 8),
            vec!["'w'", "too large"],
        ),
        one(
            "duplicate tensor in one header",
            tensor(
                r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                2,
            ),
            vec!["duplicate", "'w'"],
        ),
        one("bad metadata", tensor(r#"{"__metadata__":{"a":[1]}}"#, 0), vec!["__metadata__"]),
        Case {
            name: "duplicate tensor across shards",
            files: vec![("a.safetensors", good.clone()), ("b.safetensors", good.clone())],
            path: "",
            needles: vec!["b.safetensors", "'w'", "a.safetensors"],
        },
        Case {
            name: "index names a missing shard",
            files: vec![
                ("a.safetensors", good.clone()),
                ("model.safetensors.index.json", index(r#"{"w":"zz.safetensors"}"#)),
            ],
            path: "",
            needles: vec!["model.safetensors.index.json", "zz.safetensors"],
        },
        Case {
            name: "index path outside the directory",
            files: vec![
                ("a.safetensors", good.clone()),
                ("model.safetensors.index.json", index(r#"{"w":"../a.safetensors"}"#)),
            ],
            path: "",
            needles: vec!["model.safetensors.index.json", "'w'", "outside"],
        },
        Case {
            name: "index absolute path",
            files: vec![
                ("a.safetensors", good.clone()),
                ("model.safetensors.index.json", index(r#"{"w":"/etc/passwd"}"#)),
            ],
            path: "",
            needles: vec!["model.safetensors.index.json", "'w'", "outside"],
        },
        Case {
            name: "index names the wrong shard",
            files: vec![
                ("a.safetensors", good.clone()),
                ("b.safetensors", tensor(r#"{"v":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, 1)),
                ("model.safetensors.index.json", index(r#"{"w":"b.safetensors","v":"b.safetensors"}"#)),
            ],
            path: "",
            needles: vec!["model.safetensors.index.json", "'w'"],
        },
        Case {
            name: "index malformed",
            files: vec![
                ("a.safetensors", good.clone()),
                ("model.safetensors.index.json", b"{\"weight_map\":".to_vec()),
            ],
            path: "",
            needles: vec!["model.safetensors.index.json", "malformed"],
        },
        Case {
            name: "index without weight_map",
            files: vec![("a.safetensors", good.clone()), ("model.safetensors.index.json", b"{}".to_vec())],
            path: "",
            needles: vec!["model.safetensors.index.json", "weight_map"],
        },
        Case { name: "empty directory", files: vec![], path: "", needles: vec!["no *.safetensors"] },
        Case {
            name: "directory without weights",
            files: vec![("config.json", b"{}".to_vec()), ("sub/x.safetensors", good.clone())],
            path: "",
            needles: vec!["no *.safetensors"],
        },
        Case {
            name: "a bad shard among good ones",
            files: vec![("a.safetensors", good.clone()), ("b.safetensors", good[..30].to_vec())],
            path: "",
            needles: vec!["b.safetensors"],
        },
        Case { name: "missing path", files: vec![], path: "nope.safetensors", needles: vec!["nope.safetensors"] },
    ]
}

/// Every malformed checkpoint, as the fine-tuned or the base input, exits 1 with one error
/// line naming the file (and tensor), and leaves no output.
#[test]
fn malformed_checkpoints_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let delta = dir.path().join("d.fapm");
    for (i, case) in malformed_checkpoints().into_iter().enumerate() {
        let root = dir.path().join(format!("case{i}"));
        fs::create_dir(&root).unwrap();
        for (rel, bytes) in &case.files {
            let p = root.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, bytes).unwrap();
        }
        let path = if case.path.is_empty() { root.clone() } else { root.join(case.path) };
        let err = Checkpoint::open(&path).err().unwrap_or_else(|| panic!("{}: accepted", case.name));
        let msg = err.to_string();
        assert!(msg.contains(s(&root)), "{}: {msg}", case.name);
        for n in &case.needles {
            assert!(msg.contains(n), "{}: '{n}' not in {msg}", case.name);
        }
        for (b, f) in [(s(&base), s(&path)), (s(&path), s(&ft))] {
            let out = run(&["prune", "--base", b, "--finetuned", f, "-o", s(&delta), "-q"]);
            assert_error(&out, &case.needles, case.name);
            assert!(!delta.exists(), "{}: output left behind", case.name);
        }
    }
    assert_eq!(leftovers(dir.path(), &[]).iter().filter(|n| n.contains("fapm")).count(), 0);
}

/// A delta of the single fixture (sparsity 0.9), and the fixture's base.
fn fixture_delta(dir: &Path) -> (PathBuf, PathBuf) {
    let base = fixture("single/base.safetensors");
    let ft = fixture("single/finetuned.safetensors");
    let delta = dir.join("d.fapm");
    let out = run(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&delta), "-q"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (delta, base)
}

fn verify_in_process(delta: &Path) -> fapm::Result<fapm::ApplySummary> {
    fapm::verify_delta(delta, 1, &Ctl::default())
}

fn apply_in_process(base: &Path, delta: &Path, output: Option<PathBuf>) -> fapm::Result<fapm::ApplySummary> {
    let cfg = ApplyConfig {
        base: base.to_path_buf(),
        delta: delta.to_path_buf(),
        output,
        threads: 1,
        memory_budget: config::DEFAULT_MEMORY_BUDGET,
        overwrite: false,
    };
    fapm::apply(&cfg, &Ctl::default())
}

/// One flipped bit anywhere in a delta is caught by `verify` and by `apply`: every byte of
/// the fixture delta gets one random bit flipped (every bit of the preamble, footer and a
/// few block and manifest bytes), `verify` in-process on all of them, `apply` on a sample,
/// and the binary on a few.
#[test]
fn every_flipped_bit_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (delta, base) = fixture_delta(dir.path());
    let good = fs::read(&delta).unwrap();
    assert!(verify_in_process(&delta).is_ok());
    let bad = dir.path().join("bad.fapm");
    let out = dir.path().join("out.safetensors");
    let mut rng = Rng(0x5eed);
    let len = good.len();
    let mut flips: Vec<(usize, u8)> = (0..len).map(|i| (i, rng.below(8) as u8)).collect();
    for i in (0..16).chain(len - 64..len).chain([len / 3, len / 2, len - 100]) {
        flips.extend((0..8).map(|b| (i, b)));
    }
    let started = std::time::Instant::now();
    for (n, &(i, bit)) in flips.iter().enumerate() {
        let mut bytes = good.clone();
        bytes[i] ^= 1 << bit;
        fs::write(&bad, &bytes).unwrap();
        let r = std::panic::catch_unwind(|| verify_in_process(&bad).map(|_| ()));
        assert!(matches!(r, Ok(Err(_))), "byte {i} bit {bit}: verify did not fail cleanly");
        if n % 97 == 0 {
            let r = apply_in_process(&base, &bad, Some(out.clone()));
            assert!(r.is_err(), "byte {i} bit {bit}: apply accepted it");
            assert!(!out.exists());
        }
        if n % 4001 == 0 {
            let o = run(&["verify", s(&bad), "--base", s(&base)]);
            assert_error(&o, &["bad.fapm"], "verify of a flipped bit");
            let o = run(&["apply", "--base", s(&base), "--delta", s(&bad), "-o", s(&out), "-q"]);
            assert_error(&o, &["bad.fapm"], "apply of a flipped bit");
        }
    }
    eprintln!("{} flips of a {len}-byte delta in {:?}", flips.len(), started.elapsed());

    // Every bit of a small delta with two tensors and a side file.
    let small = dir.path().join("small");
    let (ft_dir, base_dir) = (small.join("ft"), small.join("base"));
    fs::create_dir_all(&ft_dir).unwrap();
    fs::create_dir_all(&base_dir).unwrap();
    let (b, f) = small_pair(&small);
    fs::rename(b, base_dir.join("model.safetensors")).unwrap();
    fs::rename(f, ft_dir.join("model.safetensors")).unwrap();
    fs::write(ft_dir.join("config.json"), b"{}").unwrap();
    let small_delta = small.join("d.fapm");
    let o = run(&["prune", "--base", s(&base_dir), "--finetuned", s(&ft_dir), "-o", s(&small_delta), "-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let good = fs::read(&small_delta).unwrap();
    for i in 0..good.len() * 8 {
        let mut bytes = good.clone();
        bytes[i / 8] ^= 1 << (i % 8);
        fs::write(&bad, &bytes).unwrap();
        let r = std::panic::catch_unwind(|| verify_in_process(&bad).map(|_| ()));
        assert!(matches!(r, Ok(Err(_))), "small delta byte {} bit {}: verify did not fail cleanly", i / 8, i % 8);
    }
    eprintln!("every bit of a {}-byte delta in {:?}", good.len(), started.elapsed());
    assert_eq!(leftovers(dir.path(), &["d.fapm", "bad.fapm", "small"]), Vec::<String>::new());
    assert_eq!(leftovers(&small, &["base", "ft", "d.fapm"]), Vec::<String>::new());
}

/// Truncated deltas, a newer format version and absurd sizes are refused up front.
#[test]
fn truncated_newer_and_bomb_deltas_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (delta, base) = fixture_delta(dir.path());
    let good = fs::read(&delta).unwrap();
    let bad = dir.path().join("bad.fapm");
    for cut in [0, 1, 15, 16, 79, 80, good.len() / 2, good.len() - 64, good.len() - 1] {
        fs::write(&bad, &good[..cut]).unwrap();
        let o = run(&["verify", s(&bad)]);
        assert_error(&o, &["bad.fapm"], &format!("delta cut at {cut}"));
    }
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&(fapm_stages::format::VERSION + 1).to_le_bytes());
    fs::write(&bad, &newer).unwrap();
    assert_error(&run(&["verify", s(&bad)]), &["bad.fapm", "newer"], "newer version");
    let o = run(&["apply", "--base", s(&base), "--delta", s(&bad), "-o", s(&dir.path().join("o")), "-q"]);
    assert_error(&o, &["bad.fapm", "newer"], "apply of a newer version");
    // A manifest claiming 2^40 decompressed bytes: refused before any allocation.
    let mut bomb = good.clone();
    let at = good.len() - 64 + 16;
    bomb[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    fs::write(&bad, &bomb).unwrap();
    assert_error(&run(&["verify", s(&bad)]), &["bad.fapm", "limit"], "manifest bomb");

    // A manifest of 8 MiB that compresses to a few hundred bytes, with a valid footer hash.
    let raw = vec![b' '; 8 << 20];
    let packed = zstd::bulk::compress(&raw, 3).unwrap();
    let mut file = good[..16].to_vec();
    file.extend_from_slice(&packed);
    let mut footer = Vec::new();
    for word in [16, packed.len() as u64, raw.len() as u64] {
        footer.extend_from_slice(&word.to_le_bytes());
    }
    let mut h = blake3::Hasher::new();
    h.update(&good[..16]);
    h.update(&packed);
    h.update(&footer);
    footer.extend_from_slice(h.finalize().as_bytes());
    footer.extend_from_slice(b"FAPMEND1");
    file.extend_from_slice(&footer);
    fs::write(&bad, &file).unwrap();
    assert_error(&run(&["verify", s(&bad)]), &["bad.fapm", "4096:1"], "manifest ratio bomb");

    // Crafted manifests with valid hashes: absurd block and tensor sizes.
    let m = DeltaReader::open(&delta).unwrap().manifest;
    let mut huge_blocks = m.clone();
    huge_blocks.block_elems = 1 << 23;
    let mut huge_tensor = m.clone();
    let t = huge_tensor.tensors.iter_mut().find(|t| t.blocks.len() == 1).unwrap();
    t.shape = vec![1 << 40];
    let mut lying_block = m.clone();
    lying_block.tensors[0].blocks[0].raw_len = u64::MAX;
    for (what, manifest) in [("block size", huge_blocks), ("tensor size", huge_tensor), ("block length", lying_block)] {
        rewrite(&delta, &bad, &manifest);
        let o = run(&["verify", s(&bad)]);
        assert_error(&o, &["bad.fapm", "inconsistent manifest"], what);
    }
}

/// Writes `manifest` with the blocks of `from` (same order and sizes) as a new delta `to`.
fn rewrite(from: &Path, to: &Path, manifest: &Manifest) {
    let original = fs::read(from).unwrap();
    let reader = DeltaReader::open(from).unwrap();
    let mut w = DeltaWriter::new(fs::File::create(to).unwrap(), to).unwrap();
    for b in reader.manifest.blocks() {
        w.block(&original[b.offset as usize..(b.offset + b.len) as usize], b.raw_len).unwrap();
    }
    w.finish(manifest).unwrap();
}

/// Names inside a delta are not paths to trust: a side file or shard that would land
/// outside `--output` is refused, even with every hash valid, and nothing is written.
#[test]
fn crafted_paths_never_escape_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let pair = dir.path().join("pair");
    let (base_dir, ft_dir) = (pair.join("base"), pair.join("ft"));
    fs::create_dir_all(&base_dir).unwrap();
    fs::create_dir_all(ft_dir.join("tok")).unwrap();
    let (b, f) = small_pair(&pair);
    fs::rename(b, base_dir.join("model.safetensors")).unwrap();
    fs::rename(f, ft_dir.join("model.safetensors")).unwrap();
    fs::write(ft_dir.join("tok/config.json"), b"{\"x\":1}").unwrap();
    let delta = dir.path().join("d.fapm");
    let o = run(&["prune", "--base", s(&base_dir), "--finetuned", s(&ft_dir), "-o", s(&delta), "-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = DeltaReader::open(&delta).unwrap().manifest;
    assert_eq!(m.side_files.len(), 1);

    let work = dir.path().join("work");
    fs::create_dir(&work).unwrap();
    let bad = work.join("bad.fapm");
    let out = work.join("out");
    let mut cases: Vec<(String, Manifest)> = Vec::new();
    for p in [
        "../evil",
        "../../evil",
        "/tmp/fapm-evil",
        "tok/../../evil",
        "./evil",
        "",
        "a\\..\\evil",
        "model.safetensors",
        "model.safetensors.index.json",
    ] {
        let mut mm = m.clone();
        mm.side_files[0].path = p.into();
        cases.push((format!("side file '{p}'"), mm));
    }
    for p in ["../x.safetensors", "/tmp/fapm-evil.safetensors", "a/../../x.safetensors", "model.safetensors.index.json"]
    {
        let mut mm = m.clone();
        mm.shards[0].name = p.into();
        cases.push((format!("shard '{p}'"), mm));
    }
    for (what, mm) in cases {
        rewrite(&delta, &bad, &mm);
        for args in
            [vec!["apply", "--base", s(&base_dir), "--delta", s(&bad), "-o", s(&out), "-q"], vec!["verify", s(&bad)]]
        {
            assert_error(&run(&args), &["bad.fapm"], &what);
        }
        assert_eq!(leftovers(&work, &["bad.fapm"]), Vec::<String>::new(), "{what}");
        assert!(!dir.path().join("evil").exists() && !dir.path().join("x.safetensors").exists(), "{what}");
        assert!(!Path::new("/tmp/fapm-evil").exists() && !Path::new("/tmp/fapm-evil.safetensors").exists());
    }
    // The untouched delta still applies, inside the output.
    let o = run(&["apply", "--base", s(&base_dir), "--delta", s(&delta), "-o", s(&out), "-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(fs::read(out.join("tok/config.json")).unwrap(), b"{\"x\":1}");
}

/// `apply` and `verify --base` name the first tensor (in the delta's order) whose base
/// bytes differ.
#[test]
fn the_wrong_base_names_the_first_differing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (delta, base) = fixture_delta(dir.path());
    let m = DeltaReader::open(&delta).unwrap().manifest;
    let diffable: Vec<&str> = m.tensors.iter().filter(|t| t.base_hash.is_some()).map(|t| t.name.as_str()).collect();
    let (first, later) = (diffable[1], diffable[diffable.len() - 1]);
    let ckpt = Checkpoint::open(&base).unwrap();
    let mut bytes = fs::read(&base).unwrap();
    for name in [later, first] {
        let t = ckpt.get(name).unwrap();
        let at = 8 + t.shard.header.len() + t.info().begin as usize;
        bytes[at] ^= 0x01;
    }
    let wrong = dir.path().join("wrong.safetensors");
    fs::write(&wrong, bytes).unwrap();
    let out = dir.path().join("out.safetensors");
    let needle = format!("'{first}'");
    let o = run(&["apply", "--base", s(&wrong), "--delta", s(&delta), "-o", s(&out), "-q"]);
    assert_error(&o, &["wrong.safetensors", &needle, "differs"], "apply on the wrong base");
    let o = run(&["verify", s(&delta), "--base", s(&wrong), "-q"]);
    assert_error(&o, &["wrong.safetensors", &needle, "differs"], "verify on the wrong base");
    assert!(!out.exists());
    // A base missing a tensor, or with another shape, is named too.
    let other = dir.path().join("other.safetensors");
    write_safetensors(&other, &[T::new(first, DType::F32, &[1], f32s([0.0]))]);
    let o = run(&["apply", "--base", s(&other), "--delta", s(&delta), "-o", s(&out), "-q"]);
    assert_error(&o, &["other.safetensors"], "apply on an unrelated base");
    assert_eq!(leftovers(dir.path(), &["d.fapm", "wrong.safetensors", "other.safetensors"]), Vec::<String>::new());
}

/// One random mutation of `bytes`: flip, insert, delete or truncate.
fn mutate(bytes: &[u8], kind: u8, at: usize, value: u8) -> Vec<u8> {
    let mut v = bytes.to_vec();
    let at = at % v.len().max(1);
    match kind % 4 {
        0 if !v.is_empty() => v[at] ^= 1 << (value % 8),
        1 => v.insert(at, value),
        2 if !v.is_empty() => {
            v.remove(at);
        }
        _ => v.truncate(at),
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    /// Mutated checkpoint files give a clean error or a checkpoint whose every tensor can be
    /// read; prune on them gives a clean error or a delta that verifies.
    #[test]
    fn mutated_checkpoints_never_panic(kinds in prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..4)) {
        let dir = tempfile::tempdir().unwrap();
        let (base, ft) = small_pair(dir.path());
        let mut bytes = fs::read(&ft).unwrap();
        for (k, at, v) in kinds {
            bytes = mutate(&bytes, k, at, v);
        }
        fs::write(&ft, &bytes).unwrap();
        let r = std::panic::catch_unwind(|| {
            let c = Checkpoint::open(&ft)?;
            let total: usize = c.tensors().map(|t| t.bytes().len()).sum();
            Ok::<_, fapm::Error>(total)
        });
        prop_assert!(r.is_ok(), "Checkpoint::open panicked");
        if let Ok(Err(e)) = &r {
            prop_assert!(e.to_string().contains("ft.safetensors"), "{e}");
        }
        let delta = dir.path().join("d.fapm");
        let o = run(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&delta), "-q"]);
        prop_assert!(matches!(o.status.code(), Some(0 | 1)), "{}", String::from_utf8_lossy(&o.stderr));
        prop_assert_eq!(o.status.success(), matches!(r, Ok(Ok(_))));
        if o.status.success() {
            prop_assert!(verify_in_process(&delta).is_ok());
        } else {
            prop_assert!(!delta.exists());
        }
    }

    /// Mutated deltas are refused, in-process and by the binary, with no output left.
    #[test]
    fn mutated_deltas_are_refused(kinds in prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..4)) {
        let dir = tempfile::tempdir().unwrap();
        let (base, ft) = small_pair(dir.path());
        let delta = dir.path().join("d.fapm");
        let o = run(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&delta), "-q", "--sparsity", "0.5"]);
        prop_assert!(o.status.success());
        let good = fs::read(&delta).unwrap();
        let mut bytes = good.clone();
        for (k, at, v) in kinds {
            bytes = mutate(&bytes, k, at, v);
        }
        prop_assume!(bytes != good);
        fs::write(&delta, &bytes).unwrap();
        let out = dir.path().join("out.safetensors");
        let r = std::panic::catch_unwind(|| verify_in_process(&delta).map(|_| ()));
        prop_assert!(matches!(r, Ok(Err(_))), "verify: {r:?}");
        let r = std::panic::catch_unwind(|| apply_in_process(&base, &delta, Some(out.clone())).map(|_| ()));
        prop_assert!(matches!(r, Ok(Err(_))), "apply: {r:?}");
        prop_assert!(!out.exists());
        let o = run(&["apply", "--base", s(&base), "--delta", s(&delta), "-o", s(&out), "-q"]);
        prop_assert_eq!(o.status.code(), Some(1));
        prop_assert!(!out.exists());
    }
}

/// Regression: the decompression-bomb guard refused the honest delta of a checkpoint with
/// thousands of similar tensors, whose manifest compresses about 70:1.
#[test]
fn many_similar_tensors_make_a_valid_delta() {
    let dir = tempfile::tempdir().unwrap();
    let (base, d) = many_tiny_tensors(dir.path());
    let out = run(&["verify", s(&d), "--base", s(&base), "-q"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

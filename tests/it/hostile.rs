//! Hostile input (docs/SECURITY.md): malformed checkpoints, corrupted and crafted deltas, the
//! wrong base, random mutations. No panic, no partial output, every corruption caught.

use std::fs;
use std::path::{Path, PathBuf};

use fapm::config::{self, ApplyConfig};
use fapm::RunControl;
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
    [malformed_layouts(), malformed_headers(), malformed_tensor_entries(), malformed_directories(), malformed_indexes()]
        .into_iter()
        .flatten()
        .collect()
}

/// A good single-tensor shard, for the cases to break or to surround a bad file with.
fn good_shard() -> Vec<u8> {
    safetensors_bytes(&[T::new("w", DType::F32, &[4], f32s([1.0, 2.0, 3.0, 4.0]))], None)
}

/// A shard with this JSON header and `data_len` zero bytes of data.
fn shard(header: &str, data_len: usize) -> Vec<u8> {
    raw_shard(header, &vec![0; data_len])
}

/// An index file with this weight map.
fn index(map: &str) -> Vec<u8> {
    format!(r#"{{"metadata":{{}},"weight_map":{map}}}"#).into_bytes()
}

/// A case of one file, `m.safetensors`, opened as the checkpoint; the error names it.
fn one_file(name: &'static str, bytes: Vec<u8>, needles: Vec<&'static str>) -> Case {
    Case {
        name,
        files: vec![("m.safetensors", bytes)],
        path: "m.safetensors",
        needles: [vec!["m.safetensors"], needles].concat(),
    }
}

/// A case whose checkpoint is the case directory itself.
fn directory(name: &'static str, files: Vec<(&'static str, Vec<u8>)>, needles: Vec<&'static str>) -> Case {
    Case { name, files, path: "", needles }
}

/// Files too short, truncated, or with a header length that points nowhere.
fn malformed_layouts() -> Vec<Case> {
    let good = good_shard();
    let mut huge_len = good.clone();
    huge_len[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut past_end = good.clone();
    past_end[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
    vec![
        one_file("empty file", vec![], vec!["too short"]),
        one_file("three bytes", vec![1, 2, 3], vec!["too short"]),
        one_file("truncated data", good[..good.len() - 3].to_vec(), vec!["'w'", "outside"]),
        one_file("truncated header", good[..20].to_vec(), vec!["past the end"]),
        one_file("header length u64::MAX", huge_len, vec!["limit"]),
        one_file("header length past the end", past_end, vec!["past the end"]),
    ]
}

/// Headers that are not a JSON object.
fn malformed_headers() -> Vec<Case> {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    vec![
        one_file("header not JSON", raw_shard("{not json", &[]), vec!["malformed header"]),
        one_file(
            "header not UTF-8",
            raw_shard("{\"\u{ff}\":1}", &[]).iter().map(|&b| if b == 0xc3 { 0xff } else { b }).collect(),
            vec!["UTF-8"],
        ),
        one_file("header deeply nested", raw_shard(&deep, &[]), vec!["malformed header"]),
        one_file("header a list", raw_shard("[1]", &[]), vec!["malformed header"]),
    ]
}

/// Well-formed headers whose tensor entries (or metadata) are wrong.
fn malformed_tensor_entries() -> Vec<Case> {
    vec![
        one_file(
            "unknown dtype",
            shard(r#"{"w":{"dtype":"F7","shape":[1],"data_offsets":[0,1]}}"#, 1),
            vec!["'w'", "dtype"],
        ),
        one_file(
            "shape disagrees with offsets",
            shard(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, 4),
            vec!["'w'", "needs 8"],
        ),
        one_file(
            "offsets out of range",
            shard(r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#, 4),
            vec!["'w'", "outside"],
        ),
        one_file(
            "offsets reversed",
            shard(r#"{"w":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#, 4),
            vec!["'w'", "outside"],
        ),
        one_file(
            "offsets negative",
            shard(r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}}"#, 4),
            vec!["'w'", "malformed header entry"],
        ),
        one_file(
            "overlapping tensors",
            shard(
                r#"{"v":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"w":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                6,
            ),
            vec!["'w'", "overlaps"],
        ),
        one_file(
            "shape overflows",
            shard(r#"{"w":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#, 8),
            vec!["'w'", "too large"],
        ),
        one_file(
            "duplicate tensor in one header",
            shard(
                r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                2,
            ),
            vec!["duplicate", "'w'"],
        ),
        one_file("bad metadata", shard(r#"{"__metadata__":{"a":[1]}}"#, 0), vec!["__metadata__"]),
    ]
}

/// Directories of shards without an index: clashing, missing or bad shards, and a missing path.
fn malformed_directories() -> Vec<Case> {
    let good = good_shard();
    vec![
        directory(
            "duplicate tensor across shards",
            vec![("a.safetensors", good.clone()), ("b.safetensors", good.clone())],
            vec!["b.safetensors", "'w'", "a.safetensors"],
        ),
        directory("empty directory", vec![], vec!["no *.safetensors"]),
        directory(
            "directory without weights",
            vec![("config.json", b"{}".to_vec()), ("sub/x.safetensors", good.clone())],
            vec!["no *.safetensors"],
        ),
        directory(
            "a bad shard among good ones",
            vec![("a.safetensors", good.clone()), ("b.safetensors", good[..30].to_vec())],
            vec!["b.safetensors"],
        ),
        Case { name: "missing path", files: vec![], path: "nope.safetensors", needles: vec!["nope.safetensors"] },
    ]
}

/// Directories whose `model.safetensors.index.json` is malformed or routes tensors wrongly.
fn malformed_indexes() -> Vec<Case> {
    const INDEX: &str = "model.safetensors.index.json";
    let with_index =
        |name, index: Vec<u8>, needles| directory(name, vec![("a.safetensors", good_shard()), (INDEX, index)], needles);
    vec![
        with_index("index names a missing shard", index(r#"{"w":"zz.safetensors"}"#), vec![INDEX, "zz.safetensors"]),
        with_index(
            "index path outside the directory",
            index(r#"{"w":"../a.safetensors"}"#),
            vec![INDEX, "'w'", "outside"],
        ),
        with_index("index absolute path", index(r#"{"w":"/etc/passwd"}"#), vec![INDEX, "'w'", "outside"]),
        directory(
            "index names the wrong shard",
            vec![
                ("a.safetensors", good_shard()),
                ("b.safetensors", shard(r#"{"v":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, 1)),
                (INDEX, index(r#"{"w":"b.safetensors","v":"b.safetensors"}"#)),
            ],
            vec![INDEX, "'w'"],
        ),
        with_index("index malformed", b"{\"weight_map\":".to_vec(), vec![INDEX, "malformed"]),
        with_index("index without weight_map", b"{}".to_vec(), vec![INDEX, "weight_map"]),
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
pub(crate) fn fixture_delta(dir: &Path) -> (PathBuf, PathBuf) {
    let base = fixture("single/base.safetensors");
    let ft = fixture("single/finetuned.safetensors");
    let delta = dir.join("d.fapm");
    let out = run(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&delta), "-q"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (delta, base)
}

fn verify_in_process(delta: &Path) -> fapm::Result<fapm::ApplySummary> {
    let cfg = config::VerifyConfig {
        delta: delta.to_path_buf(),
        base: None,
        delta_only: false,
        hub: fapm::hub::Env::read(|_| None),
        threads: 1,
        memory_budget: config::DEFAULT_MEMORY_BUDGET,
    };
    fapm::verify(&cfg, &RunControl::default())
}

fn apply_in_process(base: &Path, delta: &Path, output: Option<PathBuf>) -> fapm::Result<fapm::ApplySummary> {
    let cfg = ApplyConfig {
        base: Some(base.to_path_buf()),
        delta: delta.to_path_buf(),
        hub: fapm::hub::Env::read(|_| None),
        output,
        threads: 1,
        memory_budget: config::DEFAULT_MEMORY_BUDGET,
        overwrite: false,
    };
    fapm::apply(&cfg, &RunControl::default())
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

    // A manifest of a few hundred bytes, with a valid footer hash, that claims more than zstd
    // can decompress it to.
    let raw = vec![b' '; 8 << 20];
    let packed = zstd::bulk::compress(&raw, 3).unwrap();
    let mut file = good[..16].to_vec();
    file.extend_from_slice(&packed);
    let mut footer = Vec::new();
    let claim = packed.len() as u64 * (fapm_stages::format::MAX_MANIFEST_RATIO + 1);
    for word in [16, packed.len() as u64, claim] {
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
    assert_error(&run(&["verify", s(&bad)]), &["bad.fapm", "32768:1"], "manifest ratio bomb");

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
    apply_ok(&base_dir, &delta, &out);
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

/// A delta given as the base, and a base that is the delta's result already (the fine-tune, with
/// every change kept), are each named for what they are.
#[test]
fn a_delta_or_the_result_given_as_the_base_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft, delta) =
        (dir.path().join("b.safetensors"), dir.path().join("f.safetensors"), dir.path().join("d.fapm"));
    write_safetensors(&base, &[T::new("w", DType::F32, &[4], f32s([1.0, 2.0, 3.0, 4.0]))]);
    write_safetensors(&ft, &[T::new("w", DType::F32, &[4], f32s([1.5, 2.0, 3.5, 4.0]))]);
    let o = run(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&delta), "--sparsity", "0", "-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("out.safetensors");
    let swapped = "is a fapm delta, not a safetensors checkpoint (were the base and the delta swapped?)";
    let o = run(&["prune", "--base", s(&delta), "--finetuned", s(&ft), "-o", s(&out), "-q"]);
    assert_error(&o, &["d.fapm", swapped], "prune with a delta as the base");
    let o = run(&["apply", "--base", s(&delta), "--delta", s(&delta), "-o", s(&out), "-q"]);
    assert_error(&o, &["d.fapm", swapped], "apply with a delta as the base");
    // And the other way round: a checkpoint given where a delta goes.
    let ckpt = dir.path().join("c.safetensors");
    write_safetensors(&ckpt, &[T::new("w", DType::F32, &[64], f32s([0.5; 64]))]);
    let not_delta = "is a safetensors checkpoint, not a fapm delta (were the base and the delta swapped?)";
    let o = run(&["apply", "--base", s(&base), "--delta", s(&ckpt), "-o", s(&out), "-q"]);
    assert_error(&o, &["c.safetensors", not_delta], "apply with a checkpoint as the delta");
    assert_error(&run(&["verify", s(&ckpt), "-q"]), &["c.safetensors", not_delta], "verify");
    assert_error(&run(&["inspect", s(&ckpt)]), &["c.safetensors", not_delta], "inspect");
    let held = "this model already holds the delta's result";
    let o = run(&["apply", "--base", s(&ft), "--delta", s(&delta), "-o", s(&out), "-q"]);
    assert_error(&o, &["f.safetensors", "'w'", held], "apply on the fine-tune");
    let o = run(&["verify", s(&delta), "--base", s(&ft), "-q"]);
    assert_error(&o, &["f.safetensors", "'w'", held], "verify on the fine-tune");
    assert!(!out.exists());
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

// ---------------------------------------------------------------------------------------
// Crafted deltas: a stranger's file with every hash recomputed, so that each edit reaches
// past the integrity checks to the rules behind them (docs/SECURITY.md, issue-style kinds:
// allocations, JSON memory, paths, tiling, side files, printing).

/// A delta taken apart: its manifest, every tensor's decompressed blocks and every side
/// file's contents. Edit any of them and [`pack`] writes a delta whose hashes all match.
pub(crate) struct Unpacked {
    pub(crate) m: Manifest,
    pub(crate) tensors: Vec<Vec<Vec<u8>>>,
    pub(crate) side: Vec<Vec<u8>>,
}

pub(crate) fn unpack(delta: &Path) -> Unpacked {
    let r = DeltaReader::open(delta).unwrap();
    let tensors =
        r.manifest.tensors.iter().map(|t| t.blocks.iter().map(|b| r.block(b, &t.name).unwrap()).collect()).collect();
    let side = r
        .manifest
        .side_files
        .iter()
        .map(|f| f.blocks.iter().flat_map(|b| r.block(b, &f.path).unwrap()).collect())
        .collect();
    Unpacked { m: r.manifest, tensors, side }
}

/// Writes `u` as the delta `to` with fapm's own writer: every block compressed and hashed
/// again, every side file's size, hash and blocks taken from its contents, manifest and
/// footer hashed. Tensor hashes (`out_hash`, `base_hash`) are left as `u` says.
pub(crate) fn pack(u: &Unpacked, to: &Path) {
    let mut m = u.m.clone();
    let mut w = DeltaWriter::new(fs::File::create(to).unwrap(), to).unwrap();
    let mut block = |raw: &[u8]| w.block(&zstd::bulk::compress(raw, 1).unwrap(), raw.len() as u64).unwrap();
    for (t, raws) in m.tensors.iter_mut().zip(&u.tensors) {
        t.blocks = raws.iter().map(|raw| block(raw)).collect();
    }
    let per = m.raw_block_bytes as usize;
    for (f, data) in m.side_files.iter_mut().zip(&u.side) {
        f.size = data.len() as u64;
        f.hash = blake3::hash(data).into();
        f.blocks = data.chunks(per).map(&mut block).collect();
    }
    w.finish(&m).unwrap();
}

/// Replaces the manifest of `from` by the JSON text `json` (compressed, footer hashed) as
/// `to`: for manifests too large or too odd to build as a `Manifest`.
pub(crate) fn with_manifest_text(from: &Path, json: &[u8], to: &Path) {
    let good = fs::read(from).unwrap();
    let m_off = u64::from_le_bytes(good[good.len() - 64..good.len() - 56].try_into().unwrap()) as usize;
    let packed = zstd::bulk::compress(json, 1).unwrap();
    let mut file = good[..m_off].to_vec();
    file.extend_from_slice(&packed);
    let mut footer = Vec::new();
    for word in [m_off as u64, packed.len() as u64, json.len() as u64] {
        footer.extend_from_slice(&word.to_le_bytes());
    }
    let mut h = blake3::Hasher::new();
    h.update(&good[..16]);
    h.update(&packed);
    h.update(&footer);
    footer.extend_from_slice(h.finalize().as_bytes());
    footer.extend_from_slice(b"FAPMEND1");
    file.extend_from_slice(&footer);
    fs::write(to, &file).unwrap();
}

/// The memory given to fapm where memory is the point: far more than any honest run here
/// needs (see the control runs), far less than the hostile files asked for.
pub(crate) const MEMORY_LIMIT: u64 = 1 << 30;

/// Runs fapm with `args` with its data limited to `bytes` (RLIMIT_DATA: the heap and every
/// private writable mapping, so every allocation; not the read-only maps of the inputs).
/// An allocation past it fails, which aborts a Rust program (exit 134).
pub(crate) fn run_limited(args: &[&str], bytes: u64) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = fapm();
    cmd.args(args);
    // SAFETY: setrlimit is async-signal-safe and touches only the child being started.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit { rlim_cur: bytes as libc::rlim_t, rlim_max: bytes as libc::rlim_t };
            if libc::setrlimit(libc::RLIMIT_DATA, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

/// `verify`, `inspect` and `apply` of `delta` each exit 1 with one error line naming it and
/// containing `needle`, under the memory limit, and leave no output.
fn refused_everywhere(delta: &Path, base: &Path, needle: &str, what: &str) {
    let out = delta.with_file_name("refused-out");
    let (d, b, o) = (s(delta), s(base), s(&out));
    let name = delta.file_name().unwrap().to_str().unwrap();
    for args in [vec!["verify", d], vec!["inspect", d], vec!["apply", "--base", b, "--delta", d, "-o", o, "-q"]] {
        let o = run_limited(&args, MEMORY_LIMIT);
        assert_error(&o, &[name, needle], &format!("{what}: {}", args[0]));
    }
    assert!(!out.exists(), "{what}: output written");
}

/// Hole 1: Counts and sizes from a delta are checked against what the file can hold before
/// anything is allocated from them. On main, a 2^40-element record made `verify`, `inspect`
/// and `apply` collect 2^30 block sizes (16 GiB) and abort.
#[test]
fn crafted_counts_allocate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (delta, base) = fixture_delta(dir.path());
    for args in [vec!["verify", s(&delta)], vec!["inspect", s(&delta)]] {
        let o = run_limited(&args, MEMORY_LIMIT);
        assert!(o.status.success(), "control run under the limit: {}", String::from_utf8_lossy(&o.stderr));
    }
    let mut u = unpack(&delta);
    let n: u64 = 1 << 40;
    u.m.raw_block_bytes = 1024;
    u.m.shards.truncate(1);
    u.m.shards[0].header = format!(r#"{{"w":{{"dtype":"U8","shape":[{n}],"data_offsets":[0,{n}]}}}}"#);
    let mut t = u.m.tensors.iter().find(|t| t.mode == fapm_stages::format::Mode::Whole).unwrap().clone();
    (t.name, t.dtype, t.shape, t.kept, t.candidates) = ("w".into(), DType::U8, vec![n], n, n);
    u.m.tensors = vec![t];
    u.tensors = vec![vec![vec![0; 1024]]];
    let bad = dir.path().join("huge.fapm");
    pack(&u, &bad);
    refused_everywhere(&bad, &base, "expected 1073741824", "a 2^40-byte tensor in one block");
}

/// Hole 2: Parsing a header or manifest costs memory in proportion to what it describes, within
/// the memory budget. On main each of these made fapm abort under the limit: a generic JSON
/// value costs 17-34 times the text of `[1,1,...]` or `["",...]`.
#[test]
fn json_that_asks_for_gigabytes_is_refused_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (delta, base) = fixture_delta(dir.path());
    // Incompressible text, so that the manifests pass the decompression-bomb ratio.
    let mut rng = Rng(7);
    let noise: String = (0..96 << 10).map(|_| (b'a' + rng.below(26) as u8) as char).collect();
    let u = unpack(&delta);

    // A manifest listing 40 million base-only names (120 MB of `"",`).
    let mut m = u.m.clone();
    m.tool = noise.clone();
    m.base_only = vec!["@".into()];
    let text = serde_json::to_string(&m).unwrap();
    let list = format!("[{}\"\"]", "\"\",".repeat(40_000_000 - 1));
    let bad = dir.path().join("names.fapm");
    with_manifest_text(&delta, text.replace(r#"["@"]"#, &list).as_bytes(), &bad);
    refused_everywhere(&bad, &base, "memory budget", "40 million base-only names");

    // A shard header recorded in the manifest whose one tensor has 20 million dimensions.
    let mut m = u.m.clone();
    m.tool = noise;
    let shape = format!("[{}1]", "1,".repeat(20_000_000 - 1));
    m.shards[0].header = format!(r#"{{"w":{{"dtype":"U8","shape":{shape},"data_offsets":[0,1]}}}}"#);
    let bad = dir.path().join("shape.fapm");
    rewrite(&delta, &bad, &m);
    refused_everywhere(&bad, &base, "memory budget", "a 20-million-dimension shape in a delta");

    // The same header in a checkpoint.
    let ft = dir.path().join("wide.safetensors");
    fs::write(&ft, raw_shard(&m.shards[0].header, &[0])).unwrap();
    let out = dir.path().join("wide.fapm");
    let o = run_limited(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&out), "-q"], MEMORY_LIMIT);
    assert_error(&o, &["wide.safetensors", "memory budget"], "a 20-million-dimension shape in a checkpoint");
    assert!(!out.exists());
}

/// A directory pair whose fine-tuned shard lives in `sub/` (named by an index) with one
/// side file `config.json`, pruned: (base dir, fine-tuned dir, delta).
pub(crate) fn sub_shard_delta(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (base_dir, ft_dir) = (dir.join("base"), dir.join("ft"));
    let (b, f) = small_pair(dir);
    for (file, d) in [(&b, &base_dir), (&f, &ft_dir)] {
        fs::create_dir_all(d.join("sub")).unwrap();
        fs::rename(file, d.join("sub/model.safetensors")).unwrap();
        let map = if d == &ft_dir {
            r#"{"a":"sub/model.safetensors","b":"sub/model.safetensors","ids":"sub/model.safetensors"}"#
        } else {
            r#"{"a":"sub/model.safetensors","b":"sub/model.safetensors"}"#
        };
        fs::write(d.join("model.safetensors.index.json"), format!(r#"{{"weight_map":{map}}}"#)).unwrap();
    }
    fs::write(ft_dir.join("config.json"), b"{}").unwrap();
    let delta = dir.join("d.fapm");
    let o = run(&["prune", "--base", s(&base_dir), "--finetuned", s(&ft_dir), "-o", s(&delta), "-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (base_dir, ft_dir, delta)
}

/// Hole 3: Paths in a delta have one spelling, unique across shards, side files and the index.
/// On main, a side file `sub//model.safetensors` passed the path check and the uniqueness
/// check (a different string), and `apply` overwrote the shard it had just verified.
#[test]
fn two_spellings_of_one_path_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (base_dir, _, delta) = sub_shard_delta(dir.path());
    let u = unpack(&delta);
    assert_eq!(u.m.shards[0].name, "sub/model.safetensors");
    let bad = dir.path().join("bad.fapm");
    let mut cases: Vec<(String, Unpacked)> = Vec::new();
    for p in ["sub//model.safetensors", "sub/./model.safetensors", "sub/model.safetensors/", "sub", "a\u{1b}[2Jb"] {
        let mut c = Unpacked { m: u.m.clone(), tensors: u.tensors.clone(), side: vec![b"pwned".to_vec()] };
        c.m.side_files[0].path = p.into();
        cases.push((format!("side file '{}'", p.escape_default()), c));
    }
    for p in ["sub//model.safetensors", "./sub/model.safetensors", "config.json/x.safetensors"] {
        let mut c = Unpacked { m: u.m.clone(), tensors: u.tensors.clone(), side: u.side.clone() };
        c.m.shards[0].name = p.into();
        cases.push((format!("shard '{p}'"), c));
    }
    for (what, c) in cases {
        pack(&c, &bad);
        refused_everywhere(&bad, &base_dir, "inconsistent manifest", &what);
    }
    let out = dir.path().join("out");
    apply_ok(&base_dir, &delta, &out);
    assert_ne!(fs::read(out.join("sub/model.safetensors")).unwrap(), b"pwned");
}

/// Hole 4: Tensors tile every shard's data buffer from 0 without gap or overlap, in checkpoints
/// and in the shard headers a delta records. On main, an 8 KB delta whose offsets start
/// 16 GiB in verified, and `apply` wrote a 16 GiB (sparse) shard.
#[test]
fn shard_data_must_tile_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (delta, base) = fixture_delta(dir.path());
    let u = unpack(&delta);
    let shift = |header: &str, by: &dyn Fn(&str, u64) -> u64| {
        let mut v: serde_json::Value = serde_json::from_str(header).unwrap();
        for (name, t) in v.as_object_mut().unwrap() {
            if let Some(o) = t.get_mut("data_offsets") {
                let (b, e) = (o[0].as_u64().unwrap(), o[1].as_u64().unwrap());
                *o = serde_json::json!([by(name, b), by(name, e)]);
            }
        }
        v.to_string()
    };
    let first = u.m.tensors[0].name.clone();
    let bad = dir.path().join("bad.fapm");
    let far: &dyn Fn(&str, u64) -> u64 = &|_, x| x + (16 << 30);
    let gap: &dyn Fn(&str, u64) -> u64 = &|n, x| if n == first { x } else { x + 2 };
    for (what, by) in [("all offsets 16 GiB in", far), ("a gap after the first tensor", gap)] {
        let mut c = Unpacked { m: u.m.clone(), tensors: u.tensors.clone(), side: u.side.clone() };
        c.m.shards[0].header = shift(&c.m.shards[0].header, by);
        pack(&c, &bad);
        refused_everywhere(&bad, &base, "tile", what);
    }
    // And in a checkpoint: a gap before the data, and bytes after the last tensor.
    let good = fs::read(fixture("single/finetuned.safetensors")).unwrap();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&good[8..8 + n]).unwrap();
    let gap = raw_shard(&shift(header, &|_, x| x + 8), &[vec![0; 8], good[8 + n..].to_vec()].concat());
    let trailing = [good.clone(), vec![0; 3]].concat();
    for (what, bytes) in [("a gap before the first tensor", gap), ("bytes after the last tensor", trailing)] {
        let ft = dir.path().join("ft.safetensors");
        fs::write(&ft, bytes).unwrap();
        let out = dir.path().join("o.fapm");
        let o = run(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&out), "-q"]);
        assert_error(&o, &["ft.safetensors", "tile"], what);
    }
}

/// `verify` without `--base` checks every whole tensor against its recorded hash (its
/// bytes are all in the delta); on main it skipped them, and `apply` then refused the delta.
#[test]
fn verify_checks_whole_tensors_without_a_base() {
    let dir = tempfile::tempdir().unwrap();
    let (delta, base) = fixture_delta(dir.path());
    let mut u = unpack(&delta);
    let i = u.m.tensors.iter().position(|t| t.mode == fapm_stages::format::Mode::Whole).unwrap();
    u.tensors[i][0][0] ^= 1;
    let bad = dir.path().join("bad.fapm");
    pack(&u, &bad);
    let needle = format!("'{}'", u.m.tensors[i].name);
    assert_error(&run(&["verify", s(&bad)]), &["bad.fapm", &needle, "recorded hash"], "verify");
    let o = run(&["apply", "--base", s(&base), "--delta", s(&bad), "-o", s(&dir.path().join("o")), "-q"]);
    assert_error(&o, &["bad.fapm", &needle, "recorded hash"], "apply");
}

/// `verify` refuses a delta whose `source` and `index` contradict each other, and one with
/// no shards at all (both verified on main).
#[test]
fn contradictory_and_empty_deltas_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (delta, base) = fixture_delta(dir.path());
    let u = unpack(&delta);
    let bad = dir.path().join("bad.fapm");
    let mut indexed_file = Unpacked { m: u.m.clone(), tensors: u.tensors.clone(), side: vec![] };
    indexed_file.m.index = true;
    let mut empty = Unpacked { m: u.m.clone(), tensors: vec![], side: vec![] };
    empty.m.source = fapm_stages::format::Source::Directory;
    (empty.m.shards, empty.m.tensors) = (vec![], vec![]);
    for (what, c) in [("a single file with an index", indexed_file), ("no shards", empty)] {
        pack(&c, &bad);
        refused_everywhere(&bad, &base, "inconsistent manifest", what);
    }
}

/// The window of blocks in flight counts the delta's own block sizes: 64 MiB raw blocks
/// (the most a delta may declare) do not take `verify --threads 16` past its default
/// budget, 256 MiB, given as the process's data limit. On main it held 4 of them at once
/// (sized for 4 MiB blocks) and aborted.
#[test]
fn large_raw_blocks_stay_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (delta, _) = fixture_delta(dir.path());
    let mut m = unpack(&delta).m;
    let (per, blocks) = (64u64 << 20, 16u64);
    let n = per * blocks;
    m.raw_block_bytes = per;
    m.shards.truncate(1);
    m.shards[0].header = format!(r#"{{"w":{{"dtype":"U8","shape":[{n}],"data_offsets":[0,{n}]}}}}"#);
    let mut t = m.tensors.iter().find(|t| t.mode == fapm_stages::format::Mode::Whole).unwrap().clone();
    (t.name, t.dtype, t.shape, t.kept, t.candidates) = ("w".into(), DType::U8, vec![n], n, n);
    let zeros = vec![0u8; per as usize];
    let mut h = blake3::Hasher::new();
    for _ in 0..blocks {
        h.update(&zeros);
    }
    t.out_hash = h.finalize().into();
    let big = dir.path().join("big.fapm");
    let mut w = DeltaWriter::new(fs::File::create(&big).unwrap(), &big).unwrap();
    let packed = zstd::bulk::compress(&zeros, 1).unwrap();
    t.blocks = (0..blocks).map(|_| w.block(&packed, per).unwrap()).collect();
    m.tensors = vec![t];
    w.finish(&m).unwrap();
    drop(zeros);
    let o = run_limited(&["verify", s(&big), "--threads", "16"], fapm::config::DEFAULT_MEMORY_BUDGET);
    assert!(o.status.success(), "{:?}: {}", o.status, String::from_utf8_lossy(&o.stderr));
}

/// Runs prune of `ft_dir` (against `base_dir`) into `out` with `--json`: (stdout, stderr).
pub(crate) fn prune_json(base_dir: &Path, ft_dir: &Path, out: &Path) -> (serde_json::Value, String) {
    let o = run(&["prune", "--base", s(base_dir), "--finetuned", s(ft_dir), "-o", s(out), "--json", "--overwrite"]);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{stderr}");
    (serde_json::from_slice(&o.stdout).unwrap(), stderr)
}

/// Hole 5: Side files: only regular files of real file systems, every embedded one named, a
/// warning for each symlink out of the directory (none for a Hugging Face cache snapshot's
/// links into its repository's `blobs/`), no delta inside a delta. On main the environment
/// of the process (`/proc/self/environ`, an "empty regular file") and an old delta were
/// embedded silently.
#[test]
fn prune_names_every_side_file_and_embeds_only_data() {
    let dir = tempfile::tempdir().unwrap();
    let (base_dir, ft_dir, delta) = sub_shard_delta(dir.path());
    let outside = dir.path().join("private");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("token.txt"), b"hf_secret").unwrap();
    std::os::unix::fs::symlink(outside.join("token.txt"), ft_dir.join("token.txt")).unwrap();
    std::os::unix::fs::symlink("/proc/self/environ", ft_dir.join("environ")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", ft_dir.join("zero")).unwrap();
    fs::copy(&delta, ft_dir.join("old.fapm")).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(ft_dir.join("fifo")).status().unwrap().success());
    fs::write(ft_dir.join("note\u{202e}txt.md"), b"x").unwrap();
    // The delta is written into the fine-tuned directory, twice (the second replaces the first).
    let out = ft_dir.join("new.fapm");
    for _ in 0..2 {
        let (json, stderr) = prune_json(&base_dir, &ft_dir, &out);
        let embedded: Vec<&str> =
            json["embedded_side_files"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        // A bidirectional control is invisible: such a name is left out (SPEC section 4).
        assert_eq!(embedded, ["config.json", "token.txt"], "{stderr}");
        let left_out = json["left_out_side_files"].as_array().unwrap();
        assert!(left_out.iter().any(|l| l["path"] == "note\u{202e}txt.md"), "{json}");
        let warned = |needles: &[&str]| stderr.lines().any(|l| needles.iter().all(|n| l.contains(n)));
        let target = fs::canonicalize(outside.join("token.txt")).unwrap();
        assert!(warned(&["token.txt", s(&target), "outside"]), "{stderr}");
        assert!(warned(&["environ", "not a regular file"]) && warned(&["old.fapm", "fapm delta"]), "{stderr}");
        assert!(!stderr.contains('\u{202e}'), "{stderr:?}");
        let m = DeltaReader::open(&out).unwrap().manifest;
        assert_eq!(m.side_files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(), embedded);
    }

    // A Hugging Face cache snapshot: links into the repository's blobs/, no warning.
    let repo = dir.path().join("hub/models--org--tiny");
    let (blobs, snap) = (repo.join("blobs"), repo.join("snapshots/0123abcd"));
    fs::create_dir_all(&blobs).unwrap();
    fs::create_dir_all(&snap).unwrap();
    fs::copy(ft_dir.join("sub/model.safetensors"), blobs.join("aaaa")).unwrap();
    fs::write(blobs.join("bbbb"), b"{}").unwrap();
    std::os::unix::fs::symlink("../../blobs/aaaa", snap.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink("../../blobs/bbbb", snap.join("config.json")).unwrap();
    let base_one = dir.path().join("base1");
    fs::create_dir(&base_one).unwrap();
    fs::copy(base_dir.join("sub/model.safetensors"), base_one.join("model.safetensors")).unwrap();
    let (json, stderr) = prune_json(&base_one, &snap, &dir.path().join("hf.fapm"));
    assert_eq!(json["embedded_side_files"], serde_json::json!(["config.json"]));
    assert!(!stderr.contains("WARN"), "{stderr}");
}

/// More side files than a delta may carry: `prune` refuses to write such a delta, and a
/// crafted one is refused (on main, `apply` created every one of 20,000 empty files).
#[test]
fn the_number_of_side_files_is_limited() {
    let dir = tempfile::tempdir().unwrap();
    let (base_dir, ft_dir, delta) = sub_shard_delta(dir.path());
    let mut u = unpack(&delta);
    u.m.side_files = (0..20_000)
        .map(|i| fapm_stages::format::SideFile { path: format!("f{i}"), ..u.m.side_files[0].clone() })
        .collect();
    u.side = vec![vec![]; 20_000];
    let bad = dir.path().join("many.fapm");
    pack(&u, &bad);
    refused_everywhere(&bad, &base_dir, "side files", "20,000 side files");
    let many = ft_dir.join("many");
    fs::create_dir(&many).unwrap();
    for i in 0..10_001 {
        fs::write(many.join(format!("f{i}")), b"").unwrap();
    }
    let out = dir.path().join("o.fapm");
    let o = run(&["prune", "--base", s(&base_dir), "--finetuned", s(&ft_dir), "-o", s(&out), "-q"]);
    assert_error(&o, &["side files"], "10,001 side files");
    assert!(!out.exists());
}

/// Hole 6: Every string from a file is escaped wherever it is printed. On main `inspect` printed
/// the manifest's `tool` and `sparsity` raw, and `--json` let DEL, C1 controls and
/// bidirectional marks through.
#[test]
fn text_from_a_delta_never_reaches_the_terminal_raw() {
    let dir = tempfile::tempdir().unwrap();
    let (delta, _) = fixture_delta(dir.path());
    let mut u = unpack(&delta);
    let evil = "\u{1b}]0;owned\u{7}\u{1b}[2J\r\u{9b}31m\u{7f}\u{202e}";
    u.m.tool = format!("fapm {evil}");
    // Recorded options must parse (a pattern that compiles), and still reach the output.
    u.m.include = vec![regex::escape(evil)];
    u.m.base_only = vec![evil.into()];
    let bad = dir.path().join("bad.fapm");
    pack(&u, &bad);
    // A recorded option that does not parse is refused, and named escaped in the error.
    let mut refused = unpack(&delta);
    refused.m.sparsity = format!("0.9{evil}");
    let refused_path = dir.path().join("refused.fapm");
    pack(&refused, &refused_path);
    let o = run(&["inspect", s(&refused_path)]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("owned"), "{stderr}");
    for c in ['\u{1b}', '\u{7}', '\r', '\u{9b}', '\u{7f}', '\u{202e}'] {
        assert!(!stderr.contains(c), "the error printed {c:?} raw: {stderr:?}");
    }
    for json in [false, true] {
        let args = [&["inspect", s(&bad)][..], if json { &["--json"] } else { &[] }].concat();
        let o = run(&args);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(stdout.contains("owned"), "{stdout}");
        for c in ['\u{1b}', '\u{7}', '\r', '\u{9b}', '\u{7f}', '\u{202e}'] {
            assert!(!stdout.contains(c), "inspect (json: {json}) printed {c:?} raw: {stdout:?}");
        }
        if json {
            let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(v["tool"].as_str().unwrap(), u.m.tool, "escaping must keep the JSON's meaning");
        }
    }
}

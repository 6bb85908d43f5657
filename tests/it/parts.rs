//! Partitioned prunes (SPEC section 7): `prune --part I/N` on each part, `merge` of the parts
//! in any order, and the result byte for byte what one prune writes; every way of getting
//! the parts wrong refused with an error that names the part.

use std::path::{Path, PathBuf};

use proptest::prelude::*;

use crate::util::{assert_error, fixture, leftovers, run, s, write_safetensors, Rng, T};

fn ok(args: &[&str]) -> std::process::Output {
    let out = run(args);
    assert!(out.status.success(), "fapm {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Prunes `base`/`ft` into `out`, with `extra` flags (such as `--part 2/3`).
fn prune(base: &Path, ft: &Path, out: &Path, extra: &[&str]) {
    ok(&[&["prune", "--base", s(base), "--finetuned", s(ft), "-o", s(out), "-q"], extra].concat());
}

/// Prunes every part of `count` into `dir/part-I.fapm`; returns their paths.
fn prune_parts(base: &Path, ft: &Path, dir: &Path, count: u32, extra: &[&str]) -> Vec<PathBuf> {
    (1..=count)
        .map(|i| {
            let part = dir.join(format!("part-{i}.fapm"));
            let spec = format!("{i}/{count}");
            prune(base, ft, &part, &[&["--part", &spec], extra].concat());
            part
        })
        .collect()
}

fn merge(parts: &[PathBuf], out: &Path) -> std::process::Output {
    let mut args = vec!["merge"];
    args.extend(parts.iter().map(|p| s(p)));
    args.extend(["-o", s(out), "-q"]);
    run(&args)
}

/// On the sharded fixture (side files, an index, several shards): every number of parts,
/// from one to more than there are tensors, merges to the single prune's bytes.
#[test]
fn merged_parts_are_the_single_prune_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = (fixture("sharded/base"), fixture("sharded/finetuned"));
    let whole = dir.path().join("whole.fapm");
    prune(&base, &ft, &whole, &[]);
    let want = std::fs::read(&whole).unwrap();
    let tensors = serde_json::from_slice::<serde_json::Value>(&ok(&["inspect", s(&whole), "--json"]).stdout).unwrap()
        ["tensors"]
        .as_array()
        .unwrap()
        .len() as u32;
    for count in [1, 2, 3, 7, tensors, tensors + 2] {
        let sub = dir.path().join(format!("n{count}"));
        std::fs::create_dir(&sub).unwrap();
        let mut parts = prune_parts(&base, &ft, &sub, count, &[]);
        parts.reverse();
        let merged = sub.join("merged.fapm");
        let o = merge(&parts, &merged);
        assert!(o.status.success(), "{count} parts: {}", String::from_utf8_lossy(&o.stderr));
        assert!(std::fs::read(&merged).unwrap() == want, "{count} parts merge to other bytes");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Generated checkpoints (extended tensors, whole tensors, a base-only one), options that
    /// a part must carry, any number of parts merged in any order: the single prune's bytes.
    #[test]
    fn parts_in_any_order_merge_to_the_single_prune(
        seed in any::<u64>(),
        count in 1u32..8,
        sparsity in prop::sample::select(vec!["0.9", "0.5"]),
        penalty in prop::sample::select(vec!["1", "0.5"]),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (base, ft) = generated_pair(dir.path(), seed);
        let opts = ["--sparsity", sparsity, "--penalty", penalty, "--sparsity-for", "t1=0.25"];
        let whole = dir.path().join("whole.fapm");
        prune(&base, &ft, &whole, &opts);
        let mut parts = prune_parts(&base, &ft, dir.path(), count, &opts);
        let mut rng = Rng(seed | 1);
        for i in (1..parts.len()).rev() {
            parts.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let merged = dir.path().join("merged.fapm");
        let o = merge(&parts, &merged);
        prop_assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        prop_assert!(std::fs::read(&merged).unwrap() == std::fs::read(&whole).unwrap());
    }
}

/// Five float tensors of random sizes (some extended), an integer one, a base-only one.
fn generated_pair(dir: &Path, seed: u64) -> (PathBuf, PathBuf) {
    let mut rng = Rng(seed | 1);
    let (mut b, mut f) = (Vec::new(), Vec::new());
    let floats = |rng: &mut Rng, n: u64| -> Vec<u8> {
        (0..n).flat_map(|_| ((rng.normal() * 0.02) as f32).to_le_bytes()).collect()
    };
    for i in 0..5 {
        let (rows, cols, extra) = (1 + rng.below(40), 1 + rng.below(40), rng.below(3) * rng.below(5));
        let base = floats(&mut rng, rows * cols);
        let mut ft: Vec<u8> = base
            .chunks(4)
            .flat_map(|x| {
                let v = f32::from_le_bytes(x.try_into().unwrap());
                (if rng.below(3) == 0 { v + rng.normal() as f32 * 0.002 } else { v }).to_le_bytes()
            })
            .collect();
        ft.extend(floats(&mut rng, extra * cols));
        let name = format!("t{i}");
        b.push(T::new(&name, fapm_stages::dtype::DType::F32, &[rows, cols], base));
        f.push(T::new(&name, fapm_stages::dtype::DType::F32, &[rows + extra, cols], ft));
    }
    f.push(T::new("ids", fapm_stages::dtype::DType::I64, &[2], vec![7; 16]));
    b.push(T::new("only_in_base", fapm_stages::dtype::DType::F32, &[1], vec![0; 4]));
    let (base, ft) = (dir.join("base.safetensors"), dir.join("ft.safetensors"));
    write_safetensors(&base, &b);
    write_safetensors(&ft, &f);
    (base, ft)
}

/// Parts that do not belong together, missing, repeated or corrupt parts, and whole deltas
/// are refused by merge, naming the part; nothing is left behind. A part is not a delta to
/// apply: apply says to merge, verify and inspect say what it is.
#[test]
fn wrong_parts_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, ft) = (fixture("sharded/base"), fixture("sharded/finetuned"));
    let parts = prune_parts(&base, &ft, d, 3, &[]);
    let out = d.join("merged.fapm");
    let keep: Vec<String> = (1..=3).map(|i| format!("part-{i}.fapm")).collect();
    let mut keep: Vec<&str> = keep.iter().map(String::as_str).collect();

    assert_error(&merge(&parts[..2], &out), &["part 3 of 3 is missing", "--part 3/3"], "missing part");
    let twice = [parts[0].clone(), parts[1].clone(), parts[1].clone(), parts[2].clone()];
    assert_error(&merge(&twice, &out), &["part-2.fapm", "this file is given twice"], "repeated part");

    let other = d.join("other");
    let sub = |name: &str| {
        let p = other.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    let sparser = prune_parts(&base, &ft, &sub("sparser"), 3, &["--sparsity", "0.95"]);
    let mixed = [parts[0].clone(), sparser[1].clone(), parts[2].clone()];
    assert_error(&merge(&mixed, &out), &["sparser/part-2.fapm", "sparsity differs"], "other options");
    let four = prune_parts(&base, &ft, &sub("four"), 4, &[]);
    let mixed = [parts[0].clone(), four[1].clone(), parts[2].clone()];
    assert_error(&merge(&mixed, &out), &["four/part-2.fapm", "number of parts differs"], "other count");
    // The same tensors in another shard file: another base, by its layout.
    let renamed = sub("renamed-base");
    reshard(&base, &renamed);
    let foreign = prune_parts(&renamed, &ft, &sub("foreign"), 3, &[]);
    let mixed = [parts[0].clone(), parts[1].clone(), foreign[2].clone()];
    assert_error(&merge(&mixed, &out), &["foreign/part-3.fapm", "base checkpoint differs"], "other base");

    let whole = d.join("whole.fapm");
    prune(&base, &ft, &whole, &[]);
    keep.push("whole.fapm");
    assert_error(&merge(&[whole.clone(), parts[1].clone()], &out), &["whole.fapm", "whole delta"], "whole delta");

    let corrupt = d.join("corrupt.fapm");
    let mut bytes = std::fs::read(&parts[1]).unwrap();
    bytes[20] ^= 1; // inside the first block
    std::fs::write(&corrupt, &bytes).unwrap();
    keep.push("corrupt.fapm");
    let corrupted = [parts[0].clone(), corrupt.clone(), parts[2].clone()];
    assert_error(&merge(&corrupted, &out), &["corrupt.fapm", "corrupt"], "corrupt part");
    keep.push("other");
    assert_eq!(leftovers(d, &keep), Vec::<String>::new(), "merge left output behind");

    let o = run(&["apply", "--base", s(&base), "--delta", s(&parts[1]), "-o", s(&d.join("model"))]);
    assert_error(&o, &["part-2.fapm", "part 2 of 3", "fapm merge"], "apply of a part");
    let o = ok(&["verify", s(&parts[1])]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("part     2 of 3"));
    let o = ok(&["inspect", s(&parts[1])]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("part 2 of 3"));
}

/// `--part auto` reads a Slurm array task's place, `auto/N` a Kubernetes completion index,
/// and both write what `--part I/N` writes.
#[test]
fn auto_parts_come_from_the_job_environment() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = (fixture("sharded/base"), fixture("sharded/finetuned"));
    let by_hand = dir.path().join("hand.fapm");
    prune(&base, &ft, &by_hand, &["--part", "2/3"]);
    let args = |out: &Path, part: &str| {
        let mut c = crate::util::fapm();
        c.args(["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(out), "-q", "--part", part]);
        c.env_remove("SLURM_ARRAY_TASK_ID").env_remove("JOB_COMPLETION_INDEX");
        c
    };
    let slurm = dir.path().join("slurm.fapm");
    let o = args(&slurm, "auto")
        .envs([
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "4"),
            ("SLURM_ARRAY_TASK_MAX", "6"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let k8s = dir.path().join("k8s.fapm");
    let o = args(&k8s, "auto/3").env("JOB_COMPLETION_INDEX", "1").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = std::fs::read(&by_hand).unwrap();
    assert!(std::fs::read(&slurm).unwrap() == want && std::fs::read(&k8s).unwrap() == want);
    let o = args(&dir.path().join("x.fapm"), "auto").output().unwrap();
    assert_error(&o, &["--part", "SLURM_ARRAY_TASK_ID"], "auto outside a job");
}

/// Copies a checkpoint directory's tensors into one file named differently.
fn reshard(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let tensors: Vec<T> = crate::util::read_tensors(from)
        .into_iter()
        .map(|(name, dtype, shape, data)| T::new(&name, dtype, &shape, data))
        .collect();
    write_safetensors(&to.join("model.safetensors"), &tensors);
}

//! The streaming pipeline against the in-memory reference, on many generated checkpoints:
//! every dtype pair, ties, zeros, NaN and Inf, empty and scalar tensors, tensors spanning
//! many chunks, extended tensors (resized vocabularies), both metrics, penalty strengths,
//! per-tensor sparsity, both threshold modes, several thread counts.

use std::path::Path;

use fapm::config::{self, ApplyConfig, PruneConfig};
use fapm::RunControl;
use fapm_stages::dtype::DType;
use fapm_stages::threshold::score::Metric as M;
use fapm_stages::threshold::select::ThresholdMode;
use proptest::prelude::*;

use crate::reference::{self, Metric};
use crate::util::{read_tensors, write_safetensors, Rng, Tensors, T};

const FLOATS: [DType; 4] = [DType::BF16, DType::F16, DType::F32, DType::F64];
/// Small blocks, so that a few thousand elements span many chunks and windows.
const BLOCK: u64 = 512;

/// Encodes an f64 in `dtype` (through f32, as a checkpoint saved from f32 would be).
fn encode(dtype: DType, x: f64) -> Vec<u8> {
    if dtype == DType::F64 {
        return x.to_le_bytes().to_vec();
    }
    reference::narrow(dtype, x as f32).to_le_bytes()[..dtype.size()].to_vec()
}

/// A base and fine-tuned pair of values for one tensor, in one of several styles.
fn values(rng: &mut Rng, n: usize, style: u64) -> (Vec<f64>, Vec<f64>) {
    let mut base = Vec::with_capacity(n);
    let mut ft = Vec::with_capacity(n);
    for _ in 0..n {
        let (b, f) = match style {
            // Realistic: small weights, a fraction nudged a little.
            0 => {
                let b = rng.normal() * 0.02;
                let f = if rng.below(10) < 3 { b + rng.normal() * 0.002 } else { b };
                (b, f)
            }
            // Heavy ties: few distinct values and changes.
            1 => {
                let b = [0.0, 0.5, -0.5, 1.0, -1.0][rng.below(5) as usize];
                let f = b + [0.0, 0.25, -0.25, 0.5][rng.below(4) as usize];
                (b, f)
            }
            // Specials everywhere.
            _ => {
                let pick = |r: &mut Rng| match r.below(9) {
                    0 => f64::NAN,
                    1 => f64::INFINITY,
                    2 => f64::NEG_INFINITY,
                    3 => 0.0,
                    4 => -0.0,
                    _ => r.normal(),
                };
                let b = pick(rng);
                let f = if rng.below(2) == 0 { b } else { pick(rng) };
                (b, f)
            }
        };
        base.push(b);
        ft.push(f);
    }
    (base, ft)
}

struct Case {
    base: Vec<T>,
    ft: Vec<T>,
}

fn shape_for(rng: &mut Rng, n: usize) -> Vec<u64> {
    match (n, rng.below(3)) {
        (1, 0) => vec![],
        (_, 1) if n.is_multiple_of(4) => vec![4, n as u64 / 4],
        _ => vec![n as u64],
    }
}

fn gen_case(seed: u64, tensors: usize, max_n: u64) -> Case {
    gen_case_sized(seed, tensors, 0, max_n)
}

/// [`gen_case`] with tensors of `min_n..max_n` elements (and some tiny ones).
fn gen_case_sized(seed: u64, tensors: usize, min_n: u64, max_n: u64) -> Case {
    let mut rng = Rng(seed | 1);
    let (mut base, mut ft) = (Vec::new(), Vec::new());
    for i in 0..tensors {
        let n = match rng.below(6) {
            0 => rng.below(3) as usize, // empty, scalar-sized, two
            _ => (min_n + rng.below(max_n - min_n)) as usize,
        };
        let (fd, bd) = if rng.below(3) == 0 {
            (FLOATS[rng.below(4) as usize], FLOATS[rng.below(4) as usize])
        } else {
            let d = FLOATS[rng.below(4) as usize];
            (d, d)
        };
        let style = rng.below(3);
        let (b, mut f) = values(&mut rng, n, style);
        let shape = shape_for(&mut rng, n);
        let name = format!("t{i}");
        base.push(T::new(&name, bd, &shape, b.iter().flat_map(|&x| encode(bd, x)).collect()));
        // Some tensors are extended by appended rows (a resized vocabulary), zeros among them.
        let mut ft_shape = shape.clone();
        if !shape.is_empty() && rng.below(4) == 0 {
            let rows = 1 + rng.below(3 + max_n / 1000);
            let row: u64 = shape[1..].iter().product();
            ft_shape[0] += rows;
            let (_, extra) = values(&mut rng, (rows * row) as usize, 2);
            f.extend(extra.iter().map(|&x| if rng.below(4) == 0 { 0.0 } else { x }));
        }
        ft.push(T::new(&name, fd, &ft_shape, f.iter().flat_map(|&x| encode(fd, x)).collect()));
    }
    // A whole tensor (integers) and a tensor only the base has.
    ft.push(T::new("ids", DType::I32, &[3], vec![1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]));
    base.push(T::new("ids", DType::I32, &[3], vec![0; 12]));
    base.push(T::new("base_only", DType::F32, &[1], vec![0; 4]));
    // The order the files will have, which the outputs must keep.
    crate::util::sort_as_written(&mut ft);
    Case { base, ft }
}

fn prune_cfg(dir: &Path, sparsity: &str, metric: M, threshold: ThresholdMode, threads: usize) -> PruneConfig {
    PruneConfig {
        base: dir.join("base.safetensors"),
        finetuned: dir.join("ft.safetensors"),
        output: dir.join(format!("d-{threads}-{sparsity}.fapm")),
        sparsity: config::sparsity(sparsity).unwrap(),
        metric,
        threshold,
        include: vec![],
        exclude: config::regexes("--exclude", &["^t1$".into()]).unwrap(),
        threads,
        memory_budget: config::DEFAULT_MEMORY_BUDGET,
        overwrite: true,
        block_elems: BLOCK,
        sparsity_for: vec![],
        penalty: config::Penalty::default(),
        part: None,
        base_repo: None,
        finetuned_repo: None,
    }
}

/// `prune_cfg` with a penalty strength and, for tensor `t2`, a sparsity of its own.
fn tuned_cfg(dir: &Path, sparsity: &str, metric: M, penalty: &str, t2: Option<&str>, threads: usize) -> PruneConfig {
    let mut cfg = prune_cfg(dir, sparsity, metric, ThresholdMode::Exact, threads);
    cfg.penalty = config::penalty(penalty).unwrap();
    if let Some(s) = t2 {
        cfg.sparsity_for =
            config::sparsity_rules(&["^nothing$=0".into(), format!("^t2$={s}"), "t=0.125".into()]).unwrap();
    }
    cfg
}

/// Prunes and applies; returns the delta's bytes and the rebuilt tensors.
fn round_trip(cfg: &PruneConfig) -> (Vec<u8>, Tensors) {
    let ctl = RunControl::default();
    fapm::prune(cfg, &ctl).unwrap();
    let out = cfg.output.with_extension("out.safetensors");
    let apply = ApplyConfig {
        base: Some(cfg.base.clone()),
        delta: cfg.output.clone(),
        hub: fapm::hub::Env::read(|_| None),
        output: Some(out.clone()),
        threads: cfg.threads,
        // The budget under test is prune's; below the CLI's minimum, apply could not read the
        // manifest of thousands of 512-element blocks.
        memory_budget: cfg.memory_budget.max(config::DEFAULT_MEMORY_BUDGET),
        overwrite: true,
    };
    fapm::apply(&apply, &ctl).unwrap();
    (std::fs::read(&cfg.output).unwrap(), read_tensors(&out))
}

/// Every tensor of `out` is what the reference builds for exact mode.
fn check_exact(case: &Case, out: &Tensors, metric: M, sparsity: &str) -> Result<(), TestCaseError> {
    check_tuned(case, out, metric, 1.0, &|_| sparsity)
}

/// [`check_exact`] with a penalty strength and each tensor's sparsity.
fn check_tuned<'a>(
    case: &Case,
    out: &Tensors,
    metric: M,
    penalty: f32,
    sparsity_of: &dyn Fn(&str) -> &'a str,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(out.len(), case.ft.len());
    for (ft, (name, dtype, shape, bytes)) in case.ft.iter().zip(out) {
        prop_assert_eq!(&ft.name, name);
        prop_assert_eq!(ft.dtype, *dtype);
        prop_assert_eq!(&ft.shape, shape);
        let base = case.base.iter().find(|b| b.name == ft.name).unwrap();
        if !ft.dtype.is_diffable() {
            prop_assert_eq!(&ft.data, bytes);
            continue;
        }
        let n = (base.data.len() / base.dtype.size()) as u64;
        let keep = (ft.name != "t1").then(|| reference::keep_count(n, sparsity_of(&ft.name)));
        let (want, _) = reference::expected_penalised(
            ft.dtype,
            &ft.data,
            base.dtype,
            &base.data,
            ref_metric(metric),
            penalty,
            keep,
        );
        prop_assert!(&want == bytes, "tensor {} ({} from {}) differs", ft.name, ft.dtype, base.dtype);
    }
    Ok(())
}

fn ref_metric(m: M) -> Metric {
    match m {
        M::Fapm => Metric::Fapm,
        M::Magnitude => Metric::Magnitude,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Exact mode agrees bit for bit with the reference, whatever the thread count, and the
    /// delta's bytes do not depend on it.
    #[test]
    fn exact_matches_reference(
        seed in any::<u64>(),
        tensors in 1usize..4,
        sparsity in prop::sample::select(vec!["0", "1", "0.9", "0.5", "0.37", "0.999", "0.1"]),
        magnitude in any::<bool>(),
    ) {
        let case = gen_case(seed, tensors, 3000);
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(&dir.path().join("base.safetensors"), &case.base);
        write_safetensors(&dir.path().join("ft.safetensors"), &case.ft);
        let metric = if magnitude { M::Magnitude } else { M::Fapm };
        let (delta1, out) = round_trip(&prune_cfg(dir.path(), sparsity, metric, ThresholdMode::Exact, 1));
        let (delta3, out3) = round_trip(&prune_cfg(dir.path(), sparsity, metric, ThresholdMode::Exact, 3));
        prop_assert!(delta1 == delta3, "delta bytes depend on --threads");
        prop_assert_eq!(&out, &out3);
        check_exact(&case, &out, metric, sparsity)?;
    }

    /// The penalty strength and per-tensor sparsity agree with the reference: `t2` has a rule
    /// of its own, the others fall through to `t=0.125` (the first matching rule wins), and
    /// without rules every tensor takes `--sparsity`.
    #[test]
    fn penalty_and_per_tensor_sparsity_match_reference(
        seed in any::<u64>(),
        tensors in 3usize..5,
        sparsity in prop::sample::select(vec!["0.9", "0.5", "0.99"]),
        t2 in prop::sample::select(vec![None, Some("0"), Some("0.75"), Some("1")]),
        penalty in prop::sample::select(vec!["0", "0.25", "0.5", "1", "2", "7.3"]),
    ) {
        let case = gen_case(seed, tensors, 3000);
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(&dir.path().join("base.safetensors"), &case.base);
        write_safetensors(&dir.path().join("ft.safetensors"), &case.ft);
        let (_, out) = round_trip(&tuned_cfg(dir.path(), sparsity, M::Fapm, penalty, t2, 2));
        let of = |name: &str| match t2 {
            Some(s) if name == "t2" => s,
            Some(_) => "0.125",
            None => sparsity,
        };
        check_tuned(&case, &out, M::Fapm, penalty.parse().unwrap(), &of)?;
    }

    /// `--penalty 0` is magnitude pruning bit for bit (SPEC section 3): the same model, in
    /// both threshold modes, also where a base weight is 0 and the penalty term is infinite.
    #[test]
    fn penalty_zero_is_magnitude(
        seed in any::<u64>(),
        sparsity in prop::sample::select(vec!["0.9", "0.5", "0.99"]),
        approx in any::<bool>(),
    ) {
        let case = gen_case(seed, 3, 3000);
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(&dir.path().join("base.safetensors"), &case.base);
        write_safetensors(&dir.path().join("ft.safetensors"), &case.ft);
        let mode = if approx { ThresholdMode::Approx } else { ThresholdMode::Exact };
        let (_, magnitude) = round_trip(&prune_cfg(dir.path(), sparsity, M::Magnitude, mode, 2));
        let mut cfg = tuned_cfg(dir.path(), sparsity, M::Fapm, "0", None, 2);
        cfg.threshold = mode;
        let (_, zero) = round_trip(&cfg);
        prop_assert_eq!(zero, magnitude);
    }

    /// Tensors of many chunks, from which the threshold pass gathers the candidates above a
    /// sampled floor: the delta is the same whether those hits all fit the memory budget,
    /// some do, or none, in both modes; and exact mode still agrees with the reference.
    #[test]
    fn the_budget_for_hits_changes_nothing_but_speed(
        seed in any::<u64>(),
        sparsity in prop::sample::select(vec!["0.9", "0.5", "0.99", "0.75"]),
        magnitude in any::<bool>(),
        approx in any::<bool>(),
    ) {
        let case = gen_case_sized(seed, 3, 20_000, 120_000);
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(&dir.path().join("base.safetensors"), &case.base);
        write_safetensors(&dir.path().join("ft.safetensors"), &case.ft);
        let metric = if magnitude { M::Magnitude } else { M::Fapm };
        let mode = if approx { ThresholdMode::Approx } else { ThresholdMode::Exact };
        let mut deltas = Vec::new();
        // The default budget holds every hit; 10M (below the CLI's minimum) about 1 MiB of
        // them; 1M none.
        for budget in [config::DEFAULT_MEMORY_BUDGET, 10 << 20, 1 << 20] {
            let mut cfg = prune_cfg(dir.path(), sparsity, metric, mode, 2);
            cfg.memory_budget = budget;
            let (delta, out) = round_trip(&cfg);
            if !approx {
                check_exact(&case, &out, metric, sparsity)?;
            }
            deltas.push(delta);
        }
        prop_assert!(deltas.windows(2).all(|w| w[0] == w[1]), "delta bytes depend on the budget");
    }

    /// Approx mode keeps exactly as many positions as exact mode, and everything it prunes
    /// scores within SPEC's tolerance of everything it keeps.
    #[test]
    fn approx_keeps_k_within_tolerance(
        seed in any::<u64>(),
        sparsity in prop::sample::select(vec!["0.9", "0.5", "0.75", "0.99"]),
        magnitude in any::<bool>(),
    ) {
        let case = gen_case(seed, 3, 4000);
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(&dir.path().join("base.safetensors"), &case.base);
        write_safetensors(&dir.path().join("ft.safetensors"), &case.ft);
        let metric = if magnitude { M::Magnitude } else { M::Fapm };
        let (_, out) = round_trip(&prune_cfg(dir.path(), sparsity, metric, ThresholdMode::Approx, 2));
        for (ft, (_, _, _, bytes)) in case.ft.iter().zip(&out) {
            if ft.name == "t1" || !ft.dtype.is_diffable() {
                continue;
            }
            let base = case.base.iter().find(|b| b.name == ft.name).unwrap();
            // An extended tensor's prefix of the base's length is what is pruned.
            let n = base.data.len() / base.dtype.size();
            let prefix = &ft.data[..n * ft.dtype.size()];
            let (_, exact_kept) = reference::expected(ft.dtype, prefix, base.dtype, &base.data, ref_metric(metric), Some(reference::keep_count(n as u64, sparsity)));
            let conv = reference::converted(ft.dtype, base.dtype, &base.data);
            let scores = reference::scores(ft.dtype, prefix, base.dtype, &base.data, ref_metric(metric));
            let ftbits = |i| reference::bits(ft.dtype, prefix, i);
            let (mut kept, mut pruned) = (Vec::new(), Vec::new());
            for (i, &c) in conv.iter().enumerate() {
                if ftbits(i) == c {
                    continue;
                }
                if reference::bits(ft.dtype, bytes, i) == ftbits(i) { kept.push(i) } else { pruned.push(i) }
            }
            prop_assert_eq!(kept.len(), exact_kept.len());
            let min_kept = kept.iter().map(|&i| scores[i]).fold(f32::INFINITY, f32::min);
            let max_pruned = pruned.iter().map(|&i| scores[i]).fold(f32::NEG_INFINITY, f32::max);
            if !kept.is_empty() && !pruned.is_empty() {
                if min_kept == f32::NEG_INFINITY {
                    prop_assert_eq!(max_pruned, f32::NEG_INFINITY);
                } else {
                    let bound = min_kept + min_kept.abs() / 128.0 + f32::from_bits(0x0080_0000);
                    prop_assert!(max_pruned <= bound, "pruned {} > kept {} + tolerance", max_pruned, min_kept);
                }
            }
        }
    }
}

/// An extended tensor whose base ends far into a chunk of many cache-sized pieces (the
/// reconstructed chunk is built 64 KiB at a time): the appended rows start in a later piece
/// than the first, and whole chunks lie past the base. Agrees with the reference.
#[test]
fn extended_tensors_in_chunks_of_many_pieces() {
    let mut rng = Rng(11);
    let (rows, extra, cols) = (300u64, 97u64, 1000u64);
    for (fd, bd) in [(DType::BF16, DType::BF16), (DType::F32, DType::F16), (DType::F64, DType::F32)] {
        let (b, mut f) = values(&mut rng, (rows * cols) as usize, 0);
        let (_, appended) = values(&mut rng, (extra * cols) as usize, 2);
        f.extend(appended);
        let case = Case {
            base: vec![T::new("embed", bd, &[rows, cols], b.iter().flat_map(|&x| encode(bd, x)).collect())],
            ft: vec![T::new("embed", fd, &[rows + extra, cols], f.iter().flat_map(|&x| encode(fd, x)).collect())],
        };
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(&dir.path().join("base.safetensors"), &case.base);
        write_safetensors(&dir.path().join("ft.safetensors"), &case.ft);
        let mut cfg = prune_cfg(dir.path(), "0.9", M::Fapm, ThresholdMode::Exact, 2);
        cfg.block_elems = 1 << 17;
        let (_, out) = round_trip(&cfg);
        check_exact(&case, &out, M::Fapm, "0.9").unwrap();
    }
}

/// Sparsity 0 rebuilds the fine-tuned file bit for bit; sparsity 1 rebuilds the base
/// (converted to the fine-tuned dtypes) in every diffable tensor.
#[test]
fn sparsity_zero_and_one_are_the_endpoints() {
    let case = gen_case(7, 4, 5000);
    let dir = tempfile::tempdir().unwrap();
    write_safetensors(&dir.path().join("base.safetensors"), &case.base);
    write_safetensors(&dir.path().join("ft.safetensors"), &case.ft);
    let mut cfg = prune_cfg(dir.path(), "0", M::Fapm, ThresholdMode::Exact, 2);
    cfg.exclude.clear();
    round_trip(&cfg);
    let rebuilt = std::fs::read(cfg.output.with_extension("out.safetensors")).unwrap();
    assert_eq!(rebuilt, std::fs::read(dir.path().join("ft.safetensors")).unwrap());

    let cfg = prune_cfg(dir.path(), "1", M::Fapm, ThresholdMode::Exact, 2);
    let (_, out) = round_trip(&cfg);
    for (ft, (name, _, _, bytes)) in case.ft.iter().zip(&out) {
        if !ft.dtype.is_diffable() || name == "t1" {
            continue;
        }
        let base = case.base.iter().find(|b| &b.name == name).unwrap();
        let conv = reference::converted(ft.dtype, base.dtype, &base.data);
        let want: Vec<u8> = conv.iter().flat_map(|c| c.to_le_bytes()[..ft.dtype.size()].to_vec()).collect();
        assert_eq!(&want, bytes, "{name}");
    }
}

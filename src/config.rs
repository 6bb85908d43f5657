//! Validated settings for each command: what the flags mean once checked. Bad values are
//! [`Error::Config`] (exit code 1), unlike usage errors that clap reports (exit code 2).

use std::path::PathBuf;

use fapm_stages::format::RepoRecord;
use fapm_stages::read::partition::PartSpec;
use fapm_stages::threshold::score::Metric;
use fapm_stages::threshold::select::{Sparsity, ThresholdMode};
use fapm_stages::Error;
use regex::Regex;

use crate::hub::{self, Want};

/// The default `--memory-budget`.
pub const DEFAULT_MEMORY_BUDGET: u64 = fapm_stages::DEFAULT_MEMORY_BUDGET;
/// The smallest `--memory-budget` fapm can work in.
pub const MIN_MEMORY_BUDGET: u64 = 64 << 20;

/// Everything `prune` needs.
#[derive(Debug, Clone)]
pub struct PruneConfig {
    /// The base checkpoint.
    pub base: PathBuf,
    /// The fine-tuned checkpoint.
    pub finetuned: PathBuf,
    /// Where the delta goes.
    pub output: PathBuf,
    /// Fraction of each pruned tensor's elements to prune.
    pub sparsity: Sparsity,
    /// `--sparsity-for` rules: the first whose regex matches a tensor's name sets its sparsity.
    pub sparsity_for: Vec<SparsityRule>,
    /// How positions are scored.
    pub metric: Metric,
    /// The FAPM penalty strength `l` in `S = |d| - l * t`.
    pub penalty: Penalty,
    /// Exact or approximate k-th score.
    pub threshold: ThresholdMode,
    /// Tensors to prune (all when empty).
    pub include: Vec<Regex>,
    /// Tensors never to prune.
    pub exclude: Vec<Regex>,
    /// Worker threads.
    pub threads: usize,
    /// Bytes fapm may allocate.
    pub memory_budget: u64,
    /// Replace an existing output.
    pub overwrite: bool,
    /// Elements per block of pruned and dense tensors: a power of two, at least 512
    /// (tests use small blocks to exercise many chunks; the CLI always uses the default).
    pub block_elems: u64,
    /// Write only this part of a partitioned prune (SPEC section 7).
    pub part: Option<PartSpec>,
    /// The base's repository and commit, when it was named by repo id (recorded in the delta).
    pub base_repo: Option<RepoRecord>,
    /// The fine-tune's repository and commit, when it was named by repo id.
    pub finetuned_repo: Option<RepoRecord>,
}

impl PruneConfig {
    /// Whether tensor `name` is selected for pruning.
    pub fn selects(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|r| r.is_match(name)))
            && !self.exclude.iter().any(|r| r.is_match(name))
    }

    /// How tensor `name` is treated when it is diffable: pruned at its sparsity, or dense
    /// (`None`) when it is not selected.
    pub fn pruning(&self, name: &str) -> Option<Sparsity> {
        self.selects(name).then(|| self.sparsity_of(name))
    }

    /// The sparsity of tensor `name`: the first matching `--sparsity-for` rule's, else
    /// `--sparsity`.
    pub fn sparsity_of(&self, name: &str) -> Sparsity {
        self.sparsity_for.iter().find(|r| r.pattern.is_match(name)).map_or(self.sparsity, |r| r.sparsity)
    }
}

/// One `--sparsity-for RE=S` rule.
#[derive(Debug, Clone)]
pub struct SparsityRule {
    /// The tensors it applies to.
    pub pattern: Regex,
    /// Their sparsity.
    pub sparsity: Sparsity,
}

/// `--penalty L`: the decimal as given (recorded in the delta) and the nearest f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Penalty {
    /// `L` as given.
    pub text: String,
    /// The nearest f32.
    pub value: f32,
}

impl Default for Penalty {
    fn default() -> Self {
        Penalty { text: "1".into(), value: 1.0 }
    }
}

/// Everything `apply` and `verify --base` need.
#[derive(Debug, Clone)]
pub struct ApplyConfig {
    /// The base checkpoint (`None`: the one the delta records, found as a repo id).
    pub base: Option<PathBuf>,
    /// The delta.
    pub delta: PathBuf,
    /// How the delta's recorded base is found.
    pub hub: hub::Env,
    /// Where the model goes (`None`: verify only, write nothing).
    pub output: Option<PathBuf>,
    /// Worker threads.
    pub threads: usize,
    /// Bytes fapm may allocate.
    pub memory_budget: u64,
    /// Replace an existing output.
    pub overwrite: bool,
}

/// Everything `verify` needs.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// The delta.
    pub delta: PathBuf,
    /// With a base: an apply that writes nothing; without: against the base the delta records
    /// (when it records one and `delta_only` is not set), else the delta's own hashes.
    pub base: Option<PathBuf>,
    /// Check the delta's own hashes only, even when it records its base.
    pub delta_only: bool,
    /// How the delta's recorded base is found.
    pub hub: hub::Env,
    /// Worker threads.
    pub threads: usize,
    /// Bytes fapm may allocate.
    pub memory_budget: u64,
}

/// Everything `merge` needs.
#[derive(Debug, Clone)]
pub struct MergeConfig {
    /// The part deltas, in any order.
    pub parts: Vec<PathBuf>,
    /// Where the delta goes.
    pub output: PathBuf,
    /// Bytes fapm may allocate, for all the parts together.
    pub memory_budget: u64,
    /// Replace an existing output.
    pub overwrite: bool,
}

/// Everything `inspect` needs.
#[derive(Debug, Clone)]
pub struct InspectConfig {
    /// The delta.
    pub delta: PathBuf,
    /// Bytes fapm may allocate.
    pub memory_budget: u64,
}

/// The options of a command as given, before they are checked: what the command line's
/// flags and the Python package's keyword arguments convert into. Each `check` builds the
/// command's validated settings, so both front ends refuse the same values with the same
/// message.
pub mod options {
    use std::path::PathBuf;

    /// Options every command that reads a delta or a checkpoint takes.
    #[derive(Debug, Clone, Default)]
    pub struct Run {
        /// Worker threads (`None` or 0: one per core).
        pub threads: Option<usize>,
        /// `--memory-budget` as given (`None`: the default).
        pub memory_budget: Option<String>,
    }

    /// `prune`'s options as given.
    #[derive(Debug, Clone)]
    pub struct Prune {
        /// The base checkpoint.
        pub base: PathBuf,
        /// The fine-tuned checkpoint.
        pub finetuned: PathBuf,
        /// Where the delta goes.
        pub output: PathBuf,
        /// `--sparsity`.
        pub sparsity: String,
        /// `--sparsity-for RE=S` rules.
        pub sparsity_for: Vec<String>,
        /// `--metric`.
        pub metric: String,
        /// `--penalty`.
        pub penalty: String,
        /// `--threshold`.
        pub threshold: String,
        /// `--include` patterns.
        pub include: Vec<String>,
        /// `--exclude` patterns.
        pub exclude: Vec<String>,
        /// `--part`.
        pub part: Option<String>,
        /// Replace an existing output.
        pub overwrite: bool,
        /// Threads and memory.
        pub run: Run,
    }

    /// A delta as named: a path, a delta folder or a repo id (`org/name[@REV]`, `hf://`).
    #[derive(Debug, Clone)]
    pub struct Delta {
        /// The name.
        pub name: PathBuf,
        /// `--revision`, for a repo id.
        pub revision: Option<String>,
    }

    impl Prune {
        /// The defaults of every option but the paths (as `fapm prune --help` shows them).
        pub fn new(base: PathBuf, finetuned: PathBuf, output: PathBuf) -> Self {
            Prune {
                base,
                finetuned,
                output,
                sparsity: "0.9".into(),
                sparsity_for: Vec::new(),
                metric: "fapm".into(),
                penalty: "1".into(),
                threshold: "exact".into(),
                include: Vec::new(),
                exclude: Vec::new(),
                part: None,
                overwrite: false,
                run: Run::default(),
            }
        }
    }
}

impl options::Prune {
    /// Checks every option, then finds the checkpoints (a repo id in the Hugging Face cache,
    /// fetched when missing: [`hub`]); `env` reads the environment for `--part auto` and the
    /// Hub's settings.
    pub fn check(&self, env: impl Fn(&str) -> Option<String>) -> Result<PruneConfig, Error> {
        let mut cfg = PruneConfig {
            base: self.base.clone(),
            finetuned: self.finetuned.clone(),
            output: self.output.clone(),
            sparsity: sparsity(&self.sparsity)?,
            sparsity_for: sparsity_rules(&self.sparsity_for)?,
            metric: metric(&self.metric)?,
            penalty: penalty(&self.penalty)?,
            threshold: threshold(&self.threshold)?,
            include: regexes("--include", &self.include)?,
            exclude: regexes("--exclude", &self.exclude)?,
            threads: threads(self.run.threads),
            memory_budget: memory_budget(self.run.memory_budget.as_deref())?,
            overwrite: self.overwrite,
            block_elems: fapm_stages::format::BLOCK_ELEMS,
            part: self.part.as_deref().map(|p| part(p, &env)).transpose()?,
            base_repo: None,
            finetuned_repo: None,
        };
        if cfg.metric == Metric::Magnitude && cfg.penalty.value != 1.0 {
            return Err(Error::Config("--penalty applies to --metric fapm only".into()));
        }
        let hub = hub::Env::read(&env);
        let base = hub::resolve_text(&self.base, None, Want::Weights, &hub)?;
        let ft = hub::resolve_text(&self.finetuned, None, Want::Model, &hub)?;
        (cfg.base, cfg.base_repo, cfg.finetuned, cfg.finetuned_repo) = (base.path, base.repo, ft.path, ft.repo);
        Ok(cfg)
    }
}

impl options::Run {
    /// The checked thread count and memory budget.
    pub fn check(&self) -> Result<(usize, u64), Error> {
        Ok((threads(self.threads), memory_budget(self.memory_budget.as_deref())?))
    }
}

impl options::Delta {
    /// The delta file this names ([`hub::resolve`]).
    pub fn resolve(&self, hub: &hub::Env) -> Result<PathBuf, Error> {
        Ok(hub::resolve_text(&self.name, self.revision.as_deref(), Want::Delta, hub)?.path)
    }
}

/// A base checkpoint named by path or repo id, found.
fn base_path(base: Option<&std::path::Path>, hub: &hub::Env) -> Result<Option<PathBuf>, Error> {
    base.map(|b| hub::resolve_text(b, None, Want::Weights, hub).map(|r| r.path)).transpose()
}

impl ApplyConfig {
    /// `apply`'s settings (with `output`) or those of `verify --base` (without), checked;
    /// the delta and base found ([`hub`]; `env` reads the Hub's settings).
    pub fn new(
        base: Option<PathBuf>,
        delta: &options::Delta,
        output: Option<PathBuf>,
        overwrite: bool,
        run: &options::Run,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, Error> {
        let (threads, memory_budget) = run.check()?;
        let hub = hub::Env::read(env);
        let delta = delta.resolve(&hub)?;
        let base = base_path(base.as_deref(), &hub)?;
        Ok(ApplyConfig { base, delta, hub, output, threads, memory_budget, overwrite })
    }
}

impl VerifyConfig {
    /// `verify`'s settings, checked; the delta and base found ([`hub`]).
    pub fn new(
        delta: &options::Delta,
        base: Option<PathBuf>,
        delta_only: bool,
        run: &options::Run,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, Error> {
        let (threads, memory_budget) = run.check()?;
        if delta_only && base.is_some() {
            return Err(Error::Config("--delta-only checks the delta alone; it takes no --base".into()));
        }
        let hub = hub::Env::read(env);
        let delta = delta.resolve(&hub)?;
        let base = base_path(base.as_deref(), &hub)?;
        Ok(VerifyConfig { delta, base, delta_only, hub, threads, memory_budget })
    }
}

impl MergeConfig {
    /// `merge`'s settings, checked. Merging copies blocks without decoding them: it runs on
    /// one thread and takes no `--threads`.
    pub fn new(parts: Vec<PathBuf>, output: PathBuf, overwrite: bool, budget: Option<&str>) -> Result<Self, Error> {
        Ok(MergeConfig { parts, output, memory_budget: memory_budget(budget)?, overwrite })
    }
}

impl InspectConfig {
    /// `inspect`'s settings, checked; the delta found ([`hub`]).
    pub fn new(
        delta: &options::Delta,
        budget: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, Error> {
        let memory_budget = memory_budget(budget)?;
        Ok(InspectConfig { delta: delta.resolve(&hub::Env::read(env))?, memory_budget })
    }
}

/// Parses `--sparsity`.
pub fn sparsity(text: &str) -> Result<Sparsity, Error> {
    Sparsity::parse(text).map_err(Error::Config)
}

/// Parses `--sparsity-for RE=S` rules (split at the last `=`: a regex may hold one, a
/// sparsity never does).
pub fn sparsity_rules(rules: &[String]) -> Result<Vec<SparsityRule>, Error> {
    rules
        .iter()
        .map(|rule| {
            let (re, s) = rule.rsplit_once('=').ok_or_else(|| {
                Error::Config(format!("invalid --sparsity-for '{rule}': expected REGEX=SPARSITY, such as 'embed=0.5'"))
            })?;
            let pattern = regexes("--sparsity-for", &[re.to_owned()])?.remove(0);
            Ok(SparsityRule { pattern, sparsity: sparsity(s)? })
        })
        .collect()
}

/// Parses `--penalty`: a finite decimal `L >= 0`, read as the nearest f32.
///
/// ```
/// assert_eq!(fapm::config::penalty("0.25").unwrap().value, 0.25);
/// assert!(fapm::config::penalty("-1").is_err() && fapm::config::penalty("inf").is_err());
/// ```
pub fn penalty(text: &str) -> Result<Penalty, Error> {
    let value = fapm_stages::options::penalty(text).map_err(Error::Config)?;
    Ok(Penalty { text: text.to_owned(), value })
}

/// Parses `--part`: `I/N`, `auto` (a Slurm array job's task) or `auto/N` (a Kubernetes
/// indexed job's completion index), reading the environment through `env`.
pub fn part(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<PartSpec, Error> {
    let bad = |why: String| Error::Config(format!("invalid --part '{text}': {why}"));
    let number = |name: &str, v: &str| -> Result<u64, Error> {
        v.trim().parse::<u64>().map_err(|_| bad(format!("{name} is '{v}', not a whole number")))
    };
    let var = |name: &str| -> Result<u64, Error> {
        let v = env(name).ok_or_else(|| bad(format!("{name} is not set (is this a job array task?)")))?;
        number(name, &v)
    };
    let (index, count) = match text.split_once('/') {
        None if text == "auto" => {
            let (id, min) = (var("SLURM_ARRAY_TASK_ID")?, var("SLURM_ARRAY_TASK_MIN")?);
            let step = env("SLURM_ARRAY_TASK_STEP").map_or(Ok(1), |v| number("SLURM_ARRAY_TASK_STEP", &v))?.max(1);
            let count = var("SLURM_ARRAY_TASK_COUNT")?;
            if id < min || (id - min) % step != 0 {
                return Err(bad(format!("SLURM_ARRAY_TASK_ID {id} is not MIN {min} plus a multiple of STEP {step}")));
            }
            ((id - min) / step + 1, count)
        }
        Some(("auto", n)) => (var("JOB_COMPLETION_INDEX")?.saturating_add(1), number("N", n)?),
        Some((i, n)) => (number("I", i)?, number("N", n)?),
        None => return Err(bad("expected I/N, auto or auto/N".into())),
    };
    if count == 0 || count > u32::MAX as u64 || index == 0 || index > count {
        return Err(bad(format!("part {index} of {count}: need 1 <= I <= N")));
    }
    Ok(PartSpec { index: index as u32, count: count as u32 })
}

/// Parses `--metric`.
pub fn metric(text: &str) -> Result<Metric, Error> {
    match text {
        "fapm" => Ok(Metric::Fapm),
        "magnitude" => Ok(Metric::Magnitude),
        _ => Err(Error::Config(format!("invalid metric '{text}': expected fapm or magnitude"))),
    }
}

/// Parses `--threshold`.
pub fn threshold(text: &str) -> Result<ThresholdMode, Error> {
    match text {
        "exact" => Ok(ThresholdMode::Exact),
        "approx" => Ok(ThresholdMode::Approx),
        _ => Err(Error::Config(format!("invalid threshold '{text}': expected exact or approx"))),
    }
}

/// Compiles `--include` / `--exclude` patterns.
pub fn regexes(flag: &str, patterns: &[String]) -> Result<Vec<Regex>, Error> {
    patterns
        .iter()
        .map(|p| {
            fapm_stages::options::regex(p).map_err(|why| Error::Config(format!("invalid {flag} pattern '{p}': {why}")))
        })
        .collect()
}

/// Resolves `--threads` (0 or absent: every core).
pub fn threads(n: Option<usize>) -> usize {
    match n {
        Some(n) if n > 0 => n,
        _ => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    }
}

/// Parses a size such as `512M`, `2GiB`, `1.5G` or `1000000` (bytes).
///
/// ```
/// assert_eq!(fapm::config::size("512M").unwrap(), 512 << 20);
/// assert!(fapm::config::size("12 parsecs").is_err());
/// ```
pub fn size(text: &str) -> Result<u64, Error> {
    let bad = || {
        Error::Config(format!(
            "invalid size '{text}': expected a number with an optional unit (K, M, G, T), such as 512M"
        ))
    };
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = num * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Checks `--memory-budget`.
pub fn memory_budget(text: Option<&str>) -> Result<u64, Error> {
    let Some(text) = text else { return Ok(DEFAULT_MEMORY_BUDGET) };
    let b = size(text)?;
    if b < MIN_MEMORY_BUDGET {
        return Err(Error::Config(format!("--memory-budget {text} is below the minimum of 64M")));
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size("512M").unwrap(), 512 << 20);
        assert_eq!(size("2GiB").unwrap(), 2 << 30);
        assert_eq!(size("1.5g").unwrap(), 3 << 29);
        assert_eq!(size("4096").unwrap(), 4096);
        for bad in ["", "M", "12Q", "-1G", "1..2M"] {
            assert!(size(bad).is_err(), "{bad}");
        }
        assert!(memory_budget(Some("1M")).is_err());
        assert_eq!(memory_budget(None).unwrap(), DEFAULT_MEMORY_BUDGET);
    }

    #[test]
    fn include_then_exclude() {
        let mut c = PruneConfig { exclude: regexes("--exclude", &["norm".into()]).unwrap(), ..test_config() };
        assert!(c.selects("layers.0.mlp.weight"));
        assert!(!c.selects("layers.0.norm.weight"));
        c.include = regexes("--include", &["mlp".into()]).unwrap();
        assert!(!c.selects("layers.0.attn.weight"));
        assert!(regexes("--include", &["(".into()]).is_err());
    }

    #[test]
    fn first_matching_sparsity_rule_wins() {
        let rules = sparsity_rules(&["embed=0.5".into(), "(a|b)=c=0.25".into(), "embed_tokens=0".into()]).unwrap();
        assert_eq!(rules[1].pattern.as_str(), "(a|b)=c");
        let c = PruneConfig { sparsity_for: rules, ..test_config() };
        assert_eq!(c.sparsity_of("model.embed_tokens.weight").keep_count(10), 5);
        assert_eq!(c.sparsity_of("xb=c").keep_count(100), 75);
        assert_eq!(c.sparsity_of("lm_head.weight").keep_count(10), 1);
        for bad in ["embed", "embed=2", "(=0.5", "=x"] {
            assert!(sparsity_rules(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn penalties_are_finite_non_negative_decimals() {
        assert_eq!(penalty("1").unwrap().value, 1.0);
        assert_eq!(penalty(".5").unwrap().value, 0.5);
        assert_eq!(penalty("0.1").unwrap().value, 0.1f32);
        for bad in ["", ".", "-0.5", "1e3", "nan", "inf", "1.2.3", " 1", "9".repeat(40).as_str()] {
            assert!(penalty(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parts_from_flags_slurm_and_kubernetes() {
        let none = |_: &str| None;
        assert_eq!(part("2/3", none).unwrap(), PartSpec { index: 2, count: 3 });
        for bad in ["0/3", "4/3", "1/0", "x/2", "2", "auto/0", "1/-1"] {
            assert!(part(bad, |_| Some("0".into())).is_err(), "{bad}");
        }
        // A Slurm array --array=10-16:3 has tasks 10, 13, 16.
        let slurm = |id: &'static str| {
            move |k: &str| match k {
                "SLURM_ARRAY_TASK_ID" => Some(id.to_owned()),
                "SLURM_ARRAY_TASK_MIN" => Some("10".into()),
                "SLURM_ARRAY_TASK_STEP" => Some("3".into()),
                "SLURM_ARRAY_TASK_COUNT" => Some("3".into()),
                _ => None,
            }
        };
        assert_eq!(part("auto", slurm("13")).unwrap(), PartSpec { index: 2, count: 3 });
        assert_eq!(part("auto", slurm("16")).unwrap(), PartSpec { index: 3, count: 3 });
        assert!(part("auto", slurm("14")).is_err());
        assert!(part("auto", none).unwrap_err().to_string().contains("SLURM_ARRAY_TASK_ID"));
        let k8s = |k: &str| (k == "JOB_COMPLETION_INDEX").then(|| "0".to_owned());
        assert_eq!(part("auto/4", k8s).unwrap(), PartSpec { index: 1, count: 4 });
        assert!(part("auto/4", |_| Some("4".into())).is_err());
    }

    fn test_config() -> PruneConfig {
        PruneConfig {
            base: PathBuf::new(),
            finetuned: PathBuf::new(),
            output: PathBuf::new(),
            sparsity: sparsity("0.9").unwrap(),
            sparsity_for: vec![],
            metric: Metric::Fapm,
            penalty: Penalty::default(),
            threshold: ThresholdMode::Exact,
            include: vec![],
            exclude: vec![],
            threads: 1,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            overwrite: false,
            block_elems: fapm_stages::format::BLOCK_ELEMS,
            part: None,
            base_repo: None,
            finetuned_repo: None,
        }
    }
}

//! Validated settings for each command: what the flags mean once checked. Bad values are
//! [`Error::Config`] (exit code 1), unlike usage errors that clap reports (exit code 2).

use std::path::PathBuf;

use fapm_stages::score::Metric;
use fapm_stages::threshold::{Sparsity, ThresholdMode};
use fapm_stages::Error;
use regex::Regex;

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
    /// How positions are scored.
    pub metric: Metric,
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
}

impl PruneConfig {
    /// Whether tensor `name` is selected for pruning.
    pub fn selects(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|r| r.is_match(name)))
            && !self.exclude.iter().any(|r| r.is_match(name))
    }
}

/// Everything `apply` and `verify --base` need.
#[derive(Debug, Clone)]
pub struct ApplyConfig {
    /// The base checkpoint.
    pub base: PathBuf,
    /// The delta.
    pub delta: PathBuf,
    /// Where the model goes (`None`: verify only, write nothing).
    pub output: Option<PathBuf>,
    /// Worker threads.
    pub threads: usize,
    /// Bytes fapm may allocate.
    pub memory_budget: u64,
    /// Replace an existing output.
    pub overwrite: bool,
}

/// Parses `--sparsity`.
pub fn sparsity(text: &str) -> Result<Sparsity, Error> {
    Sparsity::parse(text).map_err(Error::Config)
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
            Regex::new(p).map_err(|e| {
                // regex explains with a multi-line diagram; its last line says what is wrong.
                let text = e.to_string();
                let why = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
                Error::Config(format!("invalid {flag} pattern '{p}': {}", why.trim_start_matches("error: ")))
            })
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
        let mut c = PruneConfig {
            base: PathBuf::new(),
            finetuned: PathBuf::new(),
            output: PathBuf::new(),
            sparsity: sparsity("0.9").unwrap(),
            metric: Metric::Fapm,
            threshold: ThresholdMode::Exact,
            include: vec![],
            exclude: regexes("--exclude", &["norm".into()]).unwrap(),
            threads: 1,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            overwrite: false,
            block_elems: fapm_stages::format::BLOCK_ELEMS,
        };
        assert!(c.selects("layers.0.mlp.weight"));
        assert!(!c.selects("layers.0.norm.weight"));
        c.include = regexes("--include", &["mlp".into()]).unwrap();
        assert!(!c.selects("layers.0.attn.weight"));
        assert!(regexes("--include", &["(".into()]).is_err());
    }
}

//! `fapm report`: the pictures the FAPM paper uses to explain its metric, drawn for the
//! user's own base / fine-tuned pair: one `index.html` with the charts as inline SVG and the
//! heatmaps as PNG files beside it.
//!
//! Like `prune`, it streams: every pass reads the memory-mapped tensors in chunks of
//! [`stats::CHUNK`] elements. What it keeps is a few numbers per tensor, two key histograms
//! while a tensor is counted, and the block values of the heatmaps being drawn (at most
//! 768 x 768 blocks, 14 MiB), whatever the model's size.

mod chart;
mod heatmap;
mod html;
mod sections;
mod stats;
mod svg;

use std::io::Write as _;

use rayon::prelude::*;
use std::path::PathBuf;

use crate::output::{Kind, Staged};
use fapm_stages::checkpoint::Checkpoint;
use fapm_stages::read;
use fapm_stages::run::RunControl;
use fapm_stages::threshold::select::Sparsity;
use fapm_stages::Error;

use heatmap::Quantity;
use html::Figure;
use stats::{Pair, Scratch, TensorStats, SPARSITIES};

/// How many tensors get heatmaps when no `--tensor` regex is given.
pub const DEFAULT_HEATMAP_TENSORS: usize = 4;

/// What `fapm report` reads and where it writes.
#[derive(Debug, Clone)]
pub struct ReportConfig {
    /// The base checkpoint (file or directory).
    pub base: PathBuf,
    /// The fine-tuned checkpoint (file or directory).
    pub finetuned: PathBuf,
    /// The report directory to create.
    pub output: PathBuf,
    /// Tensors to draw heatmaps of (`is_match` on the name); empty: a few picked evenly.
    pub tensors: Vec<regex::Regex>,
    /// Replace an existing output directory.
    pub overwrite: bool,
}

/// What `fapm report` wrote.
#[derive(Debug, Clone)]
pub struct ReportSummary {
    /// The report directory.
    pub output: PathBuf,
    /// Every file written, `index.html` first, as paths inside `output`.
    pub files: Vec<PathBuf>,
    /// The tensors charted (2-D floating tensors present in both checkpoints), in order.
    pub tensors_charted: usize,
    /// How many of them are extended (rows appended to the base's): their base-shaped part
    /// is charted.
    pub extended_tensors: usize,
    /// The tensors that got heatmaps.
    pub heatmap_tensors: Vec<String>,
}

/// Writes the report for `cfg`: `index.html` and the heatmaps, into a temporary directory
/// beside `cfg.output` that is renamed into place once complete.
pub fn report(cfg: &ReportConfig) -> Result<ReportSummary, Error> {
    report_with(cfg, &RunControl::default())
}

/// [`report`], stopping with `Cancelled` between tensors once `ctl` is cancelled (Ctrl-C).
pub fn report_with(cfg: &ReportConfig, ctl: &RunControl) -> Result<ReportSummary, Error> {
    let staged = Staged::new(&cfg.output, Kind::Directory, cfg.overwrite)?;
    std::fs::create_dir(staged.path()).map_err(|e| Error::io(&cfg.output, e))?;
    let (files, summary) = write_report(cfg, &staged, ctl)?;
    staged.commit()?;
    let files = files.into_iter().map(|f| cfg.output.join(f)).collect();
    Ok(ReportSummary { output: cfg.output.clone(), files, ..summary })
}

/// The 2-D tensors that prune diffs against the base (floating, the same shape or extended,
/// SPEC section 2), in checkpoint order, and how many other fine-tuned tensors there are.
fn pairs(base: &Checkpoint, ft: &Checkpoint) -> (Vec<Pair>, usize) {
    let mut out = Vec::new();
    let mut other = 0;
    for t in ft.tensors() {
        let info = t.info();
        match base.get(&info.name) {
            Some(b) if info.shape.len() == 2 && read::diffable(b.info(), info) && b.info().numel() > 0 => {
                let (rows, cols) = (b.info().shape[0], b.info().shape[1]);
                out.push(Pair {
                    name: info.name.clone(),
                    rows,
                    cols,
                    appended_rows: info.shape[0] - rows,
                    ft: t.clone(),
                    base: b,
                });
            }
            _ => other += 1,
        }
    }
    (out, other)
}

/// Which pairs get heatmaps: every match of any regex, or a few spread evenly.
fn heatmap_choice(pairs: &[Pair], res: &[regex::Regex]) -> Result<Vec<usize>, Error> {
    if res.is_empty() {
        let n = pairs.len();
        let k = DEFAULT_HEATMAP_TENSORS.min(n);
        let mut picks: Vec<usize> = (0..k).map(|i| if k == 1 { 0 } else { i * (n - 1) / (k - 1) }).collect();
        picks.dedup();
        return Ok(picks);
    }
    for re in res {
        if !pairs.iter().any(|p| re.is_match(&p.name)) {
            return Err(Error::Config(format!(
                "--tensor '{re}' matches no 2-D floating tensor present in both checkpoints"
            )));
        }
    }
    Ok((0..pairs.len()).filter(|&i| res.iter().any(|re| re.is_match(&pairs[i].name))).collect())
}

/// A file-name-safe version of a tensor name.
fn file_stem(i: usize, name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' { c } else { '_' })
        .take(80)
        .collect();
    format!("t{i:03}-{clean}")
}

/// Computes everything and writes the heatmaps and `index.html` into the staged directory;
/// returns the file names written, `index.html` first.
fn write_report(cfg: &ReportConfig, staged: &Staged, ctl: &RunControl) -> Result<(Vec<String>, ReportSummary), Error> {
    let base = Checkpoint::open(&cfg.base)?;
    let ft = Checkpoint::open(&cfg.finetuned)?;
    let (pairs, other) = pairs(&base, &ft);
    if pairs.is_empty() {
        return Err(Error::invalid(&cfg.finetuned, "has no 2-D floating tensor that the base has with the same shape"));
    }
    let chosen = heatmap_choice(&pairs, &cfg.tensors)?;
    let sparsities: Vec<Sparsity> = SPARSITIES.iter().map(|s| Sparsity::parse(s).expect("constant sparsity")).collect();
    // Tensors are counted on every core, each worker with its own buffers; the numbers of a
    // tensor do not depend on which worker counts it.
    let stats: Vec<TensorStats> = pairs
        .par_iter()
        .map_init(Scratch::default, |scratch, p| {
            ctl.check()?;
            let s = stats::tensor_stats(p, &sparsities, scratch);
            tracing::debug!(tensor = %s.name, candidates = s.candidates, "report: tensor counted");
            Ok(s)
        })
        .collect::<Result<_, Error>>()?;
    let mut scratch = Scratch::default();

    let whole = sections::WholeModel::new(&stats);
    let mut sections = vec![sections::overview(&whole), sections::tradeoff(&whole)];
    let mut files = vec!["index.html".to_string()];
    let mut heatmap_tensors = Vec::new();
    for &i in &chosen {
        ctl.check()?;
        let figures = write_heatmaps(cfg, staged, i, &pairs[i], &stats[i], &mut scratch, &mut files)?;
        sections.push(sections::heatmaps(&pairs[i], &stats[i], figures));
        heatmap_tensors.push(pairs[i].name.clone());
    }
    sections.extend(sections::per_tensor(&stats));
    let page = sections::page(cfg, &pairs, &stats, other, sections);
    let index = staged.path().join("index.html");
    staged.track(&index);
    let mut file = staged.create_file(&index)?;
    file.write_all(html::render(&page).as_bytes()).map_err(|e| Error::io(cfg.output.join("index.html"), e))?;
    let summary = ReportSummary {
        output: PathBuf::new(),
        files: Vec::new(),
        tensors_charted: pairs.len(),
        extended_tensors: pairs.iter().filter(|p| p.appended_rows > 0).count(),
        heatmap_tensors,
    };
    Ok((files, summary))
}

/// Draws the six heatmaps of pair `i` into the staged directory, adding their names to
/// `files`; returns them as figures for the page.
fn write_heatmaps(
    cfg: &ReportConfig,
    staged: &Staged,
    i: usize,
    pair: &Pair,
    stats: &TensorStats,
    scratch: &mut Scratch,
    files: &mut Vec<String>,
) -> Result<Vec<Figure>, Error> {
    let grid = heatmap::accumulate(pair, stats.mean, stats.map_cut, scratch);
    // The two kept maps share one scale, so that their colours compare.
    let kept_max = [Quantity::KeptMagnitude, Quantity::KeptFapm]
        .into_iter()
        .flat_map(|q| grid.values(q))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let stem = file_stem(i, &pair.name);
    let mut figures = Vec::new();
    for q in Quantity::ALL {
        let shared = matches!(q, Quantity::KeptMagnitude | Quantity::KeptFapm).then_some(kept_max);
        let picture = heatmap::render(&grid, q, shared);
        let name = format!("{stem}-{}.png", q.slug());
        let (path, dest) = (staged.path().join(&name), cfg.output.join(&name));
        let png = picture.png().map_err(|e| Error::invalid(&dest, format!("cannot encode png: {e}")))?;
        staged.track(&path);
        staged.create_file(&path)?.write_all(&png).map_err(|e| Error::io(&dest, e))?;
        let (svg, width) = picture.svg(&grid, &name);
        figures.push(Figure { svg, width, caption: sections::heatmap_caption(q, stats.mean) });
        files.push(name);
    }
    Ok(figures)
}

#[cfg(test)]
mod tests;

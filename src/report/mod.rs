//! `fapm report`: the pictures the FAPM paper uses to explain its metric, drawn for the
//! user's own base / fine-tuned pair: one `index.html` with the charts as inline SVG, the
//! heatmaps as PNG files beside it, and the trade-off's numbers as `report.json`.
//!
//! Like `prune`, it streams: every pass reads the memory-mapped tensors in chunks of
//! [`stats::CHUNK`] elements, a batch of tensors at a time on as many workers as
//! `--memory-budget` has room for. What it keeps is the whole model's sums (a few numbers per
//! penalty strength and sparsity), the numbers of at most [`MAX_TENSOR_ROWS`] tensors for the
//! per-tensor charts and table, and the block values of the heatmap being drawn (at most
//! 768 x 768 blocks, 14 MiB), whatever the model's size or number of tensors.

mod chart;
mod heatmap;
mod html;
mod points;
mod sections;
mod stats;
mod svg;

use std::collections::BinaryHeap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::output::{Kind, Staged};
use fapm_stages::checkpoint::Checkpoint;
use fapm_stages::read;
use fapm_stages::run::RunControl;
use fapm_stages::threshold::select::Sparsity;
use fapm_stages::Error;

use heatmap::Quantity;
use html::Figure;
pub use points::{Point, WholeModel};
use stats::{Pair, Scratch, TensorStats, PENALTIES, SPARSITIES};

/// How many tensors get heatmaps when no `--tensor` regex is given.
pub const DEFAULT_HEATMAP_TENSORS: usize = 4;

/// The most tensors that get heatmaps (the first matches of `--tensor`).
pub const MAX_HEATMAP_TENSORS: usize = 16;

/// The most tensors the per-tensor charts and table show: the largest (by elements, the
/// first on ties), in checkpoint order. Every tensor is in the whole-model numbers.
pub const MAX_TENSOR_ROWS: usize = 48;

/// Tensors counted between two folds into the whole-model sums.
const BATCH: usize = 512;

/// The version of `report.json`'s layout (docs/PIPELINE.md, "report.json").
pub const REPORT_JSON_VERSION: u32 = 1;

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
    /// The memory budget in bytes (`--memory-budget`): bounds the workers and what they hold.
    pub memory_budget: u64,
}

/// What `fapm report` wrote.
#[derive(Debug, Clone)]
pub struct ReportSummary {
    /// The report directory.
    pub output: PathBuf,
    /// Every file written, `index.html` first, as paths inside `output`.
    pub files: Vec<PathBuf>,
    /// The tensors charted (floating tensors present in both checkpoints), in order.
    pub tensors_charted: usize,
    /// How many of them are extended (rows appended to the base's): their base-shaped part
    /// is charted.
    pub extended_tensors: usize,
    /// The tensors that got heatmaps.
    pub heatmap_tensors: Vec<String>,
    /// The tensors of the per-tensor charts and table (at most [`MAX_TENSOR_ROWS`]).
    pub tensors_shown: usize,
    /// Each (strength, sparsity) point of the trade-off, as in `report.json`.
    pub points: Vec<Point>,
}

/// Writes the report for `cfg`: `index.html`, `report.json` and the heatmaps, into a temporary
/// directory beside `cfg.output` that is renamed into place once complete.
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

/// The charted tensor for fine-tuned tensor `t`, when prune diffs it against the base
/// (floating, the same shape or extended, SPEC section 2) and it has elements.
fn pair_of(base: &Checkpoint, t: fapm_stages::checkpoint::TensorRef) -> Option<Pair> {
    let info = t.info();
    let b = base.get(&info.name)?;
    if !read::diffable(b.info(), info) || b.info().numel() == 0 {
        return None;
    }
    let shape = &b.info().shape;
    let rows = shape.first().copied().unwrap_or(1);
    let cols = shape.iter().skip(1).product();
    let appended_rows = info.shape.first().map_or(0, |&r| r - rows);
    Some(Pair { name: info.name.clone(), rows, cols, appended_rows, rank: shape.len(), ft: t.clone(), base: b })
}

/// The charted tensors of `ft`, in checkpoint order, made one at a time.
fn pairs<'a>(base: &'a Checkpoint, ft: &'a Checkpoint) -> impl Iterator<Item = Pair> + 'a {
    ft.tensors().filter_map(move |t| pair_of(base, t))
}

/// What one pass over the headers finds: how many tensors are charted, which get heatmaps,
/// which are shown one by one, and what prune stores whole.
struct Layout {
    /// Charted tensors.
    charted: usize,
    /// Fine-tuned tensors that are not charted (no floating base of the same shape).
    other: usize,
    /// Bytes of what prune stores whole: uncharted tensors and appended rows.
    whole_bytes: u64,
    /// Indices (among the charted) of the tensors with heatmaps, ascending.
    heatmaps: Vec<usize>,
    /// Indices of the tensors shown one by one, ascending.
    shown: Vec<usize>,
}

impl Layout {
    fn new(base: &Checkpoint, ft: &Checkpoint, res: &[regex::Regex]) -> Result<Self, Error> {
        let (mut charted, mut other, mut whole_bytes) = (0usize, 0usize, 0u64);
        let mut two_d = Vec::new();
        let mut matched = vec![false; res.len()];
        let mut heatmaps = Vec::new();
        // The largest tensors: a min-heap of (elements, earlier first) of at most MAX_TENSOR_ROWS.
        let mut largest = BinaryHeap::new();
        for t in ft.tensors() {
            let bytes = t.info().byte_len();
            let Some(p) = pair_of(base, t) else {
                other += 1;
                whole_bytes += bytes;
                continue;
            };
            let i = charted;
            charted += 1;
            whole_bytes += bytes / (p.rows + p.appended_rows).max(1) * p.appended_rows;
            largest.push(std::cmp::Reverse((p.numel(), std::cmp::Reverse(i))));
            if largest.len() > MAX_TENSOR_ROWS {
                largest.pop();
            }
            if p.rank != 2 {
                continue;
            }
            if res.is_empty() {
                if two_d.len() < u32::MAX as usize {
                    two_d.push(i as u32);
                }
            } else if res.iter().any(|re| re.is_match(&p.name)) {
                for (m, re) in matched.iter_mut().zip(res) {
                    *m |= re.is_match(&p.name);
                }
                if heatmaps.len() < MAX_HEATMAP_TENSORS {
                    heatmaps.push(i);
                }
            }
        }
        if let Some(re) = res.iter().zip(&matched).find(|(_, m)| !**m).map(|(re, _)| re) {
            return Err(Error::Config(format!(
                "--tensor '{re}' matches no 2-D floating tensor present in both checkpoints"
            )));
        }
        if res.is_empty() {
            let n = two_d.len();
            let k = DEFAULT_HEATMAP_TENSORS.min(n);
            heatmaps = (0..k).map(|i| two_d[if k == 1 { 0 } else { i * (n - 1) / (k - 1) }] as usize).collect();
            heatmaps.dedup();
        }
        let mut shown: Vec<usize> = largest.into_iter().map(|std::cmp::Reverse((_, std::cmp::Reverse(i)))| i).collect();
        shown.sort_unstable();
        Ok(Layout { charted, other, whole_bytes, heatmaps, shown })
    }
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

/// How the page and `report.json` name a checkpoint: never its absolute path (a page is
/// shared), but the name a person knows it by: a Hugging Face cache snapshot as `org/name`,
/// a directory by its name, a file by its directory's name and its own.
pub fn display_name(path: &Path) -> String {
    let parts: Vec<String> = path
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    if let Some(repo) = parts.iter().rev().find_map(|p| p.strip_prefix("models--")) {
        return repo.replacen("--", "/", 1);
    }
    match parts.as_slice() {
        [] => ".".into(),
        [.., dir, file] if file.ends_with(".safetensors") => format!("{dir}/{file}"),
        [.., last] => last.clone(),
    }
}

/// How many workers count tensors at once: one per core, as many as half the budget holds
/// (each worker's buffers and histograms; the other half is for the heatmap being drawn, the
/// batch's numbers and the tensors shown one by one).
fn workers(budget: u64) -> usize {
    let per_worker = stats::scratch_bytes(PENALTIES.len()) + (PENALTIES.len() as u64 + 1) * (512 << 10);
    let room = (budget / 2).saturating_sub(heatmap::GRID_BYTES);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    ((room / per_worker) as usize).clamp(1, cores)
}

/// Computes everything and writes the heatmaps, `report.json` and `index.html` into the
/// staged directory; returns the file names written, `index.html` first.
fn write_report(cfg: &ReportConfig, staged: &Staged, ctl: &RunControl) -> Result<(Vec<String>, ReportSummary), Error> {
    // One budget: both checkpoints' headers take at most half of it (`bounded_json::RunMemory`).
    let _memory = fapm_stages::bounded_json::RunMemory::new(cfg.memory_budget);
    let base = Checkpoint::open_within(&cfg.base, cfg.memory_budget, ctl)?;
    let ft = Checkpoint::open_within(&cfg.finetuned, cfg.memory_budget, ctl)?;
    let layout = Layout::new(&base, &ft, &cfg.tensors)?;
    if layout.charted == 0 {
        return Err(Error::invalid(&cfg.finetuned, "has no floating tensor that the base has with the same shape"));
    }
    let sparsities: Vec<Sparsity> = SPARSITIES.iter().map(|s| Sparsity::parse(s).expect("constant sparsity")).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers(cfg.memory_budget))
        .build()
        .map_err(|e| Error::Config(format!("cannot start the report's workers: {e}")))?;
    let mut whole = WholeModel::new(layout.whole_bytes);
    // The numbers of the tensors shown one by one or drawn, and the heatmaps' pairs.
    let mut kept_stats: Vec<(usize, TensorStats)> = Vec::new();
    let mut drawn: Vec<(usize, Pair)> = Vec::new();
    let mut extended: Vec<(String, u64, u64)> = Vec::new();
    let (mut extended_count, mut appended_values) = (0, 0u64);
    let mut tensors = pairs(&base, &ft).enumerate();
    loop {
        let batch: Vec<(usize, Pair)> = tensors.by_ref().take(BATCH).collect();
        if batch.is_empty() {
            break;
        }
        ctl.check()?;
        // Tensors are counted on every worker, each with its own buffers; the numbers of a
        // tensor do not depend on which worker counts it.
        let stats: Vec<TensorStats> = pool.install(|| {
            batch
                .par_iter()
                .map_init(Scratch::default, |scratch, (_, p)| {
                    ctl.check()?;
                    let s = stats::tensor_stats(p, &sparsities, scratch);
                    tracing::debug!(tensor = %s.name, candidates = s.candidates, "report: tensor counted");
                    Ok(s)
                })
                .collect::<Result<_, Error>>()
        })?;
        for ((i, p), s) in batch.into_iter().zip(stats) {
            whole.add(&s);
            if p.appended_rows > 0 {
                extended_count += 1;
                appended_values += p.appended_rows * p.cols;
                if extended.len() < MAX_TENSOR_ROWS {
                    extended.push((p.name.clone(), p.appended_rows, p.appended_rows * p.cols));
                }
            }
            let draw = layout.heatmaps.binary_search(&i).is_ok();
            if draw || layout.shown.binary_search(&i).is_ok() {
                kept_stats.push((i, s));
            }
            if draw {
                drawn.push((i, p));
            }
        }
    }
    let points = whole.points();
    let mut scratch = Scratch::default();
    let mut sections = vec![sections::overview(&whole), sections::tradeoff(&whole, &points)];
    let mut files = vec!["index.html".to_string(), "report.json".to_string()];
    let mut heatmap_tensors = Vec::new();
    for (i, pair) in &drawn {
        ctl.check()?;
        let s = &kept_stats.iter().find(|(j, _)| j == i).expect("a drawn tensor's numbers are kept").1;
        let figures = write_heatmaps(cfg, staged, *i, pair, s, &mut scratch, &mut files)?;
        sections.push(sections::heatmaps(pair, s, figures));
        heatmap_tensors.push(pair.name.clone());
    }
    let shown: Vec<&TensorStats> =
        kept_stats.iter().filter(|(i, _)| layout.shown.binary_search(i).is_ok()).map(|(_, s)| s).collect();
    sections.push(sections::per_tensor(&shown, layout.charted));
    let (base_name, ft_name) = (display_name(&cfg.base), display_name(&cfg.finetuned));
    let facts = sections::facts(&whole, layout.other, (extended_count, appended_values), &extended);
    let page = html::Page { base: base_name.clone(), finetuned: ft_name.clone(), facts, sections };
    write_file(staged, &cfg.output, "report.json", points::json(&base_name, &ft_name, &whole, &points).as_bytes())?;
    write_file(staged, &cfg.output, "index.html", html::render(&page).as_bytes())?;
    let summary = ReportSummary {
        output: PathBuf::new(),
        files: Vec::new(),
        tensors_charted: layout.charted,
        extended_tensors: extended_count,
        heatmap_tensors,
        tensors_shown: shown.len(),
        points,
    };
    Ok((files, summary))
}

/// Writes `name` into the staged directory.
fn write_file(staged: &Staged, output: &Path, name: &str, bytes: &[u8]) -> Result<(), Error> {
    let path = staged.path().join(name);
    staged.track(&path);
    staged.create_file(&path)?.write_all(bytes).map_err(|e| Error::io(output.join(name), e))
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

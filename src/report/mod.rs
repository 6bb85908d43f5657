//! `fapm report`: the pictures the FAPM paper uses to explain its metric, drawn for the
//! user's own base / fine-tuned pair as PNG files plus one `index.html` that explains them.
//!
//! Like `prune`, it streams: every pass reads the memory-mapped tensors in chunks of at most
//! [`stats::CHUNK`] elements, and what it keeps per tensor is a few numbers, so memory stays
//! bounded (a few MiB of bins and heatmap blocks) whatever the model's size.

mod chart;
mod font;
mod heatmap;
mod html;
mod png;
mod stats;

use std::path::{Path, PathBuf};

use crate::pipeline::Ctl;
use fapm_stages::checkpoint::Checkpoint;
use fapm_stages::threshold::Sparsity;
use fapm_stages::Error;

use chart::{Chart, Series, FAPM, MAGNITUDE};
use heatmap::Quantity;
use html::{Figure, Page, Section};
use stats::{Kept, Pair, Scratch, TensorStats, MAP_SPARSITY, SPARSITIES};

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
    /// The tensors that got heatmaps.
    pub heatmap_tensors: Vec<String>,
}

/// Writes the report for `cfg`: all pictures and `index.html`, into a temporary directory
/// beside `cfg.output` that is renamed into place once complete.
pub fn report(cfg: &ReportConfig) -> Result<ReportSummary, Error> {
    report_with(cfg, &Ctl::default())
}

/// [`report`], stopping with `Cancelled` between tensors once `ctl` is cancelled (Ctrl-C).
pub fn report_with(cfg: &ReportConfig, ctl: &Ctl) -> Result<ReportSummary, Error> {
    let out = &cfg.output;
    let name = out
        .file_name()
        .ok_or_else(|| Error::Config(format!("{}: not a directory name", out.display())))?
        .to_string_lossy()
        .into_owned();
    if out.symlink_metadata().is_ok() && !cfg.overwrite {
        return Err(Error::Config(format!("{}: already exists (pass --overwrite to replace it)", out.display())));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(".{name}.fapm-tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    // Removed by the SIGBUS guard (with every picture written into it) if an input shard is
    // truncated under its memory map.
    let guards = std::sync::Mutex::new(vec![crate::sigbus::register(&tmp)]);
    let result = write_report(cfg, &tmp, ctl, &guards);
    let files = match result {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = move_into_place(&tmp, out, &parent, &name) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let (files, summary) = files;
    Ok(ReportSummary { output: out.clone(), files: files.into_iter().map(|f| out.join(f)).collect(), ..summary })
}

/// Renames `tmp` to `out`, moving an existing `out` aside first and deleting it after.
fn move_into_place(tmp: &Path, out: &Path, parent: &Path, name: &str) -> Result<(), Error> {
    let old = parent.join(format!(".{name}.fapm-old-{}", std::process::id()));
    let had_old = match out.symlink_metadata() {
        Ok(_) => {
            std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
            true
        }
        Err(_) => false,
    };
    if let Err(e) = std::fs::rename(tmp, out) {
        if had_old {
            let _ = std::fs::rename(&old, out);
        }
        return Err(Error::io(out, e));
    }
    if had_old {
        let meta = old.symlink_metadata().map_err(|e| Error::io(&old, e))?;
        let removed = if meta.is_dir() { std::fs::remove_dir_all(&old) } else { std::fs::remove_file(&old) };
        removed.map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// The 2-D floating tensors of the fine-tuned checkpoint that the base has with the same
/// shape, in checkpoint order, and how many other fine-tuned tensors there are.
fn pairs(base: &Checkpoint, ft: &Checkpoint) -> (Vec<Pair>, usize) {
    let mut out = Vec::new();
    let mut other = 0;
    for t in ft.tensors() {
        let info = t.info();
        let b = base.get(&info.name);
        match b {
            Some(b)
                if info.shape.len() == 2
                    && b.info().shape == info.shape
                    && info.dtype.is_diffable()
                    && b.info().dtype.is_diffable()
                    && info.numel() > 0 =>
            {
                out.push(Pair {
                    name: info.name.clone(),
                    rows: info.shape[0],
                    cols: info.shape[1],
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

fn pct(s: &str) -> String {
    let v: f64 = s.parse().unwrap_or(0.0);
    format!("{}%", (v * 100.0).round())
}

type Written = (Vec<String>, ReportSummary);

/// Computes everything and writes it into `dir`; returns the file names written.
fn write_report(
    cfg: &ReportConfig,
    dir: &Path,
    ctl: &Ctl,
    guards: &std::sync::Mutex<Vec<crate::sigbus::Registration>>,
) -> Result<Written, Error> {
    let base = Checkpoint::open(&cfg.base)?;
    let ft = Checkpoint::open(&cfg.finetuned)?;
    let (pairs, other) = pairs(&base, &ft);
    if pairs.is_empty() {
        return Err(Error::invalid(&cfg.finetuned, "has no 2-D floating tensor that the base has with the same shape"));
    }
    let chosen = heatmap_choice(&pairs, &cfg.tensors)?;
    let sparsities: Vec<Sparsity> = SPARSITIES.iter().map(|s| Sparsity::parse(s).expect("constant sparsity")).collect();
    let mut scratch = Scratch::default();
    let mut stats: Vec<TensorStats> = Vec::with_capacity(pairs.len());
    for p in &pairs {
        ctl.check()?;
        let s = stats::tensor_stats(p, &sparsities, &mut scratch);
        tracing::debug!(tensor = %s.name, candidates = s.candidates, "report: tensor binned");
        stats.push(s);
    }
    drop(scratch);

    let mut files = Vec::new();
    let mut write = |name: String, canvas: png::Canvas| -> Result<String, Error> {
        if let Ok(mut g) = guards.lock() {
            g.push(crate::sigbus::register(&dir.join(&name)));
        }
        canvas.write_png(&dir.join(&name))?;
        files.push(name.clone());
        Ok(name)
    };
    let mut sections = Vec::new();

    // Whole-model curves.
    let (norm_fig, rel_fig) = overview(&stats);
    let overview_figs = vec![
        Figure {
            caption: "Share of the task vector's L2 norm that survives pruning, whole model \
                      (each matrix pruned to the given sparsity on its own). Higher keeps more \
                      of what fine-tuning learned."
                .into(),
            file: write("overview-norm.png".into(), norm_fig)?,
        },
        Figure {
            caption: "Mean relative change |dW| / |W_base| of the positions that are kept, \
                      whole model, log scale. Lower means the kept changes disturb the base \
                      weights less, the cause of forgetting that FAPM targets."
                .into(),
            file: write("overview-relative.png".into(), rel_fig)?,
        },
    ];
    sections.push(Section {
        title: "Magnitude against FAPM, whole model".into(),
        intro: format!(
            "Orange: magnitude pruning (keep the largest |dW|). Blue: FAPM. x: sparsity \
             (the share of each matrix pruned back to the base). Computed over the {} \
             2-D floating tensors present in both checkpoints.",
            pairs.len()
        ),
        figures: overview_figs,
    });

    // Heatmaps.
    let mut heatmap_tensors = Vec::new();
    for &i in &chosen {
        ctl.check()?;
        let (p, s) = (&pairs[i], &stats[i]);
        let grid = heatmap::accumulate(p, s.mean, s.map_cut);
        let kept_max = grid
            .values(Quantity::KeptMagnitude)
            .into_iter()
            .chain(grid.values(Quantity::KeptFapm))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        let stem = file_stem(i, &p.name);
        let mut figures = Vec::new();
        for q in Quantity::ALL {
            let shared = matches!(q, Quantity::KeptMagnitude | Quantity::KeptFapm).then_some(kept_max);
            let canvas = heatmap::render(&grid, q, &p.name, shared);
            let file = write(format!("{stem}-{}.png", q.slug()), canvas)?;
            figures.push(Figure { file, caption: heatmap_caption(q, s.mean) });
        }
        sections.push(Section {
            title: format!("Heatmaps of {}", p.name),
            intro: format!(
                "{} x {} ({} base, {} fine-tuned); {:.2}% of positions changed; \
                 mean(|W_base|) = {:.4e}. Each pixel is one block of the matrix \
                 (rows top to bottom, columns left to right); grey means no finite value. Log \
                 colour bars span the 0.5th to 99.5th percentile of the blocks (the score's, \
                 each sign's 99th percentile of |S|, scaled separately); blocks beyond take the \
                 end colours.",
                p.rows,
                p.cols,
                p.base.info().dtype,
                p.ft.info().dtype,
                100.0 * s.candidates as f64 / s.n as f64,
                s.mean
            ),
            figures,
        });
        heatmap_tensors.push(p.name.clone());
    }

    // Per-layer curves.
    for (j, sp) in SPARSITIES.iter().enumerate() {
        let tag = format!("s{}", pct(sp).trim_end_matches('%'));
        let (n, r) = per_layer(&stats, j, sp);
        let figures = vec![
            Figure {
                caption: format!("Share of each tensor's task-vector L2 norm kept at sparsity {}", pct(sp)),
                file: write(format!("layers-norm-{tag}.png"), n)?,
            },
            Figure {
                caption: format!(
                    "Mean |dW| / |W_base| over each tensor's kept positions at sparsity {} \
                     (log scale)",
                    pct(sp)
                ),
                file: write(format!("layers-relative-{tag}.png"), r)?,
            },
        ];
        sections.push(Section {
            title: format!("Per tensor, sparsity {}", pct(sp)),
            intro: "One point per 2-D floating tensor, in checkpoint order (x = its position \
                    in the table at the bottom). Orange: magnitude, blue: FAPM."
                .into(),
            figures,
        });
    }

    let page = Page {
        base: cfg.base.display().to_string(),
        finetuned: cfg.finetuned.display().to_string(),
        facts: vec![
            format!(
                "{} tensors charted (2-D, floating, same shape in both); {} other fine-tuned \
                 tensors are not (1-D, integer, or missing from the base).",
                pairs.len(),
                other
            ),
            "A candidate is a position whose fine-tuned bits differ from the base; only \
             candidates can be kept. 'Kept' counts positions by score, as prune does with \
             --threshold approx: within one histogram bin (scores within 2^-7 relative of \
             each other) the boundary is taken pro rata, so the curves are exact to one bin."
                .into(),
            "Relative changes |dW| / |W_base| are averaged over positions where the ratio is \
             finite (a base weight of exactly 0 gives an infinite ratio, left out)."
                .into(),
        ],
        sections,
        table_head: [
            "#",
            "tensor",
            "shape",
            "changed",
            "mean |W_base|",
            "norm kept 90% mag",
            "norm kept 90% FAPM",
            "rel. change 90% mag",
            "rel. change 90% FAPM",
        ]
        .map(String::from)
        .to_vec(),
        table: table(&pairs, &stats),
    };
    let index = dir.join("index.html");
    std::fs::write(&index, html::render(&page)).map_err(|e| Error::io(&index, e))?;
    let mut names = vec!["index.html".to_string()];
    names.extend(files);
    Ok((
        names,
        ReportSummary { output: PathBuf::new(), files: Vec::new(), tensors_charted: pairs.len(), heatmap_tensors },
    ))
}

fn heatmap_caption(q: Quantity, mean: f32) -> String {
    match q {
        Quantity::BaseAbs => "Block mean of |W_base|, log colour scale: where the base weights \
                               are large or small."
            .into(),
        Quantity::DeltaAbs => "Block mean of the task vector |dW|, log scale: where fine-tuning \
                                changed the matrix most. Magnitude pruning keeps the brightest \
                                positions."
            .into(),
        Quantity::Relative => "Block mean of the relative change |dW| / |W_base|, log scale: \
                                large where small base weights moved a lot, the changes that \
                                cause forgetting."
            .into(),
        Quantity::Score => format!(
            "Block mean of the FAPM score S = |dW| - A |dW| / |W_base| with A = mean(|W_base|) \
             = {mean:.3e}; symmetric log scale, red positive (kept first), blue negative \
             (penalised: |W_base| < A)."
        ),
        Quantity::KeptMagnitude => format!(
            "Share of each block that magnitude pruning keeps at sparsity {}; same colour \
             scale as the FAPM map next to it.",
            pct(MAP_SPARSITY)
        ),
        Quantity::KeptFapm => format!(
            "Share of each block that FAPM keeps at sparsity {}: compare with the magnitude \
             map to see where FAPM moves the kept positions.",
            pct(MAP_SPARSITY)
        ),
    }
}

fn sparsity_ticks() -> Vec<(f64, String)> {
    SPARSITIES.iter().enumerate().map(|(i, s)| (i as f64, pct(s))).collect()
}

/// One series per metric (magnitude, then FAPM) with the points `points(m)` of metric `m`.
fn metric_series(points: impl Fn(usize) -> Vec<(f64, f64)>) -> Vec<Series> {
    [("magnitude", MAGNITUDE), ("FAPM", FAPM)]
        .iter()
        .enumerate()
        .map(|(m, (label, color))| Series { label: label.to_string(), color: *color, points: points(m) })
        .collect()
}

/// The two whole-model charts (norm kept, relative change), one point per sparsity.
fn overview(stats: &[TensorStats]) -> (png::Canvas, png::Canvas) {
    let total: f64 = stats.iter().map(|s| s.total_d2).sum();
    let sum = |m: usize, j: usize| {
        let mut k = Kept::default();
        for s in stats {
            k.add(&s.kept[m][j]);
        }
        k
    };
    let series = |f: &dyn Fn(&Kept) -> f64| {
        metric_series(|m| (0..SPARSITIES.len()).map(|j| (j as f64, f(&sum(m, j)))).collect())
    };
    let norm = Chart {
        title: "Task-vector norm kept".into(),
        subtitle: "whole model, ||dW kept|| / ||dW||".into(),
        x_label: "sparsity (share of each matrix pruned)".into(),
        y_label: "norm fraction kept".into(),
        y_log: false,
        y_range: Some((0.0, 1.0)),
        x_ticks: Some(sparsity_ticks()),
        series: series(&|k| k.norm_fraction(total)),
    };
    let rel = Chart {
        title: "Relative change of kept positions".into(),
        subtitle: "whole model, mean |dW| / |W_base| over kept".into(),
        x_label: "sparsity (share of each matrix pruned)".into(),
        y_label: "mean |dW|/|W_base|".into(),
        y_log: true,
        y_range: None,
        x_ticks: Some(sparsity_ticks()),
        series: series(&|k| k.mean_rel()),
    };
    (chart::render(&norm), chart::render(&rel))
}

/// The two per-tensor charts at sparsity index `j`.
fn per_layer(stats: &[TensorStats], j: usize, sp: &str) -> (png::Canvas, png::Canvas) {
    let series = |f: &dyn Fn(&TensorStats, &Kept) -> f64| {
        metric_series(|m| stats.iter().enumerate().map(|(i, s)| (i as f64, f(s, &s.kept[m][j]))).collect())
    };
    let norm = Chart {
        title: format!("Norm kept per tensor, sparsity {}", pct(sp)),
        subtitle: "||dW kept|| / ||dW|| of each tensor".into(),
        x_label: "tensor (checkpoint order)".into(),
        y_label: "norm fraction kept".into(),
        y_log: false,
        y_range: Some((0.0, 1.0)),
        x_ticks: None,
        series: series(&|s, k| k.norm_fraction(s.total_d2)),
    };
    let rel = Chart {
        title: format!("Kept relative change, sparsity {}", pct(sp)),
        subtitle: "mean |dW| / |W_base| over each tensor's kept positions".into(),
        x_label: "tensor (checkpoint order)".into(),
        y_label: "mean |dW|/|W_base|".into(),
        y_log: true,
        y_range: None,
        x_ticks: None,
        series: series(&|_, k| k.mean_rel()),
    };
    (chart::render(&norm), chart::render(&rel))
}

fn table(pairs: &[Pair], stats: &[TensorStats]) -> Vec<Vec<String>> {
    let j = SPARSITIES.iter().position(|s| *s == MAP_SPARSITY).expect("the map sparsity is charted");
    pairs
        .iter()
        .zip(stats)
        .enumerate()
        .map(|(i, (p, s))| {
            let (m, f) = (&s.kept[0][j], &s.kept[1][j]);
            vec![
                i.to_string(),
                p.name.clone(),
                format!("{} x {}", p.rows, p.cols),
                format!("{:.2}%", 100.0 * s.candidates as f64 / s.n as f64),
                format!("{:.3e}", s.mean),
                format!("{:.3}", m.norm_fraction(s.total_d2)),
                format!("{:.3}", f.norm_fraction(s.total_d2)),
                format!("{:.3e}", m.mean_rel()),
                format!("{:.3e}", f.mean_rel()),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests;

//! What the page says: the charts built from the numbers, the captions that explain each
//! picture, the facts about the inputs and the per-tensor table.

use super::chart::{self, Chart, Series, FAPM, MAGNITUDE};
use super::heatmap::Quantity;
use super::html::{Figure, Page, Section};
use super::stats::{Kept, Pair, TensorStats, MAP_SPARSITY, SPARSITIES};
use super::ReportConfig;

/// `0.9` as `90%`.
fn pct(s: &str) -> String {
    let v: f64 = s.parse().unwrap_or(0.0);
    format!("{}%", (v * 100.0).round())
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

/// The whole-model charts (norm kept, relative change), one point per sparsity.
pub fn overview(stats: &[TensorStats]) -> Section {
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
        x_names: Some(SPARSITIES.iter().map(|s| format!("sparsity {}", pct(s))).collect()),
        series: series(&|k| k.norm_fraction(total)),
    };
    let rel = Chart {
        title: "Relative change of kept positions".into(),
        subtitle: "whole model, mean |dW| / |W_base| over kept".into(),
        y_label: "mean |dW| / |W_base|".into(),
        y_log: true,
        y_range: None,
        series: series(&|k| k.mean_rel()),
        ..norm.clone()
    };
    Section {
        title: "Magnitude against FAPM, whole model".into(),
        intro: format!(
            "Orange: magnitude pruning (keep the largest |dW|). Blue: FAPM. x: sparsity (the share \
             of each matrix pruned back to the base). Computed over the {} 2-D floating tensors \
             present in both checkpoints. Hover over a point for its value.",
            stats.len()
        ),
        figures: vec![
            Figure {
                svg: chart::render(&norm),
                width: chart::WIDTH,
                caption: "Share of the task vector's L2 norm that survives pruning, whole model (each \
                          matrix pruned to the given sparsity on its own). Higher keeps more of what \
                          fine-tuning learned."
                    .into(),
            },
            Figure {
                svg: chart::render(&rel),
                width: chart::WIDTH,
                caption: "Mean relative change |dW| / |W_base| of the positions that are kept, whole \
                          model, log scale. Lower means the kept changes disturb the base weights less, \
                          the cause of forgetting that FAPM targets."
                    .into(),
            },
        ],
    }
}

/// The section of one tensor's heatmaps.
pub fn heatmaps(p: &Pair, s: &TensorStats, figures: Vec<Figure>) -> Section {
    Section {
        title: format!("Heatmaps of {}", p.name),
        intro: format!(
            "{} x {} ({} base, {} fine-tuned); {:.2}% of positions changed; mean(|W_base|) = {:.4e}. \
             Each pixel is the mean of one block of the matrix (rows top to bottom, columns left \
             to right); grey means no finite value. Log colour scales span the 0.5th to 99.5th \
             percentile of the blocks, the score's each sign's 99th percentile of |S| (scaled \
             separately); blocks beyond take the end colours, and an arrow at the end of the colour \
             bar says there are some.",
            p.rows,
            p.cols,
            p.base.info().dtype,
            p.ft.info().dtype,
            100.0 * s.candidates as f64 / s.n as f64,
            s.mean
        ),
        figures,
    }
}

/// What one heatmap shows and how to read it.
pub fn heatmap_caption(q: Quantity, mean: f32) -> String {
    match q {
        Quantity::BaseAbs => {
            "Block mean of |W_base|, log colour scale: where the base weights are large or small.".into()
        }
        Quantity::DeltaAbs => "Block mean of the task vector |dW|, log scale: where fine-tuning changed the \
                                matrix most. Magnitude pruning keeps the brightest positions."
            .into(),
        Quantity::Relative => "Block mean of the relative change |dW| / |W_base|, log scale: large where \
                                small base weights moved a lot, the changes that cause forgetting."
            .into(),
        Quantity::Score => format!(
            "Block mean of the FAPM score S = |dW| - A |dW| / |W_base| with A = mean(|W_base|) = \
             {mean:.3e}; symmetric log scale, red positive (kept first), blue negative (penalised: \
             |W_base| < A)."
        ),
        Quantity::KeptMagnitude => format!(
            "Share of each block that magnitude pruning keeps at sparsity {}; same colour scale as \
             the FAPM map next to it.",
            pct(MAP_SPARSITY)
        ),
        Quantity::KeptFapm => format!(
            "Share of each block that FAPM keeps at sparsity {}: compare with the magnitude map to \
             see where FAPM moves the kept positions.",
            pct(MAP_SPARSITY)
        ),
    }
}

/// One section per sparsity: each tensor's norm kept and relative change.
pub fn per_tensor(stats: &[TensorStats]) -> Vec<Section> {
    let names: Vec<String> = stats.iter().map(|s| s.name.clone()).collect();
    SPARSITIES
        .iter()
        .enumerate()
        .map(|(j, sp)| {
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
                x_names: Some(names.clone()),
                series: series(&|s, k| k.norm_fraction(s.total_d2)),
            };
            let rel = Chart {
                title: format!("Kept relative change, sparsity {}", pct(sp)),
                subtitle: "mean |dW| / |W_base| over each tensor's kept positions".into(),
                y_label: "mean |dW| / |W_base|".into(),
                y_log: true,
                y_range: None,
                series: series(&|_, k| k.mean_rel()),
                ..norm.clone()
            };
            Section {
                title: format!("Per tensor, sparsity {}", pct(sp)),
                intro: "One point per 2-D floating tensor, in checkpoint order (x = its row in the \
                        table at the bottom). Orange: magnitude, blue: FAPM."
                    .into(),
                figures: vec![
                    Figure {
                        svg: chart::render(&norm),
                        width: chart::WIDTH,
                        caption: format!("Share of each tensor's task-vector L2 norm kept at sparsity {}", pct(sp)),
                    },
                    Figure {
                        svg: chart::render(&rel),
                        width: chart::WIDTH,
                        caption: format!(
                            "Mean |dW| / |W_base| over each tensor's kept positions at sparsity {} (log scale)",
                            pct(sp)
                        ),
                    },
                ],
            }
        })
        .collect()
}

/// The whole page: inputs, facts, sections and the per-tensor table.
pub fn page(cfg: &ReportConfig, pairs: &[Pair], stats: &[TensorStats], other: usize, sections: Vec<Section>) -> Page {
    Page {
        base: cfg.base.display().to_string(),
        finetuned: cfg.finetuned.display().to_string(),
        facts: vec![
            format!(
                "{} tensors charted (2-D, floating, same shape in both); {} other fine-tuned tensors \
                 are not (1-D, integer, or missing from the base).",
                pairs.len(),
                other
            ),
            "A candidate is a position whose fine-tuned bits differ from the base; only candidates \
             can be kept. 'Kept' is exactly what fapm prune --threshold approx keeps at that \
             sparsity: the same histogram of scores, the same cut, the same positions."
                .into(),
            "Relative changes |dW| / |W_base| are averaged over positions where the ratio is finite \
             (a base weight of exactly 0 gives an infinite ratio, left out)."
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
        table: table(pairs, stats),
    }
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

//! What the page says: the charts built from the numbers, the captions that explain each
//! picture, the facts about the inputs and the tables.

use super::chart::{self, Chart, Series, GUIDE, STRENGTH_COLORS};
use super::heatmap::Quantity;
use super::html::{Figure, Page, Section, Table};
use super::stats::{Kept, Pair, TensorStats, MAP_PENALTIES, MAP_SPARSITY, PENALTIES, SPARSITIES};
use super::ReportConfig;

/// `0.9` as `90%`.
fn pct(s: &str) -> String {
    let v: f64 = s.parse().unwrap_or(0.0);
    format!("{}%", (v * 100.0).round())
}

fn sparsity_ticks() -> Vec<(f64, String)> {
    SPARSITIES.iter().enumerate().map(|(i, s)| (i as f64, pct(s))).collect()
}

/// The legend name of penalty strength `PENALTIES[l]`.
fn strength_label(l: usize) -> String {
    match PENALTIES[l] {
        "0" => "l = 0 (magnitude)".into(),
        "1" => "l = 1 (FAPM)".into(),
        other => format!("l = {other}"),
    }
}

/// The flags of `fapm prune` that keep what strength `l` keeps at sparsity `j`.
fn flags(l: usize, j: usize) -> String {
    format!("--penalty {} --sparsity {}", PENALTIES[l], SPARSITIES[j])
}

/// One series per penalty strength, in the order of [`PENALTIES`], with the points
/// `points(l)` of strength `l`.
fn strength_series(points: impl Fn(usize) -> Vec<(f64, f64)>) -> Vec<Series> {
    (0..PENALTIES.len()).map(|l| Series::line(strength_label(l), STRENGTH_COLORS[l], points(l))).collect()
}

/// What every strength keeps of the whole model at every sparsity: the sums over tensors that
/// the whole-model charts and the trade-off chart draw.
pub struct WholeModel {
    /// `kept[l][j]`: what strength `PENALTIES[l]` keeps at sparsity `SPARSITIES[j]`.
    kept: Vec<Vec<Kept>>,
    /// The task vector's whole squared norm.
    total_d2: f64,
    /// How many tensors are summed.
    tensors: usize,
}

impl WholeModel {
    /// Sums the tensors' numbers.
    pub fn new(stats: &[TensorStats]) -> Self {
        let mut kept = vec![vec![Kept::default(); SPARSITIES.len()]; PENALTIES.len()];
        for s in stats {
            for (sum, k) in kept.iter_mut().flatten().zip(s.kept.iter().flatten()) {
                sum.add(k);
            }
        }
        WholeModel { kept, total_d2: stats.iter().map(|s| s.total_d2).sum(), tensors: stats.len() }
    }

    /// Strength `l` at sparsity `j` as a point of the trade-off chart: (mean relative change
    /// of kept positions, norm fraction kept).
    fn point(&self, l: usize, j: usize) -> (f64, f64) {
        (self.kept[l][j].mean_rel(), self.kept[l][j].norm_fraction(self.total_d2))
    }
}

fn figure(c: &Chart, caption: impl Into<String>) -> Figure {
    Figure { svg: chart::render(c), width: chart::WIDTH, caption: caption.into() }
}

/// The whole-model charts (norm kept, relative change), one point per sparsity and one line
/// per penalty strength.
pub fn overview(whole: &WholeModel) -> Section {
    let series = |f: &dyn Fn((f64, f64)) -> f64| {
        strength_series(|l| (0..SPARSITIES.len()).map(|j| (j as f64, f(whole.point(l, j)))).collect())
    };
    let norm = Chart {
        title: "Task-vector norm kept".into(),
        subtitle: "whole model, ||dW kept|| / ||dW||".into(),
        x_label: "sparsity (share of each matrix pruned)".into(),
        y_label: "norm fraction kept".into(),
        x_log: false,
        y_log: false,
        y_range: Some((0.0, 1.0)),
        x_ticks: Some(sparsity_ticks()),
        x_names: Some(SPARSITIES.iter().map(|s| format!("sparsity {}", pct(s))).collect()),
        series: series(&|(_, norm)| norm),
    };
    let rel = Chart {
        title: "Relative change of kept positions".into(),
        subtitle: "whole model, mean |dW| / |W_base| over kept".into(),
        y_label: "mean |dW| / |W_base|".into(),
        y_log: true,
        y_range: None,
        series: series(&|(rel, _)| rel),
        ..norm.clone()
    };
    Section {
        title: "Penalty strengths, whole model".into(),
        intro: format!(
            "One line per penalty strength l (fapm prune --penalty l): orange is magnitude pruning \
             (l = 0), blue the paper's FAPM (l = 1), purple the strongest penalty. x: sparsity (the \
             share of each matrix pruned back to the base). Computed over the {} 2-D floating \
             tensors that prune diffs against the base. Hover over a point for its value.",
            whole.tensors
        ),
        figures: vec![
            figure(
                &norm,
                "Share of the task vector's L2 norm that survives pruning, whole model (each matrix \
                 pruned to the given sparsity on its own). Higher keeps more of what fine-tuning \
                 learned; a stronger penalty gives up some of it.",
            ),
            figure(
                &rel,
                "Mean relative change |dW| / |W_base| of the positions that are kept, whole model, log \
                 scale. Lower means the kept changes disturb the base weights less, the cause of \
                 forgetting that the penalty targets.",
            ),
        ],
        table: None,
    }
}

/// Whether point `i` of the trade-off chart's `points` (relative change, norm kept) is on its
/// frontier: no other point has at most its relative change and at least its norm and is
/// better in one of the two.
fn on_frontier(points: &[(f64, f64)], i: usize) -> bool {
    let (r, n) = points[i];
    if !(n.is_finite() && r.is_finite()) {
        return false;
    }
    !points.iter().any(|&(r2, n2)| n2 >= n && r2 <= r && (n2 > n || r2 < r))
}

/// The trade-off chart: kept norm against mean relative change of kept positions, one point
/// per (strength, sparsity), and the table of every point with the flags that give it.
pub fn tradeoff(whole: &WholeModel) -> Section {
    let describe = |l: usize, j: usize| {
        let (rel, norm) = whole.point(l, j);
        format!(
            "{}, sparsity {}: norm kept {:.3}, mean |dW| / |W_base| {:.3e}; {}",
            strength_label(l),
            pct(SPARSITIES[j]),
            norm,
            rel,
            flags(l, j)
        )
    };
    let mut series: Vec<Series> = (0..SPARSITIES.len())
        .map(|j| Series {
            label: pct(SPARSITIES[j]),
            color: GUIDE,
            points: (0..PENALTIES.len()).map(|l| whole.point(l, j)).collect(),
            tips: None,
            guide: true,
        })
        .collect();
    series.extend((0..PENALTIES.len()).map(|l| Series {
        tips: Some((0..SPARSITIES.len()).map(|j| describe(l, j)).collect()),
        ..Series::line(
            strength_label(l),
            STRENGTH_COLORS[l],
            (0..SPARSITIES.len()).map(|j| whole.point(l, j)).collect(),
        )
    }));
    let chart = Chart {
        title: "Trade-off: norm kept against relative change".into(),
        subtitle: "whole model, one point per (strength l, sparsity); grey joins equal sparsity".into(),
        x_label: "mean |dW| / |W_base| of kept positions (log scale; left disturbs the base less)".into(),
        y_label: "norm fraction kept".into(),
        x_log: true,
        y_log: false,
        y_range: Some((0.0, 1.0)),
        x_ticks: None,
        x_names: None,
        series,
    };
    // Every (strength, sparsity), sparsity-major as the table's cells, for the frontier.
    let points: Vec<(f64, f64)> =
        (0..SPARSITIES.len()).flat_map(|j| (0..PENALTIES.len()).map(move |l| whole.point(l, j))).collect();
    let rows = (0..SPARSITIES.len())
        .map(|j| {
            let mut row = vec![pct(SPARSITIES[j])];
            row.extend((0..PENALTIES.len()).map(|l| {
                let i = j * PENALTIES.len() + l;
                let (rel, norm) = points[i];
                let mark = if on_frontier(&points, i) { " *" } else { "" };
                format!("{norm:.3} / {rel:.2e}{mark}")
            }));
            row
        })
        .collect();
    let mut head = vec!["sparsity".to_string()];
    head.extend((0..PENALTIES.len()).map(strength_label));
    Section {
        title: "Choosing a penalty strength and a sparsity".into(),
        intro: "Each point is one choice of fapm prune --penalty l --sparsity s for this model: up keeps \
                more of the task vector (more of the new skill), left applies smaller relative changes \
                to the base weights (less forgetting, which FAPM's paper ties to large relative \
                changes). Along a grey line the sparsity, and so the delta's size, stays the same and \
                only the strength moves the choice between the two. The table gives every point as norm \
                kept / mean relative change; a * marks the frontier (no other point is better on both \
                axes): pick among those by how much forgetting your use can afford, then prune with \
                fapm prune --penalty l --sparsity s. Hover over a point for its numbers and flags."
            .into(),
        figures: vec![figure(
            &chart,
            "Whole model: share of the task vector's L2 norm kept (y) against the mean relative change \
             of the kept positions (x, log scale). Colours: penalty strengths as in the charts above; \
             grey lines join the strengths of one sparsity (labelled at the strongest penalty's end).",
        )],
        table: Some(Table { head, rows }),
    }
}

/// The section of one tensor's heatmaps.
pub fn heatmaps(p: &Pair, s: &TensorStats, figures: Vec<Figure>) -> Section {
    Section {
        title: format!("Heatmaps of {}", p.name),
        intro: format!(
            "{} ({} base, {} fine-tuned); {:.2}% of positions changed; mean(|W_base|) = {:.4e}. \
             Each pixel is the mean of one block of the matrix (rows top to bottom, columns left \
             to right); grey means no finite value. Log colour scales span the 0.5th to 99.5th \
             percentile of the blocks, the score's each sign's 99th percentile of |S| (scaled \
             separately); blocks beyond take the end colours, and an arrow at the end of the colour \
             bar says there are some.",
            shape(p),
            p.base.info().dtype,
            p.ft.info().dtype,
            100.0 * s.candidates as f64 / s.n as f64,
            s.mean
        ),
        figures,
        table: None,
    }
}

/// `rows x cols`, and the rows an extended tensor appends.
fn shape(p: &Pair) -> String {
    match p.appended_rows {
        0 => format!("{} x {}", p.rows, p.cols),
        r => format!("{} x {} (+{r} appended rows, stored whole, not charted)", p.rows, p.cols),
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
            "Share of each block that magnitude pruning (l = 0) keeps at sparsity {}; same colour \
             scale as the FAPM map next to it.",
            pct(MAP_SPARSITY)
        ),
        Quantity::KeptFapm => format!(
            "Share of each block that FAPM (l = 1) keeps at sparsity {}: compare with the magnitude \
             map to see where the penalty moves the kept positions.",
            pct(MAP_SPARSITY)
        ),
    }
}

/// One section per sparsity: each tensor's norm kept and relative change, one line per
/// penalty strength.
pub fn per_tensor(stats: &[TensorStats]) -> Vec<Section> {
    let names: Vec<String> = stats.iter().map(|s| s.name.clone()).collect();
    SPARSITIES
        .iter()
        .enumerate()
        .map(|(j, sp)| {
            let series = |f: &dyn Fn(&TensorStats, &Kept) -> f64| {
                strength_series(|l| stats.iter().enumerate().map(|(i, s)| (i as f64, f(s, &s.kept[l][j]))).collect())
            };
            let norm = Chart {
                title: format!("Norm kept per tensor, sparsity {}", pct(sp)),
                subtitle: "||dW kept|| / ||dW|| of each tensor".into(),
                x_label: "tensor (checkpoint order)".into(),
                y_label: "norm fraction kept".into(),
                x_log: false,
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
                        table at the bottom); one line per penalty strength, coloured as above."
                    .into(),
                figures: vec![
                    figure(&norm, format!("Share of each tensor's task-vector L2 norm kept at sparsity {}", pct(sp))),
                    figure(
                        &rel,
                        format!(
                            "Mean |dW| / |W_base| over each tensor's kept positions at sparsity {} (log scale)",
                            pct(sp)
                        ),
                    ),
                ],
                table: None,
            }
        })
        .collect()
}

/// The whole page: inputs, facts, sections, then the per-tensor table.
pub fn page(cfg: &ReportConfig, pairs: &[Pair], stats: &[TensorStats], other: usize, sections: Vec<Section>) -> Page {
    let mut facts = vec![
        format!(
            "{} tensors charted (2-D, floating, in both checkpoints); {} other fine-tuned tensors are \
             not (1-D, integer, or missing from the base).",
            pairs.len(),
            other
        ),
        "A candidate is a position whose fine-tuned bits differ from the base; only candidates can \
         be kept. 'Kept' is exactly what fapm prune --threshold approx --penalty l keeps at that \
         sparsity: the same histogram of scores, the same cut, the same positions."
            .into(),
        "Relative changes |dW| / |W_base| are averaged over positions where the ratio is finite (a \
         base weight of exactly 0 gives an infinite ratio, left out)."
            .into(),
    ];
    let extended: Vec<&Pair> = pairs.iter().filter(|p| p.appended_rows > 0).collect();
    if !extended.is_empty() {
        let values: u64 = extended.iter().map(|p| p.appended_rows * p.cols).sum();
        facts.push(format!(
            "{} tensors are extended (a resized vocabulary: the fine-tuned tensor appends rows to the \
             base's): {}. Their base-shaped part is charted and pruned like any other; the {} values \
             of the appended rows have no base to diff against, so prune stores them whole and they \
             are not in the charts.",
            extended.len(),
            extended.iter().map(|p| format!("{} (+{} rows)", p.name, p.appended_rows)).collect::<Vec<_>>().join(", "),
            values
        ));
    }
    let mut sections = sections;
    sections.push(Section {
        title: "Per-tensor numbers".into(),
        intro: format!(
            "At sparsity {}, for magnitude pruning (l = 0) and the paper's FAPM (l = 1).",
            pct(MAP_SPARSITY)
        ),
        figures: Vec::new(),
        table: Some(table(pairs, stats)),
    });
    Page { base: cfg.base.display().to_string(), finetuned: cfg.finetuned.display().to_string(), facts, sections }
}

fn table(pairs: &[Pair], stats: &[TensorStats]) -> Table {
    let j = SPARSITIES.iter().position(|s| *s == MAP_SPARSITY).expect("the map sparsity is charted");
    let [mag, fapm] = MAP_PENALTIES;
    let rows = pairs
        .iter()
        .zip(stats)
        .enumerate()
        .map(|(i, (p, s))| {
            let (m, f) = (&s.kept[mag][j], &s.kept[fapm][j]);
            vec![
                i.to_string(),
                p.name.clone(),
                shape(p),
                format!("{:.2}%", 100.0 * s.candidates as f64 / s.n as f64),
                format!("{:.3e}", s.mean),
                format!("{:.3}", m.norm_fraction(s.total_d2)),
                format!("{:.3}", f.norm_fraction(s.total_d2)),
                format!("{:.3e}", m.mean_rel()),
                format!("{:.3e}", f.mean_rel()),
            ]
        })
        .collect();
    let head = [
        "#",
        "tensor",
        "shape",
        "changed",
        "mean |W_base|",
        "norm kept 90% l=0",
        "norm kept 90% l=1",
        "rel. change 90% l=0",
        "rel. change 90% l=1",
    ];
    Table { head: head.map(String::from).to_vec(), rows }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frontier_is_the_points_nothing_beats_on_both_axes() {
        // (relative change, norm kept): lower change and higher norm are better.
        let points = [(0.5, 0.9), (0.1, 0.8), (0.2, 0.7), (0.6, 0.9), (0.0, f64::NAN), (0.1, 0.8)];
        let frontier: Vec<bool> = (0..points.len()).map(|i| on_frontier(&points, i)).collect();
        assert_eq!(frontier, [true, true, false, false, false, true]);
    }
}

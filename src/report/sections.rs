//! What the page says: the charts built from the numbers, the captions that explain each
//! picture, the facts about the inputs and the tables.

use super::chart::{self, Chart, Series, GUIDE, STRENGTH_COLORS};
use super::heatmap::Quantity;
use super::html::{Figure, Section, Table};
use super::points::{Point, WholeModel};
use super::stats::{Kept, Pair, TensorStats, MAP_PENALTIES, MAP_SPARSITY, PENALTIES, SPARSITIES};
use super::MAX_TENSOR_ROWS;

/// `0.9` as `90%`.
pub fn pct(s: &str) -> String {
    let v: f64 = s.parse().unwrap_or(0.0);
    format!("{}%", (v * 100.0 * 100.0).round() / 100.0)
}

/// A byte count as `12.3 MB` (decimal units, as the delta's size is quoted elsewhere).
pub fn size(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..=9_999 => format!("{bytes} B"),
        10_000..=999_999 => format!("{:.1} kB", b / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} MB", b / 1e6),
        _ => format!("{:.2} GB", b / 1e9),
    }
}

/// A share as `0.613`, or `unchanged` when there is nothing to share (no candidate).
fn share(v: Option<f64>) -> String {
    v.map_or_else(|| "unchanged".into(), |v| format!("{v:.3}"))
}

fn sparsity_ticks() -> Vec<(f64, String)> {
    SPARSITIES.iter().enumerate().map(|(i, s)| (i as f64, pct(s))).collect()
}

/// The legend name of penalty strength `PENALTIES[l]`.
fn strength_label(l: usize) -> String {
    match PENALTIES[l] {
        "0" => "λ = 0 (magnitude)".into(),
        "1" => "λ = 1 (FAPM)".into(),
        other => format!("λ = {other}"),
    }
}

/// One series per penalty strength, in the order of [`PENALTIES`], with the points
/// `points(l)` of strength `l`.
fn strength_series(points: impl Fn(usize) -> Vec<(f64, f64)>) -> Vec<Series> {
    (0..PENALTIES.len()).map(|l| Series::line(strength_label(l), STRENGTH_COLORS[l], points(l))).collect()
}

fn figure(c: &Chart, caption: impl Into<String>) -> Figure {
    Figure { svg: chart::render(c), width: chart::WIDTH, caption: caption.into() }
}

fn nan(v: Option<f64>) -> f64 {
    v.unwrap_or(f64::NAN)
}

/// The whole-model charts (energy kept, forgetting proxy kept), one point per sparsity and
/// one line per penalty strength.
pub fn overview(whole: &WholeModel) -> Section {
    let series = |f: &dyn Fn(&Kept) -> f64| {
        strength_series(|l| (0..SPARSITIES.len()).map(|j| (j as f64, f(&whole.kept[l][j]))).collect())
    };
    let energy = Chart {
        title: "Task-vector energy kept".into(),
        subtitle: "whole model, sum dW^2 over kept / over all changes".into(),
        x_label: "sparsity (share of each tensor pruned)".into(),
        y_label: "energy kept".into(),
        x_log: false,
        y_log: false,
        y_range: Some((0.0, 1.0)),
        x_ticks: Some(sparsity_ticks()),
        x_names: Some(SPARSITIES.iter().map(|s| format!("sparsity {}", pct(s))).collect()),
        series: series(&|k| nan(Kept::share(k.d2, whole.total_d2))),
    };
    let forgetting = Chart {
        title: "Forgetting proxy kept".into(),
        subtitle: "whole model, sum min(|dW| / |W_base|, 1)^2 over kept / over all changes".into(),
        y_label: "forgetting proxy kept".into(),
        series: series(&|k| nan(Kept::share(k.rel2, whole.total_rel2))),
        ..energy.clone()
    };
    Section {
        title: "Penalty strengths, whole model".into(),
        intro: format!(
            "One line per penalty strength λ (fapm prune --penalty λ): orange is magnitude pruning \
             (λ = 0), blue the paper's FAPM (λ = 1), purple the strongest penalty. x: sparsity (the \
             share of each tensor pruned back to the base). Both measures are sums over the kept \
             positions, as shares of their value over every change (sparsity 0 keeps 1 of each), over \
             the {} floating tensors that prune diffs against the base, 1-D norms and biases \
             included. Hover over a point for its value.",
            whole.tensors
        ),
        figures: vec![
            figure(
                &energy,
                "Share of the task vector's energy (sum of dW^2) that survives pruning: how much of \
                 what fine-tuning learned is kept. Higher keeps more of the new skill.",
            ),
            figure(
                &forgetting,
                "Share of the forgetting proxy, the sum of the squared relative changes \
                 min(|dW| / |W_base|, 1)^2, that the kept positions apply: large relative changes to \
                 base weights are what FAPM's paper ties to forgetting. Lower forgets less.",
            ),
        ],
        table: None,
    }
}

/// The trade-off chart: energy kept against forgetting proxy kept, one curve per penalty
/// strength through its sparsities, the Pareto points ringed and labelled with the delta's
/// size; and the table of every point with its flags.
pub fn tradeoff(whole: &WholeModel, points: &[Point]) -> Section {
    let at = |l: usize, j: usize| &points[j * PENALTIES.len() + l];
    let xy = |p: &Point| (nan(p.forgetting), nan(p.energy_kept));
    let describe = |p: &Point| {
        let standing = match p.dominated_by {
            _ if p.pareto => ", Pareto-optimal".to_string(),
            Some(d) => format!(", dominated by {}", points[d].label()),
            None => String::new(),
        };
        format!(
            "{}: energy kept {}, forgetting proxy {}, delta about {}{standing}; fapm prune {}",
            p.label(),
            share(p.energy_kept),
            share(p.forgetting),
            size(p.delta_bytes),
            p.flags()
        )
    };
    let mut series: Vec<Series> = (0..SPARSITIES.len())
        .map(|j| Series {
            label: pct(SPARSITIES[j]),
            color: GUIDE,
            points: (0..PENALTIES.len()).map(|l| xy(at(l, j))).collect(),
            tips: None,
            guide: true,
            marks: None,
        })
        .collect();
    series.extend((0..PENALTIES.len()).map(|l| Series {
        tips: Some((0..SPARSITIES.len()).map(|j| describe(at(l, j))).collect()),
        marks: Some((0..SPARSITIES.len()).map(|j| at(l, j).pareto.then(|| size(at(l, j).delta_bytes))).collect()),
        ..Series::line(strength_label(l), STRENGTH_COLORS[l], (0..SPARSITIES.len()).map(|j| xy(at(l, j))).collect())
    }));
    let chart = Chart {
        title: "Trade-off: energy kept against forgetting".into(),
        subtitle: "whole model; a curve per λ through sparsities 99% (left) to 50%; ringed: Pareto, labelled \
                   with the delta's size"
            .into(),
        x_label: "forgetting proxy kept, sum min(|dW|/|W_base|, 1)^2 (log scale; left forgets less)".into(),
        y_label: "task-vector energy kept".into(),
        x_log: true,
        y_log: false,
        y_range: Some((0.0, 1.0)),
        x_ticks: None,
        x_names: None,
        series,
    };
    // A row per sparsity, a column per strength: compact enough to sit above the heatmaps.
    let rows = (0..SPARSITIES.len())
        .map(|j| {
            let mut row = vec![pct(SPARSITIES[j])];
            row.extend((0..PENALTIES.len()).map(|l| {
                let p = at(l, j);
                let mark = if p.pareto { " ★" } else { "" };
                format!("{} / {} / {}{mark}", share(p.energy_kept), share(p.forgetting), size(p.delta_bytes))
            }));
            row
        })
        .collect();
    let mut head = vec!["sparsity".to_string()];
    head.extend((0..PENALTIES.len()).map(strength_label));
    Section {
        title: "Choosing a penalty strength and a sparsity".into(),
        intro: format!(
            "Each point is one choice of fapm prune --penalty λ --sparsity s for this model: up keeps more \
             of the task vector's energy (more of the new skill), left applies less of the forgetting \
             proxy (smaller changes relative to the base weights), and the label gives the delta's size. \
             Both axes are sums over the kept positions, so keeping more moves a point up and right: \
             the question is where a curve gets high for little forgetting and few bytes. {} The table gives \
             every point as energy kept / forgetting proxy kept / delta size, ★ marking the Pareto points; \
             hover over a point for its numbers and flags. The delta sizes are estimates (the kept values encoded \
             and compressed as prune does, measured on sampled chunks, plus what prune stores whole).",
            dominance_sentence(whole, points)
        ),
        figures: vec![figure(
            &chart,
            "Whole model: share of the task vector's energy kept (y) against the share of the \
             forgetting proxy kept (x, log scale). Colours: penalty strengths as in the charts above; \
             grey lines join the strengths of one sparsity (labelled at the strongest penalty's end).",
        )],
        table: Some(Table { head, rows }),
    }
}

/// The sentence that says which points dominate: the Pareto points (nothing keeps more
/// energy with less forgetting in a delta no larger), and how many the others are.
pub fn dominance_sentence(whole: &WholeModel, points: &[Point]) -> String {
    if whole.candidates == 0 {
        return "The fine-tuned model is the base: nothing changed, so there is no trade-off.".into();
    }
    // The Pareto points by strength: "λ = 1 at 50, 75 and 90%".
    let pareto: Vec<String> = PENALTIES
        .iter()
        .filter_map(|l| {
            let at: Vec<String> = points
                .iter()
                .filter(|p| p.pareto && p.penalty == *l)
                .map(|p| pct(p.sparsity).trim_end_matches('%').to_string())
                .collect();
            let (last, rest) = at.split_last()?;
            let list = if rest.is_empty() { last.clone() } else { format!("{} and {last}", rest.join(", ")) };
            Some(format!("λ = {l} at {list}%"))
        })
        .collect();
    let count = points.iter().filter(|p| p.pareto).count();
    let others = points.len() - count;
    let example = points.iter().filter_map(|p| Some((p, &points[p.dominated_by?]))).max_by_key(|(p, _)| p.delta_bytes);
    let example = example.map_or(String::new(), |(p, by)| {
        format!(
            " For instance {} ({}) keeps less energy with more forgetting than {} ({}).",
            p.label(),
            size(p.delta_bytes),
            by.label(),
            size(by.delta_bytes)
        )
    });
    format!(
        "{} of the {} points are Pareto-optimal (no other point keeps more energy with less forgetting): {}. \
         The other {others} are dominated: another point beats each on both axes (hover over a point to see \
         which; the dominating point may be larger).{example} Choose among the Pareto points by the size you \
         can ship and the forgetting you can afford, then check the choice on your own evaluation \
         (fapm.sweep in Python): weight-space measures rank candidates, your evaluation decides.",
        count,
        points.len(),
        pareto.join("; "),
    )
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
    let dims = match p.rank {
        0 => "scalar".to_string(),
        1 => p.cols.to_string(),
        2 => format!("{} x {}", p.rows, p.cols),
        _ => format!("{} x ({} inner)", p.rows, p.cols),
    };
    match p.appended_rows {
        0 => dims,
        r => format!("{dims} (+{r} appended rows, stored whole, not charted)"),
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
            "Share of each block that magnitude pruning (λ = 0) keeps at sparsity {}; same colour \
             scale as the FAPM map next to it.",
            pct(MAP_SPARSITY)
        ),
        Quantity::KeptFapm => format!(
            "Share of each block that FAPM (λ = 1) keeps at sparsity {}: compare with the magnitude \
             map to see where the penalty moves the kept positions.",
            pct(MAP_SPARSITY)
        ),
    }
}

/// The per-tensor section: for the tensors `shown` (the largest, at most
/// [`MAX_TENSOR_ROWS`] of `charted`), each one's energy and forgetting proxy kept at
/// [`MAP_SPARSITY`], a line per penalty strength, and their table.
pub fn per_tensor(shown: &[&TensorStats], charted: usize) -> Section {
    let j = SPARSITIES.iter().position(|s| *s == MAP_SPARSITY).expect("the map sparsity is charted");
    let names: Vec<String> = shown.iter().map(|s| s.name.clone()).collect();
    let series = |f: &dyn Fn(&TensorStats, &Kept) -> Option<f64>| {
        strength_series(|l| shown.iter().enumerate().map(|(i, s)| (i as f64, nan(f(s, &s.kept[l][j])))).collect())
    };
    let energy = Chart {
        title: format!("Energy kept per tensor, sparsity {}", pct(MAP_SPARSITY)),
        subtitle: "sum dW^2 over kept / over all changes, each tensor".into(),
        x_label: "tensor (checkpoint order; its row in the table below)".into(),
        y_label: "energy kept".into(),
        x_log: false,
        y_log: false,
        y_range: Some((0.0, 1.0)),
        x_ticks: None,
        x_names: Some(names),
        series: series(&|s, k| Kept::share(k.d2, s.total_d2)),
    };
    let forgetting = Chart {
        title: format!("Forgetting proxy kept per tensor, sparsity {}", pct(MAP_SPARSITY)),
        subtitle: "sum min(|dW| / |W_base|, 1)^2 over kept / over all changes, each tensor".into(),
        y_label: "forgetting proxy kept".into(),
        series: series(&|s, k| Kept::share(k.rel2, s.total_rel2)),
        ..energy.clone()
    };
    let which = if shown.len() < charted {
        format!(
            "the {} largest of the {charted} tensors (by elements; at most {MAX_TENSOR_ROWS} are shown one by \
             one, every tensor is in the whole-model numbers)",
            shown.len()
        )
    } else {
        format!("all {charted} tensors")
    };
    let [mag, fapm] = MAP_PENALTIES;
    let rows = shown
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (m, f) = (&s.kept[mag][j], &s.kept[fapm][j]);
            let unchanged = s.candidates == 0;
            let cell = |v: Option<f64>| if unchanged { "unchanged".into() } else { share(v) };
            vec![
                i.to_string(),
                s.name.clone(),
                s.n.to_string(),
                format!("{:.2}%", 100.0 * s.candidates as f64 / s.n as f64),
                format!("{:.3e}", s.mean),
                cell(Kept::share(m.d2, s.total_d2)),
                cell(Kept::share(f.d2, s.total_d2)),
                cell(Kept::share(m.rel2, s.total_rel2)),
                cell(Kept::share(f.rel2, s.total_rel2)),
            ]
        })
        .collect();
    let s90 = pct(MAP_SPARSITY);
    let head = vec![
        "#".to_string(),
        "tensor".into(),
        "elements".into(),
        "changed".into(),
        "mean |W_base|".into(),
        format!("energy kept {s90} λ=0"),
        format!("energy kept {s90} λ=1"),
        format!("forgetting {s90} λ=0"),
        format!("forgetting {s90} λ=1"),
    ];
    Section {
        title: format!("Per tensor, sparsity {s90}"),
        intro: format!(
            "One point per tensor for {which}, in checkpoint order; one line per penalty strength, \
             coloured as above. A tensor that fine-tuning left unchanged shows as unchanged."
        ),
        figures: vec![
            figure(&energy, format!("Share of each tensor's task-vector energy kept at sparsity {s90}")),
            figure(&forgetting, format!("Share of each tensor's forgetting proxy kept at sparsity {s90}")),
        ],
        table: Some(Table { head, rows }),
    }
}

/// Facts about the inputs, for the list at the top of the page.
/// `extended` is how many tensors are extended and how many values their appended rows hold;
/// `named` the first of them (name, rows appended, values appended).
pub fn facts(whole: &WholeModel, other: usize, extended: (usize, u64), named: &[(String, u64, u64)]) -> Vec<String> {
    let (extended, values) = extended;
    let mut facts = vec![
        format!(
            "{} tensors charted (floating, in both checkpoints, 1-D included; {} of them unchanged); {} \
             other fine-tuned tensors are not (integer, another shape, or missing from the base), and \
             prune stores them whole.",
            whole.tensors, whole.unchanged, other
        ),
        format!(
            "{} of {} positions changed. A candidate is a position whose fine-tuned bits differ from the \
             base; only candidates can be kept. 'Kept' is exactly what fapm prune --threshold approx \
             --penalty λ keeps at that sparsity: the same histogram of scores, the same cut, the same \
             positions.",
            whole.candidates, whole.elements
        ),
        "The forgetting proxy sums min(|dW| / |W_base|, 1)^2 over the kept positions: a change as large \
         as the weight it modifies (or to a weight of 0) counts 1, the most one position can count."
            .into(),
    ];
    if extended > 0 {
        let more = if named.len() < extended { format!(" and {} more", extended - named.len()) } else { String::new() };
        facts.push(format!(
            "{extended} tensors are extended (a resized vocabulary: the fine-tuned tensor appends rows to the \
             base's): {}{more}. Their base-shaped part is charted and pruned like any other; the {values} \
             values of the appended rows have no base to diff against, so prune stores them whole and they \
             are not in the charts.",
            named.iter().map(|(n, r, _)| format!("{n} (+{r} rows)")).collect::<Vec<_>>().join(", "),
        ));
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_shares_read_as_people_write_them() {
        assert_eq!(size(999), "999 B");
        assert_eq!(size(123_456), "123.5 kB");
        assert_eq!(size(45_600_000), "45.6 MB");
        assert_eq!(size(5_247_425), "5.2 MB");
        assert_eq!(share(None), "unchanged");
        assert_eq!(share(Some(0.61234)), "0.612");
        assert_eq!(pct("0.95"), "95%");
        assert_eq!(pct("0.999"), "99.9%");
    }
}

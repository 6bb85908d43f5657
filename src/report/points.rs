//! The trade-off's points: for every penalty strength λ and sparsity, what the whole model
//! keeps (the share of the task vector's energy and of the forgetting proxy) and the delta's
//! size; which points are Pareto-optimal; and `report.json`, where other tools read them.

use serde_json::json;

use super::stats::{Kept, TensorStats, PENALTIES, SPARSITIES};

/// What every strength keeps of the whole model at every sparsity: the sums over tensors,
/// folded in one tensor at a time.
pub struct WholeModel {
    /// `kept[l][j]`: what strength `PENALTIES[l]` keeps at sparsity `SPARSITIES[j]`.
    pub kept: Vec<Vec<Kept>>,
    /// The task vector's energy `sum dW^2` over every candidate.
    pub total_d2: f64,
    /// The forgetting proxy over every candidate.
    pub total_rel2: f64,
    /// How many tensors are summed.
    pub tensors: usize,
    /// How many of them are unchanged (no candidate).
    pub unchanged: usize,
    /// How many elements they have, and how many are candidates.
    pub elements: u64,
    /// Candidates (positions whose bits changed).
    pub candidates: u64,
    /// `bytes[l][j]`: the estimated bytes of the kept values of tensors whose bytes were measured.
    bytes: Vec<Vec<f64>>,
    /// `unmeasured[l][j]`: kept values of tensors whose sampled chunks kept none.
    unmeasured: Vec<Vec<u64>>,
    /// Bytes prune stores whole (uncharted tensors, appended rows).
    pub whole_bytes: u64,
}

/// One choice of `fapm prune --penalty λ --sparsity s`, for the whole model.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// The penalty strength, as `--penalty` takes it.
    pub penalty: &'static str,
    /// The sparsity, as `--sparsity` takes it.
    pub sparsity: &'static str,
    /// The share of the task vector's energy kept (None: nothing changed).
    pub energy_kept: Option<f64>,
    /// The share of the forgetting proxy kept (None: nothing changed).
    pub forgetting: Option<f64>,
    /// Positions kept.
    pub kept: u64,
    /// The delta's estimated size in bytes.
    pub delta_bytes: u64,
    /// No other point keeps at least as much energy with at most as much forgetting, and is
    /// better in one of the two.
    pub pareto: bool,
    /// The index (in the points) of a point that dominates this one, when not Pareto-optimal.
    pub dominated_by: Option<usize>,
}

impl Point {
    /// `λ = 0.5, sparsity 90%`.
    pub fn label(&self) -> String {
        format!("λ = {}, sparsity {}", self.penalty, super::sections::pct(self.sparsity))
    }

    /// The flags of `fapm prune` that keep this point.
    pub fn flags(&self) -> String {
        format!("--penalty {} --sparsity {}", self.penalty, self.sparsity)
    }
}

impl WholeModel {
    /// No tensor yet; `whole_bytes` is what prune stores whole.
    pub fn new(whole_bytes: u64) -> Self {
        let grid = |v| vec![vec![v; SPARSITIES.len()]; PENALTIES.len()];
        WholeModel {
            kept: vec![vec![Kept::default(); SPARSITIES.len()]; PENALTIES.len()],
            total_d2: 0.0,
            total_rel2: 0.0,
            tensors: 0,
            unchanged: 0,
            elements: 0,
            candidates: 0,
            bytes: grid(0.0),
            unmeasured: vec![vec![0; SPARSITIES.len()]; PENALTIES.len()],
            whole_bytes,
        }
    }

    /// Adds one tensor's numbers.
    pub fn add(&mut self, s: &TensorStats) {
        self.tensors += 1;
        self.unchanged += (s.candidates == 0) as usize;
        self.elements += s.n;
        self.candidates += s.candidates;
        self.total_d2 += s.total_d2;
        self.total_rel2 += s.total_rel2;
        for (l, row) in s.kept.iter().enumerate() {
            for (j, k) in row.iter().enumerate() {
                self.kept[l][j].add(k);
                match k.bytes_per_value() {
                    Some(b) => self.bytes[l][j] += b * k.count as f64,
                    None => self.unmeasured[l][j] += k.count,
                }
            }
        }
    }

    /// The estimated delta bytes of strength `l` at sparsity `j`: each tensor's kept values at
    /// its measured bytes per value (the model's where none of its were measured), plus what
    /// is stored whole.
    pub fn delta_bytes(&self, l: usize, j: usize) -> u64 {
        let k = &self.kept[l][j];
        let per_value = k.bytes_per_value().unwrap_or(0.0);
        (self.bytes[l][j] + self.unmeasured[l][j] as f64 * per_value).round() as u64 + self.whole_bytes
    }

    /// Every (strength, sparsity) point, sparsity-major, with the Pareto marks.
    pub fn points(&self) -> Vec<Point> {
        let mut points: Vec<Point> = (0..SPARSITIES.len())
            .flat_map(|j| (0..PENALTIES.len()).map(move |l| (l, j)))
            .map(|(l, j)| {
                let k = &self.kept[l][j];
                Point {
                    penalty: PENALTIES[l],
                    sparsity: SPARSITIES[j],
                    energy_kept: Kept::share(k.d2, self.total_d2),
                    forgetting: Kept::share(k.rel2, self.total_rel2),
                    kept: k.count,
                    delta_bytes: self.delta_bytes(l, j),
                    pareto: false,
                    dominated_by: None,
                }
            })
            .collect();
        let marks = pareto(&points);
        for (p, m) in points.iter_mut().zip(marks) {
            (p.pareto, p.dominated_by) = (m.is_none() && p.energy_kept.is_some(), m);
        }
        points
    }
}

/// Whether `a` dominates `b` on the trade-off chart's two axes: at least as much energy, at
/// most as much forgetting, and better in one of them. The size is not a criterion: energy is
/// kept best by magnitude pruning at every size by construction, so with the size as a third
/// criterion no point would ever beat one of another size and every point would be
/// "optimal"; the size is shown beside each point instead, and named in the sentence.
pub fn dominates(a: &Point, b: &Point) -> bool {
    let (Some(ea), Some(fa), Some(eb), Some(fb)) = (a.energy_kept, a.forgetting, b.energy_kept, b.forgetting) else {
        return false;
    };
    ea >= eb && fa <= fb && (ea > eb || fa < fb)
}

/// For each point, a point that dominates it (the smallest delta among them, then the one
/// keeping the most energy), or None when it is Pareto-optimal.
fn pareto(points: &[Point]) -> Vec<Option<usize>> {
    points
        .iter()
        .map(|b| {
            (0..points.len()).filter(|&i| dominates(&points[i], b)).min_by(|&x, &y| {
                let (px, py) = (&points[x], &points[y]);
                px.delta_bytes.cmp(&py.delta_bytes).then(py.energy_kept.partial_cmp(&px.energy_kept).expect("finite"))
            })
        })
        .collect()
}

/// `report.json`: the inputs by name and every point (docs/PIPELINE.md, "report.json").
pub fn json(base: &str, finetuned: &str, whole: &WholeModel, points: &[Point]) -> String {
    let points: Vec<_> = points
        .iter()
        .map(|p| {
            json!({
                "sparsity": p.sparsity,
                "penalty": p.penalty,
                "energy_kept": p.energy_kept,
                "forgetting": p.forgetting,
                "delta_bytes": p.delta_bytes,
                "pareto": p.pareto,
                "kept": p.kept,
                "dominated_by": p.dominated_by,
                "command": format!("fapm prune {}", p.flags()),
            })
        })
        .collect();
    let v = json!({
        "fapm_report": super::REPORT_JSON_VERSION,
        "base": base,
        "finetuned": finetuned,
        "tensors": whole.tensors,
        "unchanged_tensors": whole.unchanged,
        "elements": whole.elements,
        "candidates": whole.candidates,
        "metric": "fapm",
        "threshold": "approx",
        "points": points,
    });
    let mut text = serde_json::to_string_pretty(&v).expect("a JSON value serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(e: f64, f: f64, bytes: u64) -> Point {
        Point {
            penalty: "1",
            sparsity: "0.9",
            energy_kept: Some(e),
            forgetting: Some(f),
            kept: 0,
            delta_bytes: bytes,
            pareto: false,
            dominated_by: None,
        }
    }

    #[test]
    fn pareto_points_are_those_nothing_beats_on_both_axes() {
        let points = [
            point(0.9, 0.5, 100),
            point(0.8, 0.1, 100),
            point(0.7, 0.2, 50),  // dominated by the second (a larger delta)
            point(0.9, 0.6, 100), // dominated by the first
            point(0.5, 0.05, 10),
            point(0.5, 0.05, 10),  // equal points do not dominate each other
            point(0.5, 0.04, 300), // it beats the two above, whatever its size
            point(0.1, 0.01, 1),
        ];
        let got = pareto(&points);
        assert_eq!(got, [None, None, Some(1), Some(0), Some(6), Some(6), None, None]);
        let mut unchanged = point(0.0, 0.0, 1);
        (unchanged.energy_kept, unchanged.forgetting) = (None, None);
        assert_eq!(pareto(&[unchanged.clone(), point(0.5, 0.5, 5)]), [None, None]);
    }
}

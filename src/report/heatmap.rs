//! Heatmaps of one weight matrix, block-downsampled in one streaming pass: |W_base|, |dW|,
//! |dW| / |W_base|, the FAPM score, and where each metric's kept positions lie.

use fapm_stages::score::{convert, key, score, Elem, Metric};
use fapm_stages::with_elems;

use super::png::{fmt_value, Align, Canvas, Rgb, INK, MUTED, WHITE};
use super::stats::{BinCut, Pair, MAP_SPARSITY};

/// The largest heatmap, in blocks, along either side.
pub const MAX_CELLS: u64 = 256;

/// Colour of a block with no finite value.
const NO_DATA: Rgb = [190, 190, 190];

/// One picture a heatmap can show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    /// Block mean of `|W_base|`.
    BaseAbs,
    /// Block mean of `|dW|`.
    DeltaAbs,
    /// Block mean of `|dW| / |W_base|` (finite values).
    Relative,
    /// Block mean of the FAPM score (finite values).
    Score,
    /// Share of the block kept by magnitude pruning at [`MAP_SPARSITY`].
    KeptMagnitude,
    /// Share of the block kept by FAPM pruning at [`MAP_SPARSITY`].
    KeptFapm,
}

impl Quantity {
    /// Every quantity, in the order the report shows them.
    pub const ALL: [Quantity; 6] = [
        Quantity::BaseAbs,
        Quantity::DeltaAbs,
        Quantity::Relative,
        Quantity::Score,
        Quantity::KeptMagnitude,
        Quantity::KeptFapm,
    ];

    /// A short name for file names.
    pub fn slug(self) -> &'static str {
        match self {
            Quantity::BaseAbs => "base",
            Quantity::DeltaAbs => "delta",
            Quantity::Relative => "relative",
            Quantity::Score => "score",
            Quantity::KeptMagnitude => "kept-magnitude",
            Quantity::KeptFapm => "kept-fapm",
        }
    }

    /// The picture's title.
    pub fn title(self) -> String {
        match self {
            Quantity::BaseAbs => "|W_base|".into(),
            Quantity::DeltaAbs => "|dW| = |W_ft - W_base|".into(),
            Quantity::Relative => "|dW| / |W_base|".into(),
            Quantity::Score => "FAPM score S".into(),
            Quantity::KeptMagnitude => format!("kept by magnitude, s = {MAP_SPARSITY}"),
            Quantity::KeptFapm => format!("kept by FAPM, s = {MAP_SPARSITY}"),
        }
    }

    fn scale(self) -> Scale {
        match self {
            Quantity::BaseAbs | Quantity::DeltaAbs | Quantity::Relative => Scale::Log,
            Quantity::Score => Scale::SymLog,
            Quantity::KeptMagnitude | Quantity::KeptFapm => Scale::Linear,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scale {
    Log,
    SymLog,
    Linear,
}

#[derive(Clone, Copy, Default)]
struct Cell {
    n: u64,
    base: f64,
    delta: f64,
    rel: f64,
    rel_n: u64,
    score: f64,
    score_n: u64,
    kept: [f64; 2],
}

/// Block sums of one matrix on a grid of at most [`MAX_CELLS`] x [`MAX_CELLS`] blocks.
pub struct Grid {
    /// Matrix rows.
    pub rows: u64,
    /// Matrix columns.
    pub cols: u64,
    /// Grid rows.
    pub gh: usize,
    /// Grid columns.
    pub gw: usize,
    cells: Vec<Cell>,
}

/// Grid size for a matrix: aspect kept where it can be, at least 32 blocks a side (or the
/// matrix size), at most [`MAX_CELLS`].
pub fn grid_dims(rows: u64, cols: u64) -> (usize, usize) {
    let m = rows.max(cols).max(1);
    let fit = |n: u64| ((n as u128 * MAX_CELLS as u128).div_ceil(m as u128) as u64).clamp(32, 256);
    (fit(rows).min(rows) as usize, fit(cols).min(cols) as usize)
}

/// First index of each block when `n` indices are split into `g` blocks (then `n`).
fn bounds(n: u64, g: usize) -> Vec<u64> {
    (1..=g as u64).map(|j| (j as u128 * n as u128).div_ceil(g as u128) as u64).collect()
}

fn block_of(x: u64, n: u64, g: usize) -> usize {
    (x as u128 * g as u128 / n as u128) as usize
}

/// One streaming pass over a pair, summing every block; `cuts` are the two metrics' cuts
/// (magnitude, FAPM) at [`MAP_SPARSITY`] and `mean` is the FAPM base mean.
pub fn accumulate(pair: &Pair, mean: f32, cuts: [BinCut; 2]) -> Grid {
    let (gh, gw) = grid_dims(pair.rows, pair.cols);
    let mut grid = Grid { rows: pair.rows, cols: pair.cols, gh, gw, cells: vec![Cell::default(); gh * gw] };
    let rb = bounds(pair.rows, gh);
    let cb = bounds(pair.cols, gw);
    let (ftd, based) = pair.dtypes();
    pair.for_chunks(|start, ft, base| {
        with_elems!(ftd, based, |F, B| add_chunk::<F, B>(&mut grid, &rb, &cb, start, ft, base, mean, cuts))
    });
    grid
}

#[allow(clippy::too_many_arguments)]
fn add_chunk<F: Elem, B: Elem>(
    grid: &mut Grid,
    rb: &[u64],
    cb: &[u64],
    start: u64,
    ft: &[u8],
    base: &[u8],
    mean: f32,
    cuts: [BinCut; 2],
) {
    let (rows, cols, gw) = (grid.rows, grid.cols, grid.gw);
    let (mut row, mut col) = (start / cols, start % cols);
    let mut cr = block_of(row, rows, grid.gh);
    let mut cc = block_of(col, cols, gw);
    for i in 0..ft.len() / F::SIZE {
        let fb = F::bits(ft, i);
        let bb = B::bits(base, i);
        let p = B::to_f32(bb);
        let changed = fb != convert::<F, B>(bb);
        let f = if changed { F::to_f32(fb) } else { p };
        let ad = (f - p).abs();
        let rel = ad / p.abs();
        let s = score(Metric::Fapm, f, p, mean);
        let cell = &mut grid.cells[cr * gw + cc];
        cell.n += 1;
        if p.is_finite() {
            cell.base += p.abs() as f64;
        }
        if ad.is_finite() {
            cell.delta += ad as f64;
        }
        if rel.is_finite() {
            cell.rel += rel as f64;
            cell.rel_n += 1;
        }
        if s.is_finite() {
            cell.score += s as f64;
            cell.score_n += 1;
        }
        if changed {
            cell.kept[0] += cuts[0].weight(key(ad));
            cell.kept[1] += cuts[1].weight(key(s));
        }
        col += 1;
        if col == cols {
            col = 0;
            cc = 0;
            row += 1;
            if row < rows && row >= rb[cr] {
                cr += 1;
            }
        } else if col >= cb[cc] {
            cc += 1;
        }
    }
}

impl Grid {
    /// The value of every block for `q`, row-major (NaN where the block has no finite data).
    pub fn values(&self, q: Quantity) -> Vec<f64> {
        let ratio = |a: f64, n: u64| if n > 0 { a / n as f64 } else { f64::NAN };
        self.cells
            .iter()
            .map(|c| match q {
                Quantity::BaseAbs => ratio(c.base, c.n),
                Quantity::DeltaAbs => ratio(c.delta, c.n),
                Quantity::Relative => ratio(c.rel, c.rel_n),
                Quantity::Score => ratio(c.score, c.score_n),
                Quantity::KeptMagnitude => ratio(c.kept[0], c.n),
                Quantity::KeptFapm => ratio(c.kept[1], c.n),
            })
            .collect()
    }
}

/// Interpolates a colour map given as evenly spaced stops, `t` in [0, 1].
fn ramp(stops: &[Rgb], t: f64) -> Rgb {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let x = t * (stops.len() - 1) as f64;
    let i = (x.floor() as usize).min(stops.len() - 2);
    let f = x - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (stops[i], stops[i + 1]);
    [mix(a[0], b[0]), mix(a[1], b[1]), mix(a[2], b[2])]
}

/// A perceptually ordered dark-blue-to-yellow map (the viridis stops).
const SEQUENTIAL: [Rgb; 9] = [
    [68, 1, 84],
    [71, 44, 122],
    [59, 81, 139],
    [44, 113, 142],
    [33, 144, 141],
    [39, 173, 129],
    [92, 200, 99],
    [170, 220, 50],
    [253, 231, 37],
];

/// Blue for negative, white for zero, red for positive.
const DIVERGING: [Rgb; 7] =
    [[33, 102, 172], [103, 169, 207], [209, 229, 240], [247, 247, 247], [253, 219, 199], [239, 138, 98], [178, 24, 43]];

/// The `q`-quantile of a non-empty slice (nearest rank; reorders the slice).
fn percentile(v: &mut [f64], q: f64) -> f64 {
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    *v.select_nth_unstable_by(i, f64::total_cmp).1
}

/// How values map to [0, 1] and which ticks the colour bar shows.
struct Mapping {
    scale: Scale,
    /// Bottom of a log or linear scale; the linear threshold of a symmetric-log one.
    lo: f64,
    /// Top of the scale.
    hi: f64,
    /// Bottom of a symmetric-log scale, as a magnitude (the two signs scale separately).
    neg: f64,
}

impl Mapping {
    /// Fits the scale to the values: log and symmetric-log scales span the 0.5th to 99.5th
    /// percentile (a few extreme blocks, such as near-zero base weights, would otherwise
    /// wash everything else out); values beyond the ends take the end colours.
    fn new(scale: Scale, values: &[f64], shared_max: Option<f64>) -> Self {
        let mut finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        match scale {
            Scale::Log => {
                finite.retain(|&v| v > 0.0);
                let (lo, hi) = if finite.is_empty() {
                    (0.1, 1.0)
                } else {
                    let (lo, hi) = (percentile(&mut finite, 0.005), percentile(&mut finite, 0.995));
                    (lo.max(hi * 1e-6).min(hi / 10f64.sqrt()), hi)
                };
                Mapping { scale, lo, hi, neg: 0.0 }
            }
            Scale::SymLog => {
                let side = |positive: bool| {
                    let mut abs: Vec<f64> =
                        finite.iter().filter(|&&v| (v > 0.0) == positive && v != 0.0).map(|v| v.abs()).collect();
                    if abs.is_empty() {
                        0.0
                    } else {
                        percentile(&mut abs, 0.99)
                    }
                };
                let (pos, neg) = (side(true), side(false));
                let (pos, neg) = match (pos > 0.0, neg > 0.0) {
                    (true, true) => (pos, neg),
                    (true, false) => (pos, pos),
                    (false, true) => (neg, neg),
                    (false, false) => (1.0, 1.0),
                };
                Mapping { scale, lo: pos.min(neg) * 1e-3, hi: pos, neg }
            }
            Scale::Linear => {
                let m = shared_max.unwrap_or_else(|| finite.iter().copied().fold(0.0, f64::max));
                Mapping { scale, lo: 0.0, hi: if m > 0.0 { m } else { 1.0 }, neg: 0.0 }
            }
        }
    }

    fn t(&self, v: f64) -> f64 {
        match self.scale {
            Scale::Log => {
                let v = v.clamp(self.lo, self.hi);
                (v / self.lo).log10() / (self.hi / self.lo).log10()
            }
            Scale::SymLog => {
                let v = v.clamp(-self.neg, self.hi);
                let f = |x: f64| (1.0 + x.abs() / self.lo).log10();
                if v >= 0.0 {
                    0.5 + 0.5 * f(v) / f(self.hi)
                } else {
                    0.5 - 0.5 * f(v) / f(self.neg)
                }
            }
            Scale::Linear => v / self.hi,
        }
    }

    fn color(&self, v: f64) -> Rgb {
        if !v.is_finite() {
            NO_DATA
        } else if self.scale == Scale::SymLog {
            ramp(&DIVERGING, self.t(v))
        } else {
            ramp(&SEQUENTIAL, self.t(v))
        }
    }

    fn ticks(&self) -> Vec<f64> {
        match self.scale {
            Scale::Log => {
                let (a, b) = (self.lo.log10().ceil() as i32, self.hi.log10().floor() as i32);
                let step = ((b - a) / 6 + 1).max(1);
                let mut t: Vec<f64> = (a..=b).filter(|e| (e - a) % step == 0).map(|e| 10f64.powi(e)).collect();
                if t.len() < 2 {
                    t = vec![self.lo, self.hi];
                }
                t
            }
            Scale::SymLog => {
                let (m, n) = (self.hi, self.neg);
                vec![-n, -n / 10.0, -n / 100.0, 0.0, m / 100.0, m / 10.0, m]
            }
            Scale::Linear => (0..=4).map(|i| self.hi * i as f64 / 4.0).collect(),
        }
    }
}

/// Draws one heatmap with its title, tensor name, row/column extents and colour bar.
/// `shared_max` fixes the top of a linear scale (so the two kept maps compare).
pub fn render(grid: &Grid, q: Quantity, name: &str, shared_max: Option<f64>) -> Canvas {
    let values = grid.values(q);
    let map = Mapping::new(q.scale(), &values, shared_max);
    let px = (240 / grid.gh.max(grid.gw)).clamp(1, 16);
    let (img_w, img_h) = ((grid.gw * px) as i64, (grid.gh * px) as i64);
    let labels: Vec<String> = map.ticks().iter().map(|&v| fmt_value(v)).collect();
    let label_w = labels.iter().map(|l| l.len() * 6).max().unwrap_or(0) as i64;
    let row_label_w = (grid.rows.to_string().len() * 6) as i64;
    let (x0, y0) = (14 + row_label_w + 6, 64i64);
    let bar_h = img_h.max(160);
    let bar_x = x0 + img_w + 18;
    let subtitle = format!(
        "{} x {}, block mean over {} x {} blocks",
        grid.rows,
        grid.cols,
        grid.rows.div_ceil(grid.gh as u64),
        grid.cols.div_ceil(grid.gw as u64)
    );
    let text_w = [q.title().len() * 12, name.len() * 6, subtitle.len() * 6].into_iter().max().unwrap_or(0) as i64;
    let width = (bar_x + 16 + 6 + label_w + 14).max(text_w + 28);
    let height = y0 + bar_h + 30;
    let mut c = Canvas::new(width as usize, height as usize, WHITE);
    c.text(14, 12, &q.title(), 2, Align::Left, INK);
    c.text(14, 34, name, 1, Align::Left, INK);
    c.text(14, 46, &subtitle, 1, Align::Left, MUTED);
    for gy in 0..grid.gh {
        for gx in 0..grid.gw {
            let col = map.color(values[gy * grid.gw + gx]);
            let (x, y) = (x0 + (gx * px) as i64, y0 + (gy * px) as i64);
            c.fill_rect(x, y, px as i64, px as i64, col);
        }
    }
    c.outline(x0 - 1, y0 - 1, img_w + 2, img_h + 2, INK);
    c.text(x0 - 4, y0, "0", 1, Align::Right, MUTED);
    let last_row = (grid.rows - 1).to_string();
    c.text(x0 - 4, y0 + img_h - 7, &last_row, 1, Align::Right, MUTED);
    c.text(x0, y0 + img_h + 5, "0", 1, Align::Left, MUTED);
    let last_col = (grid.cols - 1).to_string();
    c.text(x0 + img_w, y0 + img_h + 5, &last_col, 1, Align::Right, MUTED);
    // Colour bar: top is the highest value.
    for y in 0..bar_h {
        let t = 1.0 - y as f64 / (bar_h - 1).max(1) as f64;
        let col = if q.scale() == Scale::SymLog { ramp(&DIVERGING, t) } else { ramp(&SEQUENTIAL, t) };
        c.fill_rect(bar_x, y0 + y, 16, 1, col);
    }
    c.outline(bar_x - 1, y0 - 1, 18, bar_h + 2, INK);
    for (v, label) in map.ticks().iter().zip(&labels) {
        let y = y0 + ((1.0 - map.t(*v)) * (bar_h - 1) as f64).round() as i64;
        c.fill_rect(bar_x + 16, y, 4, 1, INK);
        c.text(bar_x + 23, y - 3, label, 1, Align::Left, INK);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_keeps_aspect_within_limits() {
        assert_eq!(grid_dims(8, 8), (8, 8));
        assert_eq!(grid_dims(4096, 4096), (256, 256));
        assert_eq!(grid_dims(4096, 11008), (96, 256));
        assert_eq!(grid_dims(151_936, 896), (256, 32));
        assert_eq!(grid_dims(3, 100_000), (3, 256));
    }

    #[test]
    fn blocks_partition_the_indices() {
        for (n, g) in [(10u64, 3usize), (256, 256), (1000, 7), (5, 5)] {
            let b = bounds(n, g);
            assert_eq!(*b.last().unwrap(), n);
            for x in 0..n {
                let j = block_of(x, n, g);
                assert!(x < b[j] && (j == 0 || x >= b[j - 1]), "{n} {g} {x}");
            }
        }
    }

    #[test]
    fn colour_maps_are_monotone_at_the_ends() {
        let m = Mapping::new(Scale::Log, &[1e-3, 1.0, f64::NAN, 0.0], None);
        assert_eq!(m.color(1.0), SEQUENTIAL[8]);
        assert_eq!(m.color(1e-9), SEQUENTIAL[0]);
        assert_eq!(m.color(f64::NAN), NO_DATA);
        let s = Mapping::new(Scale::SymLog, &[-200.0, 1.0], None);
        assert_eq!(s.color(0.0), DIVERGING[3]);
        assert_eq!(s.color(-200.0), DIVERGING[0]);
        assert_eq!(s.color(1.0), DIVERGING[6]);
        assert_eq!(s.color(-1e9), DIVERGING[0]);
    }
}

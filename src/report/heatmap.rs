//! Heatmaps of one weight matrix, block-averaged in one streaming pass: |W_base|, |dW|,
//! |dW| / |W_base|, the FAPM score, and where each metric's kept positions lie. The blocks
//! are drawn as a PNG; its title, axes and colour bar are SVG around it in the page.
//!
//! A heatmap is sized for a person to see rows and columns of change: its longer side is
//! [`LONG_SIDE`] pixels, its shorter side at least half that whatever the matrix's aspect
//! (a 1536 x 384 matrix is drawn 768 x 384, one pixel per column), and no block is smaller
//! than a pixel. Colour scales are clipped at percentiles so that a few extreme blocks do
//! not wash out the rest; the colour bar's end arrows show when blocks lie beyond them.

use std::fmt::Write as _;

use fapm_stages::dtype::Elem;
use fapm_stages::threshold::score::{score, Metric};
use fapm_stages::threshold::select::Cut;
use fapm_stages::with_elems;

use super::stats::{Pair, Scratch, Selection, MAP_PENALTIES, MAP_SPARSITY};
use super::svg::{esc, hex, num, text, text_width, Anchor, Rgb, INK, MUTED};

/// The longer side of every heatmap, in pixels.
pub const LONG_SIDE: u64 = 768;

/// What drawing one tensor's heatmaps holds at most, in bytes (for the memory budget): its
/// grid of blocks (six values each), one picture's pixels and its PNG.
pub const GRID_BYTES: u64 = LONG_SIDE * LONG_SIDE * (6 * 4 + 2 * 4);

/// The most the drawn aspect ratio may differ from square (the true one is in the title).
pub const MAX_ASPECT: u64 = 2;

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

/// The drawn size of a `rows x cols` matrix, (height, width) in pixels.
pub fn display_dims(rows: u64, cols: u64) -> (u64, u64) {
    let (long, short) = (rows.max(cols).max(1), rows.min(cols));
    let side = ((LONG_SIDE as u128 * short as u128) / long as u128) as u64;
    let side = side.clamp(LONG_SIDE / MAX_ASPECT, LONG_SIDE);
    if rows >= cols {
        (LONG_SIDE, side)
    } else {
        (side, LONG_SIDE)
    }
}

/// Grid size (blocks down, blocks across): one block per pixel of the drawn size, or one
/// per element when the matrix is smaller.
pub fn grid_dims(rows: u64, cols: u64) -> (usize, usize) {
    let (h, w) = display_dims(rows, cols);
    (rows.min(h) as usize, cols.min(w) as usize)
}

/// First index of each block when `n` indices are split into `g` blocks (the last is `n`).
fn bounds(n: u64, g: usize) -> Vec<u64> {
    (1..=g as u64).map(|j| (j as u128 * n as u128).div_ceil(g as u128) as u64).collect()
}

/// Sums over one block while its grid row is being streamed.
#[derive(Clone, Copy, Default)]
struct Cell {
    n: u64,
    base: f64,
    delta: f64,
    rel: f64,
    rel_n: u64,
    score: f64,
    score_n: u64,
    kept: [u64; 2],
}

impl Cell {
    /// The block's value of every quantity, in [`Quantity::ALL`] order (NaN: no data).
    fn values(&self) -> [f32; 6] {
        let ratio = |a: f64, n: u64| if n > 0 { (a / n as f64) as f32 } else { f32::NAN };
        [
            ratio(self.base, self.n),
            ratio(self.delta, self.n),
            ratio(self.rel, self.rel_n),
            ratio(self.score, self.score_n),
            ratio(self.kept[0] as f64, self.n),
            ratio(self.kept[1] as f64, self.n),
        ]
    }
}

/// Every block's value of every quantity for one matrix.
pub struct Grid {
    /// Matrix rows.
    pub rows: u64,
    /// Matrix columns.
    pub cols: u64,
    /// Grid rows.
    pub gh: usize,
    /// Grid columns.
    pub gw: usize,
    /// Row-major, one entry per block, quantities in [`Quantity::ALL`] order.
    values: Vec<[f32; 6]>,
}

impl Grid {
    /// The value of every block for `q`, row-major (NaN where the block has no finite data).
    pub fn values(&self, q: Quantity) -> Vec<f64> {
        let i = Quantity::ALL.iter().position(|&a| a == q).expect("every quantity is listed");
        self.values.iter().map(|v| v[i] as f64).collect()
    }
}

/// The streaming state: the current position, and the sums of the grid row it is in (the
/// matrix arrives row by row, so only one grid row of sums is ever open).
struct Accumulator {
    cols: u64,
    row_bounds: Vec<u64>,
    col_bounds: Vec<u64>,
    row: u64,
    col: u64,
    block_row: usize,
    block_col: usize,
    band: Vec<Cell>,
    values: Vec<[f32; 6]>,
}

impl Accumulator {
    fn step(&mut self) {
        self.col += 1;
        if self.col < self.cols {
            if self.col >= self.col_bounds[self.block_col] {
                self.block_col += 1;
            }
            return;
        }
        (self.col, self.block_col) = (0, 0);
        self.row += 1;
        if self.row >= self.row_bounds[self.block_row] {
            self.flush();
            self.block_row += 1;
        }
    }

    fn flush(&mut self) {
        self.values.extend(self.band.iter().map(Cell::values));
        self.band.fill(Cell::default());
    }
}

/// One streaming pass over a pair, averaging every block; `cuts` are the cuts of the
/// [`MAP_PENALTIES`] (magnitude, FAPM) at [`MAP_SPARSITY`] and `mean` is the FAPM base mean.
pub fn accumulate(pair: &Pair, mean: f32, cuts: [Cut; 2], scratch: &mut Scratch) -> Grid {
    let (gh, gw) = grid_dims(pair.rows, pair.cols);
    let mut acc = Accumulator {
        cols: pair.cols,
        row_bounds: bounds(pair.rows, gh),
        col_bounds: bounds(pair.cols, gw),
        row: 0,
        col: 0,
        block_row: 0,
        block_col: 0,
        band: vec![Cell::default(); gw],
        values: Vec::with_capacity(gh * gw),
    };
    let strengths = super::stats::penalties();
    let scorers = pair.scorers(mean, &MAP_PENALTIES.map(|l| strengths[l]));
    let mut selections = cuts.map(Selection::new);
    let mut kept = [Vec::new(), Vec::new()];
    let (ftd, based) = pair.dtypes();
    pair.for_chunks(|_, ft, base| {
        let (len, _) = scratch.score(&scorers, ft, base);
        for ((sel, keys), kept) in selections.iter_mut().zip(&scratch.keys).zip(&mut kept) {
            let n = sel.next(&keys[..len], &mut scratch.kept);
            kept.clear();
            kept.extend_from_slice(&scratch.kept[..n]);
        }
        with_elems!(ftd, based, |F, B| add_chunk::<F, B>(&mut acc, ft, base, mean, [&kept[0], &kept[1]]))
    });
    debug_assert_eq!(acc.values.len(), gh * gw, "every grid row is flushed");
    Grid { rows: pair.rows, cols: pair.cols, gh, gw, values: acc.values }
}

/// Adds one chunk to the open grid row(s); `kept` are the chunk-relative indices each
/// metric keeps, ascending.
fn add_chunk<F: Elem, B: Elem>(acc: &mut Accumulator, ft: &[u8], base: &[u8], mean: f32, kept: [&[u32]; 2]) {
    let mut next_kept = [0usize; 2];
    for i in 0..ft.len() / F::SIZE {
        let p = B::to_f32(B::bits(base, i));
        let f = F::to_f32(F::bits(ft, i));
        let ad = (f - p).abs();
        let rel = ad / p.abs();
        let s = score(Metric::Fapm, f, p, mean);
        let cell = &mut acc.band[acc.block_col];
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
        for m in 0..2 {
            if kept[m].get(next_kept[m]) == Some(&(i as u32)) {
                cell.kept[m] += 1;
                next_kept[m] += 1;
            }
        }
        acc.step();
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

/// The `q`-quantile of `v` as the end of a colour scale: the extreme value on that side
/// when the quantile equals the median (reorders the slice; not empty).
fn spread_end(v: &mut [f64], q: f64) -> f64 {
    let (end, median) = (percentile(v, q), percentile(v, 0.5));
    if end != median {
        end
    } else if q > 0.5 {
        v.iter().copied().fold(f64::MIN, f64::max)
    } else {
        v.iter().copied().fold(f64::MAX, f64::min)
    }
}

/// How values map to [0, 1], and whether some lie beyond either end of the scale.
struct Mapping {
    scale: Scale,
    /// Bottom of a log or linear scale; the linear threshold of a symmetric-log one.
    lo: f64,
    /// Top of the scale.
    hi: f64,
    /// Bottom of a symmetric-log scale, as a magnitude (the two signs scale separately).
    neg: f64,
    /// Some finite values lie below the bottom / above the top.
    clipped: (bool, bool),
}

impl Mapping {
    /// Fits the scale to the values: a log scale spans the 0.5th to 99.5th percentile, a
    /// symmetric-log one each sign's 99th percentile of magnitude; values beyond the ends
    /// take the end colours. An end whose percentile is the median (a flat bulk with a few
    /// rows or columns apart: the structure to show) is the extreme value instead.
    /// `shared_max` fixes the top of a linear scale.
    fn new(scale: Scale, values: &[f64], shared_max: Option<f64>) -> Self {
        let mut finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let mut map = match scale {
            Scale::Log => {
                let mut positive: Vec<f64> = finite.iter().copied().filter(|&v| v > 0.0).collect();
                let (lo, hi) = if positive.is_empty() {
                    (0.1, 1.0)
                } else {
                    let lo = spread_end(&mut positive, 0.005);
                    let hi = spread_end(&mut positive, 0.995);
                    (lo.max(hi * 1e-6).min(hi / 10f64.sqrt()), hi)
                };
                Mapping { scale, lo, hi, neg: 0.0, clipped: (false, false) }
            }
            Scale::SymLog => {
                let side = |positive: bool| {
                    let mut abs: Vec<f64> =
                        finite.iter().filter(|&&v| (v > 0.0) == positive && v != 0.0).map(|v| v.abs()).collect();
                    if abs.is_empty() {
                        0.0
                    } else {
                        spread_end(&mut abs, 0.99)
                    }
                };
                let (pos, neg) = match (side(true), side(false)) {
                    (p, n) if p > 0.0 && n > 0.0 => (p, n),
                    (p, _) if p > 0.0 => (p, p),
                    (_, n) if n > 0.0 => (n, n),
                    _ => (1.0, 1.0),
                };
                Mapping { scale, lo: pos.min(neg) * 1e-3, hi: pos, neg, clipped: (false, false) }
            }
            Scale::Linear => {
                let m = shared_max.unwrap_or_else(|| finite.iter().copied().fold(0.0, f64::max));
                Mapping { scale, lo: 0.0, hi: if m > 0.0 { m } else { 1.0 }, neg: 0.0, clipped: (false, false) }
            }
        };
        let bottom = if scale == Scale::SymLog { -map.neg } else { map.lo };
        finite.retain(|&v| scale != Scale::Log || v > 0.0);
        map.clipped = (finite.iter().any(|&v| v < bottom), finite.iter().any(|&v| v > map.hi));
        map
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

    fn stops(&self) -> &'static [Rgb] {
        if self.scale == Scale::SymLog {
            &DIVERGING
        } else {
            &SEQUENTIAL
        }
    }

    fn color(&self, v: f64) -> Rgb {
        if v.is_finite() {
            ramp(self.stops(), self.t(v))
        } else {
            NO_DATA
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

/// One heatmap, drawn: its pixels and the colour scale they were drawn with.
pub struct Heatmap {
    q: Quantity,
    map: Mapping,
    /// Width of the picture in pixels.
    pub width: usize,
    /// Height of the picture in pixels.
    pub height: usize,
    rgb: Vec<u8>,
}

/// Draws quantity `q` of `grid`, each block a whole number of pixels. `shared_max` fixes
/// the top of a linear scale (so that the two kept maps compare).
pub fn render(grid: &Grid, q: Quantity, shared_max: Option<f64>) -> Heatmap {
    let values = grid.values(q);
    let map = Mapping::new(q.scale(), &values, shared_max);
    let (dh, dw) = display_dims(grid.rows, grid.cols);
    let sy = (dh as usize / grid.gh).max(1);
    let sx = (dw as usize / grid.gw).max(1);
    let (width, height) = (grid.gw * sx, grid.gh * sy);
    let mut rgb = Vec::with_capacity(width * height * 3);
    for block_row in values.chunks(grid.gw) {
        let mut line = Vec::with_capacity(width * 3);
        for &v in block_row {
            let color = map.color(v);
            for _ in 0..sx {
                line.extend_from_slice(&color);
            }
        }
        for _ in 0..sy {
            rgb.extend_from_slice(&line);
        }
    }
    Heatmap { q, map, width, height, rgb }
}

impl Heatmap {
    /// The colour of the pixel at (x, y).
    #[cfg(test)]
    pub fn pixel(&self, x: usize, y: usize) -> Rgb {
        let i = (y * self.width + x) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    /// The picture as an 8-bit RGB PNG file.
    pub fn png(&self) -> Result<Vec<u8>, png::EncodingError> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&self.rgb)?;
        writer.finish()?;
        Ok(out)
    }

    /// The picture as an inline `<svg>` and its width: title, the PNG at `file` (relative to
    /// the page, and a link to it at full size), row and column extents, and the colour bar
    /// with its ticks.
    pub fn svg(&self, grid: &Grid, file: &str) -> (String, f64) {
        let (w, h) = (self.width as f64, self.height as f64);
        let row_label = (grid.rows - 1).to_string();
        let x0 = 30.0 + text_width(&row_label, 11);
        let y0 = 58.0;
        let bar_x = x0 + w + 18.0;
        let labels: Vec<(f64, String)> = self.map.ticks().into_iter().map(|v| (v, num(v))).collect();
        let label_w = labels.iter().map(|(_, l)| text_width(l, 11)).fold(0.0, f64::max);
        let subtitle = format!(
            "{} x {} matrix; each pixel the mean of a block of about {} x {}",
            grid.rows,
            grid.cols,
            num((grid.rows as f64 / grid.gh as f64 * 10.0).round() / 10.0),
            num((grid.cols as f64 / grid.gw as f64 * 10.0).round() / 10.0)
        );
        let width = (bar_x + 14.0 + 8.0 + label_w + 8.0).max(text_width(&subtitle, 12) + 16.0).ceil();
        let height = (y0 + h + 40.0).ceil();
        let mut s = String::new();
        let _ = write!(
            s,
            "<svg class=\"heatmap\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width} {height}\" \
             width=\"{width}\" height=\"{height}\" role=\"img\"><title>{}</title>",
            esc(&self.q.title())
        );
        text(&mut s, 8.0, 22.0, Anchor::Start, 16, INK, &self.q.title());
        text(&mut s, 8.0, 42.0, Anchor::Start, 12, MUTED, &subtitle);
        let _ = write!(
            s,
            "<a href=\"{href}\"><image href=\"{href}\" x=\"{x0:.1}\" y=\"{y0}\" width=\"{w}\" height=\"{h}\" \
             preserveAspectRatio=\"none\"/></a>\
             <rect x=\"{:.1}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"{INK}\"/>",
            x0 - 0.5,
            y0 - 0.5,
            w + 1.0,
            h + 1.0,
            href = esc(file),
        );
        text(&mut s, x0 - 5.0, y0 + 9.0, Anchor::End, 11, MUTED, "0");
        text(&mut s, x0 - 5.0, y0 + h, Anchor::End, 11, MUTED, &row_label);
        text(&mut s, x0, y0 + h + 15.0, Anchor::Start, 11, MUTED, "0");
        text(&mut s, x0 + w, y0 + h + 15.0, Anchor::End, 11, MUTED, &(grid.cols - 1).to_string());
        text(&mut s, x0 + w / 2.0, y0 + h + 30.0, Anchor::Middle, 12, INK, "column");
        let mid = y0 + h / 2.0;
        let _ = write!(s, "<g transform=\"translate(16 {mid:.1}) rotate(-90)\">");
        text(&mut s, 0.0, 0.0, Anchor::Middle, 12, INK, "row");
        s.push_str("</g>");
        self.colour_bar(&mut s, file, bar_x, y0, h, &labels);
        s.push_str("</svg>");
        (s, width)
    }

    /// The colour bar: a gradient from the scale's bottom (below) to its top, ticks, and an
    /// arrow at each end beyond which some blocks lie.
    fn colour_bar(&self, s: &mut String, file: &str, x: f64, y0: f64, h: f64, labels: &[(f64, String)]) {
        let id: String = file.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        let _ = write!(s, "<defs><linearGradient id=\"g-{id}\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">");
        for i in 0..=32 {
            let t = i as f64 / 32.0;
            let _ = write!(s, "<stop offset=\"{t:.4}\" stop-color=\"{}\"/>", hex(ramp(self.map.stops(), t)));
        }
        let _ = write!(
            s,
            "</linearGradient></defs><rect x=\"{x:.1}\" y=\"{y0}\" width=\"14\" height=\"{h}\" \
             fill=\"url(#g-{id})\" stroke=\"{INK}\" stroke-width=\"0.5\"/>"
        );
        let (below, above) = self.map.clipped;
        let stops = self.map.stops();
        if above {
            let c = hex(stops[stops.len() - 1]);
            let _ =
                write!(s, "<path d=\"M{x:.1} {y0} l7 -9 l7 9 z\" fill=\"{c}\" stroke=\"{INK}\" stroke-width=\"0.5\"/>");
        }
        if below {
            let (c, y) = (hex(stops[0]), y0 + h);
            let _ =
                write!(s, "<path d=\"M{x:.1} {y} l7 9 l7 -9 z\" fill=\"{c}\" stroke=\"{INK}\" stroke-width=\"0.5\"/>");
        }
        for (v, label) in labels {
            let y = y0 + (1.0 - self.map.t(*v)) * h;
            let _ = write!(
                s,
                "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{INK}\"/>",
                x + 14.0,
                x + 18.0
            );
            text(s, x + 21.0, y + 4.0, Anchor::Start, 11, INK, label);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heatmaps_are_large_enough_to_see_rows_and_columns() {
        assert_eq!(grid_dims(8, 8), (8, 8));
        assert_eq!(display_dims(8, 8), (768, 768));
        // One pixel per column and half a pixel per row of a 1536 x 384 matrix.
        assert_eq!(display_dims(1536, 384), (768, 384));
        assert_eq!(grid_dims(1536, 384), (768, 384));
        assert_eq!(grid_dims(4096, 4096), (768, 768));
        assert_eq!(grid_dims(4096, 11008), (384, 768));
        assert_eq!(grid_dims(151_936, 896), (768, 384));
        assert_eq!(grid_dims(3, 100_000), (3, 768));
        assert_eq!(display_dims(3, 100_000), (384, 768));
    }

    #[test]
    fn blocks_partition_the_indices() {
        for (n, g) in [(10u64, 3usize), (256, 256), (1000, 7), (5, 5)] {
            let b = bounds(n, g);
            assert_eq!(*b.last().unwrap(), n);
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{n} {g}: {b:?}");
        }
    }

    #[test]
    fn colour_scales_clip_at_percentiles_and_say_so() {
        let mut values: Vec<f64> = (1..=1000).map(|i| i as f64 * 1e-3).collect();
        values.push(1e6);
        values.push(f64::NAN);
        let m = Mapping::new(Scale::Log, &values, None);
        assert!(m.hi < 1.0 && m.clipped == (true, true), "{} {:?}", m.hi, m.clipped);
        assert_eq!(m.color(1e6), SEQUENTIAL[8]);
        assert_eq!(m.color(1e-9), SEQUENTIAL[0]);
        assert_eq!(m.color(f64::NAN), NO_DATA);
        let s = Mapping::new(Scale::SymLog, &[-200.0, 1.0], None);
        assert_eq!(s.color(0.0), DIVERGING[3]);
        assert_eq!(s.color(-200.0), DIVERGING[0]);
        assert_eq!(s.color(1.0), DIVERGING[6]);
        assert_eq!(s.color(-1e9), DIVERGING[0]);
        let l = Mapping::new(Scale::Linear, &[0.0, 0.5], Some(1.0));
        assert_eq!((l.t(0.5), l.clipped), (0.5, (false, false)));
    }
}

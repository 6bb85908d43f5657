//! Line charts drawn straight into an RGB canvas: axes, grid, ticks, legend and one line
//! per series, with a linear or logarithmic y axis. Enough for the report's curves.

use super::png::{fmt_value, Align, Canvas, Rgb, GRID, INK, MUTED, WHITE};

/// Magnitude pruning's colour in every chart.
pub const MAGNITUDE: Rgb = [230, 120, 20];
/// FAPM's colour in every chart.
pub const FAPM: Rgb = [31, 100, 180];

/// One line of a chart. Points with a non-finite y (or y <= 0 on a log axis) break the line.
pub struct Series {
    /// Its legend text.
    pub label: String,
    /// Its colour.
    pub color: Rgb,
    /// (x, y) points in drawing order.
    pub points: Vec<(f64, f64)>,
}

/// What to draw and how to label it.
pub struct Chart {
    /// Title, drawn large at the top.
    pub title: String,
    /// One line under the title.
    pub subtitle: String,
    /// The x axis label.
    pub x_label: String,
    /// The y axis label.
    pub y_label: String,
    /// Logarithmic y axis.
    pub y_log: bool,
    /// Fixed y range (else fitted to the data).
    pub y_range: Option<(f64, f64)>,
    /// Fixed x ticks (else evenly spaced integers).
    pub x_ticks: Option<Vec<(f64, String)>>,
    /// The lines.
    pub series: Vec<Series>,
}

/// Canvas size of every chart.
pub const WIDTH: usize = 760;
/// Canvas height of every chart.
pub const HEIGHT: usize = 340;

/// A step of 1, 2 or 5 times a power of ten, near `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    let m = raw / p;
    p * if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    }
}

impl Chart {
    fn usable(&self, y: f64) -> bool {
        y.is_finite() && (!self.y_log || y > 0.0)
    }

    fn x_extent(&self) -> (f64, f64) {
        let xs = self.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let ticks = self.x_ticks.iter().flatten().map(|t| t.0);
        let (lo, hi) =
            xs.chain(ticks).filter(|x| x.is_finite()).fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
        if lo > hi {
            (0.0, 1.0)
        } else {
            let pad = ((hi - lo) * 0.03).max(0.5);
            (lo - pad, hi + pad)
        }
    }

    fn y_extent(&self) -> (f64, f64) {
        if let Some(r) = self.y_range {
            return r;
        }
        let ys = self.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).filter(|&y| self.usable(y));
        let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
        if lo > hi {
            return if self.y_log { (0.1, 1.0) } else { (0.0, 1.0) };
        }
        if self.y_log {
            let (a, b) = (lo.log10().floor(), hi.log10().ceil());
            (10f64.powf(a), 10f64.powf(if b > a { b } else { a + 1.0 }))
        } else {
            let span = if hi > lo { hi - lo } else { hi.abs().max(1.0) };
            let step = nice_step(span / 5.0);
            let lo = (lo / step).floor() * step;
            let hi = ((hi / step).ceil() * step).max(lo + step);
            (lo.min(0.0), hi)
        }
    }

    fn y_ticks(&self, (lo, hi): (f64, f64)) -> Vec<f64> {
        if self.y_log {
            let (a, b) = (lo.log10().round() as i32, hi.log10().round() as i32);
            let step = ((b - a) / 6 + 1).max(1);
            (a..=b).filter(|e| (e - a) % step == 0).map(|e| 10f64.powi(e)).collect()
        } else {
            let step = nice_step((hi - lo) / 5.0);
            let n = ((hi - lo) / step).round() as i64;
            (0..=n).map(|i| lo + i as f64 * step).collect()
        }
    }
}

/// Draws a chart.
pub fn render(chart: &Chart) -> Canvas {
    let mut c = Canvas::new(WIDTH, HEIGHT, WHITE);
    let (left, right, top, bottom) = (78i64, WIDTH as i64 - 20, 58i64, HEIGHT as i64 - 46);
    let (pw, ph) = ((right - left) as f64, (bottom - top) as f64);
    let (x0, x1) = chart.x_extent();
    let (y0, y1) = chart.y_extent();
    let fy = |y: f64| {
        if chart.y_log {
            (y.log10() - y0.log10()) / (y1.log10() - y0.log10())
        } else {
            (y - y0) / (y1 - y0)
        }
    };
    let px = |x: f64| left + ((x - x0) / (x1 - x0) * pw).round() as i64;
    let py = |y: f64| bottom - (fy(y).clamp(-0.02, 1.02) * ph).round() as i64;

    c.text(16, 10, &chart.title, 2, Align::Left, INK);
    c.text(16, 32, &chart.subtitle, 1, Align::Left, MUTED);
    // Legend, right-aligned on the subtitle's line.
    let mut lx = right;
    for s in chart.series.iter().rev() {
        c.text(lx, 32, &s.label, 1, Align::Right, INK);
        lx -= (s.label.len() * 6) as i64 + 6;
        c.fill_rect(lx - 14, 34, 14, 3, s.color);
        lx -= 26;
    }
    // Grid and y ticks.
    for t in chart.y_ticks((y0, y1)) {
        let y = py(t);
        c.fill_rect(left, y, right - left, 1, GRID);
        c.fill_rect(left - 4, y, 4, 1, INK);
        c.text(left - 7, y - 3, &fmt_value(t), 1, Align::Right, INK);
    }
    // x ticks.
    let ticks = chart.x_ticks.clone().unwrap_or_else(|| {
        let (a, b) = (x0.ceil().max(0.0), x1.floor());
        let step = nice_step((b - a) / 8.0).max(1.0);
        let mut t = Vec::new();
        let mut x = (a / step).ceil() * step;
        while x <= b {
            t.push((x, fmt_value(x)));
            x += step;
        }
        t
    });
    for (x, label) in &ticks {
        let xx = px(*x);
        c.fill_rect(xx, bottom + 1, 1, 4, INK);
        c.text(xx, bottom + 9, label, 1, Align::Center, INK);
    }
    c.fill_rect(left, top, 1, bottom - top + 1, INK);
    c.fill_rect(left, bottom, right - left + 1, 1, INK);
    c.text((left + right) / 2, HEIGHT as i64 - 18, &chart.x_label, 1, Align::Center, INK);
    c.text_up(14, (top + bottom) / 2, &chart.y_label, 1, INK);
    // Lines, then dots on top when there are few points.
    for s in &chart.series {
        let mut prev: Option<(i64, i64)> = None;
        for &(x, y) in &s.points {
            if !chart.usable(y) || !x.is_finite() {
                prev = None;
                continue;
            }
            let p = (px(x), py(y));
            if let Some(q) = prev {
                c.line(q, p, 2, s.color);
            }
            prev = Some(p);
        }
        if s.points.len() <= 64 {
            for &(x, y) in &s.points {
                if chart.usable(y) && x.is_finite() {
                    c.dot(px(x), py(y), 3, s.color);
                }
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(y_log: bool, points: Vec<(f64, f64)>) -> Chart {
        Chart {
            title: "t".into(),
            subtitle: "s".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            y_log,
            y_range: None,
            x_ticks: None,
            series: vec![Series { label: "a".into(), color: FAPM, points }],
        }
    }

    #[test]
    fn ranges_cover_the_data() {
        let c = chart(false, vec![(0.0, 0.13), (1.0, 0.87), (2.0, f64::NAN)]);
        let (lo, hi) = c.y_extent();
        assert!(lo <= 0.13 && hi >= 0.87, "{lo} {hi}");
        let c = chart(true, vec![(0.0, 3e-4), (1.0, 0.2), (2.0, 0.0)]);
        assert_eq!(c.y_extent(), (1e-4, 1.0));
        assert_eq!(c.y_ticks((1e-4, 1.0)).len(), 5);
        assert_eq!(nice_step(0.23), 0.5);
        assert_eq!(nice_step(7.0), 10.0);
    }

    #[test]
    fn degenerate_charts_still_draw() {
        for points in [vec![], vec![(0.0, 1.0)], vec![(0.0, f64::NAN)]] {
            let c = render(&chart(true, points.clone()));
            assert_eq!((c.width, c.height), (WIDTH, HEIGHT));
            render(&chart(false, points));
        }
        let c = render(&chart(false, vec![(0.0, 0.0), (1.0, 1.0)]));
        // The line runs in FAPM's colour somewhere inside the plot.
        let found = (0..WIDTH).any(|x| (0..HEIGHT).any(|y| c.get(x, y) == Some(FAPM)));
        assert!(found);
    }
}

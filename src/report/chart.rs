//! Line charts as inline SVG: axes, grid, ticks, legend and one line per series, with a
//! linear or logarithmic y axis. Each point carries a `<title>`, so hovering over it shows
//! its value.

use std::fmt::Write as _;

use super::svg::{esc, hex, num, text, text_width, Anchor, Rgb, GRID, INK, MUTED};

/// Magnitude pruning's colour in every chart.
pub const MAGNITUDE: Rgb = [230, 120, 20];
/// FAPM's colour in every chart.
pub const FAPM: Rgb = [31, 100, 180];

/// One line of a chart. Points with a non-finite y (or y <= 0 on a log axis) break the line.
#[derive(Clone)]
pub struct Series {
    /// Its legend text.
    pub label: String,
    /// Its colour.
    pub color: Rgb,
    /// (x, y) points in drawing order.
    pub points: Vec<(f64, f64)>,
}

/// What to draw and how to label it.
#[derive(Clone)]
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
    /// Name of each x position, shown when hovering over a point (else the x value).
    pub x_names: Option<Vec<String>>,
    /// The lines.
    pub series: Vec<Series>,
}

/// Width of every chart, in SVG user units (CSS pixels at natural size).
pub const WIDTH: f64 = 720.0;
/// Height of every chart.
pub const HEIGHT: f64 = 330.0;

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

    fn x_ticks(&self, (x0, x1): (f64, f64)) -> Vec<(f64, String)> {
        self.x_ticks.clone().unwrap_or_else(|| {
            let (a, b) = (x0.ceil().max(0.0), x1.floor());
            let step = nice_step((b - a) / 8.0).max(1.0);
            let mut t = Vec::new();
            let mut x = (a / step).ceil() * step;
            while x <= b {
                t.push((x, num(x)));
                x += step;
            }
            t
        })
    }
}

/// Draws a chart as one `<svg>` element.
pub fn render(chart: &Chart) -> String {
    let (left, right, top, bottom) = (76.0, WIDTH - 16.0, 58.0, HEIGHT - 48.0);
    let (x0, x1) = chart.x_extent();
    let (y0, y1) = chart.y_extent();
    let fy = |y: f64| {
        if chart.y_log {
            (y.log10() - y0.log10()) / (y1.log10() - y0.log10())
        } else {
            (y - y0) / (y1 - y0)
        }
    };
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (right - left);
    let py = |y: f64| bottom - fy(y).clamp(-0.02, 1.02) * (bottom - top);

    let mut s = String::new();
    let _ = write!(
        s,
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         width=\"{WIDTH}\" height=\"{HEIGHT}\" role=\"img\"><title>{}</title>",
        esc(&chart.title)
    );
    text(&mut s, 16.0, 24.0, Anchor::Start, 16, INK, &chart.title);
    text(&mut s, 16.0, 44.0, Anchor::Start, 12, MUTED, &chart.subtitle);
    // Legend, right-aligned on the subtitle's line.
    let mut lx = right;
    for series in chart.series.iter().rev() {
        text(&mut s, lx, 44.0, Anchor::End, 12, INK, &series.label);
        lx -= text_width(&series.label, 12) + 6.0;
        let _ = write!(
            s,
            "<line x1=\"{:.1}\" y1=\"40\" x2=\"{lx:.1}\" y2=\"40\" stroke=\"{}\" stroke-width=\"3\"/>",
            lx - 18.0,
            hex(series.color)
        );
        lx -= 30.0;
    }
    // Grid and y ticks.
    for t in chart.y_ticks((y0, y1)) {
        let y = py(t);
        let _ = write!(s, "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{right}\" y2=\"{y:.1}\" stroke=\"{GRID}\"/>");
        let _ = write!(s, "<line x1=\"{}\" y1=\"{y:.1}\" x2=\"{left}\" y2=\"{y:.1}\" stroke=\"{INK}\"/>", left - 4.0);
        text(&mut s, left - 7.0, y + 4.0, Anchor::End, 11, INK, &num(t));
    }
    for (x, label) in chart.x_ticks((x0, x1)) {
        let x = px(x);
        let _ =
            write!(s, "<line x1=\"{x:.1}\" y1=\"{bottom}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"{INK}\"/>", bottom + 4.0);
        text(&mut s, x, bottom + 17.0, Anchor::Middle, 11, INK, &label);
    }
    let _ = write!(
        s,
        "<polyline points=\"{left},{top} {left},{bottom} {right},{bottom}\" fill=\"none\" stroke=\"{INK}\"/>"
    );
    text(&mut s, (left + right) / 2.0, HEIGHT - 10.0, Anchor::Middle, 12, INK, &chart.x_label);
    let mid = (top + bottom) / 2.0;
    let _ = write!(s, "<g transform=\"translate(18 {mid:.1}) rotate(-90)\">");
    text(&mut s, 0.0, 0.0, Anchor::Middle, 12, INK, &chart.y_label);
    s.push_str("</g>");
    for series in &chart.series {
        draw_series(&mut s, chart, series, &px, &py);
    }
    s.push_str("</svg>");
    s
}

/// One series: a polyline per unbroken run of points, then a dot per point with its value
/// as a tooltip when there are few enough points to see them.
fn draw_series(s: &mut String, chart: &Chart, series: &Series, px: &dyn Fn(f64) -> f64, py: &dyn Fn(f64) -> f64) {
    let color = hex(series.color);
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for &(x, y) in &series.points {
        if chart.usable(y) && x.is_finite() {
            runs.last_mut().expect("one run at least").push((px(x), py(y)));
        } else if !runs.last().is_some_and(Vec::is_empty) {
            runs.push(Vec::new());
        }
    }
    for run in runs.iter().filter(|r| r.len() > 1) {
        let points: Vec<String> = run.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = write!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" stroke-linejoin=\"round\"/>",
            points.join(" ")
        );
    }
    if series.points.len() > 64 {
        return;
    }
    for &(x, y) in &series.points {
        if !(chart.usable(y) && x.is_finite()) {
            continue;
        }
        let at = match &chart.x_names {
            Some(names) => names.get(x as usize).cloned().unwrap_or_default(),
            None => num(x),
        };
        let _ = write!(
            s,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{color}\"><title>{}: {} at {}</title></circle>",
            px(x),
            py(y),
            esc(&series.label),
            num(y),
            esc(&at)
        );
    }
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
            x_names: None,
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
    fn lines_break_at_missing_points_and_points_show_their_values() {
        let svg = render(&chart(true, vec![(0.0, 0.5), (1.0, 0.25), (2.0, f64::NAN), (3.0, 0.1), (4.0, 0.2)]));
        assert_eq!(svg.matches("<polyline").count(), 1 + 2, "the axes and two runs");
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.contains("<title>a: 0.25 at 1</title>"), "{svg}");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
    }

    #[test]
    fn degenerate_charts_still_draw() {
        for points in [vec![], vec![(0.0, 1.0)], vec![(0.0, f64::NAN)]] {
            for log in [true, false] {
                let svg = render(&chart(log, points.clone()));
                assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
            }
        }
    }
}

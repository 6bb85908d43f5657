//! Line charts as inline SVG: axes, grid, ticks, legend and one line per series, with a
//! linear or logarithmic y axis. Each point carries a `<title>`, so hovering over it shows
//! its value.

use std::fmt::Write as _;

use super::svg::{esc, hex, num, text, text_width, Anchor, Rgb, GRID, INK, MUTED};

/// The colour of each penalty strength of `stats::PENALTIES` in every chart, from magnitude
/// pruning (orange, strength 0) through the paper's FAPM (blue, strength 1) to the strongest
/// penalty (purple): distinct hues in the order of the strengths.
pub const STRENGTH_COLORS: [Rgb; 5] = [[230, 120, 20], [150, 160, 30], [30, 150, 130], [31, 100, 180], [120, 60, 160]];

/// The colour of guide lines (points of equal sparsity on the trade-off chart).
pub const GUIDE: Rgb = [170, 170, 170];

/// One line of a chart. Points with a non-finite coordinate (or one <= 0 on a log axis)
/// break the line.
#[derive(Clone)]
pub struct Series {
    /// Its legend text; a guide's label is written beside its last point instead.
    pub label: String,
    /// Its colour.
    pub color: Rgb,
    /// (x, y) points in drawing order.
    pub points: Vec<(f64, f64)>,
    /// The hover text of each point (else the series' label, the value and the x name).
    pub tips: Option<Vec<String>>,
    /// A guide: a thin line under the others, without dots or a legend entry.
    pub guide: bool,
    /// Points to ring (the Pareto points), each with a label written beside it.
    pub marks: Option<Vec<Option<String>>>,
}

impl Series {
    /// A series drawn as a line with a dot per point and an entry in the legend.
    pub fn line(label: impl Into<String>, color: Rgb, points: Vec<(f64, f64)>) -> Self {
        Series { label: label.into(), color, points, tips: None, guide: false, marks: None }
    }
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
    /// Logarithmic x axis (its ticks are then powers of ten).
    pub x_log: bool,
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
pub const HEIGHT: f64 = 350.0;

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

/// The decades `10^a ..= 10^b` around `lo ..= hi` (positive), at least one wide.
fn decades(lo: f64, hi: f64) -> (f64, f64) {
    let (a, b) = (lo.log10().floor(), hi.log10().ceil());
    (10f64.powf(a), 10f64.powf(if b > a { b } else { a + 1.0 }))
}

/// Powers of ten from `lo` to `hi` (themselves powers of ten), at most about seven.
fn decade_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (a, b) = (lo.log10().round() as i32, hi.log10().round() as i32);
    let step = ((b - a) / 6 + 1).max(1);
    (a..=b).filter(|e| (e - a) % step == 0).map(|e| 10f64.powi(e)).collect()
}

/// Where `v` lies between `lo` and `hi`, 0 to 1, on a linear or logarithmic scale.
fn fraction(v: f64, (lo, hi): (f64, f64), log: bool) -> f64 {
    if log {
        (v.log10() - lo.log10()) / (hi.log10() - lo.log10())
    } else {
        (v - lo) / (hi - lo)
    }
}

impl Chart {
    fn usable(&self, (x, y): (f64, f64)) -> bool {
        x.is_finite() && y.is_finite() && (!self.y_log || y > 0.0) && (!self.x_log || x > 0.0)
    }

    fn x_extent(&self) -> (f64, f64) {
        let xs = self.series.iter().flat_map(|s| s.points.iter().filter(|&&p| self.usable(p)).map(|p| p.0));
        let ticks = self.x_ticks.iter().flatten().map(|t| t.0);
        let (lo, hi) =
            xs.chain(ticks).filter(|x| x.is_finite()).fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
        if self.x_log {
            return if lo > hi { (0.1, 1.0) } else { decades(lo, hi) };
        }
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
        let ys = self.series.iter().flat_map(|s| s.points.iter().filter(|&&p| self.usable(p)).map(|p| p.1));
        let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
        if lo > hi {
            return if self.y_log { (0.1, 1.0) } else { (0.0, 1.0) };
        }
        if self.y_log {
            decades(lo, hi)
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
            decade_ticks(lo, hi)
        } else {
            let step = nice_step((hi - lo) / 5.0);
            let n = ((hi - lo) / step).round() as i64;
            (0..=n).map(|i| lo + i as f64 * step).collect()
        }
    }

    fn x_ticks(&self, (x0, x1): (f64, f64)) -> Vec<(f64, String)> {
        if self.x_log && self.x_ticks.is_none() {
            return decade_ticks(x0, x1).into_iter().map(|x| (x, num(x))).collect();
        }
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
    let (left, right, top, bottom) = (76.0, WIDTH - 16.0, 78.0, HEIGHT - 48.0);
    let (x0, x1) = chart.x_extent();
    let (y0, y1) = chart.y_extent();
    let px = |x: f64| left + fraction(x, (x0, x1), chart.x_log).clamp(-0.02, 1.02) * (right - left);
    let py = |y: f64| bottom - fraction(y, (y0, y1), chart.y_log).clamp(-0.02, 1.02) * (bottom - top);

    let mut s = String::new();
    let _ = write!(
        s,
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         width=\"{WIDTH}\" height=\"{HEIGHT}\" role=\"img\"><title>{}</title>",
        esc(&chart.title)
    );
    text(&mut s, 16.0, 24.0, Anchor::Start, 16, INK, &chart.title);
    text(&mut s, 16.0, 44.0, Anchor::Start, 12, MUTED, &chart.subtitle);
    // Legend, right-aligned on a line of its own under the subtitle.
    let mut lx = right;
    for series in chart.series.iter().rev().filter(|s| !s.guide) {
        text(&mut s, lx, 64.0, Anchor::End, 12, INK, &series.label);
        lx -= text_width(&series.label, 12) + 6.0;
        let _ = write!(
            s,
            "<line x1=\"{:.1}\" y1=\"60\" x2=\"{lx:.1}\" y2=\"60\" stroke=\"{}\" stroke-width=\"3\"/>",
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
    // Guides first, under the lines they guide.
    for series in chart.series.iter().filter(|s| s.guide).chain(chart.series.iter().filter(|s| !s.guide)) {
        draw_series(&mut s, chart, series, &px, &py);
    }
    s.push_str("</svg>");
    s
}

/// One series: a polyline per unbroken run of points, then a dot per point with its value
/// as a tooltip when there are few enough points to see them (a guide: its label instead).
fn draw_series(s: &mut String, chart: &Chart, series: &Series, px: &dyn Fn(f64) -> f64, py: &dyn Fn(f64) -> f64) {
    let color = hex(series.color);
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for &p in &series.points {
        if chart.usable(p) {
            runs.last_mut().expect("one run at least").push((px(p.0), py(p.1)));
        } else if !runs.last().is_some_and(Vec::is_empty) {
            runs.push(Vec::new());
        }
    }
    let width = if series.guide { 1 } else { 2 };
    for run in runs.iter().filter(|r| r.len() > 1) {
        let points: Vec<String> = run.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = write!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"{width}\" \
             stroke-linejoin=\"round\"/>",
            points.join(" ")
        );
    }
    if series.guide {
        if let Some(&(x, y)) = runs.iter().flatten().last() {
            text(s, x + 5.0, y + 4.0, Anchor::Start, 10, MUTED, &series.label);
        }
        return;
    }
    if series.points.len() > 64 {
        return;
    }
    for (i, &(x, y)) in series.points.iter().enumerate() {
        if !chart.usable((x, y)) {
            continue;
        }
        let tip = match (&series.tips, &chart.x_names) {
            (Some(tips), _) => tips.get(i).cloned().unwrap_or_default(),
            (None, Some(names)) => {
                format!("{}: {} at {}", series.label, num(y), names.get(x as usize).map_or("", |n| n))
            }
            (None, None) => format!("{}: {} at {}", series.label, num(y), num(x)),
        };
        let _ = write!(
            s,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{color}\"><title>{}</title></circle>",
            px(x),
            py(y),
            esc(&tip)
        );
        if let Some(Some(label)) = series.marks.as_ref().and_then(|m| m.get(i)) {
            let _ = write!(
                s,
                "<circle class=\"mark\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"7\" fill=\"none\" stroke=\"{INK}\" \
                 stroke-width=\"1.5\"/>",
                px(x),
                py(y)
            );
            text(s, px(x) + 9.0, py(y) - 6.0, Anchor::Start, 10, INK, label);
        }
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
            x_log: false,
            y_log,
            y_range: None,
            x_ticks: None,
            x_names: None,
            series: vec![Series::line("a", STRENGTH_COLORS[3], points)],
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
    fn a_log_x_axis_spans_decades_and_guides_are_thin_and_unlisted() {
        let mut c = chart(false, vec![(2e-3, 0.9), (0.05, 0.5), (0.0, 0.4)]);
        c.x_log = true;
        c.series[0].tips = Some(vec!["first".into(), "second".into(), "third".into()]);
        c.series.push(Series {
            label: "90%".into(),
            color: GUIDE,
            points: vec![(3e-3, 0.8), (0.02, 0.6)],
            tips: None,
            guide: true,
            marks: None,
        });
        assert_eq!(c.x_extent(), (1e-3, 0.1));
        let svg = render(&c);
        assert!(svg.contains(">0.001</text>") && svg.contains(">0.1</text>"), "decade ticks: {svg}");
        // x = 0 has no place on a log axis: two dots, each with its own tip; the guide has
        // no dots, a label at its end and no legend entry.
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("<title>first</title>") && svg.contains("<title>second</title>"));
        assert_eq!(svg.matches("stroke-width=\"1\"").count(), 1);
        assert_eq!(svg.matches(">90%</text>").count(), 1);
        assert_eq!(svg.matches("stroke-width=\"3\"").count(), 1, "one legend entry");
        // The guide is drawn before (under) the series.
        assert!(svg.find("stroke-width=\"1\"").unwrap() < svg.find("stroke-width=\"2\"").unwrap());
    }

    #[test]
    fn marked_points_are_ringed_and_labelled() {
        let mut c = chart(false, vec![(0.0, 0.5), (1.0, 0.25), (2.0, 0.75)]);
        c.series[0].marks = Some(vec![None, Some("1.2 MB".into()), None]);
        let svg = render(&c);
        assert_eq!(svg.matches("class=\"mark\"").count(), 1);
        assert_eq!(svg.matches(">1.2 MB</text>").count(), 1);
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

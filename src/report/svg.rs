//! Small helpers for the SVG the report writes inline into `index.html`: escaping, colours,
//! number labels and text. The browser lays out and renders the text with its own fonts, so
//! labels stay sharp at any zoom and the pictures need no font of their own.

use std::fmt::Write as _;

/// One 8-bit sRGB colour.
pub type Rgb = [u8; 3];

/// Near-black, for text and axes.
pub const INK: &str = "#222";
/// Mid grey, for secondary text.
pub const MUTED: &str = "#666";
/// Light grey, for grid lines.
pub const GRID: &str = "#e1e1e1";

/// Escapes text for HTML and SVG element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A colour as CSS `#rrggbb`.
pub fn hex(c: Rgb) -> String {
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

/// Formats a value compactly for a tick label: `0`, `0.25`, `12.5`, `3e-5`, `1.2e4`.
pub fn num(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if !v.is_finite() {
        return if v.is_nan() {
            "nan"
        } else if v > 0.0 {
            "inf"
        } else {
            "-inf"
        }
        .into();
    }
    let a = v.abs();
    if (1e-3..1e4).contains(&a) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.1e}").replace(".0e", "e")
    }
}

/// Where a text's anchor point sits along its width (SVG `text-anchor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// The anchor is the text's left edge.
    Start,
    /// The anchor is the text's centre.
    Middle,
    /// The anchor is the text's right edge.
    End,
}

/// Appends a `<text>` element with its baseline at `y`, `size` px, filled with `fill`.
pub fn text(out: &mut String, x: f64, y: f64, anchor: Anchor, size: u32, fill: &str, content: &str) {
    let anchor = match anchor {
        Anchor::Start => "start",
        Anchor::Middle => "middle",
        Anchor::End => "end",
    };
    let _ = write!(
        out,
        "<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"{anchor}\" font-size=\"{size}\" fill=\"{fill}\">{}</text>",
        esc(content)
    );
}

/// A rough width of `s` at `size` px in a proportional sans-serif font, for layout only.
pub fn text_width(s: &str, size: u32) -> f64 {
    s.chars().count() as f64 * size as f64 * 0.6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_format_compactly() {
        assert_eq!(num(0.0), "0");
        assert_eq!(num(0.25), "0.25");
        assert_eq!(num(12.5), "12.5");
        assert_eq!(num(1.0), "1");
        assert_eq!(num(1e-5), "1e-5");
        assert_eq!(num(-2.5e6), "-2.5e6");
        assert_eq!(hex([255, 0, 16]), "#ff0010");
    }

    #[test]
    fn text_is_escaped() {
        let mut s = String::new();
        text(&mut s, 1.0, 2.0, Anchor::End, 12, INK, "a<b & \"c\"");
        assert_eq!(
            s,
            "<text x=\"1.0\" y=\"2.0\" text-anchor=\"end\" font-size=\"12\" fill=\"#222\">a&lt;b &amp; &quot;c&quot;</text>"
        );
    }
}

//! An RGB canvas with the few drawing primitives the report pictures need (rectangles,
//! lines, dots, bitmap text) and the PNG encoder that writes it out.

use std::io::BufWriter;
use std::path::Path;

use fapm_stages::Error;

use super::font::{glyph, text_width, GLYPH_W};

/// One 8-bit sRGB colour.
pub type Rgb = [u8; 3];

/// Near-black, for text and axes.
pub const INK: Rgb = [34, 34, 34];
/// White, for backgrounds.
pub const WHITE: Rgb = [255, 255, 255];
/// Light grey, for grid lines.
pub const GRID: Rgb = [225, 225, 225];
/// Mid grey, for secondary text.
pub const MUTED: Rgb = [110, 110, 110];

/// Where a text's anchor point sits along its width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// The anchor is the text's left edge.
    Left,
    /// The anchor is the text's centre.
    Center,
    /// The anchor is the text's right edge.
    Right,
}

/// A width x height RGB picture, row-major, origin at the top left.
pub struct Canvas {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    /// A canvas filled with `bg`.
    pub fn new(width: usize, height: usize, bg: Rgb) -> Self {
        let mut pixels = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            pixels.extend_from_slice(&bg);
        }
        Canvas { width, height, pixels }
    }

    /// Sets one pixel; points outside the canvas are ignored.
    pub fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&c);
        }
    }

    /// The colour of one pixel (`None` outside the canvas).
    #[cfg(test)]
    pub fn get(&self, x: usize, y: usize) -> Option<Rgb> {
        if x < self.width && y < self.height {
            let i = (y * self.width + x) * 3;
            Some([self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]])
        } else {
            None
        }
    }

    /// Fills the rectangle with top-left corner (x, y), clipped to the canvas.
    pub fn fill_rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        for yy in y.max(0)..(y + h).min(self.height as i64) {
            for xx in x.max(0)..(x + w).min(self.width as i64) {
                self.set(xx, yy, c);
            }
        }
    }

    /// Draws the one-pixel outline of a rectangle.
    pub fn outline(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        self.fill_rect(x, y, w, 1, c);
        self.fill_rect(x, y + h - 1, w, 1, c);
        self.fill_rect(x, y, 1, h, c);
        self.fill_rect(x + w - 1, y, 1, h, c);
    }

    /// Draws a line `thick` pixels wide between two points (Bresenham with a square pen).
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), thick: i64, c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        let off = (thick - 1) / 2;
        loop {
            self.fill_rect(x - off, y - off, thick, thick, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Draws a filled disc of radius `r` centred on (x, y).
    pub fn dot(&mut self, x: i64, y: i64, r: i64, c: Rgb) {
        for yy in -r..=r {
            for xx in -r..=r {
                if xx * xx + yy * yy <= r * r + r {
                    self.set(x + xx, y + yy, c);
                }
            }
        }
    }

    /// Draws `text` with its top at `y` and its anchor at `x`, each font pixel `scale` wide.
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: usize, align: Align, c: Rgb) {
        let w = text_width(text, scale) as i64;
        let left = match align {
            Align::Left => x,
            Align::Center => x - w / 2,
            Align::Right => x - w,
        };
        let s = scale as i64;
        for (i, ch) in text.chars().enumerate() {
            let gx = left + (i * (GLYPH_W + 1) * scale) as i64;
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..GLYPH_W {
                    if bits & (1 << (GLYPH_W - 1 - col)) != 0 {
                        self.fill_rect(gx + col as i64 * s, y + row as i64 * s, s, s, c);
                    }
                }
            }
        }
    }

    /// Draws `text` rotated a quarter turn anticlockwise (reading upwards), centred on
    /// (x, y_center), with its glyphs' tops at column `x`.
    pub fn text_up(&mut self, x: i64, y_center: i64, text: &str, scale: usize, c: Rgb) {
        let w = text_width(text, scale) as i64;
        let bottom = y_center + w / 2;
        let s = scale as i64;
        for (i, ch) in text.chars().enumerate() {
            let gy = bottom - (i * (GLYPH_W + 1) * scale) as i64;
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..GLYPH_W {
                    if bits & (1 << (GLYPH_W - 1 - col)) != 0 {
                        let px = x + row as i64 * s;
                        let py = gy - (col as i64 + 1) * s;
                        self.fill_rect(px, py, s, s, c);
                    }
                }
            }
        }
    }

    /// Encodes the canvas as an 8-bit RGB PNG at `path`.
    pub fn write_png(&self, path: &Path) -> Result<(), Error> {
        let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let mut enc = png::Encoder::new(BufWriter::new(file), self.width as u32, self.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Best);
        let fail = |e: png::EncodingError| match e {
            png::EncodingError::IoError(e) => Error::io(path, e),
            other => Error::invalid(path, format!("cannot encode png: {other}")),
        };
        let mut writer = enc.write_header().map_err(fail)?;
        writer.write_image_data(&self.pixels).map_err(fail)?;
        writer.finish().map_err(fail)
    }
}

/// Formats a value compactly for a tick label: `0`, `0.25`, `12.5`, `3e-05`, `1.2e+04`.
pub fn fmt_value(v: f64) -> String {
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
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    } else {
        let s = format!("{v:.1e}");
        // "1.0e-5" -> "1e-5"
        s.replace(".0e", "e")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_decodes_with_the_right_size_and_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        let mut c = Canvas::new(37, 21, WHITE);
        c.fill_rect(2, 3, 4, 5, [200, 10, 20]);
        c.text(10, 2, "Ab1", 1, Align::Left, INK);
        c.line((0, 20), (36, 0), 2, [0, 0, 255]);
        c.write_png(&path).unwrap();
        let decoder = png::Decoder::new(std::fs::File::open(&path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (37, 21));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        let px = |x: usize, y: usize| &buf[(y * 37 + x) * 3..(y * 37 + x) * 3 + 3];
        assert_eq!(px(3, 4), [200, 10, 20]);
        assert_eq!(px(30, 20), WHITE);
    }

    #[test]
    fn drawing_is_clipped() {
        let mut c = Canvas::new(4, 4, WHITE);
        c.fill_rect(-10, -10, 100, 100, INK);
        c.line((-5, -5), (9, 9), 3, INK);
        c.text(-3, -3, "W", 2, Align::Right, INK);
        c.text_up(2, 2, "Wide text", 2, INK);
        assert_eq!(c.get(3, 3), Some(INK));
        assert_eq!(c.get(4, 0), None);
    }

    #[test]
    fn values_format_compactly() {
        assert_eq!(fmt_value(0.0), "0");
        assert_eq!(fmt_value(0.25), "0.25");
        assert_eq!(fmt_value(12.5), "12.5");
        assert_eq!(fmt_value(1.0), "1");
        assert_eq!(fmt_value(1e-5), "1e-5");
        assert_eq!(fmt_value(-2.5e6), "-2.5e6");
    }
}

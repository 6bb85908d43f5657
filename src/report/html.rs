//! The report's `index.html`: what FAPM is, then every picture (inline SVG; heatmaps are
//! PNG files inside their SVG frame) with a caption that says how to read it, then the
//! per-tensor numbers as a table.

use std::fmt::Write as _;

use super::svg::esc;

/// One picture on the page.
pub struct Figure {
    /// The picture: one `<svg>` element.
    pub svg: String,
    /// Its natural width in CSS pixels; the page may draw it narrower, never wider.
    pub width: f64,
    /// What it shows and how to read it (plain text).
    pub caption: String,
}

/// A table of plain-text cells.
pub struct Table {
    /// Header cells.
    pub head: Vec<String>,
    /// Rows of cells.
    pub rows: Vec<Vec<String>>,
}

/// A titled group of pictures, and perhaps a table under them.
pub struct Section {
    /// The heading.
    pub title: String,
    /// A paragraph under the heading (plain text).
    pub intro: String,
    /// The pictures, laid out in a grid.
    pub figures: Vec<Figure>,
    /// A table under the pictures.
    pub table: Option<Table>,
}

/// Everything the page shows.
pub struct Page {
    /// The base checkpoint, by name (never an absolute path: the page is shared).
    pub base: String,
    /// The fine-tuned checkpoint, by name.
    pub finetuned: String,
    /// Facts about the inputs, one per list item (plain text).
    pub facts: Vec<String>,
    /// Sections of pictures and tables, in order.
    pub sections: Vec<Section>,
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;\
max-width:1600px;padding:0 1.5em;color:#222;line-height:1.45}\
h1{margin-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}\
code{background:#f3f3f3;padding:0 .25em;border-radius:3px}\
.grid{display:flex;flex-wrap:wrap;gap:1.2em}\
figure{margin:0}figure svg{width:100%;height:auto;display:block;\
font-family:system-ui,-apple-system,Segoe UI,sans-serif}\
figcaption{font-size:.9em;color:#444;margin-top:.3em}\
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:.2em .5em;\
text-align:right}td:first-child,th:first-child{text-align:left;font-family:monospace}\
.note{color:#555;font-size:.9em}";

const EXPLAIN: &str = "<p>Fine-tuning changes a model's weights by a <em>task vector</em> \
<code>dW = W_ft - W_base</code>. Keeping only a small part of it (pruning the rest back to the \
base weights) gives a compact delta, and <em>which</em> part is kept decides how much of the new \
skill survives and how much of the base model's knowledge is lost. <strong>Magnitude</strong> \
pruning keeps the largest <code>|dW|</code>. It tends to keep changes to weights that were small \
in the base model: those are large <em>relative</em> changes <code>|dW| / |W_base|</code>, and \
large relative changes are what make a model forget. The <strong>Forgetting-Aware Pruning \
Metric</strong> (FAPM, EMNLP 2025) scores every position by</p>\
<p style=\"text-align:center\"><code>S = |dW| - mean(|W_base|) &middot; |dW| / |W_base|</code></p>\
<p>per weight matrix, and keeps the top-scoring positions (for instance the top 10%). The \
second term penalises large relative changes, so FAPM keeps most of the task vector's norm \
while keeping the relative changes it applies small. <code>fapm prune --penalty &lambda;</code> \
scales that term: <code>S = |dW| - &lambda; &middot; mean(|W_base|) &middot; |dW| / |W_base|</code>, \
where <code>&lambda; = 1</code> is the paper's metric and <code>&lambda; = 0</code> is magnitude \
pruning. The pictures below show, for your own pair of checkpoints, what each penalty strength \
&lambda; and each sparsity keep and what the delta weighs, so that you can choose both; the \
numbers are in <code>report.json</code> beside this page.</p>";

/// Renders the whole page.
pub fn render(page: &Page) -> String {
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    h.push_str("<title>fapm report</title>\n");
    let _ = writeln!(h, "<style>{STYLE}</style>\n</head>\n<body>");
    h.push_str("<h1>fapm report: what forgetting-aware pruning keeps</h1>\n");
    let _ = writeln!(
        h,
        "<p class=\"note\">base <code>{}</code><br>fine-tuned <code>{}</code></p>",
        esc(&page.base),
        esc(&page.finetuned)
    );
    h.push_str(EXPLAIN);
    h.push('\n');
    if !page.facts.is_empty() {
        h.push_str("<ul>\n");
        for f in &page.facts {
            let _ = writeln!(h, "<li>{}</li>", esc(f));
        }
        h.push_str("</ul>\n");
    }
    for s in &page.sections {
        let _ = writeln!(h, "<h2>{}</h2>\n<p>{}</p>", esc(&s.title), esc(&s.intro));
        h.push_str("<div class=\"grid\">\n");
        for f in &s.figures {
            // Two figures side by side where they fit at 560 px or more, each at most its
            // natural size: heatmaps are drawn scaled, their PNG links to the full size.
            let _ = writeln!(
                h,
                "<figure style=\"flex:1 1 {:.0}px;max-width:{:.0}px\">{}<figcaption>{}</figcaption></figure>",
                f.width.min(560.0),
                f.width,
                f.svg,
                esc(&f.caption)
            );
        }
        h.push_str("</div>\n");
        if let Some(t) = &s.table {
            table(&mut h, t);
        }
    }
    h.push_str("</body>\n</html>\n");
    h
}

fn table(h: &mut String, t: &Table) {
    h.push_str("<table>\n<tr>");
    for c in &t.head {
        let _ = write!(h, "<th>{}</th>", esc(c));
    }
    h.push_str("</tr>\n");
    for row in &t.rows {
        h.push_str("<tr>");
        for c in row {
            let _ = write!(h, "<td>{}</td>", esc(c));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_shows_every_figure_and_escapes_text() {
        let page = Page {
            base: "a<b>.safetensors".into(),
            finetuned: "ft".into(),
            facts: vec!["x & y".into()],
            sections: vec![Section {
                title: "T".into(),
                intro: "i".into(),
                figures: vec![
                    Figure { svg: "<svg id=\"one\"></svg>".into(), width: 100.0, caption: "c \"1\"".into() },
                    Figure { svg: "<svg id=\"two\"></svg>".into(), width: 900.0, caption: "c2".into() },
                ],
                table: Some(Table { head: vec!["name".into()], rows: vec![vec!["w<".into()]] }),
            }],
        };
        let html = render(&page);
        assert!(html.contains(
            "<figure style=\"flex:1 1 100px;max-width:100px\"><svg id=\"one\"></svg><figcaption>c &quot;1&quot;"
        ));
        assert!(html.contains("<figure style=\"flex:1 1 560px;max-width:900px\"><svg id=\"two\"></svg>"));
        assert!(html.contains("a&lt;b&gt;.safetensors"));
        assert!(html.contains("x &amp; y"));
        assert!(html.contains("c &quot;1&quot;"));
        assert!(html.contains("<table>\n<tr><th>name</th></tr>\n<tr><td>w&lt;</td></tr>\n</table>"));
        assert!(html.ends_with("</html>\n"));
    }
}

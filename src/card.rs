//! `fapm card`: a Hub-ready delta repository. A folder with the delta and a `README.md` model
//! card whose YAML metadata the Hub reads (`base_model`, `library_name: fapm`, tags, the
//! fine-tune's license) and whose body says what the delta is, the base it needs (repo id and
//! commit), the prune's settings, the sizes, the trade-off of a `fapm report` when given, and
//! how to use it. Uploading is `hf upload ORG/NAME FOLDER`; fapm has no upload code.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use fapm_stages::error::printable;
use fapm_stages::format::{DeltaReader, Manifest, Mode};
use fapm_stages::repo::{cache_folder, check_id};
use fapm_stages::run::RunControl;
use fapm_stages::{Error, Result};
use serde::Deserialize;

use crate::hub;
use crate::output::{Kind, Staged};

/// Everything `card` needs.
#[derive(Debug, Clone)]
pub struct CardConfig {
    /// The delta file.
    pub delta: PathBuf,
    /// The folder to write.
    pub output: PathBuf,
    /// A `fapm report` directory (its `report.json`).
    pub report: Option<PathBuf>,
    /// The fine-tune's model card, for its license.
    pub finetuned_card: Option<PathBuf>,
    /// The delta repository's own id, for the usage lines (`None`: a placeholder).
    pub repo_id: Option<String>,
    /// How the fine-tune's card is found in the cache when not given.
    pub hub: hub::Env,
    /// Bytes fapm may allocate.
    pub memory_budget: u64,
    /// Replace an existing folder.
    pub overwrite: bool,
}

/// What `card` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CardSummary {
    /// The folder.
    pub output: PathBuf,
    /// The delta's file name in it.
    pub delta_file: String,
    /// The base's repo id (the card's `base_model`), if the delta records one.
    pub base_model: Option<String>,
    /// The license carried from the fine-tune's card.
    pub license: Option<String>,
    /// Whether a report's trade-off is quoted.
    pub report: bool,
}

/// The largest `report.json` or model card `card` reads.
const MAX_READ: u64 = 4 << 20;

/// Writes the delta folder.
pub fn card(cfg: &CardConfig, ctl: &RunControl) -> Result<CardSummary> {
    if let Some(id) = &cfg.repo_id {
        check_id(id).map_err(|why| Error::Config(format!("invalid --repo-id '{}': it {why}", printable(id))))?;
    }
    let delta = DeltaReader::open_within(&cfg.delta, cfg.memory_budget, ctl)?;
    delta.refuse_part()?;
    let m = &delta.manifest;
    let points = cfg.report.as_deref().map(read_report).transpose()?;
    let license = license(cfg, m)?;
    let name = cfg.delta.file_name().map(|n| n.to_string_lossy().into_owned());
    let delta_file = match name {
        Some(n) if n.ends_with(".fapm") && fapm_stages::paths::check(&n).is_ok() => n,
        _ => "delta.fapm".to_owned(),
    };
    let text = render(m, delta.size, &delta_file, cfg.repo_id.as_deref(), license.as_ref(), points.as_deref());
    let staged = Staged::new(&cfg.output, Kind::Directory, cfg.overwrite)?;
    std::fs::create_dir(staged.path()).map_err(|e| Error::io(&cfg.output, e))?;
    let copy = staged.path().join(&delta_file);
    staged.track(&copy);
    std::fs::copy(&cfg.delta, &copy).map_err(|e| Error::io(&cfg.delta, e))?;
    let readme = staged.path().join("README.md");
    staged.track(&readme);
    crate::output::write_new(&readme, text).map_err(|e| Error::io(cfg.output.join("README.md"), e))?;
    ctl.check()?;
    staged.commit()?;
    Ok(CardSummary {
        output: cfg.output.clone(),
        delta_file,
        base_model: m.base_repo.as_ref().map(|r| r.repo.clone()),
        license: license.map(|l| l.license),
        report: points.is_some(),
    })
}

/// One point of a report's whole-model trade-off (`report.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct Point {
    /// The sparsity, as a decimal.
    pub sparsity: String,
    /// The penalty strength, as a decimal.
    pub penalty: String,
    /// The share of the task vector's energy kept (`None`: nothing changed).
    pub energy_kept: Option<f64>,
    /// The forgetting proxy's share kept (`None`: nothing changed).
    pub forgetting: Option<f64>,
    /// The delta's estimated size.
    pub delta_bytes: u64,
    /// On the Pareto front.
    pub pareto: bool,
}

#[derive(Deserialize)]
struct ReportFile {
    fapm_report: u32,
    points: Vec<Point>,
}

/// Reads `DIR/report.json`, as `fapm report` writes it.
fn read_report(dir: &Path) -> Result<Vec<Point>> {
    let path = dir.join("report.json");
    let text = read_bounded(&path)?;
    let r: ReportFile =
        serde_json::from_slice(&text).map_err(|e| Error::invalid(&path, format!("not a fapm report.json: {e}")))?;
    if r.fapm_report != 1 {
        return Err(Error::invalid(&path, format!("report format {} is not one this fapm reads", r.fapm_report)));
    }
    let decimal = |s: &str| !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if let Some(p) = r.points.iter().find(|p| !decimal(&p.sparsity) || !decimal(&p.penalty)) {
        return Err(Error::invalid(
            &path,
            format!(
                "a point's sparsity '{}' or penalty '{}' is not a decimal",
                printable(&p.sparsity),
                printable(&p.penalty)
            ),
        ));
    }
    Ok(r.points)
}

fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut text = Vec::new();
    file.take(MAX_READ + 1).read_to_end(&mut text).map_err(|e| Error::io(path, e))?;
    if text.len() as u64 > MAX_READ {
        return Err(Error::invalid(path, format!("larger than {MAX_READ} bytes")));
    }
    Ok(text)
}

/// A license from a model card's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
struct License {
    license: String,
    name: Option<String>,
    link: Option<String>,
}

/// The fine-tune's license: from `--finetuned-card`, else from the README.md of the
/// fine-tune's repository in the cache when the delta records one (never fetched).
fn license(cfg: &CardConfig, m: &Manifest) -> Result<Option<License>> {
    let card = match (&cfg.finetuned_card, &m.finetuned_repo) {
        (Some(path), _) => Some(path.clone()),
        (None, Some(repo)) => {
            let snapshot = cfg.hub.cache.join(cache_folder(&repo.repo)).join("snapshots").join(&repo.commit);
            Some(snapshot.join("README.md")).filter(|p| p.is_file())
        }
        (None, None) => None,
    };
    let Some(card) = card else { return Ok(None) };
    let text = read_bounded(&card)?;
    Ok(parse_license(&String::from_utf8_lossy(&text)))
}

/// `license`, `license_name` and `license_link` of a model card's YAML front matter, kept only
/// when they are plain single-line values.
fn parse_license(card: &str) -> Option<License> {
    let mut lines = card.lines();
    if lines.next()?.trim_end() != "---" {
        return None;
    }
    let mut found = License { license: String::new(), name: None, link: None };
    for line in lines.take_while(|l| l.trim_end() != "---") {
        let Some((key, value)) = line.split_once(':') else { continue };
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
        let plain = !value.is_empty()
            && value.len() <= 200
            && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+/:".contains(&b));
        match key {
            "license" if plain => found.license = value.to_owned(),
            "license_name" if plain => found.name = Some(value.to_owned()),
            "license_link" if plain => found.link = Some(value.to_owned()),
            _ => {}
        }
    }
    (!found.license.is_empty()).then_some(found)
}

/// Bytes as the card shows them.
fn size(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// The model card's text.
fn render(
    m: &Manifest,
    delta_bytes: u64,
    delta_file: &str,
    repo_id: Option<&str>,
    license: Option<&License>,
    points: Option<&[Point]>,
) -> String {
    let me = repo_id.unwrap_or("ORG/NAME");
    let mut s = String::from("---\n");
    if let Some(b) = &m.base_repo {
        let _ = writeln!(s, "base_model: {}", b.repo);
    }
    s.push_str("library_name: fapm\ntags:\n- fapm\n- sparse-delta\n- task-vector\n- pruning\n");
    if let Some(l) = license {
        let _ = writeln!(s, "license: {}", l.license);
        if let Some(n) = &l.name {
            let _ = writeln!(s, "license_name: {n}");
        }
        if let Some(k) = &l.link {
            let _ = writeln!(s, "license_link: {k}");
        }
    }
    s.push_str("---\n\n");
    let title = repo_id.map_or("A fapm sparse delta".to_owned(), |id| format!("{id}: a fapm sparse delta"));
    let _ = writeln!(s, "# {title}\n");
    let _ = writeln!(
        s,
        "This repository holds `{delta_file}`, a sparse delta made by fapm: the task \
         vector of a fine-tune (its weights minus its base's), pruned with the Forgetting-Aware Pruning Metric \
         (FAPM, EMNLP 2025), which keeps the changes that matter for the task and puts the base weights back \
         elsewhere, so the model forgets less of what the base knew. Applied to its base it rebuilds the pruned \
         fine-tune bit for bit; every tensor of the base and of the result is checked against a blake3 hash. \
         The file holds tensors, configuration and tokenizer files only: never code that runs on load, never \
         pickles.\n"
    );
    s.push_str("## The base it needs\n\n");
    match &m.base_repo {
        Some(b) => {
            let _ = writeln!(
                s,
                "[`{0}`](https://huggingface.co/{0}) at commit `{1}` (revision `{2}` when the delta was made). fapm \
                 checks each base tensor's hash, so another commit of the base is refused, never silently used.\n",
                b.repo, b.commit, b.revision
            );
        }
        None => s.push_str("The delta was made from a local base checkpoint and does not name its repository: pass it with `--base`. fapm checks each base tensor's hash.\n\n"),
    }
    if let Some(f) = &m.finetuned_repo {
        let _ = writeln!(s, "The fine-tune: [`{0}`](https://huggingface.co/{0}) at commit `{1}`.\n", f.repo, f.commit);
    }
    s.push_str("## How it was pruned\n\n| setting | value |\n|---|---|\n");
    let _ = writeln!(
        s,
        "| metric | {} |",
        serde_json::to_value(m.metric).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    );
    let _ = writeln!(s, "| penalty strength λ | {} |", m.penalty);
    let _ = writeln!(s, "| sparsity | {} |", m.sparsity);
    for r in &m.sparsity_for {
        let _ = writeln!(s, "| sparsity for `{}` | {} |", cell(&r.pattern), r.sparsity);
    }
    let _ = writeln!(
        s,
        "| threshold | {} |",
        serde_json::to_value(m.threshold).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    );
    for (flag, list) in [("include", &m.include), ("exclude", &m.exclude)] {
        for p in list {
            let _ = writeln!(s, "| {flag} | `{}` |", cell(p));
        }
    }
    let _ = writeln!(s, "| fapm | {} (delta format version {}) |\n", cell(&m.tool), m.version);
    let model_bytes: u64 = m.shards.iter().map(|sh| sh.header.len() as u64 + 8).sum::<u64>()
        + m.tensors.iter().map(|t| t.numel() * t.dtype.size() as u64).sum::<u64>()
        + m.side_files.iter().map(|f| f.size).sum::<u64>();
    let pruned: Vec<_> = m.tensors.iter().filter(|t| t.mode == Mode::Pruned).collect();
    let (kept, elements) = pruned.iter().fold((0u64, 0u64), |(k, n), t| (k + t.kept, n + t.diffed_numel()));
    s.push_str("## Sizes\n\n| | bytes |\n|---|---|\n");
    let _ = writeln!(s, "| the fine-tuned model | {} |", size(model_bytes));
    let _ = writeln!(
        s,
        "| this delta | {} ({:.1}x smaller) |\n",
        size(delta_bytes),
        model_bytes as f64 / delta_bytes.max(1) as f64
    );
    let _ = writeln!(
        s,
        "{} tensors, {} of them pruned: {} of their {} elements kept ({:.2}%).\n",
        m.tensors.len(),
        pruned.len(),
        kept,
        elements,
        100.0 * kept as f64 / elements.max(1) as f64
    );
    if let Some(points) = points {
        s.push_str("## The trade-off (from `fapm report`)\n\nWeight-space measures over the whole model, for each setting the report tried: the share of the task vector's energy kept (the task) against the share of the forgetting proxy kept (lower forgets less), and the delta's size. Points marked ★ are on the Pareto front.\n\n| sparsity | λ | energy kept | forgetting proxy | delta size | |\n|---|---|---|---|---|---|\n");
        for p in points {
            let share = |x: Option<f64>| x.map_or("unchanged".to_owned(), |x| format!("{x:.4}"));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                cell(&p.sparsity),
                cell(&p.penalty),
                share(p.energy_kept),
                share(p.forgetting),
                size(p.delta_bytes),
                if p.pareto { "★" } else { "" }
            );
        }
        s.push('\n');
    }
    let base_arg = m.base_repo.as_ref().map_or("--base BASE ".to_owned(), |_| String::new());
    s.push_str("## Use it\n\nFrom the command line (`pip install fapm`, or the `fapm` binary), with the base in the Hugging Face cache or fetched:\n\n```bash\n");
    let _ = writeln!(s, "fapm apply {base_arg}--delta {me} --output model/");
    s.push_str("```\n\nFrom Python, patching the base in place:\n\n```python\nimport fapm\nfrom transformers import AutoModel\n");
    match &m.base_repo {
        Some(b) => {
            let _ = writeln!(s, "model = AutoModel.from_pretrained(\"{}\", revision=\"{}\")", b.repo, b.commit);
        }
        None => s.push_str("model = AutoModel.from_pretrained(\"BASE\")\n"),
    }
    let _ = writeln!(s, "fapm.patch_(model, \"{me}\")\n```");
    s
}

/// A table cell: no line breaks or pipes, control characters escaped.
fn cell(s: &str) -> String {
    printable(&s.replace('|', "\\|").replace('\n', " ")).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn licenses_come_from_the_front_matter_only() {
        let card = "---\nlicense: apache-2.0\nlanguage: en\n---\nlicense: mit\n";
        assert_eq!(parse_license(card).unwrap().license, "apache-2.0");
        let other =
            "---\nlicense: other\nlicense_name: llama3\nlicense_link: https://llama.meta.com/llama3/license\n---\n";
        let l = parse_license(other).unwrap();
        assert_eq!(
            (l.name.as_deref(), l.link.as_deref()),
            (Some("llama3"), Some("https://llama.meta.com/llama3/license"))
        );
        assert_eq!(parse_license("no front matter\nlicense: mit\n"), None);
        assert_eq!(parse_license("---\nlicense: \"mit\\n- evil\"\n---\n"), None);
        assert_eq!(parse_license("---\nlicense: [a, b]\n---\n"), None);
    }
}

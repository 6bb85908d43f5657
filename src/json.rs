//! The `--json` summaries as values, so that the binary and the Python package give the same
//! objects. Peak memory, which measures a whole process, is added by the binary alone.

use std::io::{self, Write};
use std::path::Path;

use fapm_stages::dtype::DType;
use fapm_stages::format::{Hash, Manifest, Mode, TensorRecord};
use serde::{Serialize, Serializer};
use serde_json::{json, Value};

use crate::{ApplySummary, MergeSummary, PruneSummary};

/// What `prune --json` prints, without `peak_memory_bytes`.
pub fn prune(s: &PruneSummary) -> Value {
    let mut v = serde_json::to_value(s).expect("a summary serializes");
    v["command"] = json!("prune");
    v["kept_fraction"] = json!(s.kept as f64 / (s.elements.max(1)) as f64);
    v["compression_ratio"] = json!(s.finetuned_bytes as f64 / s.delta_bytes.max(1) as f64);
    v["throughput_gb_per_s"] = json!(s.input_bytes as f64 / s.seconds.max(1e-9) / 1e9);
    v
}

/// What `apply --json` (`verb` "applied") and `verify --json` ("verified") print, without
/// `peak_memory_bytes`.
pub fn apply(verb: &str, s: &ApplySummary) -> Value {
    let mut v = serde_json::to_value(s).expect("a summary serializes");
    v["command"] = json!(verb);
    v["throughput_gb_per_s"] = json!(s.tensor_bytes as f64 / s.seconds.max(1e-9) / 1e9);
    v
}

/// What `merge --json` prints, without `peak_memory_bytes`.
pub fn merge(s: &MergeSummary) -> Value {
    let mut v = serde_json::to_value(s).expect("a summary serializes");
    v["command"] = json!("merge");
    v
}

/// What `report --json` prints, the run having taken `seconds`.
#[cfg(feature = "report")]
pub fn report(s: &crate::report::ReportSummary, seconds: f64) -> Value {
    json!({
        "command": "report", "output": s.output, "files": s.files, "tensors_charted": s.tensors_charted,
        "extended_tensors": s.extended_tensors, "heatmap_tensors": s.heatmap_tensors, "seconds": seconds,
        "tensors_shown": s.tensors_shown,
    })
}

/// What `inspect --json` prints for the delta at `path` of `size` bytes, written to `out` as
/// it is produced (no JSON value of the manifest is built: the text is the only copy) and
/// made terminal-safe ([`TerminalSafe`]). One line, without the final newline.
pub fn inspect_to(out: impl Write, path: &Path, m: &Manifest, size: u64) -> io::Result<()> {
    let mut out = TerminalSafe::new(out);
    serde_json::to_writer(&mut out, &Inspect::new(path, m, size)).map_err(io::Error::from)?;
    out.flush()
}

/// [`inspect_to`] as a string (for the Python package: `json.loads` of it is the dict).
pub fn inspect_text(path: &Path, m: &Manifest, size: u64) -> String {
    let mut text = Vec::new();
    inspect_to(&mut text, path, m, size).expect("writing to memory does not fail");
    String::from_utf8(text).expect("serde_json writes UTF-8")
}

/// The `inspect --json` object, fields in the order of their names (the order in which a
/// `serde_json::Value` prints them, as earlier versions did).
#[derive(Serialize)]
struct Inspect<'a> {
    base_only: &'a [String],
    base_repo: Option<&'a fapm_stages::format::RepoRecord>,
    code_files: Vec<String>,
    exclude: &'a [String],
    file: std::borrow::Cow<'a, str>,
    finetuned_repo: Option<&'a fapm_stages::format::RepoRecord>,
    include: &'a [String],
    index: bool,
    metric: fapm_stages::threshold::score::Metric,
    part: Option<Part>,
    penalty: &'a str,
    shards: Shards<'a>,
    side_files: SideFiles<'a>,
    size: u64,
    source: fapm_stages::format::Source,
    sparsity: &'a str,
    sparsity_for: &'a [fapm_stages::format::SparsityRule],
    tensors: Tensors<'a>,
    threshold: fapm_stages::threshold::select::ThresholdMode,
    tool: &'a str,
    version: u32,
}

impl<'a> Inspect<'a> {
    fn new(path: &'a Path, m: &'a Manifest, size: u64) -> Self {
        Inspect {
            base_only: &m.base_only,
            base_repo: m.base_repo.as_ref(),
            code_files: crate::pipeline::apply::code_files(m),
            exclude: &m.exclude,
            file: path.to_string_lossy(),
            finetuned_repo: m.finetuned_repo.as_ref(),
            include: &m.include,
            index: m.index,
            metric: m.metric,
            part: m.part.as_ref().map(|p| Part {
                base: p.base,
                count: p.count,
                finetuned: p.finetuned,
                finetuned_sample: p.finetuned_sample,
                first: p.first,
                index: p.index,
                total: p.total,
            }),
            penalty: &m.penalty,
            shards: Shards(m),
            side_files: SideFiles(m),
            size,
            source: m.source,
            sparsity: &m.sparsity,
            sparsity_for: &m.sparsity_for,
            tensors: Tensors(m),
            threshold: m.threshold,
            tool: &m.tool,
            version: m.version,
        }
    }
}

/// A part record, fields in name order.
#[derive(Serialize)]
struct Part {
    base: Hash,
    count: u32,
    finetuned: Hash,
    #[serde(skip_serializing_if = "Option::is_none")]
    finetuned_sample: Option<Hash>,
    first: u64,
    index: u32,
    total: u64,
}

/// The shard names.
struct Shards<'a>(&'a Manifest);

impl Serialize for Shards<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.shards.iter().map(|sh| &sh.name))
    }
}

/// The side files' paths and sizes.
struct SideFiles<'a>(&'a Manifest);

impl Serialize for SideFiles<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Side<'a> {
            path: &'a str,
            size: u64,
        }
        s.collect_seq(self.0.side_files.iter().map(|f| Side { path: &f.path, size: f.size }))
    }
}

/// One object a tensor record, fields in name order.
struct Tensors<'a>(&'a Manifest);

impl Serialize for Tensors<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Tensor<'a> {
            appended_stored: Option<u64>,
            base_dtype: Option<DType>,
            base_shape: Option<&'a [u64]>,
            candidates: u64,
            dtype: DType,
            encoded_bytes: u64,
            kept: u64,
            mode: Mode,
            name: &'a str,
            numel: u64,
            shape: &'a [u64],
            shard: &'a str,
        }
        let m = self.0;
        s.collect_seq(m.tensors.iter().map(|t: &TensorRecord| Tensor {
            appended_stored: t.extended.as_ref().map(|e| e.stored),
            base_dtype: t.base_dtype,
            base_shape: t.extended.as_ref().map(|e| e.base_shape.as_slice()),
            candidates: t.candidates,
            dtype: t.dtype,
            encoded_bytes: t.blocks.iter().map(|b| b.len).sum(),
            kept: t.kept,
            mode: t.mode,
            name: &t.name,
            numel: t.numel(),
            shape: &t.shape,
            shard: &m.shards[t.shard].name,
        }))
    }
}

/// A writer of JSON text that writes every character a terminal could act on as a JSON escape
/// (serde_json escapes only C0 controls; DEL, C1 controls and bidirectional marks from file
/// and tensor names would otherwise reach the terminal raw). Outside strings JSON is plain
/// ASCII, so every such character is inside a string, where the escape means the same.
pub struct TerminalSafe<W: Write> {
    inner: W,
    /// The bytes of a character split between two writes.
    pending: Vec<u8>,
}

impl<W: Write> TerminalSafe<W> {
    /// Escapes what is written on its way to `inner`.
    pub fn new(inner: W) -> Self {
        TerminalSafe { inner, pending: Vec::new() }
    }

    /// Escapes and writes `text`.
    fn put(inner: &mut W, text: &str) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if fapm_stages::error::needs_escape(c) {
                inner.write_all(&text.as_bytes()[start..i])?;
                // Above U+FFFF (U+E0001, tag characters) JSON escapes a surrogate pair.
                for unit in c.encode_utf16(&mut [0; 2]) {
                    write!(inner, "\\u{unit:04x}")?;
                }
                start = i + c.len_utf8();
            }
        }
        inner.write_all(&text.as_bytes()[start..])
    }
}

impl<W: Write> Write for TerminalSafe<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let bytes: &[u8] = if self.pending.is_empty() {
            buf
        } else {
            self.pending.extend_from_slice(buf);
            &self.pending
        };
        let valid = match std::str::from_utf8(bytes) {
            Ok(text) => text.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => return Err(io::Error::new(io::ErrorKind::InvalidData, "JSON text that is not UTF-8")),
        };
        let text = std::str::from_utf8(&bytes[..valid]).expect("checked above");
        Self::put(&mut self.inner, text)?;
        let rest = bytes[valid..].to_vec();
        self.pending = rest;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "JSON text ends inside a character"));
        }
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fapm_stages::format::DeltaReader;

    /// What `inspect --json` printed before it was streamed: a JSON value of the whole
    /// manifest, printed with terminal escapes.
    fn inspect_as_value(path: &Path, m: &Manifest, size: u64) -> String {
        let encoded = |t: &TensorRecord| t.blocks.iter().map(|b| b.len).sum::<u64>();
        let tensors: Vec<_> = m
            .tensors
            .iter()
            .map(|t| {
                json!({
                    "name": t.name, "shard": m.shards[t.shard].name, "mode": t.mode, "dtype": t.dtype,
                    "base_dtype": t.base_dtype, "shape": t.shape, "numel": t.numel(),
                    "base_shape": t.extended.as_ref().map(|e| &e.base_shape),
                    "appended_stored": t.extended.as_ref().map(|e| e.stored),
                    "candidates": t.candidates, "kept": t.kept, "encoded_bytes": encoded(t),
                })
            })
            .collect();
        let v = json!({
            "file": path, "size": size, "version": m.version, "tool": m.tool, "metric": m.metric,
            "penalty": m.penalty, "sparsity": m.sparsity, "sparsity_for": m.sparsity_for,
            "threshold": m.threshold, "include": m.include, "exclude": m.exclude,
            "source": m.source, "index": m.index, "part": m.part,
            "shards": m.shards.iter().map(|s| &s.name).collect::<Vec<_>>(),
            "tensors": tensors,
            "side_files": m.side_files.iter().map(|f| json!({"path": f.path, "size": f.size})).collect::<Vec<_>>(),
            "code_files": crate::pipeline::apply::code_files(m),
            "base_only": m.base_only, "base_repo": m.base_repo, "finetuned_repo": m.finetuned_repo,
        });
        let mut out = String::new();
        for c in v.to_string().chars() {
            if fapm_stages::error::needs_escape(c) {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    /// The streamed text is byte for byte what the value printed, on the golden deltas and on
    /// a manifest with every optional field set and names a terminal would act on.
    #[test]
    fn streamed_inspect_prints_what_the_value_printed() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden");
        let mut seen = 0;
        for entry in std::fs::read_dir(&root).unwrap() {
            let path = entry.unwrap().path();
            let r = DeltaReader::open(&path).unwrap();
            assert_eq!(inspect_text(&path, &r.manifest, r.size), inspect_as_value(&path, &r.manifest, r.size));
            let mut m = r.manifest.clone();
            m.tensors[0].name = "a\u{7f}b\u{202e}c\u{9b}\"\\\n é😀".into();
            m.shards[0].name = "sh\u{2028}ard".into();
            m.tensors[1].extended = Some(fapm_stages::format::Extended { base_shape: vec![1, 2], stored: 3 });
            m.part = Some(fapm_stages::format::PartRecord {
                index: 2,
                count: 3,
                first: 4,
                total: 5,
                base: Hash([1; 32]),
                finetuned: Hash([2; 32]),
                finetuned_sample: Some(Hash([3; 32])),
            });
            m.base_repo = Some(fapm_stages::format::RepoRecord {
                repo: "org/base".into(),
                revision: "main".into(),
                commit: "0123456789abcdef0123456789abcdef01234567".into(),
            });
            m.sparsity_for =
                vec![fapm_stages::format::SparsityRule { pattern: "x\u{85}".into(), sparsity: "0.5".into() }];
            m.include = vec!["inc".into()];
            m.exclude = vec!["exc".into()];
            m.base_only = vec!["gone\u{1b}".into()];
            let odd = path.with_file_name("odd\u{7}name.fapm");
            let text = inspect_text(&odd, &m, 7);
            assert_eq!(text, inspect_as_value(&odd, &m, 7));
            assert!(!text.chars().any(fapm_stages::error::needs_escape));
            seen += 1;
        }
        assert!(seen >= 2);
    }

    /// A character split between two writes is escaped whole.
    #[test]
    fn terminal_safe_joins_split_characters() {
        let mut out = Vec::new();
        let mut w = TerminalSafe::new(&mut out);
        let text = "\"a\u{202e}b\"".as_bytes();
        for byte in text {
            w.write_all(std::slice::from_ref(byte)).unwrap();
        }
        w.flush().unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "\"a\\u202eb\"");
    }
}

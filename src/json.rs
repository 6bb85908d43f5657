//! The `--json` summaries as values, so that the binary and the Python package give the same
//! objects. Peak memory, which measures a whole process, is added by the binary alone.

use std::path::Path;

use fapm_stages::format::{Manifest, TensorRecord};
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
    })
}

/// What `inspect --json` prints for the delta at `path` of `size` bytes.
pub fn inspect(path: &Path, m: &Manifest, size: u64) -> Value {
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
    json!({
        "file": path, "size": size, "version": m.version, "tool": m.tool, "metric": m.metric,
        "penalty": m.penalty, "sparsity": m.sparsity, "sparsity_for": m.sparsity_for,
        "threshold": m.threshold, "include": m.include, "exclude": m.exclude,
        "source": m.source, "index": m.index, "part": m.part,
        "shards": m.shards.iter().map(|s| &s.name).collect::<Vec<_>>(),
        "tensors": tensors,
        "side_files": m.side_files.iter().map(|f| json!({"path": f.path, "size": f.size})).collect::<Vec<_>>(),
        "code_files": crate::pipeline::apply::code_files(m),
        "base_only": m.base_only,
    })
}

//! fapm: forgetting-aware pruning of fine-tuned checkpoints into compact, verified sparse
//! deltas, and their reconstruction.
//!
//! The library API mirrors the command line: [`prune`], [`apply`], [`verify`] and
//! [`inspect`]. Byte-level work lives in the `fapm-stages` crate.

pub mod card;
pub mod config;
pub mod hub;
pub mod json;
pub mod merge;
pub mod output;
pub mod pipeline;
#[cfg(feature = "report")]
pub mod report;
pub mod sigbus;

pub use fapm_stages::run::RunControl;
pub use fapm_stages::{Error, Result};
pub use merge::{merge, MergeSummary};
pub use pipeline::apply::{apply, verify, ApplySummary};
pub use pipeline::prune::{prune, PruneSummary};
#[cfg(feature = "report")]
pub use report::{report, ReportConfig, ReportSummary};

/// Opens a delta within the memory budget and returns its verified manifest and size (blocks
/// are not read); opening stops once `ctl` is cancelled.
pub fn inspect(cfg: &config::InspectConfig, ctl: &RunControl) -> Result<(fapm_stages::format::Manifest, u64)> {
    let reader = fapm_stages::format::DeltaReader::open_within(&cfg.delta, cfg.memory_budget, ctl)?;
    Ok((reader.manifest, reader.size))
}

//! fapm-stages: everything in fapm that touches bytes.
//!
//! Checkpoint discovery and validation ([`checkpoint`]), scores and keys ([`score`]), the
//! streaming k-th-score selection ([`threshold`]), the lossless sparse block codec
//! ([`encode`]) and the delta container ([`format`]). The root crate `fapm` builds its
//! pipeline from these pieces.

#![warn(missing_docs)]

pub mod bounded_json;
pub mod checkpoint;
pub mod decode;
pub mod dtype;
pub mod error;
pub mod format;
pub mod hash;
pub mod mask_encode;
pub mod options;
pub mod paths;
pub mod read;
pub mod repo;
pub mod run;
pub mod simd;
pub mod threshold;
pub mod write;
pub mod writeback;

pub use error::{Error, Result};

/// The memory budget when none is given (`--memory-budget`): reading headers and manifests
/// stays within it too.
pub const DEFAULT_MEMORY_BUDGET: u64 = 256 << 20;

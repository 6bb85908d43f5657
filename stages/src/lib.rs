//! fapm-stages: everything in fapm that touches bytes.
//!
//! Checkpoint discovery and validation ([`checkpoint`]), scores and keys ([`score`]), the
//! streaming k-th-score selection ([`threshold`]), the lossless sparse block codec
//! ([`encode`]) and the delta container ([`format`]). The root crate `fapm` builds its
//! pipeline from these pieces.

#![warn(missing_docs)]

pub mod checkpoint;
pub mod dtype;
pub mod encode;
pub mod error;
pub mod format;
pub mod hash;
pub mod pack;
pub mod partition;
pub mod score;
pub mod threshold;
pub mod writeback;

pub use error::{Error, Result};

//! The streaming pipelines behind `prune`, `apply` and `verify`: stages on threads joined by
//! bounded channels, chunk-parallel work on a fixed-size worker pool, one shared flag for
//! cancellation and atomic counters for progress. See docs/PIPELINE.md.
//!
//! The stages are in [`stages`], one module each, in the order a chunk goes through them;
//! each has its input and output messages and a `run`, and none knows the others' threads or
//! channels. The graphs are wired in [`prune`] and [`apply`].

pub mod apply;
pub mod budget;
pub mod control;
mod hits;
pub mod prune;
mod runner;
pub mod side;
pub(crate) mod stages;

pub use budget::Budget;
pub use control::RunControl;

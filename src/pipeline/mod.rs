//! The graphs of `prune`, `apply` and `verify`: which stages of `fapm-stages` run, on which
//! threads, joined by which bounded channels. The stages themselves (what each does to a
//! chunk) are in the `fapm-stages` crate, one module each. See docs/PIPELINE.md.

pub mod apply;
pub mod prune;

//! The stages of the pipelines, in the order a chunk goes through them.
//!
//! ```text
//! prune:  read ──► threshold ──► mask_encode ──► write
//! apply:  read ──► decode (writes the output shards in place)
//! ```
//!
//! - [`read`]: the shard reader: pairs fine-tuned and base tensors, decides each one's mode,
//!   hands out chunks as views into the memory maps.
//! - [`threshold`]: the task vector diff and the streaming score with a quantile threshold:
//!   each pruned tensor's cut.
//! - [`mask_encode`]: the masker and the sparse delta encoder, one fused per-chunk kernel.
//! - [`write`]: the writer: blocks appended in order, tensor records built.
//! - [`decode`]: apply's and verify's per-block kernel and tensor checks.

pub mod decode;
pub mod mask_encode;
pub mod read;
pub mod threshold;
pub mod write;

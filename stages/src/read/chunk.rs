//! Chunks: a tensor read a fixed number of elements at a time, as views into its memory map.
//! Every pass over a tensor goes chunk by chunk: prune's stages, the report's passes and the
//! decoder's blocks.

use crate::checkpoint::TensorRef;
use crate::format::block_sizes;

/// A range of elements of a tensor: one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// The first element.
    pub start: usize,
    /// How many elements.
    pub len: usize,
}

impl Chunk {
    /// The part of the chunk before element `end` (empty, at `end`, when it starts after).
    pub fn before(self, end: usize) -> Chunk {
        Chunk { start: self.start.min(end), len: self.len.min(end.saturating_sub(self.start)) }
    }
}

/// The chunks of `block_elems` elements of a tensor of `n` elements (the last one shorter).
pub fn chunks(n: u64, block_elems: u64) -> Vec<Chunk> {
    block_sizes(n, block_elems).map(|(s, l)| Chunk { start: s as usize, len: l as usize }).collect()
}

/// One tensor's bytes, read a chunk of elements at a time.
#[derive(Clone, Copy)]
pub struct TensorReader<'t> {
    bytes: &'t [u8],
    elem: usize,
}

impl<'t> TensorReader<'t> {
    /// Reads `t` from its shard's memory map.
    pub fn new(t: &'t TensorRef) -> Self {
        TensorReader { bytes: t.bytes(), elem: t.info().dtype.size() }
    }

    /// The bytes of `chunk`.
    #[inline]
    pub fn chunk(&self, chunk: Chunk) -> &'t [u8] {
        &self.bytes[chunk.start * self.elem..(chunk.start + chunk.len) * self.elem]
    }
}

/// A fine-tuned tensor and its base tensor, read in step.
#[derive(Clone, Copy)]
pub struct PairReader<'t> {
    /// The fine-tuned tensor.
    pub ft: TensorReader<'t>,
    /// The base tensor.
    pub base: TensorReader<'t>,
}

impl<'t> PairReader<'t> {
    /// Reads `ft` and `base` (of the same number of elements).
    pub fn new(ft: &'t TensorRef, base: &'t TensorRef) -> Self {
        PairReader { ft: TensorReader::new(ft), base: TensorReader::new(base) }
    }

    /// The fine-tuned and the base bytes of `chunk`.
    #[inline]
    pub fn chunk(&self, chunk: Chunk) -> (&'t [u8], &'t [u8]) {
        (self.ft.chunk(chunk), self.base.chunk(chunk))
    }
}

//! blake3 of a tensor hashed chunk by chunk, in parallel, with the same result as hashing it
//! whole: each chunk (a power-of-two number of bytes, at least 1 KiB, except the last) is a
//! complete subtree of the blake3 tree, so its chaining value can be computed on any thread
//! and the values merged in order afterwards.

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode};

use crate::format::Hash;

/// The hash of one chunk of a longer input, or of a whole input that is one chunk.
#[derive(Clone, Copy, Debug)]
pub enum ChunkHash {
    /// The input was this chunk alone: its final hash.
    Root(Hash),
    /// The chaining value of a chunk of a longer input.
    Subtree(ChainingValue),
}

/// Hashes the chunk `bytes` that starts at byte `offset` of an input split into `chunks`
/// chunks. Every chunk but the last must hold the same power-of-two number of bytes (>= 1 KiB).
pub fn hash_chunk(bytes: &[u8], offset: u64, chunks: usize) -> ChunkHash {
    let mut h = ChunkHasher::new(offset, chunks);
    h.update(bytes);
    h.finish()
}

/// [`hash_chunk`], fed a piece of the chunk at a time.
pub struct ChunkHasher {
    hasher: blake3::Hasher,
    root: bool,
}

impl ChunkHasher {
    /// For the chunk that starts at byte `offset` of an input split into `chunks` chunks.
    pub fn new(offset: u64, chunks: usize) -> Self {
        let mut hasher = blake3::Hasher::new();
        if chunks > 1 {
            hasher.set_input_offset(offset);
        }
        ChunkHasher { hasher, root: chunks <= 1 }
    }

    /// Adds the next bytes of the chunk.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
    }

    /// The chunk's hash.
    pub fn finish(&self) -> ChunkHash {
        if self.root {
            ChunkHash::Root(self.hasher.finalize().into())
        } else {
            ChunkHash::Subtree(self.hasher.finalize_non_root())
        }
    }
}

/// Merges the chunk hashes of an input, in order, into its blake3 hash. None: the empty input.
pub fn merge(chunks: &[ChunkHash]) -> Hash {
    match chunks {
        [] => blake3::hash(&[]).into(),
        [ChunkHash::Root(h)] => *h,
        _ => {
            let cvs: Vec<ChainingValue> = chunks
                .iter()
                .map(|p| match p {
                    ChunkHash::Subtree(cv) => *cv,
                    ChunkHash::Root(_) => panic!("a root hash among several chunks"),
                })
                .collect();
            let split = left_len(cvs.len());
            merge_subtrees_root(&subtree(&cvs[..split]), &subtree(&cvs[split..]), Mode::Hash).into()
        }
    }
}

/// The number of leading chunks in the left subtree: the largest power of two below `n`.
fn left_len(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

fn subtree(cvs: &[ChainingValue]) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let split = left_len(cvs.len());
    merge_subtrees_non_root(&subtree(&cvs[..split]), &subtree(&cvs[split..]), Mode::Hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_hash_equals_whole_hash() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for chunk in [1024usize, 2048, 8192] {
            for len in [0, 1, 1024, 1025, 4096, 5000, 9 * 1024, 17 * 1024 + 3, 70_000] {
                let input = &data[..len];
                let pieces: Vec<&[u8]> = input.chunks(chunk).collect();
                let parts: Vec<ChunkHash> =
                    pieces.iter().enumerate().map(|(i, p)| hash_chunk(p, (i * chunk) as u64, pieces.len())).collect();
                assert_eq!(merge(&parts), Hash::from(blake3::hash(input)), "chunk {chunk} len {len}");
            }
        }
    }

    #[test]
    fn left_subtree_is_largest_power_below() {
        assert_eq!([2, 3, 4, 5, 8, 9].map(left_len), [1, 2, 2, 4, 4, 8]);
    }
}

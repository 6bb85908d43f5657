//! How a prune is split over machines (SPEC section 7): the fine-tuned tensors, in output
//! order, go to `N` contiguous runs of nearly equal bytes. The rule depends only on the
//! tensors' byte sizes and `N`, so every part computes its own run alone, and `merge`
//! recomputes all of them from the parts' records to check that they fit together.

use std::ops::Range;

use crate::format::Hash;

/// `--part I/N`: write part `index` of `count` (both from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartSpec {
    /// This part, from 1.
    pub index: u32,
    /// How many parts.
    pub count: u32,
}

/// The run of tensors of each of `count` parts, given every tensor's byte size in output
/// order. Tensor `i` goes to the part in which the middle of its bytes falls: with `c` the
/// bytes before it, `b` its own and `B` all of them, part `floor(count * (2c + b) / 2B)`
/// (from 0; the last part when that is `count`). With no bytes at all, tensors are split by
/// number. Parts can be empty (more parts than tensors, or one tensor larger than a part).
///
/// ```
/// use fapm_stages::read::partition::split;
/// assert_eq!(split(&[10, 10, 10, 10], 2), vec![0..2, 2..4]);
/// assert_eq!(split(&[100, 1, 1], 2), vec![0..1, 1..3]);
/// assert_eq!(split(&[5], 3), vec![0..0, 0..1, 1..1]);
/// ```
pub fn split(sizes: &[u64], count: u32) -> Vec<Range<usize>> {
    let count = count.max(1) as u128;
    let total: u128 = sizes.iter().map(|&b| b as u128).sum();
    let mut before = 0u128;
    let part_of = |i: usize, b: u128, before: u128| -> usize {
        let p =
            if total == 0 { count * i as u128 / sizes.len() as u128 } else { count * (2 * before + b) / (2 * total) };
        p.min(count - 1) as usize
    };
    let mut starts = vec![sizes.len(); count as usize + 1];
    let mut parts = Vec::with_capacity(sizes.len());
    for (i, &b) in sizes.iter().enumerate() {
        parts.push(part_of(i, b as u128, before));
        before += b as u128;
    }
    // Parts are non-decreasing in i: part p starts at its first tensor, or where the next
    // non-empty part starts.
    for (i, &p) in parts.iter().enumerate().rev() {
        starts[p] = i;
    }
    for p in (0..count as usize).rev() {
        starts[p] = starts[p].min(starts[p + 1]);
    }
    (0..count as usize).map(|p| starts[p]..starts[p + 1]).collect()
}

/// The identity of a checkpoint's layout: blake3 over its shards' names and headers, each
/// preceded by its length. Two parts computed from the same inputs agree on it.
pub fn layout_hash<'a>(shards: impl IntoIterator<Item = (&'a str, &'a str)>) -> Hash {
    let mut h = blake3::Hasher::new();
    for (name, header) in shards {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(header.len() as u64).to_le_bytes());
        h.update(header.as_bytes());
    }
    h.finalize().into()
}

/// Bytes per window of [`content_sample`].
const SAMPLE_WINDOW: usize = 4096;
/// Windows per tensor of [`content_sample`]: the first, the last and seven evenly between.
const SAMPLE_WINDOWS: usize = 9;

/// A blake3 over a sample of a checkpoint's contents: for each tensor, in the order given, its
/// name, its length and nine 4 KiB windows of its bytes (the first, the last and seven evenly
/// spaced between; a tensor of at most nine windows whole). Every part of one prune computes
/// it over the whole fine-tuned checkpoint, so `merge` can tell apart two fine-tunes that share
/// a layout (their shard names and headers) but not their weights: two checkpoints that agree
/// on it differ nowhere in 36 KiB of each tensor. It reads about 36 KiB per tensor.
pub fn content_sample<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Hash {
    let mut h = blake3::Hasher::new();
    for (name, bytes) in tensors {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        if bytes.len() <= SAMPLE_WINDOW * SAMPLE_WINDOWS {
            h.update(bytes);
            continue;
        }
        let last = bytes.len() - SAMPLE_WINDOW;
        for i in 0..SAMPLE_WINDOWS {
            let at = (i as u128 * last as u128 / (SAMPLE_WINDOWS as u128 - 1)) as usize;
            h.update(&bytes[at..at + SAMPLE_WINDOW]);
        }
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The runs cover every tensor once, in order, and each part's bytes stay within one
        /// tensor of an equal share.
        #[test]
        fn runs_tile_the_tensors_and_balance_bytes(
            sizes in proptest::collection::vec(0u64..1000, 0..40),
            count in 1u32..12,
        ) {
            let runs = split(&sizes, count);
            prop_assert_eq!(runs.len(), count as usize);
            prop_assert_eq!(runs[0].start, 0);
            prop_assert_eq!(runs.last().unwrap().end, sizes.len());
            for w in runs.windows(2) {
                prop_assert_eq!(w[0].end, w[1].start);
            }
            let total: u64 = sizes.iter().sum();
            let largest = sizes.iter().copied().max().unwrap_or(0);
            for r in &runs {
                let bytes: u64 = sizes[r.clone()].iter().sum();
                prop_assert!(bytes as f64 <= total as f64 / count as f64 + largest as f64 + 1.0);
            }
        }
    }

    #[test]
    fn equal_tensors_split_evenly() {
        assert_eq!(split(&[1; 9], 3), vec![0..3, 3..6, 6..9]);
        assert_eq!(split(&[0; 4], 2), vec![0..2, 2..4]);
        assert_eq!(split(&[], 2), vec![0..0, 0..0]);
        assert_eq!(split(&[7, 7, 7], 1), vec![0..3]);
    }

    #[test]
    fn layouts_differ_by_any_byte() {
        let a = layout_hash([("a.safetensors", "{}")]);
        assert_eq!(a, layout_hash([("a.safetensors", "{}")]));
        assert_ne!(a, layout_hash([("a.safetensors", "{ }")]));
        assert_ne!(layout_hash([("ab", "c")]), layout_hash([("a", "bc")]));
    }

    /// The sample sees a change in any of its windows (the first and last bytes included), the
    /// name and the length; a small tensor is hashed whole.
    #[test]
    fn content_sample_sees_its_windows() {
        let big = vec![7u8; 1 << 20];
        let sample = |name: &str, bytes: &[u8]| content_sample([(name, bytes)]);
        let a = sample("w", &big);
        for at in [0, big.len() - 1, (big.len() - 4096) / 2 + 17] {
            let mut b = big.clone();
            b[at] ^= 1;
            assert_ne!(a, sample("w", &b), "byte {at}");
        }
        let mut outside = big.clone();
        outside[4096 + 5] ^= 1; // between the first and second windows
        assert_eq!(a, sample("w", &outside));
        assert_ne!(a, sample("v", &big));
        assert_ne!(a, sample("w", &big[..big.len() - 1]));
        let small = [1u8, 2, 3];
        assert_ne!(sample("s", &small), sample("s", &[1, 2, 4]));
    }
}

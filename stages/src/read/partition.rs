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
}

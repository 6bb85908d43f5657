//! Packing the keys at or above a floor: their positions (and the keys themselves) written
//! to the front of buffers, in order. It is the inner loop of gathering a chunk's hits and of
//! selecting its kept positions, so beside the portable loop it has an AVX2 copy (a lane
//! permutation per 8 keys, from a 256-entry table) and, for gathering, an AVX-512 copy
//! (`vpcompressd` per 16 keys), chosen at run time. Every copy writes the same first `n`
//! entries (tested); the vector copies also overwrite entries past them.

/// Where the keys being packed sit in their chunk.
#[derive(Debug, Clone, Copy)]
pub enum KeyPositions<'a> {
    /// Key `i` is at chunk-relative index `offset + i`.
    From(u32),
    /// Key `i` is at `idx[i]` (the keys of gathered hits).
    Of(&'a [u32]),
}

impl<'a> KeyPositions<'a> {
    /// The positions of the keys from the `n`-th on.
    #[inline(always)]
    pub fn skip(self, n: usize) -> KeyPositions<'a> {
        match self {
            KeyPositions::From(offset) => KeyPositions::From(offset + n as u32),
            KeyPositions::Of(idx) => KeyPositions::Of(&idx[n..]),
        }
    }

    #[inline(always)]
    fn at(self, i: usize) -> u32 {
        match self {
            KeyPositions::From(offset) => offset + i as u32,
            KeyPositions::Of(idx) => idx[i],
        }
    }
}

/// Writes the position of every `keys[i] >= floor` to the front of `idx` and, with `out`,
/// the key itself to the front of `out`; returns how many, `n`. Entries past the first `n`
/// may be overwritten: `idx`, `out` and the indices of `KeyPositions::Of` must be at least as long as
/// `keys`, and the positions of `KeyPositions::From` must fit a `u32` (panics otherwise).
pub fn pack(keys: &[u32], floor: u32, pos: KeyPositions<'_>, idx: &mut [u32], out: Option<&mut [u32]>) -> usize {
    assert!(idx.len() >= keys.len(), "pack: {} positions for {} keys", idx.len(), keys.len());
    match pos {
        KeyPositions::Of(from) => {
            assert!(from.len() >= keys.len(), "pack: {} indices for {} keys", from.len(), keys.len())
        }
        KeyPositions::From(offset) => assert!(offset as u64 + keys.len() as u64 <= 1 << 32, "pack: positions past u32"),
    }
    match out {
        Some(out) => {
            assert!(out.len() >= keys.len(), "pack: {} key slots for {} keys", out.len(), keys.len());
            #[cfg(target_arch = "x86_64")]
            if let KeyPositions::From(offset) = pos {
                if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("popcnt") {
                    // SAFETY: the CPU supports AVX-512 F and POPCNT, checked just above.
                    return unsafe { gather_avx512(keys, floor, offset, idx, out) };
                }
            }
            dispatch::<true>(keys, floor, pos, idx, out)
        }
        None => dispatch::<false>(keys, floor, pos, idx, &mut []),
    }
}

#[inline(always)]
fn dispatch<const KEYS: bool>(
    keys: &[u32],
    floor: u32,
    pos: KeyPositions<'_>,
    idx: &mut [u32],
    out: &mut [u32],
) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("popcnt") {
        // SAFETY: the CPU supports AVX2 and POPCNT, checked just above.
        return unsafe { pack_avx2::<KEYS>(keys, floor, pos, idx, out) };
    }
    pack_portable::<KEYS>(keys, floor, pos, idx, out)
}

/// Calls `visit(i)` for every `i` where `test(keys[i])`, in order. Keys are tested 32 at a
/// time into a bit mask (which vectorizes), and only the set bits are visited: cheap when
/// few keys pass, as in a 90%-sparse cut.
#[inline(always)]
pub fn for_each_in(keys: &[u32], test: impl Fn(u32) -> bool, mut visit: impl FnMut(usize)) {
    const G: usize = 32;
    let mut groups = keys.chunks_exact(G);
    for (g, group) in (&mut groups).enumerate() {
        let group: &[u32; G] = group.try_into().expect("G keys");
        let mut mask = 0u32;
        for (j, &k) in group.iter().enumerate() {
            mask |= (test(k) as u32) << j;
        }
        while mask != 0 {
            visit(g * G + mask.trailing_zeros() as usize);
            mask &= mask - 1;
        }
    }
    let rest = keys.len() - groups.remainder().len();
    for (j, &k) in groups.remainder().iter().enumerate() {
        if test(k) {
            visit(rest + j);
        }
    }
}

/// The portable [`pack`]: visits the set bits of each group's mask.
fn pack_portable<const KEYS: bool>(
    keys: &[u32],
    floor: u32,
    pos: KeyPositions<'_>,
    idx: &mut [u32],
    out: &mut [u32],
) -> usize {
    let mut n = 0;
    for_each_in(
        keys,
        |k| k >= floor,
        |i| {
            idx[n] = pos.at(i);
            if KEYS {
                out[n] = keys[i];
            }
            n += 1;
        },
    );
    n
}

/// For each 8-bit mask, the lanes of its set bits in order, one byte each: the permutation
/// that packs those lanes to the front of a vector of 8.
#[cfg(target_arch = "x86_64")]
static LANES: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut mask = 0;
    while mask < 256 {
        let (mut lane, mut packed) = (0, 0);
        while lane < 8 {
            if mask >> lane & 1 == 1 {
                table[mask] |= (lane as u64) << (8 * packed);
                packed += 1;
            }
            lane += 1;
        }
        mask += 1;
    }
    table
};

/// [`pack_portable`] with AVX2, 8 keys at a time: the lanes at or above the floor (unsigned:
/// `max(k, floor) == k`) are moved to the front by a permutation looked up by their mask,
/// and the vector is stored whole at `n`. Every store stays within the slices when they are
/// at least `keys.len()` long, as `n` never exceeds the keys seen before the group (the
/// slices are indexed, so a bug would panic, not write out of bounds). POPCNT counts the
/// mask (without it, `count_ones` is a longer multiply-and-shift sequence).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
fn pack_avx2<const KEYS: bool>(
    keys: &[u32],
    floor: u32,
    pos: KeyPositions<'_>,
    idx: &mut [u32],
    out: &mut [u32],
) -> usize {
    use std::arch::x86_64::*;
    let t = _mm256_set1_epi32(floor as i32);
    let eight = _mm256_set1_epi32(8);
    let mut at = match pos {
        KeyPositions::From(offset) => {
            _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(offset as i32))
        }
        KeyPositions::Of(_) => _mm256_setzero_si256(),
    };
    let mut n = 0;
    let mut groups = keys.chunks_exact(8);
    for (g, group) in (&mut groups).enumerate() {
        // SAFETY: `group` is 8 u32 = 32 readable bytes; loadu has no alignment needs.
        let k = unsafe { _mm256_loadu_si256(group.as_ptr().cast()) };
        let passing = _mm256_cmpeq_epi32(_mm256_max_epu32(k, t), k);
        let mask = _mm256_movemask_ps(_mm256_castsi256_ps(passing)) as usize;
        let lanes = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(LANES[mask & 0xff] as i64));
        let p = match pos {
            KeyPositions::From(_) => at,
            // SAFETY: `from[g * 8..]` holds 8 u32 (bounds-checked), 32 readable bytes.
            KeyPositions::Of(from) => unsafe { _mm256_loadu_si256(from[g * 8..g * 8 + 8].as_ptr().cast()) },
        };
        // SAFETY: each destination is 8 u32 = 32 writable bytes (bounds-checked).
        unsafe {
            _mm256_storeu_si256(idx[n..n + 8].as_mut_ptr().cast(), _mm256_permutevar8x32_epi32(p, lanes));
            if KEYS {
                _mm256_storeu_si256(out[n..n + 8].as_mut_ptr().cast(), _mm256_permutevar8x32_epi32(k, lanes));
            }
        }
        n += mask.count_ones() as usize;
        at = _mm256_add_epi32(at, eight);
    }
    let done = keys.len() - groups.remainder().len();
    let out = if KEYS { &mut out[n..] } else { out };
    n + pack_portable::<KEYS>(groups.remainder(), floor, pos.skip(done), &mut idx[n..], out)
}

/// [`pack_portable`] of keys and their positions `offset + i`, with AVX-512 compression, 16
/// keys at a time: each group's passing keys and indices are packed to the front of a vector
/// that is stored whole at `n` (in bounds as in [`pack_avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,popcnt")]
fn gather_avx512(keys: &[u32], floor: u32, offset: u32, idx: &mut [u32], out: &mut [u32]) -> usize {
    use std::arch::x86_64::*;
    let mut n = 0;
    let t = _mm512_set1_epi32(floor as i32);
    let mut at = _mm512_add_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(offset as i32),
    );
    let sixteen = _mm512_set1_epi32(16);
    let mut groups = keys.chunks_exact(16);
    for group in &mut groups {
        // SAFETY: `group` is 16 u32 = 64 readable bytes; loadu has no alignment needs.
        let k = unsafe { _mm512_loadu_si512(group.as_ptr().cast()) };
        let m = _mm512_cmpge_epu32_mask(k, t);
        let (i_dst, k_dst) = (&mut idx[n..n + 16], &mut out[n..n + 16]);
        // SAFETY: both destinations are 16 u32 = 64 writable bytes (bounds-checked above).
        unsafe {
            _mm512_storeu_si512(i_dst.as_mut_ptr().cast(), _mm512_maskz_compress_epi32(m, at));
            _mm512_storeu_si512(k_dst.as_mut_ptr().cast(), _mm512_maskz_compress_epi32(m, k));
        }
        n += m.count_ones() as usize;
        at = _mm512_add_epi32(at, sixteen);
    }
    let done = keys.len() - groups.remainder().len();
    n + pack_portable::<true>(
        groups.remainder(),
        floor,
        KeyPositions::From(offset + done as u32),
        &mut idx[n..],
        &mut out[n..],
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::threshold::score::NOT_CANDIDATE;

    /// `n` pseudo-random keys (xorshift from `seed`), a third of them non-candidates.
    pub(crate) fn random_keys(n: usize, seed: u64) -> Vec<u32> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x.is_multiple_of(3) {
                    NOT_CANDIDATE
                } else {
                    (x >> 32) as u32
                }
            })
            .collect()
    }

    /// The obvious loop every copy must match.
    fn reference(keys: &[u32], floor: u32, pos: impl Fn(usize) -> u32) -> (Vec<u32>, Vec<u32>) {
        (0..keys.len()).filter(|&i| keys[i] >= floor).map(|i| (pos(i), keys[i])).unzip()
    }

    /// Runs one copy of `pack` in uneven pieces, as `Gather::add` calls it, and compares.
    fn check(name: &str, copy: impl Fn(&[u32], u32, KeyPositions<'_>, &mut [u32], Option<&mut [u32]>) -> usize) {
        let keys = random_keys(10_007, 0x9e37_79b9_7f4a_7c15);
        let from: Vec<u32> = (0..keys.len() as u32).map(|i| 3 * i + 1).collect();
        for floor in [1, 0x4000_0000, 0x8000_0000, 0xffff_0000, u32::MAX] {
            for of in [false, true] {
                let want =
                    if of { reference(&keys, floor, |i| from[i]) } else { reference(&keys, floor, |i| 5 + i as u32) };
                let (mut idx, mut out) = (vec![0; keys.len()], vec![0; keys.len()]);
                let (mut n, mut at) = (0, 0);
                for piece in [1, 7, 8, 9, 15, 16, 17, 4096, 10_007] {
                    let end = (at + piece).min(keys.len());
                    let pos = if of { KeyPositions::Of(&from[at..]) } else { KeyPositions::From(5 + at as u32) };
                    n += copy(&keys[at..end], floor, pos, &mut idx[n..], Some(&mut out[n..]));
                    at = end;
                }
                assert_eq!((&idx[..n], &out[..n]), (&want.0[..], &want.1[..]), "{name}, floor {floor:#x}, of {of}");
                let mut only = vec![0; keys.len()];
                let pos = if of { KeyPositions::Of(&from) } else { KeyPositions::From(5) };
                let m = copy(&keys, floor, pos, &mut only, None);
                assert_eq!(&only[..m], &want.0[..], "{name}, positions only, floor {floor:#x}, of {of}");
            }
        }
    }

    #[test]
    fn every_copy_agrees_with_the_obvious_loop() {
        check("portable", |k, f, p, i, o| match o {
            Some(o) => pack_portable::<true>(k, f, p, i, o),
            None => pack_portable::<false>(k, f, p, i, &mut []),
        });
        check("dispatched", pack);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("popcnt") {
            // SAFETY: the CPU supports AVX2 and POPCNT, checked just above.
            check("avx2", |k, f, p, i, o| unsafe {
                match o {
                    Some(o) => pack_avx2::<true>(k, f, p, i, o),
                    None => pack_avx2::<false>(k, f, p, i, &mut []),
                }
            });
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("popcnt") {
            // SAFETY: the CPU supports AVX-512 F and POPCNT, checked just above.
            check("avx512", |k, f, p, i, o| match (p, o) {
                (KeyPositions::From(offset), Some(o)) => unsafe { gather_avx512(k, f, offset, i, o) },
                (p, o) => pack(k, f, p, i, o),
            });
        }
    }

    /// Every 8-lane mask (all 256 permutations), keys equal to the floor, and outputs of
    /// exactly the keys' length, so that a store past them would panic.
    #[test]
    fn every_mask_packs_and_ties_with_the_floor_pass() {
        let floor = 1000;
        for mask in 0..256u32 {
            // Lanes in the mask get the floor itself or more, the others just below it.
            let keys: Vec<u32> = (0..19)
                .map(|i| if mask >> (i % 8) & 1 == 1 { floor + (i as u32 % 3) } else { floor - 1 - (i as u32 % 2) })
                .collect();
            let from: Vec<u32> = (0..keys.len() as u32).map(|i| 7 * i + 3).collect();
            for of in [false, true] {
                let want =
                    if of { reference(&keys, floor, |i| from[i]) } else { reference(&keys, floor, |i| 9 + i as u32) };
                let pos = if of { KeyPositions::Of(&from) } else { KeyPositions::From(9) };
                let (mut idx, mut out) = (vec![0; keys.len()], vec![0; keys.len()]);
                let n = pack(&keys, floor, pos, &mut idx, Some(&mut out));
                assert_eq!((&idx[..n], &out[..n]), (&want.0[..], &want.1[..]), "mask {mask:#04x}, of {of}");
                let m = pack(&keys, floor, pos, &mut idx, None);
                assert_eq!(&idx[..m], &want.0[..], "positions only, mask {mask:#04x}, of {of}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "positions for")]
    fn short_positions_are_refused() {
        pack(&[1, 2, 3], 1, KeyPositions::From(0), &mut [0; 2], None);
    }

    #[test]
    #[should_panic(expected = "key slots for")]
    fn short_key_slots_are_refused() {
        pack(&[1, 2, 3], 1, KeyPositions::From(0), &mut [0; 3], Some(&mut [0; 2]));
    }

    #[test]
    #[should_panic(expected = "indices for")]
    fn short_indices_are_refused() {
        pack(&[1, 2, 3], 1, KeyPositions::Of(&[0, 1]), &mut [0; 3], None);
    }

    #[test]
    #[should_panic(expected = "past u32")]
    fn positions_past_u32_are_refused() {
        pack(&[1, 2, 3], 1, KeyPositions::From(u32::MAX - 1), &mut [0; 3], None);
    }
}

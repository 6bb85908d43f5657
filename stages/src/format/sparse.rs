//! Lossless sparse blocks: which positions of a chunk were kept and the values that rebuild
//! the fine-tuned bits there.
//!
//! Positions are LEB128 gaps. A value is the difference of the fine-tuned and base bit
//! patterns read as ordered integers (so nearby floats give small numbers), zigzagged, and
//! split into byte planes, most significant first: the high planes of a task vector are
//! nearly constant and compress very well. See docs/FORMAT.md.

/// The ordered-integer form of a `size`-byte float's bits: unsigned order equals float order.
#[inline(always)]
fn ord(bits: u64, size: usize) -> u64 {
    let sign = 1u64 << (8 * size - 1);
    let mask = sign | (sign - 1);
    if bits & sign != 0 {
        !bits & mask
    } else {
        bits | sign
    }
}

#[inline(always)]
fn unord(o: u64, size: usize) -> u64 {
    let sign = 1u64 << (8 * size - 1);
    let mask = sign | (sign - 1);
    if o & sign != 0 {
        o & !sign
    } else {
        !o & mask
    }
}

/// The zigzagged difference `ord(ft) - ord(base)`, modulo 2^(8 size).
#[inline(always)]
pub fn delta_value(ft: u64, base: u64, size: usize) -> u64 {
    let w = 8 * size as u32;
    let d = ord(ft, size).wrapping_sub(ord(base, size));
    let s = ((d << (64 - w)) as i64) >> (64 - w);
    let z = ((s << 1) ^ (s >> 63)) as u64;
    z & (u64::MAX >> (64 - w))
}

/// Inverse of [`delta_value`]: the fine-tuned bits from the base bits and the value.
#[inline(always)]
pub fn apply_value(base: u64, z: u64, size: usize) -> u64 {
    step(base, z, size, false)
}

/// `unord(ord(bits) ± unzigzag(z))`, modulo 2^(8 size).
#[inline(always)]
fn step(bits: u64, z: u64, size: usize, back: bool) -> u64 {
    let w = 8 * size as u32;
    let mask = u64::MAX >> (64 - w);
    let d = (z >> 1) ^ (z & 1).wrapping_neg();
    let o = ord(bits, size);
    unord(if back { o.wrapping_sub(d) } else { o.wrapping_add(d) } & mask, size)
}

/// The bits of one element (at most 8 little-endian bytes) as an integer.
#[inline(always)]
fn le_bits(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    x[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(x)
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Encodes the kept positions of a chunk into `raw` (cleared first) and writes the
/// fine-tuned bits into `out` at those positions.
///
/// `out` holds the chunk's base values converted to the fine-tuned dtype; `ft` the
/// fine-tuned chunk; `kept` ascending chunk-relative indices; `size` bytes per element.
pub fn encode_sparse(kept: &[u32], ft: &[u8], out: &mut [u8], size: usize, raw: &mut Vec<u8>) {
    let len = encode_sparse_in_pieces(kept, ft, size, raw, out, |_, _| None, |_| {});
    raw.truncate(len);
}

/// The bytes of the rebuilt chunk made at a time by [`encode_sparse_in_pieces`]' callers: 64
/// KiB, in a core's L2 cache with the base bytes it comes from.
pub const PIECE_BYTES: usize = 64 << 10;

/// [`encode_sparse`] without a buffer the size of the chunk: the reconstructed chunk is built
/// a `piece` at a time. For each piece, in order, `fill(start, piece)` writes the converted
/// base values of the elements from `start` on and returns `None`, or writes nothing and
/// returns those values (`Some`, as many bytes as the piece: when the dtypes are the same,
/// so that the encoder copies them as it goes rather than in a pass of its own); the kept
/// fine-tuned values are written over them and the finished piece goes to `done`. A piece
/// that fits the cache is hashed there, instead of a whole reconstructed chunk being written
/// out and read back.
///
/// The block is written to the front of `raw`, which only ever grows (so it is not zeroed
/// for every block): returns the block's length.
pub fn encode_sparse_in_pieces<'b>(
    kept: &[u32],
    ft: &[u8],
    size: usize,
    raw: &mut Vec<u8>,
    piece: &mut [u8],
    mut fill: impl FnMut(usize, &mut [u8]) -> Option<&'b [u8]>,
    mut done: impl FnMut(&[u8]),
) -> usize {
    // The count, then the gaps (at most 10 and 5 bytes), then the planes.
    let most = 10 + kept.len() * (5 + size);
    if raw.len() < most {
        raw.resize(most, 0);
    }
    let gaps_at = write_varint(raw, kept.len() as u64);
    let at = write_gaps(kept, raw, gaps_at);
    let len = at + kept.len() * size;
    let planes = &mut raw[at..len];
    let (n, per_piece) = (ft.len() / size, (piece.len() / size).max(1));
    let mut first = 0;
    for start in (0..n).step_by(per_piece) {
        let len = per_piece.min(n - start);
        let out = &mut piece[..len * size];
        let base = fill(start, out);
        let end = first + kept[first..].partition_point(|&i| (i as usize) < start + len);
        let values = Values { kept: &kept[first..end], first, total: kept.len(), start };
        match size {
            1 => values.encode::<1>(ft, base, out, planes),
            2 => values.encode::<2>(ft, base, out, planes),
            4 => values.encode::<4>(ft, base, out, planes),
            8 => values.encode::<8>(ft, base, out, planes),
            _ => unreachable!("element size {size}"),
        }
        done(out);
        first = end;
    }
    len
}

/// Writes the gaps before the `kept` positions (ascending) as LEB128 from `raw[at]` on;
/// returns where they end. `raw` must have room for 5 bytes per position.
fn write_gaps(kept: &[u32], raw: &mut [u8], at: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx512() {
        // SAFETY: the CPU supports AVX-512 F, BW and VL, checked just above.
        return unsafe { write_gaps_avx512(kept, raw, at) };
    }
    write_gaps_one_at_a_time(kept, raw, at, 0)
}

/// [`write_gaps`] a position at a time, the first gap counted from `next`.
fn write_gaps_one_at_a_time(kept: &[u32], raw: &mut [u8], mut at: usize, mut next: u32) -> usize {
    for &i in kept {
        let gap = i - next;
        next = i + 1;
        if gap < 0x80 {
            raw[at] = gap as u8;
            at += 1;
        } else {
            at += write_varint(&mut raw[at..], gap as u64);
        }
    }
    at
}

/// [`write_gaps`] 16 positions at a time: the gaps of a group computed at once and, when all
/// are below 128 (one byte each, as nearly always at the sparsities pruning keeps), narrowed
/// to bytes and stored together; a group with a longer gap is written a position at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn write_gaps_avx512(kept: &[u32], raw: &mut [u8], mut at: usize) -> usize {
    use std::arch::x86_64::*;
    assert!(raw.len() >= at + 5 * kept.len(), "room for the gaps");
    let (one, short) = (_mm512_set1_epi32(1), _mm512_set1_epi32(0x80));
    let mut next = 0u32;
    let mut groups = kept.chunks_exact(16);
    for group in &mut groups {
        // SAFETY: `group` is 16 u32 = 64 readable bytes.
        let v = unsafe { _mm512_loadu_si512(group.as_ptr().cast()) };
        // Each position's `next`: the one before it plus one; the first's, the last group's.
        let nexts = _mm512_alignr_epi32::<15>(_mm512_add_epi32(v, one), _mm512_set1_epi32(next as i32));
        let gaps = _mm512_sub_epi32(v, nexts);
        if _mm512_cmplt_epu32_mask(gaps, short) == u16::MAX {
            // SAFETY: 16 bytes from `at`, inside `raw`: it has 5 per position from `at` on,
            // and `at` has grown by at most that for the positions written before.
            unsafe { _mm_storeu_si128(raw.as_mut_ptr().add(at).cast(), _mm512_cvtepi32_epi8(gaps)) };
            at += 16;
        } else {
            at = write_gaps_one_at_a_time(group, raw, at, next);
        }
        next = group[15] + 1;
    }
    write_gaps_one_at_a_time(groups.remainder(), raw, at, next)
}

/// [`Values::encode`] for 2-byte elements, one kept position at a time. The arguments are
/// those of [`encode_pairs_avx512`].
fn encode_pairs(kept: &[u32], start: usize, ft: &[[u8; 2]], out: &mut [[u8; 2]], hi: &mut [u8], lo: &mut [u8]) {
    for ((&i, h), l) in kept.iter().zip(hi).zip(lo) {
        let (f, o) = (ft[i as usize - start], &mut out[i as usize - start]);
        let z = delta_value(le_bits(&f), le_bits(o), 2);
        (*h, *l) = ((z >> 8) as u8, z as u8);
        *o = f;
    }
}

/// The most elements of a piece the vector copy of [`Values::encode`] takes at once.
const MAX_PIECE_ELEMS: usize = PIECE_BYTES / 2;

#[cfg(target_arch = "x86_64")]
fn has_avx512_vbmi2() -> bool {
    crate::simd::has_avx512()
        && std::arch::is_x86_feature_detected!("avx512vbmi2")
        && std::arch::is_x86_feature_detected!("popcnt")
}

/// [`Values::encode`] for 2-byte elements with AVX-512, 32 elements at a time: the kept
/// positions of a piece as a bit mask, then for each group of 32 with one kept, the values of
/// every element computed at once (as [`delta_value`] does, on 16-bit lanes), the kept ones'
/// packed to the front (`vpcompressw`) and stored to the planes, and the group stored into
/// the piece: its base elements with the kept fine-tuned ones merged in under the mask. The
/// fine-tuned bytes are read in order, a cache line at a time, rather than one kept element
/// at a time.
///
/// `kept`: the piece's kept positions, chunk-relative, ascending, from `start` on and below
/// `start + out.len()`; `ft`: the piece's fine-tuned elements; `base`: the piece's base
/// elements, which every group is copied from into `out` (merged with the kept fine-tuned
/// ones), or `None` when `out` already holds them; `hi`, `lo`: the planes' slots of the kept
/// positions (`kept.len()` each).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")]
fn encode_pairs_avx512(
    kept: &[u32],
    start: usize,
    ft: &[[u8; 2]],
    base: Option<&[[u8; 2]]>,
    out: &mut [[u8; 2]],
    hi: &mut [u8],
    lo: &mut [u8],
) {
    use std::arch::x86_64::*;
    let len = out.len();
    assert!(len <= MAX_PIECE_ELEMS && ft.len() == len, "piece of {len} elements, {} fine-tuned", ft.len());
    assert!(base.is_none_or(|b| b.len() == len), "piece of {len} elements, another number of base ones");
    assert!(hi.len() == kept.len() && lo.len() == kept.len(), "planes for {} positions", kept.len());
    let mut mask = [0u32; MAX_PIECE_ELEMS / 32];
    for &i in kept {
        let b = i as usize - start;
        assert!(b < len, "kept position {i} outside the piece at {start}");
        mask[b / 32] |= 1 << (b % 32);
    }
    let sign = _mm512_set1_epi16(i16::MIN);
    // The ordered-integer form: bits ^ (sign-filled bits | 0x8000), as `ord` on 16 bits.
    let ord = |x: __m512i| _mm512_xor_si512(x, _mm512_or_si512(_mm512_srai_epi16::<15>(x), sign));
    let mut j = 0;
    for (g, &m) in mask[..len.div_ceil(32)].iter().enumerate() {
        let at = g * 32;
        // The group's valid lanes (the last group may be short).
        let valid: __mmask32 = if len - at >= 32 { u32::MAX } else { (1u32 << (len - at)) - 1 };
        // SAFETY: the masked loads and store touch only the group's valid lanes, inside
        // `base` (as long as `out`, checked above) and `out`.
        let b = unsafe {
            match base {
                Some(base) => _mm512_maskz_loadu_epi16(valid, base.as_ptr().add(at).cast()),
                None if m == 0 => continue,
                None => _mm512_maskz_loadu_epi16(valid, out.as_ptr().add(at).cast()),
            }
        };
        if m == 0 {
            // SAFETY: as above.
            unsafe { _mm512_mask_storeu_epi16(out.as_mut_ptr().add(at).cast(), valid, b) };
            continue;
        }
        let c = m.count_ones() as usize;
        let bytes: __mmask32 = if c == 32 { u32::MAX } else { (1u32 << c) - 1 };
        assert!(j + c <= kept.len(), "more kept lanes than kept positions");
        // SAFETY: the masked load reads only the group's valid lanes, inside `ft` (masked-off
        // lanes are not accessed); the stores write only valid lanes, inside `out`, and `c`
        // bytes of the planes from `j`, where `j + c <= kept.len()` (checked just above).
        unsafe {
            let f = _mm512_maskz_loadu_epi16(valid, ft.as_ptr().add(at).cast());
            let d = _mm512_sub_epi16(ord(f), ord(b));
            let z = _mm512_xor_si512(_mm512_slli_epi16::<1>(d), _mm512_srai_epi16::<15>(d));
            let packed = _mm512_maskz_compress_epi16(m, z);
            _mm256_mask_storeu_epi8(lo.as_mut_ptr().add(j).cast(), bytes, _mm512_cvtepi16_epi8(packed));
            _mm256_mask_storeu_epi8(
                hi.as_mut_ptr().add(j).cast(),
                bytes,
                _mm512_cvtepi16_epi8(_mm512_srli_epi16::<8>(packed)),
            );
            _mm512_mask_storeu_epi16(out.as_mut_ptr().add(at).cast(), valid, _mm512_mask_blend_epi16(m, b, f));
            j += c;
        }
    }
    assert_eq!(j, kept.len(), "kept positions repeated or out of order");
}

/// Writes `v` as LEB128 to the front of `out`; returns its length.
fn write_varint(out: &mut [u8], mut v: u64) -> usize {
    let mut n = 0;
    while v >= 0x80 {
        out[n] = v as u8 | 0x80;
        v >>= 7;
        n += 1;
    }
    out[n] = v as u8;
    n + 1
}

/// The kept positions of one piece of a chunk.
struct Values<'a> {
    /// Their chunk-relative indices.
    kept: &'a [u32],
    /// How many kept positions of the chunk come before them.
    first: usize,
    /// How many the chunk has in all (the length of each byte plane).
    total: usize,
    /// The chunk-relative index of the piece's first element.
    start: usize,
}

impl Values<'_> {
    /// Writes the values of the piece's kept positions into the byte planes, and the
    /// fine-tuned bits into `out` (the piece) at those positions; first the base values into
    /// `out`, when they are given (`base`) rather than already there.
    fn encode<const W: usize>(&self, ft: &[u8], base: Option<&[u8]>, out: &mut [u8], planes: &mut [u8]) {
        let (first, n, start) = (self.first, self.total, self.start);
        if W == 2 {
            // The common case (bf16, f16) without the generic plane loop.
            let (hi, lo) = planes.split_at_mut(n);
            let (hi, lo) = (&mut hi[first..first + self.kept.len()], &mut lo[first..first + self.kept.len()]);
            let ft = ft[2 * start..2 * start + out.len()].as_chunks::<2>().0;
            let out = out.as_chunks_mut::<2>().0;
            #[cfg(target_arch = "x86_64")]
            if out.len() <= MAX_PIECE_ELEMS && has_avx512_vbmi2() {
                let base = base.map(|b| b.as_chunks::<2>().0);
                // SAFETY: the CPU supports AVX-512 F, BW, VL and VBMI2, checked just above.
                unsafe { encode_pairs_avx512(self.kept, start, ft, base, out, hi, lo) };
                return;
            }
            if let Some(base) = base {
                out.as_flattened_mut().copy_from_slice(base);
            }
            encode_pairs(self.kept, start, ft, out, hi, lo);
            return;
        }
        if let Some(base) = base {
            out.copy_from_slice(base);
        }
        let (ft, _) = ft.as_chunks::<W>();
        let (out, _) = out.as_chunks_mut::<W>();
        for (j, &i) in self.kept.iter().enumerate() {
            let (f, o) = (ft[i as usize], &mut out[i as usize - start]);
            let z = delta_value(le_bits(&f), le_bits(o), W);
            for p in 0..W {
                planes[p * n + first + j] = (z >> (8 * (W - 1 - p))) as u8;
            }
            *o = f;
        }
    }
}

/// The largest raw payload a chunk of `elems` elements of `size` bytes can have.
pub fn max_sparse_len(elems: u64, size: usize) -> u64 {
    10 + elems * (10 + size as u64)
}

/// Decodes a sparse payload onto `out` (the converted base chunk of `out.len() / size`
/// elements), returning the number of positions it sets. Errors describe the corruption.
pub fn decode_sparse(raw: &[u8], out: &mut [u8], size: usize) -> Result<u64, String> {
    scatter::<false>(raw, out, size)
}

/// Undoes [`decode_sparse`]: `out` holds the decoded chunk and gets back the converted base
/// chunk it was decoded onto (every value is invertible). Returns the positions it resets.
pub fn revert_sparse(raw: &[u8], out: &mut [u8], size: usize) -> Result<u64, String> {
    scatter::<true>(raw, out, size)
}

/// Inverse of [`apply_value`] in its first argument: the base bits from the fine-tuned bits
/// and the value.
#[inline(always)]
pub fn revert_value(ft: u64, z: u64, size: usize) -> u64 {
    step(ft, z, size, true)
}

/// A sparse payload whose positions have all been checked: the kept positions of a block and
/// their values, as [`Sparse::parse`] found them.
pub struct Sparse<'a> {
    gaps: &'a [u8],
    planes: &'a [u8],
    count: usize,
    size: usize,
}

impl<'a> Sparse<'a> {
    /// Checks a payload for a block of `elems` elements of `size` bytes: the count, every
    /// position inside the block, the planes of exactly `count * size` bytes.
    pub fn parse(raw: &'a [u8], elems: u64, size: usize) -> Result<Self, String> {
        let mut pos = 0;
        let count = read_varint(raw, &mut pos).ok_or("truncated count")?;
        if count > elems {
            return Err(format!("{count} kept positions in a block of {elems} elements"));
        }
        let count = count as usize;
        // Positions first: all of them are checked before anything is written. The values
        // pass reads them again, which costs less than storing them (a buffer per block was
        // most of the time of decoding).
        let gaps = pos;
        let mut next = 0u64;
        for _ in 0..count {
            let gap = read_varint(raw, &mut pos).ok_or("truncated positions")?;
            let i = next.checked_add(gap).filter(|&i| i < elems).ok_or("position outside the block")?;
            next = i + 1;
        }
        let planes = raw.get(pos..).filter(|p| p.len() == count * size).ok_or("value planes have the wrong length")?;
        Ok(Sparse { gaps: &raw[gaps..pos], planes, count, size })
    }

    /// The number of kept positions.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no position is kept.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The kept positions, block-relative and ascending.
    pub fn positions(&self) -> impl Iterator<Item = usize> + 'a {
        Positions { gaps: self.gaps, pos: 0, next: 0 }
    }

    /// Every kept position with its value (see [`apply_value`]).
    pub fn entries(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.positions().enumerate().map(|(j, i)| {
            let z = (0..self.size).fold(0u64, |z, p| (z << 8) | self.planes[p * self.count + j] as u64);
            (i, z)
        })
    }
}

/// Writes the fine-tuned bits (or, `REVERT`, the base bits) at every kept position of `out`.
fn scatter<const REVERT: bool>(raw: &[u8], out: &mut [u8], size: usize) -> Result<u64, String> {
    let sparse = Sparse::parse(raw, (out.len() / size) as u64, size)?;
    let op = if REVERT { revert_value } else { apply_value };
    if size == 2 {
        // The common case (bf16, f16) without the generic plane loop.
        let (hi, lo) = sparse.planes.split_at(sparse.count);
        let (out, _) = out.as_chunks_mut::<2>();
        for ((i, &h), &l) in sparse.positions().zip(hi).zip(lo) {
            let o = &mut out[i];
            let f = op(u16::from_le_bytes(*o) as u64, u16::from_be_bytes([h, l]) as u64, 2);
            *o = (f as u16).to_le_bytes();
        }
    } else {
        for (i, z) in sparse.entries() {
            let f = op(le_bits(&out[i * size..(i + 1) * size]), z, size);
            out[i * size..(i + 1) * size].copy_from_slice(&f.to_le_bytes()[..size]);
        }
    }
    Ok(sparse.count as u64)
}

/// The positions of a block's gaps, which [`Sparse::parse`] has checked: every varint is
/// whole and every position inside the block.
struct Positions<'a> {
    gaps: &'a [u8],
    pos: usize,
    next: usize,
}

impl Iterator for Positions<'_> {
    type Item = usize;

    #[inline(always)]
    fn next(&mut self) -> Option<usize> {
        let gap = match *self.gaps.get(self.pos)? {
            b if b < 0x80 => {
                self.pos += 1;
                b as u64
            }
            _ => read_varint(self.gaps, &mut self.pos)?,
        };
        let i = self.next + gap as usize;
        self.next = i + 1;
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn values_round_trip(ft in any::<u64>(), base in any::<u64>(), size in prop::sample::select(vec![1usize, 2, 4, 8])) {
            let mask = u64::MAX >> (64 - 8 * size);
            let (ft, base) = (ft & mask, base & mask);
            let z = delta_value(ft, base, size);
            prop_assert!(z <= mask);
            prop_assert_eq!(apply_value(base, z, size), ft);
            prop_assert_eq!(revert_value(ft, z, size), base);
        }

        /// Every element size (2 has its own decoder), gaps of one and of several varint
        /// bytes (runs of 200 unkept elements), any bits.
        #[test]
        fn blocks_round_trip(
            pairs in prop::collection::vec((any::<u64>(), any::<u64>(), any::<bool>(), any::<bool>()), 0..300),
            size in prop::sample::select(vec![1usize, 2, 4, 8]),
        ) {
            // Each element may be followed by a run of 200 unkept, unchanged elements.
            let mut elems = Vec::new();
            for p in &pairs {
                elems.push((p.0, p.1, p.2));
                if p.3 {
                    elems.extend(std::iter::repeat_n((p.0, p.0, false), 200));
                }
            }
            let bytes = |f: &dyn Fn(&(u64, u64, bool)) -> u64| -> Vec<u8> {
                elems.iter().flat_map(|e| f(e).to_le_bytes()[..size].to_vec()).collect()
            };
            let (base, ft) = (bytes(&|e| e.0), bytes(&|e| e.1));
            let kept: Vec<u32> = (0..elems.len() as u32).filter(|&i| elems[i as usize].2).collect();
            let mut out = base.clone();
            let mut raw = Vec::new();
            encode_sparse(&kept, &ft, &mut out, size, &mut raw);
            prop_assert!(raw.len() as u64 <= max_sparse_len(elems.len() as u64, size));
            let mut again = base.clone();
            prop_assert_eq!(decode_sparse(&raw, &mut again, size), Ok(kept.len() as u64));
            prop_assert_eq!(&again, &out);
            prop_assert_eq!(revert_sparse(&raw, &mut again, size), Ok(kept.len() as u64));
            prop_assert_eq!(&again, &base);
            let sparse = Sparse::parse(&raw, elems.len() as u64, size).unwrap();
            let entries: Vec<(usize, u64)> = sparse.entries().collect();
            prop_assert_eq!(entries.iter().map(|e| e.0 as u32).collect::<Vec<_>>(), kept.clone());
            for &(i, z) in &entries {
                prop_assert_eq!(apply_value(elems[i].0 & (u64::MAX >> (64 - 8 * size)), z, size), elems[i].1 & (u64::MAX >> (64 - 8 * size)));
            }
            for (i, e) in elems.iter().enumerate() {
                let want = if e.2 { e.1 } else { e.0 };
                prop_assert_eq!(&out[i * size..(i + 1) * size], &want.to_le_bytes()[..size]);
            }
        }
    }

    proptest! {
        /// Building the reconstructed chunk a piece at a time gives the same block, and the
        /// same reconstruction, as building it whole; for every element size and piece size,
        /// whether `fill` writes the base values or hands them to the encoder.
        #[test]
        fn pieces_encode_like_the_whole_chunk(
            elems in prop::collection::vec((any::<u64>(), any::<u64>(), any::<bool>()), 0..300),
            size in prop::sample::select(vec![1usize, 2, 4, 8]),
            per_piece in 1usize..70,
            handed in any::<bool>(),
        ) {
            let bytes = |f: &dyn Fn(&(u64, u64, bool)) -> u64| -> Vec<u8> {
                elems.iter().flat_map(|e| f(e).to_le_bytes()[..size].to_vec()).collect()
            };
            let (base, ft) = (bytes(&|e| e.0), bytes(&|e| e.1));
            let kept: Vec<u32> = (0..elems.len() as u32).filter(|&i| elems[i as usize].2).collect();
            let (mut whole, mut raw) = (base.clone(), Vec::new());
            encode_sparse(&kept, &ft, &mut whole, size, &mut raw);
            // A scratch buffer left over from a larger block: only the front is written.
            let (mut piece, mut raw2, mut built) = (vec![0u8; per_piece * size], vec![0xa5; 4000], Vec::new());
            let len = encode_sparse_in_pieces(
                &kept,
                &ft,
                size,
                &mut raw2,
                &mut piece,
                |start, out| {
                    let b = &base[start * size..start * size + out.len()];
                    if handed {
                        return Some(b);
                    }
                    out.copy_from_slice(b);
                    None
                },
                |out| built.extend_from_slice(out),
            );
            prop_assert_eq!(&raw2[..len], &raw[..]);
            prop_assert_eq!(&built, &whole);
        }
    }

    proptest! {
        /// The 2-byte values of a piece: one at a time as [`delta_value`] says, and the same
        /// bytes from the AVX-512 copy where the CPU has it; pieces of any length (short last
        /// groups), any kept density (none, all), any bits, a piece anywhere in its chunk.
        #[test]
        fn pair_values_agree_with_delta_value(
            elems in prop::collection::vec((any::<u16>(), any::<u16>(), 0u8..4), 0..700),
            density in 0u8..5,
            start in 0usize..100_000,
        ) {
            let kept: Vec<u32> =
                (0..elems.len()).filter(|&i| elems[i].2 < density).map(|i| (start + i) as u32).collect();
            let ft: Vec<[u8; 2]> = elems.iter().map(|e| e.1.to_le_bytes()).collect();
            let base: Vec<[u8; 2]> = elems.iter().map(|e| e.0.to_le_bytes()).collect();
            let (mut out, mut hi, mut lo) = (base.clone(), vec![0u8; kept.len()], vec![0u8; kept.len()]);
            encode_pairs(&kept, start, &ft, &mut out, &mut hi, &mut lo);
            for (j, &i) in kept.iter().enumerate() {
                let e = elems[i as usize - start];
                let z = delta_value(e.1 as u64, e.0 as u64, 2);
                prop_assert_eq!((hi[j], lo[j]), ((z >> 8) as u8, z as u8));
            }
            for (i, e) in elems.iter().enumerate() {
                let want = if kept.contains(&((start + i) as u32)) { e.1 } else { e.0 };
                prop_assert_eq!(out[i], want.to_le_bytes());
            }
            #[cfg(target_arch = "x86_64")]
            if has_avx512_vbmi2() {
                // With the base values in the piece already, and handed over beside it (the
                // piece holding something else, which every element must replace).
                for handed in [None, Some(&base[..])] {
                    let mut out2 = if handed.is_some() { vec![[0x5a, 0xa5]; base.len()] } else { base.clone() };
                    let (mut hi2, mut lo2) = (vec![0u8; kept.len()], vec![0u8; kept.len()]);
                    // SAFETY: the CPU supports AVX-512 F, BW, VL and VBMI2, checked just above.
                    unsafe { encode_pairs_avx512(&kept, start, &ft, handed, &mut out2, &mut hi2, &mut lo2) };
                    prop_assert_eq!((&out2, &hi2, &lo2), (&out, &hi, &lo));
                }
            }
        }
    }

    proptest! {
        /// The gaps of a block: the same bytes 16 at a time (where the CPU has AVX-512) as a
        /// position at a time, for short and long gaps, a long gap anywhere in a group, and
        /// any number of positions (partial last groups).
        #[test]
        fn gaps_agree_with_one_at_a_time(
            gaps in prop_oneof![
                // Dense: every gap short, the groups' first positions small.
                prop::collection::vec(0u32..4, 0..200),
                prop::collection::vec(
                    prop_oneof![8 => 0u32..16, 4 => 0u32..0x80, 2 => 0x80u32..0x100, 1 => 0x100u32..1 << 24],
                    0..200,
                ),
            ],
        ) {
            let mut kept = Vec::with_capacity(gaps.len());
            let mut next = 0u32;
            for g in gaps {
                kept.push(next + g);
                next += g + 1;
            }
            let (mut want, mut got) = (vec![0xa5u8; 3 + 5 * kept.len()], vec![0x5au8; 3 + 5 * kept.len()]);
            let end = write_gaps_one_at_a_time(&kept, &mut want, 3, 0);
            prop_assert_eq!(write_gaps(&kept, &mut got, 3), end);
            prop_assert_eq!(&got[3..end], &want[3..end]);
        }
    }

    #[test]
    fn close_floats_give_small_values() {
        let a = half::bf16::from_f32(0.01).to_bits() as u64;
        let b = half::bf16::from_f32(0.0101).to_bits() as u64;
        assert!(delta_value(b, a, 2) < 8);
        let n = half::bf16::from_f32(-0.01).to_bits() as u64;
        let m = half::bf16::from_f32(-0.0101).to_bits() as u64;
        assert!(delta_value(m, n, 2) < 8);
    }

    #[test]
    fn corrupt_payloads_are_errors() {
        let mut out = vec![0u8; 8];
        assert!(decode_sparse(&[], &mut out, 2).is_err());
        assert!(decode_sparse(&[9], &mut out, 2).is_err()); // 9 kept of 4
        assert!(decode_sparse(&[1, 7, 0, 0], &mut out, 2).is_err()); // position 7 of 4
        assert!(decode_sparse(&[1, 0, 0], &mut out, 2).is_err()); // one plane byte missing
        assert_eq!(decode_sparse(&[1, 0, 0, 1], &mut out, 2), Ok(1));
    }
}

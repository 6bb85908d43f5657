//! Safetensors dtypes: names, sizes, which ones fapm may diff, and how the floating ones are
//! read, widened and converted to one another (SPEC section 4).

use std::fmt;

/// A safetensors element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// Boolean, one byte.
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float, 5 exponent bits.
    F8E5M2,
    /// 8-bit float, 4 exponent bits.
    F8E4M3,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl DType {
    const ALL: [DType; 15] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::F8E5M2,
        DType::F8E4M3,
        DType::I16,
        DType::U16,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U32,
        DType::F32,
        DType::F64,
        DType::I64,
        DType::U64,
    ];

    /// The name used in safetensors headers ("BF16", ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E4M3 => "F8_E4M3",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::U64 => "U64",
        }
    }

    /// Parses a safetensors dtype name; `None` when unknown.
    pub fn parse(name: &str) -> Option<DType> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 | DType::F8E5M2 | DType::F8E4M3 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    /// Whether fapm computes task vectors for this dtype (F16, BF16, F32, F64).
    pub fn is_diffable(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for DType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for DType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        DType::parse(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown dtype '{name}'")))
    }
}

/// A floating element type as stored in safetensors, seen through its bit pattern.
pub trait Elem: Copy {
    /// The dtype.
    const DTYPE: DType;
    /// Bytes per element.
    const SIZE: usize;
    /// The bit pattern as an unsigned integer of the element's width.
    type Bits: Copy + Eq + Into<u64>;
    /// Reads one element from exactly `SIZE` little-endian bytes.
    fn load(bytes: &[u8]) -> Self::Bits;
    /// Reads the bits of element `i` of `bytes`.
    #[inline(always)]
    fn bits(bytes: &[u8], i: usize) -> u64 {
        Self::load(&bytes[i * Self::SIZE..(i + 1) * Self::SIZE]).into()
    }
    /// The value as an f32 for scoring: exact widening (F64: rounding), NaN payloads
    /// unspecified (every NaN scores as -inf).
    fn score_f32(bits: Self::Bits) -> f32;
    /// Widens (F64: narrows) bits of this type to f32 for dtype conversion (SPEC section 4;
    /// NaN: quiet bit set, payload kept as far as it fits, as the `half` crate does).
    fn to_f32(bits: u64) -> f32;
    /// Rounds an f32 to this type, round-to-nearest-even (SPEC section 4).
    fn from_f32(x: f32) -> u64;
}

macro_rules! elem {
    ($name:ident, $dtype:expr, $size:expr, $raw:ty, $score:expr, $to:expr, $from:expr) => {
        /// Marker for one floating dtype.
        #[derive(Clone, Copy)]
        pub struct $name;
        impl Elem for $name {
            const DTYPE: DType = $dtype;
            const SIZE: usize = $size;
            type Bits = $raw;
            #[inline(always)]
            fn load(bytes: &[u8]) -> $raw {
                <$raw>::from_le_bytes(bytes.try_into().expect("one element"))
            }
            #[inline(always)]
            fn score_f32(bits: $raw) -> f32 {
                let f: fn($raw) -> f32 = $score;
                f(bits)
            }
            #[inline(always)]
            fn to_f32(bits: u64) -> f32 {
                let f: fn($raw) -> f32 = $to;
                f(bits as $raw)
            }
            #[inline(always)]
            fn from_f32(x: f32) -> u64 {
                let f: fn(f32) -> $raw = $from;
                f(x) as u64
            }
        }
    };
}

elem!(Bf16, DType::BF16, 2, u16, |b| f32::from_bits((b as u32) << 16), |b| half::bf16::from_bits(b).to_f32(), |x| {
    half::bf16::from_f32(x).to_bits()
});
elem!(F16, DType::F16, 2, u16, |b| f16_table()[b as usize], |b| half::f16::from_bits(b).to_f32(), |x| {
    half::f16::from_f32(x).to_bits()
});
elem!(F32, DType::F32, 4, u32, f32::from_bits, f32::from_bits, f32::to_bits);
elem!(F64, DType::F64, 8, u64, |b| f64::from_bits(b) as f32, |b| f64::from_bits(b) as f32, |x| (x as f64).to_bits());

/// Every f16 bit pattern widened to f32 (256 KiB, built once): much faster than converting.
fn f16_table() -> &'static [f32; 1 << 16] {
    static TABLE: std::sync::OnceLock<Box<[f32; 1 << 16]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new([0f32; 1 << 16]);
        for (i, v) in t.iter_mut().enumerate() {
            *v = half::f16::from_bits(i as u16).to_f32();
        }
        t
    })
}

/// The base element's bits converted to the fine-tuned dtype `F` (identity when equal).
#[inline(always)]
pub fn convert<F: Elem, B: Elem>(base_bits: u64) -> u64 {
    if F::DTYPE == B::DTYPE {
        base_bits
    } else {
        F::from_f32(B::to_f32(base_bits))
    }
}

/// Calls `$body` with `F` and `B` bound to the element types of the two dtypes.
#[macro_export]
macro_rules! with_elems {
    ($ft:expr, $base:expr, |$F:ident, $B:ident| $body:expr) => {{
        use $crate::dtype::DType as D;
        use $crate::dtype::{Bf16, F16, F32, F64};
        macro_rules! both {
            ($f:ty, $b:ty) => {{
                type $F = $f;
                type $B = $b;
                $body
            }};
        }
        macro_rules! inner {
            ($f:ty) => {
                match $base {
                    D::BF16 => both!($f, Bf16),
                    D::F16 => both!($f, F16),
                    D::F32 => both!($f, F32),
                    D::F64 => both!($f, F64),
                    other => unreachable!("not diffable: {other}"),
                }
            };
        }
        match $ft {
            D::BF16 => inner!(Bf16),
            D::F16 => inner!(F16),
            D::F32 => inner!(F32),
            D::F64 => inner!(F64),
            other => unreachable!("not diffable: {other}"),
        }
    }};
}

/// Writes a chunk of base elements converted to the fine-tuned dtype into `out`
/// (a plain copy when the dtypes agree).
pub fn convert_chunk(ft: DType, base: DType, base_bytes: &[u8], out: &mut [u8]) {
    if ft == base {
        out.copy_from_slice(base_bytes);
        return;
    }
    fn go<F: Elem, B: Elem>(base: &[u8], out: &mut [u8]) {
        for (i, o) in out.chunks_exact_mut(F::SIZE).enumerate() {
            let bits = convert::<F, B>(B::bits(base, i));
            o.copy_from_slice(&bits.to_le_bytes()[..F::SIZE]);
        }
    }
    with_elems!(ft, base, |F, B| go::<F, B>(base_bytes, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::parse(d.name()), Some(d));
        }
        assert_eq!(DType::parse("F4"), None);
        assert_eq!(DType::parse("bf16"), None);
    }

    #[test]
    fn only_ieee_and_bf16_are_diffable() {
        let diffable: Vec<_> = DType::ALL.into_iter().filter(|d| d.is_diffable()).collect();
        assert_eq!(diffable, [DType::F16, DType::BF16, DType::F32, DType::F64]);
    }

    #[test]
    fn conversion_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values; ties go to the even one (1.0).
        let x = 1.0f32 + f32::powi(2.0, -8);
        assert_eq!(convert::<Bf16, F32>(x.to_bits() as u64), 0x3f80);
        assert_eq!(convert::<F32, Bf16>(0x3f80), 1.0f32.to_bits() as u64);
        assert_eq!(convert::<F64, F64>(0x1234), 0x1234);
        assert_eq!(convert::<F16, F64>(1.0f64.to_bits()), 0x3c00);
    }
}

//! A safetensors shard's header: parsed straight into [`TensorInfo`]s while what the parse
//! allocates is charged to the memory allowance, then checked as the `safetensors` library
//! checks it (SPEC section 1): known dtypes, offsets that match the shapes, tensors tiling
//! the data buffer without gap or overlap.

use std::path::Path;

use serde::de::{Deserializer, Error as _, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::bounded_json as json;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// The largest safetensors header fapm accepts (SPEC section 1).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor as declared in a shard header, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: Vec<u64>,
    /// Start of its bytes, relative to the shard's data buffer.
    pub begin: u64,
    /// End (exclusive) of its bytes, relative to the data buffer.
    pub end: u64,
}

impl TensorInfo {
    /// The number of elements (1 for a scalar).
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The number of bytes.
    pub fn byte_len(&self) -> u64 {
        self.end - self.begin
    }
}

/// Parses and validates a whole safetensors file held in `bytes`.
///
/// Returns the header text, where the data buffer starts, and the tensors in data order.
pub fn parse_shard(path: &Path, bytes: &[u8]) -> Result<(String, usize, Vec<TensorInfo>)> {
    let len_bytes: [u8; 8] = bytes.get(..8).and_then(|b| b.try_into().ok()).unwrap_or_default();
    let data_start = header_end(path, bytes.len() as u64, len_bytes)? as usize;
    let header_bytes = &bytes[8..data_start];
    let header =
        std::str::from_utf8(header_bytes).map_err(|e| Error::invalid(path, format!("header is not UTF-8: {e}")))?;
    let data_len = (bytes.len() - data_start) as u64;
    let tensors = parse_header(path, header, data_len)?;
    json::charge(json::string_cost(header.len())).map_err(|e| Error::invalid(path, e))?;
    Ok((header.to_owned(), data_start, tensors))
}

/// Where the header of a safetensors file of `file_len` bytes, whose first 8 bytes are
/// `len_bytes`, ends (the data starts): checked against the header limit and the file's length.
pub fn header_end(path: &Path, file_len: u64, len_bytes: [u8; 8]) -> Result<u64> {
    if file_len < 8 {
        return Err(Error::invalid(path, format!("file is {file_len} bytes, too short for a safetensors header")));
    }
    if len_bytes == crate::format::MAGIC {
        return Err(Error::invalid(
            path,
            "is a fapm delta, not a safetensors checkpoint (were the base and the delta swapped?)",
        ));
    }
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_LEN {
        return Err(Error::invalid(
            path,
            format!("header length {header_len} exceeds the {MAX_HEADER_LEN}-byte limit"),
        ));
    }
    if 8 + header_len > file_len {
        return Err(Error::invalid(
            path,
            format!("header length {header_len} runs past the end of the {file_len}-byte file"),
        ));
    }
    Ok(8 + header_len)
}

/// One tensor entry of a header, as written.
#[derive(Deserialize)]
struct RawTensor<'a> {
    #[serde(borrow)]
    dtype: json::Str<'a>,
    #[serde(deserialize_with = "json::vec")]
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

impl json::Heap for TensorInfo {
    fn heap(&self) -> u64 {
        json::string_cost(self.name.capacity()) // the shape was charged as it was parsed
    }
}

/// What [`parse_header`] charged to the allowance for `tensors` (and keeps charged).
pub fn parsed_cost(tensors: &Vec<TensorInfo>) -> u64 {
    let each: u64 = tensors.iter().map(|t| json::Heap::heap(t) + (t.shape.capacity() * size_of::<u64>()) as u64).sum();
    each + (tensors.capacity() * size_of::<TensorInfo>()) as u64
}

/// What the header parser was reading when it stopped, to word the error.
enum Failure {
    /// The JSON itself, or its top level.
    Json,
    /// The `__metadata__` entry.
    Metadata,
    /// A tensor entry, and why it is refused (empty: the JSON of the entry is malformed).
    Tensor(String, String),
}

/// Parses a header's top-level object into its tensors, in header order.
struct HeaderVisitor<'f> {
    data_len: u64,
    failure: &'f mut Failure,
}

impl<'de> Visitor<'de> for HeaderVisitor<'_> {
    type Value = Vec<TensorInfo>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
        let fail = |failure: &mut Failure, name: &str, msg: String| {
            *failure = Failure::Tensor(name.to_owned(), msg);
            A::Error::custom("invalid tensor entry")
        };
        let mut tensors = Vec::new();
        let mut metadata = false;
        while let Some(json::Str(name)) = map.next_key()? {
            if name == "__metadata__" {
                *self.failure = Failure::Metadata;
                if std::mem::replace(&mut metadata, true) {
                    return Err(A::Error::custom("duplicate key '__metadata__'"));
                }
                map.next_value::<Metadata>()?;
                *self.failure = Failure::Json;
                continue;
            }
            *self.failure = Failure::Tensor(name.to_string(), String::new());
            let raw: RawTensor = map.next_value()?;
            let dtype = DType::parse(&raw.dtype.0).ok_or_else(|| {
                fail(self.failure, &name, format!("unknown dtype '{}'", json::clip(&raw.dtype.0, 32)))
            })?;
            let (begin, end) = raw.data_offsets;
            if begin > end || end > self.data_len {
                let buffer = if self.data_len == u64::MAX { String::new() } else { format!("{}-byte ", self.data_len) };
                let msg = format!("data_offsets [{begin}, {end}] outside the {buffer}data buffer");
                return Err(fail(self.failure, &name, msg));
            }
            let expected = raw.shape.iter().try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d));
            let Some(expected) = expected else { return Err(fail(self.failure, &name, "shape is too large".into())) };
            if end - begin != expected {
                let rank = raw.shape.len();
                let shape = if rank > 8 { format!("of rank {rank}") } else { format!("{:?}", raw.shape) };
                let msg =
                    format!("data_offsets span {} bytes but shape {shape} of {dtype} needs {expected}", end - begin);
                return Err(fail(self.failure, &name, msg));
            }
            let info = TensorInfo { name: name.into_owned(), dtype, shape: raw.shape, begin, end };
            json::push(&mut tensors, info).map_err(A::Error::custom)?;
            *self.failure = Failure::Json;
        }
        Ok(tensors)
    }
}

/// The `__metadata__` entry: checked to map strings to strings, kept nowhere (the header
/// text is kept verbatim).
struct Metadata;

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Metadata;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Metadata, A::Error> {
                while map.next_entry::<IgnoredAny, json::AnyStr>()?.is_some() {}
                Ok(Metadata)
            }
        }
        d.deserialize_map(V)
    }
}

/// Validates a safetensors header against a data buffer of `data_len` bytes: the tensors,
/// sorted by their offsets, must tile the buffer from 0 to its end without gap or overlap
/// (the rule of the `safetensors` library). `data_len` is `u64::MAX` for a header recorded in
/// a delta, whose data buffer is then the tensors' tiling. The parse allocates only what it
/// returns (charged to the current [`json::Allowance`]) and a list of indices.
pub fn parse_header(path: &Path, header: &str, data_len: u64) -> Result<Vec<TensorInfo>> {
    let mut failure = Failure::Json;
    let mut de = serde_json::Deserializer::from_str(header);
    let parsed =
        de.deserialize_map(HeaderVisitor { data_len, failure: &mut failure }).and_then(|t| de.end().map(|_| t));
    let mut tensors = match (parsed, failure) {
        (Ok(tensors), _) => tensors,
        (Err(e), _) if e.to_string().starts_with(json::OVER_BUDGET) => {
            return Err(Error::invalid(path, format!("header of {} bytes: {}", header.len(), json::OVER_BUDGET)));
        }
        (Err(e), Failure::Json) => return Err(Error::invalid(path, format!("malformed header JSON: {e}"))),
        (Err(e), Failure::Metadata) => {
            return Err(Error::invalid(path, format!("__metadata__ must map strings to strings: {e}")));
        }
        (Err(e), Failure::Tensor(name, msg)) if msg.is_empty() => {
            return Err(Error::tensor(path, name, format!("malformed header entry: {e}")));
        }
        (Err(_), Failure::Tensor(name, msg)) => return Err(Error::tensor(path, name, msg)),
    };
    let refuse = |tensors: &[TensorInfo], i: usize, msg: String| Err(Error::tensor(path, &tensors[i].name, msg));
    // Indices in name order, then in (begin, end) order: 4 bytes per tensor, no copies.
    let over = |e| Error::invalid(path, e);
    json::charge(4 * tensors.len() as u64).map_err(over)?;
    let mut order: Vec<u32> = (0..tensors.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| tensors[a as usize].name.cmp(&tensors[b as usize].name));
    if let Some(w) = order.windows(2).find(|w| tensors[w[0] as usize].name == tensors[w[1] as usize].name) {
        return refuse(&tensors, w[1] as usize, "duplicate key in the header".into());
    }
    order.sort_unstable_by_key(|&i| (tensors[i as usize].begin, tensors[i as usize].end, i));
    let mut pos = 0;
    for (k, &i) in order.iter().enumerate() {
        let t = &tensors[i as usize];
        if t.begin < pos {
            let prev = &tensors[order[k - 1] as usize].name;
            return refuse(&tensors, i as usize, format!("data overlaps tensor '{prev}'"));
        }
        if t.begin > pos {
            let msg = format!("starts at byte {} of the data buffer, leaving {} bytes before it that no tensor covers (tensors must tile the buffer from 0)", t.begin, t.begin - pos);
            return refuse(&tensors, i as usize, msg);
        }
        pos = t.end;
    }
    json::refund(4 * tensors.len() as u64);
    drop(order);
    if data_len != u64::MAX && pos != data_len {
        return Err(Error::invalid(
            path,
            format!(
                "the last {} bytes of the data buffer belong to no tensor (tensors must tile it to its end)",
                data_len - pos
            ),
        ));
    }
    tensors.sort_by_key(|t| t.begin); // stable: header order among equal starts
    Ok(tensors)
}

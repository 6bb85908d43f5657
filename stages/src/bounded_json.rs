//! JSON read from files (safetensors headers, index files, delta manifests), parsed straight
//! into the types fapm needs while what the parse allocates is charged against an allowance.
//!
//! A generic JSON value costs 17 to 34 times the text of `[0,0,...]` or `["",...]`, so a
//! small hostile file could ask for gigabytes. Typed parsing removes most of that, and the
//! allowance bounds the rest: inside an [`Allowance`] scope every string and every growth of a
//! list parsed through this module is charged before it is allocated (a list's old and new
//! buffers both, while it grows), and the parse stops with [`OVER_BUDGET`] once the
//! allowance is spent. The allowance is per thread, so that serde's derived parsers can
//! charge through `#[serde(deserialize_with = ...)]` without carrying it around.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};

use crate::run::RunControl;

/// The message of a parse stopped by its allowance.
pub const OVER_BUDGET: &str = "reading it needs more memory than the memory budget allows (--memory-budget)";
/// The message of a parse stopped because its run was cancelled ([`Watch`]).
pub const CANCELLED: &str = "cancelled";
/// Charges between two looks at the watched run's cancellation flag.
const CHARGES_PER_LOOK: u32 = 1024;

thread_local! {
    /// Bytes the parses of this thread may still allocate; `None` outside any allowance.
    static LEFT: Cell<Option<u64>> = const { Cell::new(None) };
    /// The run whose cancellation stops this thread's parses ([`Watch`]); null when none.
    static WATCHED: Cell<*const RunControl> = const { Cell::new(std::ptr::null()) };
    /// Charges since the flag was last looked at.
    static TICKS: Cell<u32> = const { Cell::new(0) };
}

/// A scope in which this thread's parses stop with [`CANCELLED`] soon after `ctl` is
/// cancelled (a look every 1024 charges: a large manifest's parse takes about a second).
pub struct Watch<'a> {
    outer: *const RunControl,
    _ctl: PhantomData<&'a RunControl>,
}

impl<'a> Watch<'a> {
    /// Watches `ctl` until the scope ends.
    pub fn new(ctl: &'a RunControl) -> Self {
        let outer = WATCHED.replace(ctl);
        Watch { outer, _ctl: PhantomData }
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        WATCHED.set(self.outer);
    }
}

/// Whether the watched run was cancelled, looked at every [`CHARGES_PER_LOOK`] calls.
fn cancelled() -> bool {
    let ticks = TICKS.get().wrapping_add(1);
    TICKS.set(ticks);
    if !ticks.is_multiple_of(CHARGES_PER_LOOK) {
        return false;
    }
    let ctl = WATCHED.get();
    // SAFETY: a non-null pointer was set by a `Watch` of this thread that borrows the
    // RunControl for its whole life and puts the previous pointer back when dropped, so it
    // points to a live RunControl; `Watch` holds a raw pointer and so is neither Send nor
    // Sync, and cannot end on another thread.
    !ctl.is_null() && unsafe { (*ctl).is_cancelled() }
}

/// A scope in which this thread's parses charge their allocations to `bytes`. Scopes nest:
/// an inner one is limited by what the outer one has left, and what it keeps charged when it
/// ends (memory its parse returned) stays charged to the outer one.
pub struct Allowance {
    outer: Option<u64>,
    start: u64,
}

impl Allowance {
    /// Opens a scope of `bytes` (or of what an enclosing scope has left, if less).
    pub fn new(bytes: u64) -> Self {
        let outer = LEFT.get();
        let start = bytes.min(outer.unwrap_or(u64::MAX));
        LEFT.set(Some(start));
        Allowance { outer, start }
    }
}

impl Drop for Allowance {
    fn drop(&mut self) {
        let used = self.start.saturating_sub(LEFT.get().unwrap_or(0));
        LEFT.set(self.outer.map(|o| o.saturating_sub(used)));
    }
}

/// The share of a run's memory budget that what the run keeps of its inputs' metadata may
/// take (parsed headers and indexes, a delta's records, the records a prune builds): half of
/// it, charged as [`Allowance`] charges, by every reader the run opens while this scope is
/// alive (their own allowances nest inside it). [`RunMemory::working`] is what is left for the
/// run's buffers (`run::Budget`), so that the two together stay within the budget.
pub struct RunMemory {
    budget: u64,
    scope: Allowance,
}

impl RunMemory {
    /// Opens the scope for a run of `budget` bytes.
    pub fn new(budget: u64) -> Self {
        RunMemory { budget, scope: Allowance::new(budget / 2) }
    }

    /// The metadata charged so far.
    pub fn used(&self) -> u64 {
        self.scope.start.saturating_sub(LEFT.get().unwrap_or(0))
    }

    /// The budget less the metadata charged so far.
    pub fn working(&self) -> u64 {
        self.budget.saturating_sub(self.used())
    }
}

/// Charges `bytes` to the current allowance; `Err(OVER_BUDGET)` once it is spent, and
/// `Err(CANCELLED)` once a watched run is cancelled.
pub fn charge(bytes: u64) -> Result<(), &'static str> {
    if cancelled() {
        return Err(CANCELLED);
    }
    match LEFT.get() {
        None => Ok(()),
        Some(left) if left >= bytes => {
            LEFT.set(Some(left - bytes));
            Ok(())
        }
        Some(_) => {
            LEFT.set(Some(0));
            Err(OVER_BUDGET)
        }
    }
}

/// Gives back `bytes` charged earlier (memory freed again).
pub fn refund(bytes: u64) {
    if let Some(left) = LEFT.get() {
        LEFT.set(Some(left.saturating_add(bytes)));
    }
}

/// Heap memory a parsed value owns, besides its own `size_of` (what is not already charged
/// by the lists inside it).
pub trait Heap {
    /// Bytes of heap owned directly by this value.
    fn heap(&self) -> u64 {
        0
    }
}

impl Heap for u64 {}

impl Heap for String {
    fn heap(&self) -> u64 {
        string_cost(self.capacity())
    }
}

/// What a string of `capacity` bytes costs, with the allocator's rounding.
pub fn string_cost(capacity: usize) -> u64 {
    if capacity == 0 {
        0
    } else {
        capacity as u64 + 16
    }
}

/// Appends `x` to `v`, charging `x`'s heap and any growth of `v` first.
pub fn push<T: Heap>(v: &mut Vec<T>, x: T) -> Result<(), &'static str> {
    charge(x.heap())?;
    if v.len() == v.capacity() {
        let old = v.capacity();
        let new = (old * 2).max(4);
        charge((new as u64).saturating_mul(size_of::<T>() as u64))?; // both buffers, while it grows
        v.reserve_exact(new - v.len());
        refund((old * size_of::<T>()) as u64);
    }
    v.push(x);
    Ok(())
}

/// Deserializes a list, charging every element and every growth: for
/// `#[serde(deserialize_with = "crate::bounded_json::vec")]`.
pub fn vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Heap,
{
    struct V<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de> + Heap> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut v = Vec::new();
            while let Some(x) = seq.next_element::<T>()? {
                push(&mut v, x).map_err(de::Error::custom)?;
            }
            Ok(v)
        }
    }
    d.deserialize_seq(V(PhantomData))
}

/// Deserializes a string, charging it: for `#[serde(deserialize_with = "crate::bounded_json::string")]`.
pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = Str::deserialize(d)?.0;
    charge(string_cost(s.len())).map_err(de::Error::custom)?;
    Ok(s.into_owned())
}

/// A string borrowed from the JSON text where it has no escapes, else owned (not charged:
/// the caller charges what it keeps).
pub struct Str<'de>(pub Cow<'de, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V(PhantomData))
    }
}

/// Any string, kept nowhere: checks a value's type without allocating.
pub struct AnyStr;

impl<'de> Deserialize<'de> for AnyStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = AnyStr;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E>(self, _: &str) -> Result<AnyStr, E> {
                Ok(AnyStr)
            }
        }
        d.deserialize_str(V)
    }
}

/// At most `max` characters of `s` (a name from a file, quoted in an error message).
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => Cow::Borrowed(s),
        Some((at, _)) => Cow::Owned(format!("{}...", &s[..at])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(deserialize_with = "vec")]
        names: Vec<String>,
        #[serde(deserialize_with = "vec")]
        shape: Vec<u64>,
    }

    fn parse(text: &str, bytes: u64) -> Result<Doc, String> {
        let _a = Allowance::new(bytes);
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    /// A parse in a watched scope stops soon after its run is cancelled (here: before it
    /// starts), and only there: the same parse unwatched, or after the scope, completes.
    #[test]
    fn a_watched_parse_stops_once_cancelled() {
        let doc = format!(r#"{{"names":[{}"x"],"shape":[]}}"#, r#""x","#.repeat(100_000));
        let ctl = RunControl::default();
        ctl.cancel();
        {
            let _w = Watch::new(&ctl);
            let err = parse(&doc, 1 << 30).err().unwrap();
            assert!(err.starts_with(CANCELLED), "{err}");
        }
        assert_eq!(parse(&doc, 1 << 30).unwrap().names.len(), 100_001);
        let running = RunControl::default();
        let _w = Watch::new(&running);
        assert_eq!(parse(&doc, 1 << 30).unwrap().names.len(), 100_001);
    }

    #[test]
    fn lists_and_strings_are_charged() {
        let doc = r#"{"names":["abc","de"],"shape":[1,2,3]}"#;
        let d = parse(doc, 4096).unwrap();
        assert_eq!((d.names.len(), d.shape.len()), (2, 3));
        let err = parse(doc, 100).err().unwrap();
        assert!(err.contains("memory budget"), "{err}");
        // Outside an allowance nothing is limited.
        assert!(serde_json::from_str::<Doc>(doc).is_ok());
    }

    #[test]
    fn a_list_of_a_million_zeros_is_refused_within_its_allowance() {
        let doc = format!(r#"{{"names":[],"shape":[{}0]}}"#, "0,".repeat((1 << 20) - 1));
        // Growing to 2^20 elements needs the old and new buffers: 8 + 4 MiB at the end.
        assert!(parse(&doc, 12 << 20).is_ok());
        assert!(parse(&doc, 8 << 20).err().unwrap().contains("memory budget"));
    }

    #[test]
    fn nested_allowances_keep_what_the_inner_parse_kept() {
        let outer = Allowance::new(1000);
        {
            let _inner = Allowance::new(5000); // limited to the outer 1000
            assert!(charge(600).is_ok());
            assert!(charge(600).is_err());
        }
        // The inner scope kept 1000 charged (600 and then the rest, when it failed).
        assert!(charge(1).is_err());
        drop(outer);
        assert!(charge(u64::MAX).is_ok());
    }

    #[test]
    fn clip_keeps_short_strings() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "abc...");
        assert_eq!(clip("ééé", 2), "éé...");
    }
}

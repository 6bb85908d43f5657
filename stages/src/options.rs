//! The options a prune records in its delta (penalty, regexes), parsed one way: `prune`
//! checks its flags with these functions and the reader checks a delta's record with them,
//! so a delta only ever shows options that a prune could have used.

use ::regex::{Regex, RegexBuilder};

/// The most memory one compiled regex may take (the `regex` crate's own default, stated here
/// so that `prune` and the reader agree on what compiles).
pub const REGEX_SIZE_LIMIT: usize = 10 << 20;

/// The longest penalty (and recorded sparsity) text: far more digits than an f32 or the
/// 18-digit sparsity can use. Checked before anything copies the text into a message.
pub const MAX_NUMBER_LEN: usize = 64;

/// The longest pattern: a real one is a line; parsing one costs memory in proportion to its
/// length, before the compiled size limit applies.
pub const MAX_PATTERN_LEN: usize = 16 << 10;

/// Parses a penalty `L`: a finite decimal `>= 0` (digits and at most one point, at most
/// [`MAX_NUMBER_LEN`] characters), read as the nearest f32.
pub fn penalty(text: &str) -> Result<f32, String> {
    if text.len() > MAX_NUMBER_LEN {
        return Err(format!("invalid penalty of {} bytes: at most {MAX_NUMBER_LEN}", text.len()));
    }
    let bad = || format!("invalid penalty '{text}': expected a decimal number >= 0, such as 0.5");
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
        return Err(bad());
    }
    let value: f32 = text.parse().map_err(|_| bad())?;
    if !value.is_finite() {
        return Err(bad());
    }
    Ok(value)
}

/// Compiles a tensor-name pattern of at most [`MAX_PATTERN_LEN`] bytes within
/// [`REGEX_SIZE_LIMIT`]; the reason when it does not.
pub fn regex(pattern: &str) -> Result<Regex, String> {
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(format!("a pattern of {} bytes is longer than {MAX_PATTERN_LEN}", pattern.len()));
    }
    RegexBuilder::new(pattern).size_limit(REGEX_SIZE_LIMIT).build().map_err(|e| {
        // regex explains with a multi-line diagram; its last line says what is wrong.
        let text = e.to_string();
        let why = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        why.trim_start_matches("error: ").to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NaN, infinities, negatives and exponents are not penalties; plain decimals are.
    #[test]
    fn penalties_are_plain_finite_decimals() {
        assert_eq!(penalty("0.25"), Ok(0.25));
        assert_eq!(penalty("1"), Ok(1.0));
        for bad in ["NaN", "nan", "inf", "-1", "-1e999", "1e999", "1e3", "", ".", "1.2.3"] {
            assert!(penalty(bad).is_err(), "{bad}");
        }
        assert!(penalty(&format!("{}1", "9".repeat(40))).is_err(), "overflows f32");
        assert!(penalty(&format!("0.{}", "0".repeat(70))).is_err(), "too long");
    }

    /// A pattern that does not parse, or compiles past the limit, is refused.
    #[test]
    fn regexes_compile_within_the_limit() {
        assert!(regex("^model\\.layers\\.[0-9]+\\.").is_ok());
        assert!(regex("(").is_err());
        assert!(regex("\\w{1000}\\w{1000}\\w{1000}").is_err());
        assert!(regex(&"a".repeat(MAX_PATTERN_LEN + 1)).is_err());
    }
}

//! Paths that come from files: the names a delta gives its shards and side files, which
//! `apply` turns into files under its output (SPEC section 4).

/// Whether `p` is a path in the one spelling a delta stores (SPEC section 4): relative,
/// `/`-separated, every component non-empty and neither `.` nor `..`, no `\\` and no control
/// character. So "a/b.json", but not "", "/x", "../x", "a//b", "a/./b", "a/" or "a\\b": two
/// different strings that pass never name the same file.
pub fn is_safe_relative(p: &str) -> bool {
    !p.is_empty()
        && !p.chars().any(|c| c == '\\' || c.is_control())
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_relative_paths() {
        for ok in ["a.json", "tok/vocab.txt"] {
            assert!(is_safe_relative(ok), "{ok}");
        }
        for bad in [
            "",
            "../a",
            "/etc/passwd",
            "a/../../b",
            "./a",
            "a\\..\\b",
            "a//b",
            "a/./b",
            "a/",
            "a/.",
            "a\u{1b}b",
            "a\nb",
        ] {
            assert!(!is_safe_relative(bad), "{bad}");
        }
    }
}

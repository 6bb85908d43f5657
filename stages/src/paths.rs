//! Paths that come from files: the names a delta gives its shards and side files, which
//! `apply` turns into files under its output (SPEC section 4). Every rule for such a path
//! lives here: the components, the characters, the limits, the formats a side file may not
//! have, and which side files are code. Every check is one pass over the path, after a
//! length check that costs nothing: a path of a million components is refused by its size.

/// The longest path a delta may name, in bytes (SPEC section 4).
pub const MAX_PATH_BYTES: usize = 4096;

/// The most components a path in a delta may have (SPEC section 4).
pub const MAX_PATH_COMPONENTS: usize = 64;

/// File extensions (lowercase, without the dot) of weight and pickle formats: never a side
/// file (SPEC section 4). A loader picks these up by name (`model.safetensors` beside the
/// verified shards, `pytorch_model.bin`), and pickles run code when loaded
/// (`training_args.bin`, `optimizer.pt`, `rng_state.pth` are pickles).
pub const WEIGHT_EXTENSIONS: [&str; 17] = [
    "safetensors",
    "bin",
    "pt",
    "pth",
    "ckpt",
    "pkl",
    "pickle",
    "gguf",
    "h5",
    "msgpack",
    "onnx",
    "npy",
    "npz",
    "joblib",
    "tflite",
    "mlmodel",
    "ot",
];

/// File extensions (lowercase, without the dot) of side files that are code: they travel,
/// but `prune`, `inspect` and `apply` name them. SPEC section 4 says `.py` at least; these are
/// the files something runs by importing, loading or executing them (a decision recorded in
/// docs/SECURITY.md): Python source and bytecode (`trust_remote_code` imports `.py` files; a
/// lone `.pyc` imports too), native libraries, shell and batch scripts, and notebooks.
pub const CODE_EXTENSIONS: [&str; 18] = [
    "py", "pyc", "pyo", "pyw", "pyx", "pyd", "so", "dylib", "dll", "sh", "bash", "zsh", "fish", "ps1", "bat", "cmd",
    "ipynb", "js",
];

/// Why a path may not be stored in a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathProblem {
    /// The empty string.
    Empty,
    /// Longer than [`MAX_PATH_BYTES`] (its length).
    TooLong(usize),
    /// More than [`MAX_PATH_COMPONENTS`] components.
    TooDeep,
    /// Starts with `/`, or has an empty component (`a//b`, `a/`).
    EmptyComponent,
    /// A component `.` or `..`.
    DotComponent,
    /// A component that starts with `.` (`.git`, `.hidden`).
    Hidden,
    /// A `\`, which some systems read as a separator.
    Backslash,
    /// A control or invisible character (Unicode Cc, Cf, Zl, Zp).
    Invisible(char),
}

impl std::fmt::Display for PathProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathProblem::Empty => write!(f, "is empty"),
            PathProblem::TooLong(n) => write!(f, "is {n} bytes long, over the {MAX_PATH_BYTES}-byte limit"),
            PathProblem::TooDeep => write!(f, "has more than {MAX_PATH_COMPONENTS} components"),
            PathProblem::EmptyComponent => write!(f, "is absolute or has an empty component"),
            PathProblem::DotComponent => write!(f, "has a '.' or '..' component"),
            PathProblem::Hidden => {
                write!(f, "has a component starting with '.' (hidden files such as .git are refused)")
            }
            PathProblem::Backslash => write!(f, "holds a '\\'"),
            PathProblem::Invisible(c) => {
                write!(f, "holds the control or invisible character U+{:04X}", *c as u32)
            }
        }
    }
}

/// Checks `p` against every rule for a path in a delta (SPEC section 4): relative,
/// `/`-separated, every component non-empty, not `.` or `..` and not starting with `.`, no `\`
/// and no control or invisible character, at most [`MAX_PATH_BYTES`] bytes and
/// [`MAX_PATH_COMPONENTS`] components. One pass, after the length check.
pub fn check(p: &str) -> Result<(), PathProblem> {
    if p.is_empty() {
        return Err(PathProblem::Empty);
    }
    if p.len() > MAX_PATH_BYTES {
        return Err(PathProblem::TooLong(p.len()));
    }
    let mut components = 0;
    for c in p.split('/') {
        components += 1;
        if components > MAX_PATH_COMPONENTS {
            return Err(PathProblem::TooDeep);
        }
        check_component(c)?;
    }
    Ok(())
}

/// Checks one component of a path (a file or directory name) against the rules of [`check`]
/// that concern a single name.
pub fn check_component(c: &str) -> Result<(), PathProblem> {
    if c.is_empty() {
        return Err(PathProblem::EmptyComponent);
    }
    if c == "." || c == ".." {
        return Err(PathProblem::DotComponent);
    }
    if c.starts_with('.') {
        return Err(PathProblem::Hidden);
    }
    match c.chars().find(|&ch| ch == '\\' || is_control_or_invisible(ch)) {
        Some('\\') => Err(PathProblem::Backslash),
        Some(ch) => Err(PathProblem::Invisible(ch)),
        None => Ok(()),
    }
}

/// Whether `p` is a path in the one spelling a delta stores (see [`check`]). So "a/b.json",
/// but not "", "/x", "../x", "a//b", "a/./b", "a/", "a\\b", ".git/HEAD" or "a\u{200b}": two
/// different strings that pass never name the same file, and none is hidden.
pub fn is_safe_relative(p: &str) -> bool {
    check(p).is_ok()
}

/// The extension of the last component of `p` (after its last `.`), if it has one.
fn extension(p: &str) -> Option<&str> {
    let name = p.rsplit('/').next().unwrap_or(p);
    name.rsplit_once('.').map(|(_, ext)| ext)
}

/// Whether `ext` is one of `list`, ignoring ASCII case.
fn one_of(ext: Option<&str>, list: &[&str]) -> bool {
    ext.is_some_and(|e| list.iter().any(|w| w.eq_ignore_ascii_case(e)))
}

/// The weight or pickle format of `p` ([`WEIGHT_EXTENSIONS`], any case), if it is in one: such
/// a file is never a side file.
pub fn weight_format(p: &str) -> Option<&str> {
    extension(p).filter(|&e| one_of(Some(e), &WEIGHT_EXTENSIONS))
}

/// Whether the side file `p` is code ([`CODE_EXTENSIONS`], any case).
pub fn is_code(p: &str) -> bool {
    one_of(extension(p), &CODE_EXTENSIONS)
}

/// Whether `c` is a control or invisible character: Unicode general category Cc (control),
/// Cf (format), Zl (line separator) or Zp (paragraph separator).
pub fn is_control_or_invisible(c: char) -> bool {
    c.is_control() || is_invisible(c)
}

/// Whether `c` is in Unicode general category Cf, Zl or Zp: characters a terminal shows as
/// nothing (U+200B zero width space, U+FEFF) or that reorder or break what it shows (bidi
/// controls U+202A-202E and U+2066-2069, U+2028, U+2029). Rust's std knows only Cc
/// (`char::is_control`).
pub fn is_invisible(c: char) -> bool {
    let c = c as u32;
    // Sorted, disjoint: a binary search over 21 ranges.
    FORMAT
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// Unicode general categories Cf, Zl and Zp as inclusive ranges, sorted. Generated from
/// Python 3.11's `unicodedata` (Unicode 14.0.0):
///
/// ```text
/// [cp for cp in range(0x110000) if unicodedata.category(chr(cp)) in ("Cf", "Zl", "Zp")]
/// ```
///
/// merged into ranges, then U+13439-1343F (Egyptian hieroglyph format controls, Cf since
/// Unicode 15.0) added, so the table is that of Unicode 15.0 and later.
const FORMAT: [(u32, u32); 21] = [
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x2028, 0x202E), // Zl U+2028, Zp U+2029, Cf U+202A-202E
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_relative_paths() {
        for ok in ["a.json", "tok/vocab.txt", "a.b/c", "x.", "émoji ✓ 中文.txt"] {
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

    #[test]
    fn each_rule_names_its_problem() {
        use PathProblem::*;
        let cases: [(&str, PathProblem); 14] = [
            ("", Empty),
            ("/a", EmptyComponent),
            ("a//b", EmptyComponent),
            ("a/", EmptyComponent),
            ("a/./b", DotComponent),
            ("..", DotComponent),
            (".git/HEAD", Hidden),
            ("a/.hidden", Hidden),
            ("a/.../b", Hidden),
            ("a\\b", Backslash),
            ("config.json\u{200b}", Invisible('\u{200b}')),
            ("a\u{202e}txt.md", Invisible('\u{202e}')),
            ("\u{feff}a", Invisible('\u{feff}')),
            ("a\u{2028}b", Invisible('\u{2028}')),
        ];
        for (p, problem) in cases {
            assert_eq!(check(p), Err(problem), "{}", p.escape_default());
        }
    }

    #[test]
    fn limits_are_exact() {
        let long = "a".repeat(MAX_PATH_BYTES);
        assert_eq!(check(&long), Ok(()));
        assert_eq!(check(&format!("{long}b")), Err(PathProblem::TooLong(MAX_PATH_BYTES + 1)));
        let deep = vec!["d"; MAX_PATH_COMPONENTS].join("/");
        assert_eq!(check(&deep), Ok(()));
        assert_eq!(check(&format!("{deep}/f")), Err(PathProblem::TooDeep));
        // A million components is refused by its length, before it is split.
        let huge = vec!["a"; 1_000_000].join("/");
        let start = std::time::Instant::now();
        assert_eq!(check(&huge), Err(PathProblem::TooLong(huge.len())));
        assert!(start.elapsed().as_millis() < 100);
    }

    #[test]
    fn the_invisible_table_matches_unicode() {
        assert!(FORMAT.windows(2).all(|w| w[0].1 < w[1].0), "sorted and disjoint");
        for c in ['\u{ad}', '\u{600}', '\u{200b}', '\u{200d}', '\u{200e}', '\u{2028}', '\u{2029}', '\u{202e}'] {
            assert!(is_invisible(c), "{:04X}", c as u32);
        }
        for c in ['\u{2066}', '\u{2069}', '\u{feff}', '\u{fffb}', '\u{1343f}', '\u{e0001}', '\u{e007f}'] {
            assert!(is_invisible(c), "{:04X}", c as u32);
        }
        for c in ['a', ' ', '\u{a0}', '\u{200a}', '\u{2030}', '\u{2065}', '\u{fffc}', '\u{e0000}', '\u{e0080}', 'é'] {
            assert!(!is_invisible(c), "{:04X}", c as u32);
        }
        assert!(is_control_or_invisible('\u{7f}') && is_control_or_invisible('\u{9b}'));
    }

    #[test]
    fn weights_and_code_by_extension_in_any_case() {
        for w in ["model.safetensors", "training_args.bin", "x.PT", "a/b/rng_state.pth", "x.npy", "m.GGUF", "t.ot"] {
            assert!(weight_format(w).is_some(), "{w}");
        }
        for d in ["config.json", "tokenizer/vocab.txt", "bin", "a.bin/config.json", "model.safetensors.index.json"] {
            assert!(weight_format(d).is_none(), "{d}");
        }
        assert_eq!(weight_format("x.PT"), Some("PT"));
        for c in ["a.py", "b/c.PY", "lib.so", "run.sh", "nb.ipynb", "m.pyc"] {
            assert!(is_code(c), "{c}");
        }
        for d in ["config.json", "py", "a.py/README.md", "notes.txt", "a.pyi.txt"] {
            assert!(!is_code(d), "{d}");
        }
    }
}

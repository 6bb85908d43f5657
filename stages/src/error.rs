//! One error type for everything that touches bytes, so every message names its file and tensor.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, with the file (and tensor) it went wrong in.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file whose contents break the rules (checkpoint or delta).
    #[error("{}: {msg}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, lowercase.
        msg: String,
    },
    /// A problem with one tensor of a file.
    #[error("{}: tensor '{tensor}': {msg}", path.display())]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What is wrong, lowercase.
        msg: String,
    },
    /// A bad option value or a request that cannot be met.
    #[error("{0}")]
    Config(String),
    /// The run was cancelled (Ctrl-C, SIGTERM, or another stage failed first).
    #[error("interrupted")]
    Cancelled,
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }

    /// A malformed-file error on `path`.
    pub fn invalid(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Invalid { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }

    /// An error about one tensor of `path`.
    pub fn tensor(path: impl AsRef<Path>, tensor: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor { path: path.as_ref().to_path_buf(), tensor: tensor.into(), msg: msg.into() }
    }
}

/// `s` (a name or text read from a file) made safe to print on a terminal: control
/// characters (C0, DEL, C1) and invisible ones (Unicode Cf, Zl, Zp: zero-width characters,
/// U+FEFF, line and paragraph separators, the bidirectional controls that can reorder what a
/// line shows) are written as escapes (`\n`, `\u{1b}`, `\u{200b}`, ...), so nothing from a
/// file can move the cursor, recolour, retitle the window, forge a line, or make two names
/// look the same.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// An error message as one printable line, as the command line prints it after `error:` and
/// the Python package raises it: line breaks become spaces, then control characters from
/// hostile file and tensor names are escaped ([`printable`]).
pub fn one_line(msg: &str) -> String {
    printable(&msg.replace('\n', " ")).into_owned()
}

/// Whether [`printable`] escapes `c`: a control or invisible character (the table of
/// [`crate::paths::is_control_or_invisible`], the same that refuses such paths).
pub fn needs_escape(c: char) -> bool {
    crate::paths::is_control_or_invisible(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_what_a_terminal_would_act_on() {
        assert!(matches!(printable("model.layers.0.weight"), Cow::Borrowed(_)));
        assert_eq!(printable("a\nb\r\u{1b}[2J\u{7}"), "a\\nb\\r\\u{1b}[2J\\u{7}");
        assert_eq!(printable("\u{9b}31m \u{7f} \u{202e}x \u{2028}"), "\\u{9b}31m \\u{7f} \\u{202e}x \\u{2028}");
        assert_eq!(printable("émoji ✓ 中文"), "émoji ✓ 中文");
        // Invisible characters: two names that would look the same print differently.
        assert_eq!(printable("config.json\u{200b}"), "config.json\\u{200b}");
        assert_eq!(printable("\u{feff}a\u{ad}b\u{e0001}"), "\\u{feff}a\\u{ad}b\\u{e0001}");
    }
}

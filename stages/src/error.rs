//! One error type for everything that touches bytes, so every message names its file and tensor.

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

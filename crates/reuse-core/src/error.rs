//! The one error type of reuse-core.
//!
//! Every variant that concerns a file names the file; every variant that concerns a
//! tensor names the tensor, what was expected and what was found.

use std::path::PathBuf;

/// Errors from reuse-core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read, written or renamed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file exists but is not what it claims to be (truncated, corrupt header, bad JSON...).
    #[error("{path}: corrupt or truncated file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong, as precisely as known (names the tensor where one is involved).
        reason: String,
    },
    /// A row of a data file is malformed (wrong field count, bad JSON, missing column...).
    #[error("{path}: line {line}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The line (1-based) where the row starts.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A safetensors dtype that reuse does not handle.
    #[error("{path}: tensor `{tensor}` has dtype {dtype}, expected one of F32, F64, F16, BF16, I8, U8, I32, I64")]
    UnknownDtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype found.
        dtype: String,
    },
    /// A tensor that should be present is not.
    #[error("{}tensor `{tensor}` is missing", location(.path))]
    MissingTensor {
        /// The file, if the tensors came from one.
        path: Option<PathBuf>,
        /// The tensor.
        tensor: String,
    },
    /// A tensor has the wrong shape.
    #[error("{}tensor `{tensor}` has shape {found:?}, expected {expected:?}", location(.path))]
    ShapeMismatch {
        /// The file, if the tensors came from one.
        path: Option<PathBuf>,
        /// The tensor.
        tensor: String,
        /// The shape expected.
        expected: Vec<i64>,
        /// The shape found.
        found: Vec<i64>,
    },
    /// A tensor has the wrong element type.
    #[error("{}tensor `{tensor}` has dtype {found}, expected {expected}", location(.path))]
    DtypeMismatch {
        /// The file, if the tensors came from one.
        path: Option<PathBuf>,
        /// The tensor.
        tensor: String,
        /// The dtype expected.
        expected: String,
        /// The dtype found.
        found: String,
    },
    /// A configuration value or argument is invalid.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was invalid (a key, an argument, a pattern).
        what: String,
        /// Why.
        reason: String,
    },
    /// A pattern selected nothing, or a path names no layer.
    #[error("{what} `{pattern}` matches nothing; available: {available}")]
    NoMatch {
        /// What was being selected ("parameter", "linear").
        what: String,
        /// The pattern or path.
        pattern: String,
        /// What could have matched, abbreviated.
        available: String,
    },
    /// An error raised inside libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

fn location(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!("{}: ", p.display()),
        None => String::new(),
    }
}

/// Result with reuse-core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Invalid input: `what` names the argument, file, key or tensor, `reason` says what
    /// was expected and what was found. For the crates built on reuse-core too.
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Lists `names` for an error message, at most 12 of them.
    pub(crate) fn list<S: AsRef<str>>(names: &[S]) -> String {
        let mut s: Vec<&str> = names.iter().take(12).map(|n| n.as_ref()).collect();
        if names.len() > 12 {
            s.push("...");
        }
        s.join(", ")
    }
}

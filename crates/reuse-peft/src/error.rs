//! The one error type of reuse-peft.

use std::path::PathBuf;

/// Errors from reuse-peft. Each names the file, key or module involved, what was
/// expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// An error from reuse-core (files, tensors, models).
    #[error(transparent)]
    Core(#[from] reuse_core::Error),
    /// An invalid configuration value.
    #[error("{}invalid {key}: {reason}", at(.path))]
    Config {
        /// The config file, if read from one.
        path: Option<PathBuf>,
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// `target_modules` (or a layer pattern) matches no linear of the model.
    #[error("target_modules {pattern} matches no linear layer of the model; its linear layers are: {available}")]
    NoTarget {
        /// The pattern, as written.
        pattern: String,
        /// The model's linear paths.
        available: String,
    },
    /// An adapter file does not fit the base model.
    #[error("{path}: {reason}")]
    Mismatch {
        /// The adapter file.
        path: PathBuf,
        /// What does not fit (names the key, expected and found).
        reason: String,
    },
    /// An adapter name that is unknown, or already in use.
    #[error("adapter `{name}`: {reason}")]
    Adapter {
        /// The adapter name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn at(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| format!("{}: ", p.display()))
        .unwrap_or_default()
}

/// Result with [`PeftError`].
pub type Result<T, E = PeftError> = std::result::Result<T, E>;

impl From<tch::TchError> for PeftError {
    fn from(e: tch::TchError) -> Self {
        PeftError::Core(e.into())
    }
}

pub(crate) fn config_err(key: &str, reason: impl Into<String>) -> PeftError {
    PeftError::Config {
        path: None,
        key: key.into(),
        reason: reason.into(),
    }
}

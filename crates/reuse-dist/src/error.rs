//! reuse-dist's error type.

/// What can go wrong joining a process group or running a collective.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A launcher variable (RANK, WORLD_SIZE, MASTER_ADDR, ...) is missing or malformed.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable.
        var: String,
        /// What was expected and what was found.
        reason: String,
    },
    /// Joining the store or building the Gloo group failed (nobody listening, a port in
    /// use, ranks that never arrived within the timeout).
    #[error("rank {rank} of {world}: could not join the process group at {addr}: {message}")]
    Rendezvous {
        /// This process's rank.
        rank: usize,
        /// The number of processes.
        world: usize,
        /// The store's `host:port`.
        addr: String,
        /// libtorch's message.
        message: String,
    },
    /// A collective failed: another rank exited, or did not reach the same collective
    /// within the timeout.
    #[error(
        "rank {rank} of {world}: {op} failed: {message} (another rank stopped, or did not \
         reach the same collective within {timeout_s} s)"
    )]
    Collective {
        /// This process's rank.
        rank: usize,
        /// The number of processes.
        world: usize,
        /// The collective (`all_reduce`, `broadcast`, ...).
        op: String,
        /// The group's timeout in seconds.
        timeout_s: f64,
        /// libtorch's message.
        message: String,
    },
    /// An argument is invalid (a tensor that is not contiguous, a root past the world).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The argument.
        what: String,
        /// What was expected and what was found.
        reason: String,
    },
    /// Starting or waiting for a rank's process failed.
    #[error("launch: {0}")]
    Launch(String),
    /// An error from reuse-core.
    #[error(transparent)]
    Core(#[from] reuse_core::Error),
    /// An error raised inside libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result with reuse-dist's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for reuse_core::Error {
    /// Technique hooks return core's error; a distributed failure becomes an `Invalid`
    /// whose message is this one.
    fn from(e: Error) -> Self {
        match e {
            Error::Core(c) => c,
            Error::Torch(t) => reuse_core::Error::Torch(t),
            other => reuse_core::Error::invalid("distributed run", other.to_string()),
        }
    }
}

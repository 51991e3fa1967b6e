//! reuse-testkit: where this workspace keeps its data, for its own tests, benches and
//! examples.
//!
//! The library crates take model folders and data files as arguments and know nothing of
//! this repository's layout; a crate that depends on `reuse-core` from a registry has no
//! `fixtures/` folder. The paths below exist only in a checkout of the workspace, so they
//! live here, in a crate that is never published.
//!
//! ```
//! let digits = reuse_testkit::fixtures_dir().join("digits/digits.csv.gz");
//! assert!(digits.exists());
//! ```
#![deny(missing_docs)]

use std::path::{Path, PathBuf};

/// The workspace's `fixtures/` folder.
pub fn fixtures_dir() -> PathBuf {
    workspace_dir().join("fixtures")
}

/// The workspace root: `$REUSE_WORKSPACE_DIR` when set (a test or bench binary run away
/// from the checkout it was built in, as on a GPU machine), else the checkout this crate
/// was compiled in.
pub fn workspace_dir() -> PathBuf {
    match std::env::var_os("REUSE_WORKSPACE_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

/// The all-MiniLM-L6-v2 folder: `$REUSE_MINILM_DIR` (set by the workspace's
/// `.cargo/config.toml`), else the cache `cargo xtask setup` fills. An error says to run
/// the set-up when neither holds the model.
pub fn minilm_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::var_os("REUSE_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join(".cache/models/all-MiniLM-L6-v2"));
    if dir.join("model.safetensors").exists() {
        Ok(dir)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "{} has no model.safetensors; run `cargo xtask setup` (or set REUSE_MINILM_DIR)",
                dir.display()
            ),
        ))
    }
}

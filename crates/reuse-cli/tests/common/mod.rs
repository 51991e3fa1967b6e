//! Helpers the `reuse` command's integration tests share: run the binary, find the
//! workspace, check an exit status, compare tensors.
#![allow(dead_code)] // each test file uses its own subset

use std::path::PathBuf;
use std::process::{Command, Output};

use tch::Tensor;

/// The `reuse` binary under test.
pub fn reuse_bin() -> &'static str {
    env!("CARGO_BIN_EXE_reuse")
}

/// Runs `reuse ARGS` to completion.
pub fn reuse(args: &[&str]) -> Output {
    Command::new(reuse_bin()).args(args).output().unwrap()
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Asserts success (printing stdout and stderr otherwise) and returns stdout.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Largest elementwise |a - b|.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

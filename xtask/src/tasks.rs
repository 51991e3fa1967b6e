//! `cargo xtask test` (setup, fmt, clippy, tests) and `cargo xtask bench` (setup, then
//! the release-mode experiment runner that writes target/reuse-report/).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Result;
use clap::Args;

use crate::{cmd, setup};

/// The cargo that ran us (set by cargo), else `cargo` from PATH.
fn cargo(root: &Path) -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root);
    c
}

pub fn test(root: &Path) -> Result<()> {
    let start = Instant::now();
    setup::run(root)?;
    cmd::step(cargo(root).args(["fmt", "--all", "--", "--check"]))?;
    cmd::step(cargo(root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    cmd::step(cargo(root).args(["test", "--workspace"]))?;
    println!(
        "xtask test: all steps passed in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Args)]
pub struct BenchArgs {
    /// Run only these experiments (comma-separated ids).
    #[arg(long, value_name = "ID[,ID]")]
    only: Option<String>,
    /// Device to run on (default: CUDA if available, else CPU).
    #[arg(long, value_parser = ["cpu", "cuda"])]
    device: Option<String>,
    /// Smoke-test sizes: checks the experiments run end to end in minutes; the figures
    /// mean nothing and the report is marked quick.
    #[arg(long)]
    quick: bool,
    /// Every experiment at its full size, as on a GPU (on the CPU: hours; without it a
    /// CPU run gives experiments that have one their CPU size).
    #[arg(long)]
    full: bool,
    /// Seeds of the repeated runs: 0..N (default 3).
    #[arg(long)]
    seeds: Option<usize>,
    /// Further arguments passed to reuse-bench as they are (after `--`).
    #[arg(last = true)]
    rest: Vec<String>,
}

pub fn bench(root: &Path, args: &BenchArgs) -> Result<()> {
    setup::run(root)?;
    // A full run starts with the criterion micro-benchmarks; the report lists those
    // written from now on, never older ones.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let full = args.only.is_none() && !args.quick;
    // The experiments' binary and the criterion benches in one build: built together
    // they share one feature set (the benches' dev-dependencies included), so `cargo
    // bench` below finds everything built rather than compiling the workspace again.
    cmd::step(cargo(root).args([
        "build",
        "--release",
        "-p",
        "reuse-benches",
        "--bin",
        "reuse-bench",
        "--bench",
        "hot",
        "--bench",
        "ewc",
    ]))?;
    if full {
        let mut b = cargo(root);
        b.args([
            "bench",
            "-p",
            "reuse-benches",
            "--bench",
            "hot",
            "--bench",
            "ewc",
            "--",
            "--noplot",
        ]);
        cmd::step(&mut b)?;
    }
    let mut c = Command::new(
        target_dir(root)
            .join("release")
            .join(format!("reuse-bench{}", std::env::consts::EXE_SUFFIX)),
    );
    c.current_dir(root);
    // What `.cargo/config.toml`'s [env] gives programs cargo runs (it does not override
    // a variable already set): the binary runs here without cargo.
    for (var, rel) in [
        ("LIBTORCH", ".venv/libtorch"),
        ("REUSE_MINILM_DIR", ".cache/models/all-MiniLM-L6-v2"),
    ] {
        if std::env::var_os(var).is_none() {
            c.env(var, root.join(rel));
        }
    }
    if full {
        c.env("REUSE_CRITERION_SINCE", since.to_string());
    }
    if let Some(only) = &args.only {
        c.args(["--only", only]);
    }
    if let Some(device) = &args.device {
        c.args(["--device", device]);
    }
    if args.quick {
        c.arg("--quick");
    }
    if args.full {
        c.arg("--full");
    }
    if let Some(n) = args.seeds {
        c.args(["--seeds", &n.to_string()]);
    }
    c.args(&args.rest);
    cmd::step(&mut c)?;
    let report = target_dir(root).join(if args.quick {
        "reuse-report-quick"
    } else {
        "reuse-report"
    });
    for file in ["REPORT.md", "report.json"] {
        let path = report.join(file);
        if path.exists() {
            println!("report: {}", path.display());
        } else {
            println!("report: {} was not written", path.display());
        }
    }
    if args.only.is_none() && !args.quick {
        println!("`cargo xtask readme-figures` writes the README's figures from this report");
    }
    Ok(())
}

/// `$CARGO_TARGET_DIR` (relative to the root) or `<root>/target`.
pub fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

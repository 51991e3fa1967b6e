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
    dependent_crate_builds(root)?;
    println!(
        "xtask test: all steps passed in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A serde release newer than the workspace's lock. A user's project that already has
/// it must still resolve our crates (their requirements are carets; only tch is exact).
/// When Cargo.lock reaches this version the check below asks for a newer one.
const NEWER_SERDE: &str = "1.0.229";

/// Users depend on single crates: a throwaway crate outside the workspace that depends
/// on `reuse-peft` by path and pins a newer serde patch than our lock resolves and builds.
/// Its target folder (`target/dependent-check`) is kept between runs.
fn dependent_crate_builds(root: &Path) -> Result<()> {
    let lock = std::fs::read_to_string(root.join("Cargo.lock"))?;
    let locked = lock
        .split("[[package]]")
        .find(|p| p.contains("\nname = \"serde\"\n"))
        .and_then(|p| p.split("version = \"").nth(1))
        .and_then(|v| v.split('"').next())
        .unwrap_or("");
    let parse = |v: &str| -> Vec<u64> { v.split('.').filter_map(|x| x.parse().ok()).collect() };
    anyhow::ensure!(
        parse(NEWER_SERDE) > parse(locked),
        "xtask's NEWER_SERDE ({NEWER_SERDE}) is not newer than Cargo.lock's serde ({locked}): \
         set it to a newer published release"
    );
    let dir = tempfile::tempdir()?;
    let peft = root.join("crates/reuse-peft");
    std::fs::write(
        dir.path().join("Cargo.toml"),
        format!(
            "[package]\nname = \"reuse-dependent-check\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
             publish = false\n\n[dependencies]\nreuse-peft = {{ path = {:?} }}\n\
             serde = \"={NEWER_SERDE}\"\n\n[workspace]\n",
            peft.display().to_string()
        ),
    )?;
    std::fs::create_dir(dir.path().join("src"))?;
    std::fs::write(
        dir.path().join("src/main.rs"),
        "fn main() {\n    let c = reuse_peft::LoraConfig::new(8, 16.0, &[\"query\"]);\n    \
         println!(\"{}\", c.to_json());\n}\n",
    )?;
    println!(
        "==> a crate outside the workspace: reuse-peft (path) beside serde ={NEWER_SERDE} (Cargo.lock: {locked})"
    );
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(dir.path())
        .args(["build", "--quiet"])
        .env("CARGO_TARGET_DIR", target_dir(root).join("dependent-check"))
        // Outside the workspace its .cargo/config.toml is not read.
        .env("LIBTORCH", root.join(".venv/libtorch"));
    cmd::step(&mut c)
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

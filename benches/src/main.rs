//! `reuse-bench`: the end-to-end experiments behind `cargo xtask bench`.
//!
//! Each experiment is a named function returning metrics; the runner times it, shows
//! progress and writes `target/reuse-report/report.json`
//! (`{"commit", "dirty", "date", "device", "threads", "torch", "quick", "experiments":
//! [{"id", "about", "seconds", "metrics", "notes"}]}`) and a readable
//! `target/reuse-report/REPORT.md` (`--quick`: `target/reuse-report-quick/`, so a smoke
//! run never replaces a full report). Ratios against other tools are measured in the
//! same run, with the two sides' rounds interleaved. `cargo xtask readme-figures`
//! writes the README's figures from report.json.

mod claims;
mod experiments;
mod peer;
mod plots;
mod report;

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use tch::Device;

use experiments::{Ctx, EXPERIMENTS};
use report::{ExperimentResult, Report};

/// Run the reuse benchmark experiments.
#[derive(Parser)]
struct Args {
    /// Comma-separated experiment ids (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// cpu or cuda (default: cuda if available).
    #[arg(long)]
    device: Option<String>,
    /// List the experiments and exit.
    #[arg(long)]
    list: bool,
    /// Seeds of the repeated runs: 0..N (default 3; spreads need at least 2).
    #[arg(long, default_value_t = 3)]
    seeds: usize,
    /// Smoke-test sizes (few steps, small splits, few rounds): checks that the
    /// experiments run end to end in minutes; the figures mean nothing and the report
    /// is marked quick.
    #[arg(long)]
    quick: bool,
    /// Every experiment at its full size, as on a GPU: on the CPU this runs the
    /// GPU-sized experiments as well (hours). Without it a CPU run gives experiments
    /// that have one their CPU size.
    #[arg(long)]
    full: bool,
}

fn main() -> Result<()> {
    if let Ok(spec) = std::env::var(experiments::quant::QLORA_CHILD) {
        return experiments::quant::qlora_child(&spec);
    }
    if let Ok(spec) = std::env::var(experiments::dist::DIST_CHILD) {
        return experiments::dist::child(&spec);
    }
    if let Ok(spec) = std::env::var(experiments::llm_sft::SFT_CHILD) {
        return experiments::llm_sft::child(&spec);
    }
    if let Ok(spec) = std::env::var(experiments::llm::LOSS_CHILD) {
        return experiments::llm::loss_child(&spec);
    }
    let args = Args::parse();
    if args.list {
        for e in EXPERIMENTS {
            println!("{:24} {}", e.id, e.about);
        }
        return Ok(());
    }
    let device = match args.device.as_deref() {
        None => Device::cuda_if_available(),
        Some("cpu") => Device::Cpu,
        Some("cuda") if tch::Cuda::is_available() => Device::Cuda(0),
        Some("cuda") => bail!("--device cuda: libtorch sees no CUDA device"),
        Some(d) => bail!("--device: expected cpu or cuda, found `{d}`"),
    };
    for id in &args.only {
        if !EXPERIMENTS.iter().any(|e| e.id == id) {
            let ids: Vec<_> = EXPERIMENTS.iter().map(|e| e.id).collect();
            bail!("unknown experiment `{id}`; known: {}", ids.join(", "));
        }
    }
    let chosen: Vec<_> = EXPERIMENTS
        .iter()
        .filter(|e| {
            if args.only.is_empty() {
                e.default
            } else {
                args.only.iter().any(|o| o == e.id)
            }
        })
        .collect();
    if args.quick && args.full {
        bail!("--quick and --full ask for two different sizes: give one");
    }
    let mut ctx = Ctx::with_seeds(device, args.quick, args.seeds)?;
    ctx.full |= args.full;
    // GPU-sized experiments without a CPU size are left out of a plain CPU run (unless
    // `--full`), and experiments whose quick size says nothing out of a plain `--quick`
    // run; the report lists them.
    let plain = args.only.is_empty();
    let (chosen, skipped): (Vec<_>, Vec<_>) = chosen.into_iter().partition(|e| {
        !(plain && ((e.gpu_sized && !e.sizes.has_cpu() && !ctx.full) || (args.quick && !e.quick)))
    });
    let mut report = Report::new(device, &ctx.root, args.quick);
    report.seeds = ctx.seeds.clone();
    report.skipped = skipped
        .iter()
        .map(|e| {
            let why = if e.gpu_sized && !ctx.full {
                "sized for a GPU, with no CPU size: left out of a plain CPU run (`--only` or `--full` runs it)"
            } else {
                "its quick size would say nothing: left out of `--quick` (`--only` runs it)"
            };
            (e.id.to_string(), why.to_string())
        })
        .collect();
    // One bar over the whole run, each experiment weighted by its typical duration, so
    // that the ETA means something; experiments print their own progress lines above it.
    let weight = |e: &experiments::Experiment| u64::from(e.cpu_seconds.max(1));
    let total: u64 = chosen.iter().map(|e| weight(e)).sum();
    let bar = ProgressBar::new(total);
    bar.set_style(ProgressStyle::with_template(
        "[{elapsed_precise}] {bar:30} {percent}% experiment {prefix}: {msg} (ETA {eta})",
    )?);
    let n = chosen.len();
    for (i, e) in chosen.into_iter().enumerate() {
        bar.set_prefix(format!("{}/{n}", i + 1));
        bar.set_message(e.id);
        let start = Instant::now();
        let experiments::Outcome { metrics, notes } = (e.run)(&ctx, &bar)?;
        let seconds = start.elapsed().as_secs_f64();
        experiments::say(
            &bar,
            format!("{:24} {seconds:7.1}s  {}", e.id, report::summary(&metrics)),
        );
        report.experiments.push(ExperimentResult {
            id: e.id.to_string(),
            about: e.about.to_string(),
            seconds,
            size: ctx.size(e.sizes.has_cpu()).name().to_string(),
            metrics,
            notes,
        });
        bar.inc(weight(e));
    }
    bar.finish_and_clear();
    // Micro-benchmarks `cargo xtask bench` ran just before this run (never older ones).
    if let Some(since) = std::env::var("REUSE_CRITERION_SINCE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(|d| ctx.root.join(d))
            .unwrap_or_else(|| ctx.root.join("target"));
        report.micro_benchmarks = Some(report::micro_benches(&target.join("criterion"), since));
    }
    // Quick (smoke-test) reports go beside the full one, never over it.
    let dir = ctx.report_dir();
    report.write(&dir)?;
    println!("report: {}", dir.join("REPORT.md").display());
    Ok(())
}

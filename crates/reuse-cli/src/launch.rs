//! `reuse launch -n N [--master-port P] -- PROGRAM ARGS...`.

use std::ffi::OsString;

use anyhow::{bail, Result};

/// Arguments of `reuse launch`.
#[derive(clap::Args)]
pub struct Args {
    /// Processes to start.
    #[arg(short = 'n', long = "nproc", default_value_t = 2)]
    nproc: usize,
    /// The rendezvous port on 127.0.0.1 (default: a free one).
    #[arg(long)]
    master_port: Option<u16>,
    /// Threads per process (OMP_NUM_THREADS), when the environment does not set it
    /// (default: this machine's cores divided among the processes).
    #[arg(long)]
    threads: Option<usize>,
    /// The command every rank runs, after `--`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<OsString>,
}

/// Runs the ranks; returns the exit code to end with.
pub fn run(a: Args) -> Result<i32> {
    let Some((program, args)) = a.command.split_first() else {
        bail!("reuse launch: no command given after --");
    };
    // `reuse launch -- reuse lora train ...` runs this same binary.
    let program = if program == "reuse" {
        std::env::current_exe()?.into_os_string()
    } else {
        program.clone()
    };
    let mut l = reuse_dist::Launch::new(a.nproc);
    l.master_port = a.master_port;
    l.threads_per_rank = a.threads;
    Ok(l.run(&program, args)?)
}

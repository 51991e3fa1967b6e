//! `reuse launch`: start N ranks of a command on this machine, as
//! `torchrun --standalone --nproc_per_node N --no-python` does, for machines without
//! Python.

use std::ffi::OsString;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How to start the ranks.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Processes to start.
    pub nproc: usize,
    /// The store's port; a free one when `None`.
    pub master_port: Option<u16>,
    /// Intra-op threads per rank (`OMP_NUM_THREADS`) when the environment does not set
    /// it: by default the machine's cores divided among the ranks (torchrun sets 1).
    pub threads_per_rank: Option<usize>,
    /// After one rank fails, how long the others get to notice and exit before they are
    /// killed.
    pub grace: Duration,
    /// Extra variables every rank gets.
    pub env: Vec<(String, String)>,
}

impl Launch {
    /// `nproc` ranks on a free port.
    pub fn new(nproc: usize) -> Self {
        Self {
            nproc,
            master_port: None,
            threads_per_rank: None,
            grace: Duration::from_secs(30),
            env: Vec::new(),
        }
    }

    /// The variables rank `rank` gets (besides `OMP_NUM_THREADS`).
    pub fn env(&self, rank: usize, port: u16) -> Vec<(String, String)> {
        vec![
            ("RANK".into(), rank.to_string()),
            ("LOCAL_RANK".into(), rank.to_string()),
            ("WORLD_SIZE".into(), self.nproc.to_string()),
            ("LOCAL_WORLD_SIZE".into(), self.nproc.to_string()),
            ("MASTER_ADDR".into(), "127.0.0.1".into()),
            ("MASTER_PORT".into(), port.to_string()),
        ]
    }

    /// Runs `program args` as `nproc` ranks and waits for them. Returns the exit code:
    /// 0 when every rank succeeded, else the first failing rank's (after the others
    /// exit, or are killed once `grace` has passed).
    pub fn run(&self, program: &OsString, args: &[OsString]) -> Result<i32> {
        if self.nproc == 0 {
            return Err(Error::Invalid {
                what: "launch -n".into(),
                reason: "expected at least 1 process, found 0".into(),
            });
        }
        let port = match self.master_port {
            Some(p) => p,
            None => free_port()?,
        };
        let threads = self.threads_per_rank.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / self.nproc).max(1)
        });
        let mut children: Vec<Option<Child>> = Vec::new();
        for rank in 0..self.nproc {
            let mut cmd = Command::new(program);
            cmd.args(args)
                .envs(self.env.iter().cloned())
                .envs(self.env(rank, port));
            if std::env::var_os("OMP_NUM_THREADS").is_none() {
                cmd.env("OMP_NUM_THREADS", threads.to_string());
            }
            match cmd.spawn() {
                Ok(c) => children.push(Some(c)),
                Err(e) => {
                    kill_all(&mut children);
                    return Err(Error::Launch(format!(
                        "could not start rank {rank} (`{}`): {e}",
                        program.to_string_lossy()
                    )));
                }
            }
        }
        let mut failed: Option<(usize, i32, Instant)> = None;
        loop {
            let mut running = 0;
            for (rank, slot) in children.iter_mut().enumerate() {
                let Some(child) = slot else { continue };
                match child.try_wait() {
                    Ok(Some(status)) => {
                        *slot = None;
                        if !status.success() && failed.is_none() {
                            let code = status.code().unwrap_or(1);
                            eprintln!("reuse launch: rank {rank} exited with {status}");
                            failed = Some((rank, if code == 0 { 1 } else { code }, Instant::now()));
                        }
                    }
                    Ok(None) => running += 1,
                    Err(e) => return Err(Error::Launch(format!("waiting for rank {rank}: {e}"))),
                }
            }
            if running == 0 {
                return Ok(failed.map_or(0, |f| f.1));
            }
            if let Some((rank, code, at)) = failed {
                if at.elapsed() >= self.grace {
                    eprintln!(
                        "reuse launch: rank {rank} failed {} s ago; stopping the other ranks",
                        self.grace.as_secs()
                    );
                    kill_all(&mut children);
                    return Ok(code);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn kill_all(children: &mut [Option<Child>]) {
    for c in children.iter_mut().flatten() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A TCP port on loopback that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Launch(format!("finding a free port on 127.0.0.1: {e}")))?;
    Ok(l.local_addr()
        .map_err(|e| Error::Launch(e.to_string()))?
        .port())
}

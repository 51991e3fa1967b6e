//! A process group on c10d: rendezvous through a `TCPStore`, collectives through
//! `ProcessGroupGloo`, both the ones inside the libtorch that tch links.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tch::Tensor;

use crate::{Error, Result};

extern "C" {
    fn reuse_dist_new(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        iface: *const c_char,
        bind_host: *const c_char,
        err: *mut c_char,
        len: usize,
    ) -> *mut c_void;
    fn reuse_dist_free(group: *mut c_void);
    fn reuse_dist_all_reduce(
        group: *mut c_void,
        t: *mut c_void,
        op: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn reuse_dist_broadcast(
        group: *mut c_void,
        t: *mut c_void,
        root: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn reuse_dist_all_gather(
        group: *mut c_void,
        outs: *mut *mut c_void,
        n: c_int,
        input: *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn reuse_dist_barrier(group: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn reuse_dist_set_grad(
        param: *mut c_void,
        grad: *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

/// How elementwise values combine in [`ProcessGroup::all_reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// The sum over ranks.
    Sum,
    /// The maximum over ranks.
    Max,
    /// The minimum over ranks.
    Min,
}

/// Where and how to join a process group: what torchrun (or `reuse launch`) puts in the
/// environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// The store's host (`MASTER_ADDR`); rank 0 listens there.
    pub master_addr: String,
    /// The store's port (`MASTER_PORT`).
    pub master_port: u16,
    /// This process's rank (`RANK`), `0..world_size`.
    pub rank: usize,
    /// The number of processes (`WORLD_SIZE`).
    pub world_size: usize,
    /// This process's rank on its machine (`LOCAL_RANK`): the CUDA device it should use.
    pub local_rank: usize,
    /// How long rendezvous and every collective may wait for the other ranks
    /// (`REUSE_DIST_TIMEOUT_SECS`, default 300 s).
    pub timeout: Duration,
    /// The network interface Gloo binds (`GLOO_SOCKET_IFNAME`); by default the address
    /// of this machine's hostname, or loopback when `master_addr` is loopback.
    pub interface: Option<String>,
}

impl GroupConfig {
    /// The default timeout of rendezvous and collectives.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

    /// One process on loopback: rank `rank` of `world_size` at `127.0.0.1:port`.
    pub fn local(rank: usize, world_size: usize, port: u16) -> Self {
        Self {
            master_addr: "127.0.0.1".into(),
            master_port: port,
            rank,
            world_size,
            local_rank: rank,
            timeout: Self::DEFAULT_TIMEOUT,
            interface: None,
        }
    }

    /// Reads torchrun's variables. `Ok(None)` when `WORLD_SIZE` is unset (not launched
    /// as a group); a variable that is set but malformed, or one that is missing once
    /// `WORLD_SIZE` is set, is an error naming it.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`GroupConfig::from_env`] over any lookup of variables.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |var: &str, v: &str| -> Result<usize> {
            v.trim().parse::<usize>().map_err(|_| Error::Env {
                var: var.into(),
                reason: format!("expected a non-negative integer, found `{v}`"),
            })
        };
        let need = |var: &str| -> Result<String> {
            get(var).ok_or_else(|| Error::Env {
                var: var.into(),
                reason: "not set (WORLD_SIZE is set, so this process is one rank of a \
                         group; torchrun and `reuse launch` set it)"
                    .into(),
            })
        };
        let world_size = num("WORLD_SIZE", &world)?;
        if world_size == 0 {
            return Err(Error::Env {
                var: "WORLD_SIZE".into(),
                reason: "expected at least 1, found 0".into(),
            });
        }
        let rank = num("RANK", &need("RANK")?)?;
        if rank >= world_size {
            return Err(Error::Env {
                var: "RANK".into(),
                reason: format!("expected a rank below WORLD_SIZE {world_size}, found {rank}"),
            });
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(v) => num("LOCAL_RANK", &v)?,
            None => rank,
        };
        let master_addr = need("MASTER_ADDR")?;
        if master_addr.trim().is_empty() {
            return Err(Error::Env {
                var: "MASTER_ADDR".into(),
                reason: "expected a host name or address, found an empty string".into(),
            });
        }
        let port = need("MASTER_PORT")?;
        let master_port = port.trim().parse::<u16>().map_err(|_| Error::Env {
            var: "MASTER_PORT".into(),
            reason: format!("expected a port number (0-65535), found `{port}`"),
        })?;
        let timeout = match get("REUSE_DIST_TIMEOUT_SECS") {
            Some(v) => {
                let s: f64 = v
                    .trim()
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s > 0.0)
                    .ok_or_else(|| Error::Env {
                        var: "REUSE_DIST_TIMEOUT_SECS".into(),
                        reason: format!("expected a positive number of seconds, found `{v}`"),
                    })?;
                Duration::from_secs_f64(s)
            }
            None => Self::DEFAULT_TIMEOUT,
        };
        Ok(Some(Self {
            master_addr,
            master_port,
            rank,
            world_size,
            local_rank,
            timeout,
            interface: get("GLOO_SOCKET_IFNAME").filter(|s| !s.is_empty()),
        }))
    }

    fn is_loopback(&self) -> bool {
        matches!(
            self.master_addr.as_str(),
            "127.0.0.1" | "localhost" | "::1" | "[::1]"
        )
    }
}

/// A group of processes that run collectives together, on libtorch's Gloo backend (CPU
/// tensors, and CUDA tensors through host memory).
///
/// Every rank must call the same collectives in the same order with tensors of the same
/// shape and dtype. A rank that exits or stops answering makes the others' next
/// collective fail with [`Error::Collective`] (at once when its sockets close, else after
/// the timeout), never hang or abort the process.
pub struct ProcessGroup {
    ptr: NonNull<c_void>,
    config: GroupConfig,
    reduced_bytes: AtomicU64,
}

// SAFETY: c10d process groups are used from many threads by PyTorch itself (every call
// goes through Gloo's own work queue); the pointer is owned here and freed once, in Drop.
unsafe impl Send for ProcessGroup {}
// SAFETY: as above; every method takes `&self` and c10d serialises collectives itself.
unsafe impl Sync for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.config.rank)
            .field("world_size", &self.config.world_size)
            .field("master", &self.addr())
            .finish()
    }
}

const ERR_LEN: usize = 2048;

fn message(err: &[c_char]) -> String {
    // SAFETY: the shim always NUL-terminates within `err`'s length.
    unsafe { CStr::from_ptr(err.as_ptr()) }
        .to_string_lossy()
        .trim()
        .to_string()
}

impl ProcessGroup {
    /// Joins the group `config` describes: rank 0 hosts the store and waits for the
    /// others; every rank then connects to every other through Gloo. Fails with
    /// [`Error::Rendezvous`] when the group is not complete within the timeout.
    pub fn new(config: GroupConfig) -> Result<Self> {
        let addr = format!("{}:{}", config.master_addr, config.master_port);
        let cstr = |s: &str, var: &str| {
            CString::new(s).map_err(|_| Error::Env {
                var: var.into(),
                reason: "contains a NUL byte".into(),
            })
        };
        let host = cstr(&config.master_addr, "MASTER_ADDR")?;
        let iface = cstr(
            config.interface.as_deref().unwrap_or(""),
            "GLOO_SOCKET_IFNAME",
        )?;
        let bind = CString::new(if config.is_loopback() {
            "127.0.0.1"
        } else {
            ""
        })
        .expect("no NUL");
        let mut err = [0 as c_char; ERR_LEN];
        // SAFETY: every pointer is a live NUL-terminated string or a buffer of `ERR_LEN`;
        // the shim catches every C++ exception and returns null with a message on error.
        let p = unsafe {
            reuse_dist_new(
                host.as_ptr(),
                config.master_port as c_int,
                config.rank as c_int,
                config.world_size as c_int,
                config.timeout.as_millis() as i64,
                iface.as_ptr(),
                bind.as_ptr(),
                err.as_mut_ptr(),
                ERR_LEN,
            )
        };
        let ptr = NonNull::new(p).ok_or_else(|| Error::Rendezvous {
            rank: config.rank,
            world: config.world_size,
            addr,
            message: message(&err),
        })?;
        Ok(Self {
            ptr,
            config,
            reduced_bytes: AtomicU64::new(0),
        })
    }

    /// Joins the group torchrun's variables describe; `Ok(None)` when the process was
    /// not launched as one rank of a group (no `WORLD_SIZE`).
    pub fn from_env() -> Result<Option<Self>> {
        GroupConfig::from_env()?.map(Self::new).transpose()
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.config.rank
    }

    /// The number of processes.
    pub fn world_size(&self) -> usize {
        self.config.world_size
    }

    /// Whether this is rank 0, the one that writes files and prints progress.
    pub fn is_main(&self) -> bool {
        self.config.rank == 0
    }

    /// The configuration the group was joined with.
    pub fn config(&self) -> &GroupConfig {
        &self.config
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.config.master_addr, self.config.master_port)
    }

    /// Bytes this process has sent into [`ProcessGroup::all_reduce`] so far (the
    /// all-reduce volume: with data parallelism, the trainable parameters' gradients).
    pub fn all_reduced_bytes(&self) -> u64 {
        self.reduced_bytes.load(Ordering::Relaxed)
    }

    fn collective(&self, op: &str, f: impl FnOnce(*mut c_char) -> c_int) -> Result<()> {
        let mut err = [0 as c_char; ERR_LEN];
        if f(err.as_mut_ptr()) == 0 {
            return Ok(());
        }
        Err(Error::Collective {
            rank: self.config.rank,
            world: self.config.world_size,
            op: op.into(),
            timeout_s: self.config.timeout.as_secs_f64(),
            message: message(&err),
        })
    }

    fn check(&self, op: &str, t: &Tensor) -> Result<()> {
        if !t.defined() || !t.is_contiguous() {
            return Err(Error::Invalid {
                what: format!("{op} tensor"),
                reason: format!(
                    "expected a defined, contiguous tensor, found one of shape {:?} that is not",
                    if t.defined() { t.size() } else { vec![] }
                ),
            });
        }
        Ok(())
    }

    /// Combines `t` elementwise over every rank, in place: afterwards every rank holds
    /// the same values.
    pub fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        self.check("all_reduce", t)?;
        let code = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
            ReduceOp::Min => 2,
        };
        self.collective("all_reduce", |err| {
            // SAFETY: `t` is a live contiguous tensor and `err` a buffer of ERR_LEN.
            unsafe { reuse_dist_all_reduce(self.ptr.as_ptr(), t.as_ptr() as _, code, err, ERR_LEN) }
        })?;
        let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        self.reduced_bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Copies rank `root`'s `t` into every rank's `t`, in place.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        self.check("broadcast", t)?;
        if root >= self.config.world_size {
            return Err(Error::Invalid {
                what: "broadcast root".into(),
                reason: format!(
                    "expected a rank below {}, found {root}",
                    self.config.world_size
                ),
            });
        }
        self.collective("broadcast", |err| {
            // SAFETY: as in `all_reduce`.
            unsafe {
                reuse_dist_broadcast(
                    self.ptr.as_ptr(),
                    t.as_ptr() as _,
                    root as c_int,
                    err,
                    ERR_LEN,
                )
            }
        })
    }

    /// Every rank's `t`, in rank order (every rank passes a tensor of the same shape).
    pub fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        self.check("all_gather", t)?;
        let outs: Vec<Tensor> = (0..self.config.world_size)
            .map(|_| t.empty_like())
            .collect();
        let mut ptrs: Vec<*mut c_void> = outs.iter().map(|o| o.as_ptr() as *mut c_void).collect();
        self.collective("all_gather", |err| {
            // SAFETY: `ptrs` point at `outs`, live for the call; as in `all_reduce`.
            unsafe {
                reuse_dist_all_gather(
                    self.ptr.as_ptr(),
                    ptrs.as_mut_ptr(),
                    ptrs.len() as c_int,
                    t.as_ptr() as _,
                    err,
                    ERR_LEN,
                )
            }
        })?;
        Ok(outs)
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        self.collective("barrier", |err| {
            // SAFETY: as in `all_reduce`.
            unsafe { reuse_dist_barrier(self.ptr.as_ptr(), err, ERR_LEN) }
        })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `reuse_dist_new` and is freed only here.
        unsafe { reuse_dist_free(self.ptr.as_ptr()) }
    }
}

/// Gives `param` the gradient `grad` (same shape, dtype and device), where a backward
/// pass gave it none.
pub(crate) fn set_grad(param: &Tensor, grad: &Tensor) -> Result<()> {
    let mut err = [0 as c_char; ERR_LEN];
    // SAFETY: both are live tensors; the shim catches C++ exceptions.
    let rc = unsafe {
        reuse_dist_set_grad(
            param.as_ptr() as _,
            grad.as_ptr() as _,
            err.as_mut_ptr(),
            ERR_LEN,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Invalid {
            what: "gradient".into(),
            reason: message(&err),
        })
    }
}

//! reuse-dist: data-parallel training on PyTorch's own distributed engine.
//!
//! When a team outgrows one device, the same training loop runs as N processes, on the
//! engine PyTorch users already run: libtorch's c10d, which the torch wheel ships inside
//! `libtorch_cpu` (the `TCPStore` rendezvous and the Gloo backend). A small C++ shim
//! (`cpp/c10d_shim.cpp`, compiled by this crate's build script against the same libtorch)
//! exposes the few calls needed; this crate wraps them in a safe API where a dead peer
//! or a timeout is an [`Error`], never an abort or a hang.
//!
//! * [`group`]: [`ProcessGroup`] — join from torchrun's variables (`RANK`, `WORLD_SIZE`,
//!   `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or a [`GroupConfig`]; all-reduce,
//!   broadcast, all-gather, barrier.
//! * [`parallel`]: [`DataParallel`], a technique for core's trainer (rank 0's
//!   parameters broadcast at the start, each rank's share of every batch, trainable
//!   gradients all-reduced in buckets, the loss reduced, rank 0 alone writing the run
//!   file), so N processes train the weights one process trains on the combined batch.
//! * [`launch`]: start N ranks of a command on one machine (`reuse launch -n N -- ...`)
//!   where torchrun is not at hand; under torchrun (`torchrun --nproc_per_node N
//!   --no-python reuse ...`) nothing changes.
//!
//! ```
//! use reuse_dist::{GroupConfig, ProcessGroup, ReduceOp};
//! use tch::Tensor;
//!
//! # fn main() -> reuse_dist::Result<()> {
//! // A group of one process (the launcher would start WORLD_SIZE of them, each with its
//! // RANK, and `ProcessGroup::from_env()` would join it).
//! let port = reuse_dist::launch::free_port()?;
//! let group = ProcessGroup::new(GroupConfig::local(0, 1, port))?;
//! let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
//! group.all_reduce(&t, ReduceOp::Sum)?; // the sum over every rank's `t`
//! assert_eq!(Vec::<f32>::try_from(&t)?, [1.0, 2.0, 3.0]);
//! assert_eq!(group.all_gather(&t)?.len(), 1);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod error;
pub mod group;
pub mod launch;
pub mod parallel;

pub use error::{Error, Result};
pub use group::{GroupConfig, ProcessGroup, ReduceOp};
pub use launch::Launch;
pub use parallel::{DataParallel, Shard};

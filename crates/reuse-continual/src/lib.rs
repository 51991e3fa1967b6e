//! reuse-continual: learn task after task without forgetting the earlier ones.
//!
//! Retraining on everything each time a new task arrives costs the whole history again;
//! fine-tuning on the new task alone forgets the old ones (catastrophic forgetting). The
//! techniques here plug into reuse-core's trainer as [`reuse_core::Technique`]s and
//! compose with the others (a LoRA adapter, KD):
//!
//! * [`ewc`]: elastic weight consolidation with the exact per-sample Fisher or
//!   Avalanche's batched empirical one, separate or online (the docs say how their lambda
//!   scales differ);
//! * [`replay`]: reservoir, class-balanced and task-balanced memories of fixed size,
//!   seeded, mixed into each batch with their task ids, saved with the run;
//! * [`packnet`]: parameter isolation by iterative pruning, with earlier tasks' weights
//!   kept bit for bit and per-task inference masks; [`heads`]: one head per task, routed
//!   by task id; [`deltas`]: one delta (a LoRA adapter) per task on a frozen base, chosen
//!   per example by task id, also in mixed-task batches;
//! * [`metrics`]: average accuracy, forgetting, backward and forward transfer from the
//!   accuracy matrix, as Avalanche defines them, as a table, JSON and a PNG heat map;
//! * [`scenario`]: class-, task- and domain-incremental streams from any labelled
//!   [`reuse_core::data::BatchSource`], and [`scenario::run_stream`] to train one.
//!
//! Errors are reuse-core's [`reuse_core::Error`].
//!
//! ```no_run
//! use std::rc::Rc;
//! use reuse_continual::ewc::{Ewc, EwcConfig, FisherKind};
//! use reuse_continual::scenario::{run_stream, Scenario};
//! use reuse_core::{data, Activation, Mlp, TrainConfig, Trainer};
//! use tch::Device;
//!
//! # fn main() -> reuse_core::Result<()> {
//! let d = data::load_digits(std::path::Path::new("digits.csv.gz"))?;
//! // Five tasks of two digits each, one 10-way head, no task id at test time.
//! let splits: Vec<Vec<i64>> = (0..5).map(|t| vec![2 * t, 2 * t + 1]).collect();
//! let stream = Scenario::class_incremental(Rc::new(d.train), Rc::new(d.test), &splits)?;
//! let net = Mlp::new(&[64, 400, 400, 10], Activation::Relu, Device::Cpu)?;
//! let mut ewc = Ewc::new(EwcConfig::new(10.0, FisherKind::Exact))?;
//! let mut trainer = Trainer::new(TrainConfig { epochs: 5, ..Default::default() });
//! let r = run_stream(&stream, &net, &mut trainer, &mut [&mut ewc], 256, false)?;
//! println!("{}", r.to_markdown());
//! r.save_heatmap_png(std::path::Path::new("ewc.png"), "EWC on split digits")?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod deltas;
pub mod ewc;
pub mod heads;
pub mod metrics;
pub mod packnet;
pub mod replay;
pub mod scenario;

pub use deltas::TaskDeltas;
pub use ewc::{Ewc, EwcConfig, EwcMode, FisherKind};
pub use heads::{Features, MultiHead};
pub use metrics::AccuracyMatrix;
pub use packnet::PackNet;
pub use replay::{BufferPolicy, PerBatch, Replay, ReplayBuffer, ReplayConfig};
pub use scenario::{Experience, Scenario, ScenarioKind, TaskData};

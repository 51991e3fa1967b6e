//! reuse-core: the shared ground every `reuse` technique stands on.
//!
//! `reuse` carries what a trained model already knows into the next model
//! (distillation, LoRA and adapters, continual learning, growth, quantization). Those
//! techniques live in their own crates; this crate gives them a common vocabulary:
//!
//! * [`Checkpoint`]: named tensors + metadata in safetensors, validated reads, atomic
//!   writes, f32/f16/bf16/i8/u8/i32/i64 ([`dtype`] has the casts).
//! * [`Params`]: parameters by dotted name; glob/regex selection, freeze, count,
//!   snapshot/restore.
//! * [`Linear`] with named delta slots ([`LinearDelta`]): LoRA, DoRA, IA3 and quantized
//!   storage plug in here from other crates; core never depends on a technique crate.
//! * [`Model`]: every model addresses its linears and block outputs by the Hugging Face
//!   dotted path, so techniques attach by name. [`Mlp`], [`ClassificationHead`] and the
//!   BERT encoder in [`models::bert`] implement it.
//! * [`data`]: seeded batching and the fixture loaders; [`trainer`]: a loop that
//!   composes [`Technique`]s (extra losses, batch rewriting, gradient edits, end-of-task
//!   work, saved state) with checkpointable optimizers.
//!
//! libtorch (through `tch`) does the arithmetic, so everything runs on CPU and CUDA;
//! every API takes a [`tch::Device`] explicitly.
//!
//! ```no_run
//! use reuse_core::{data, trainer, Activation, Mlp, Model, TrainConfig, Trainer};
//! use reuse_core::trainer::{StepOutputs, Trainable};
//! use tch::Device;
//!
//! struct Net(Mlp);
//! impl Trainable for Net {
//!     fn parameters(&self) -> reuse_core::Params { self.0.params() }
//!     fn forward(&self, b: &data::Batch, train: bool) -> reuse_core::Result<StepOutputs> {
//!         Ok(StepOutputs::logits(self.0.forward(&b.inputs, train)))
//!     }
//! }
//!
//! # fn main() -> reuse_core::Result<()> {
//! let digits = data::load_digits(&data::fixtures_dir().join("digits/digits.csv.gz"))?;
//! let net = Net(Mlp::new(&[64, 128, 10], Activation::Relu, Device::Cpu)?);
//! let mut trainer = Trainer::new(TrainConfig { epochs: 20, ..Default::default() });
//! trainer.fit(&net, &digits.train, None, &mut [])?;
//! let acc = trainer::accuracy(&net, &digits.test, 256, Device::Cpu)?;
//! println!("test accuracy {acc:.3}");
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod checkpoint;
pub mod data;
pub mod dtype;
mod error;
pub mod linear;
pub mod mlp;
pub mod model;
pub mod models;
pub mod optim;
pub mod params;
pub mod trainer;

pub use checkpoint::Checkpoint;
pub use error::{Error, Result};
pub use linear::{Linear, LinearDelta};
pub use mlp::{ClassificationHead, Mlp};
pub use model::{Activation, Model, OutputDelta, OutputSlots};
pub use optim::{Optimizer, OptimizerKind, Schedule};
pub use params::{Params, Snapshot};
pub use trainer::{Technique, TrainConfig, Trainer};

/// CUDA if libtorch sees a GPU, else CPU.
pub fn default_device() -> tch::Device {
    tch::Device::cuda_if_available()
}

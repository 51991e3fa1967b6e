//! reuse-core: the shared ground every `reuse` technique stands on.
//!
//! `reuse` carries what a trained model already knows into the next model
//! (distillation, LoRA and adapters, continual learning, growth, quantization). Those
//! techniques live in their own crates; this crate gives them a common vocabulary:
//!
//! * [`Checkpoint`]: named tensors + metadata in safetensors, validated reads, atomic
//!   writes, f32/f64/f16/bf16/i8/u8/i32/i64 ([`dtype`] has the casts).
//! * [`Params`]: parameters by dotted name; glob/regex selection, freeze, count,
//!   snapshot/restore.
//! * [`Linear`] with named delta slots ([`LinearDelta`]): LoRA, DoRA, IA3 and quantized
//!   storage plug in here from other crates; core never depends on a technique crate.
//! * [`Model`]: every model addresses its linears and block outputs by the Hugging Face
//!   dotted path, so techniques attach by name. [`Mlp`], [`ClassificationHead`] and the
//!   BERT encoder in [`models::bert`] implement it.
//! * [`data`]: batches that carry their example indices, task ids and padding, seeded
//!   batching, and loaders; [`trainer`]: a loop that composes [`Technique`]s, each hook
//!   seeing a [`StepContext`]: forward options (hidden states, attentions), task
//!   begin/end, batch rewriting, task-loss weights and extra losses, gradient edits,
//!   after-step fixes, and state saved with a resumable run file.
//! * [`gguf`]: llama.cpp's GGUF files, read with every count and offset checked against
//!   the file before anything is allocated; dequantized (F32/F16/BF16, Q8_0, Q4_0, Q4_1,
//!   Q5_0/Q5_1, Q4_K, Q6_K) into PyTorch's layout with Hugging Face names, config and
//!   tokenizer.
//! * [`optim`]: AdamW and SGD over tensor ops, so their state (per-parameter step
//!   counts, f32 masters for bf16 weights) is plain tensors that a run file holds.
//!
//! libtorch (through `tch`) does the arithmetic, so everything runs on CPU and CUDA;
//! every API takes a [`tch::Device`] explicitly. Models and data are found from the
//! paths and devices a caller passes; nothing here knows where a workspace keeps them.
//!
//! ```no_run
//! use std::path::Path;
//! use reuse_core::{data, trainer, Activation, Mlp, RunStateConfig, SaveParams, TrainConfig, Trainer};
//! use tch::Device;
//!
//! # fn main() -> reuse_core::Result<()> {
//! let digits = data::load_digits(Path::new("digits.csv.gz"))?;
//! // An MLP is a `Trainable` model: it classifies a batch's inputs.
//! let net = Mlp::new(&[64, 128, 10], Activation::Relu, Device::Cpu)?;
//! let mut trainer = Trainer::new(TrainConfig {
//!     epochs: 20,
//!     // Save a resumable run every 100 steps; a killed run picks up where it stopped.
//!     run_state: Some(RunStateConfig {
//!         path: "run.safetensors".into(),
//!         every: 100,
//!         params: SaveParams::Trainable,
//!     }),
//!     ..Default::default()
//! });
//! trainer.resume(&net, &mut [])?;
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
pub mod gguf;
pub mod linear;
pub mod loss;
pub mod mlp;
pub mod model;
pub mod models;
pub mod optim;
pub mod params;
mod shim;
pub mod trainer;

pub use checkpoint::Checkpoint;
pub use error::{Error, Result};
pub use linear::{
    capture_linears, CapturedLinear, Linear, LinearDelta, StorageLoader, WeightStorage,
    WeightTransform,
};
pub use mlp::{ClassificationHead, Mlp};
pub use model::{
    Activation, Evaluation, ForwardOptions, Model, OutputDelta, OutputSlots, StepOutputs, Trainable,
};
pub use optim::{Optimizer, OptimizerKind, Schedule};
pub use params::{Params, Snapshot};
pub use trainer::{
    RunStateConfig, SaveParams, StepContext, TaskContext, Technique, TrainConfig, TrainReport,
    Trainer,
};

/// CUDA if libtorch sees a GPU, else CPU.
pub fn default_device() -> tch::Device {
    tch::Device::cuda_if_available()
}

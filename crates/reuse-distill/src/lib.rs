//! Knowledge distillation on reuse-core: a big teacher's soft labels (and hidden states)
//! train a small student, and the teacher can run once instead of every epoch.
//!
//! - [`losses`]: temperature-softened KD with the T² factor, forward / reverse KL and
//!   generalised JSD, batchmean with a mask, mixing with hard-label cross-entropy by
//!   alpha, and top-k KD from cached teacher log-probabilities;
//! - [`features`]: hidden-state MSE (with an optional projection), cosine, attention MSE,
//!   attention- and value-relation KL, and the [`features::LayerMap`] that pairs layers;
//! - [`teacher`]: the [`Teacher`] trait (every reuse-core `Trainable` is one) and the
//!   fingerprints a cache records;
//! - [`cache`]: a teacher's outputs stored once in safetensors shards, looked up by the
//!   example indices each batch carries;
//! - [`distiller`]: the [`Distiller`] technique for core's trainer;
//! - [`student`]: students cut from their teacher (embeddings plus chosen layers), saved
//!   as model folders Hugging Face loads; [`embed`]: a smaller sentence-embedding model
//!   trained to match its teacher's embeddings.
//! - [`lm`]: causal-LM students cut from a Llama-family teacher (any subset of its
//!   blocks) and written as Hugging Face folders, and the same-vocabulary check
//!   token-level KD needs; the [`Distiller`] does token-level KD on causal LMs (the
//!   next-token shift, prompt and padding masks).
//! - [`vocab`]: vocabulary trimming, the embedding table cut to the tokens a domain's
//!   text uses (most of a small student's bytes are that table).
//!
//! The losses are plain functions for users' own loops; the technique composes them
//! inside [`reuse_core::Trainer`].
//!
//! ```
//! use reuse_core::data::TensorDataset;
//! use reuse_core::{Activation, Mlp, TrainConfig, Trainer};
//! use reuse_distill::losses::KdConfig;
//! use reuse_distill::{Distiller, TeacherSource};
//! use tch::{Device, Kind, Tensor};
//!
//! # fn main() -> reuse_core::Result<()> {
//! let x = Tensor::randn([64, 8], (Kind::Float, Device::Cpu));
//! let y = x.sum_dim_intlist([1i64].as_slice(), false, Kind::Float).gt(0.0).to_kind(Kind::Int64);
//! let data = TensorDataset::new(x, y)?;
//! let teacher = Mlp::new(&[8, 64, 2], Activation::Relu, Device::Cpu)?;
//! Trainer::new(TrainConfig { epochs: 5, ..Default::default() }).fit(&teacher, &data, None, &mut [])?;
//!
//! let student = Mlp::new(&[8, 4, 2], Activation::Relu, Device::Cpu)?;
//! // 0.5 * CE(labels) + 0.5 * KL(teacher || student) at T = 2, with T².
//! let mut kd = Distiller::new(TeacherSource::Live(&teacher), KdConfig::new(2.0), 0.5)?;
//! let mut trainer = Trainer::new(TrainConfig { epochs: 5, ..Default::default() });
//! trainer.begin_task(0, &student, &data, &mut [&mut kd])?; // checks classes, vocabularies
//! trainer.fit(&student, &data, None, &mut [&mut kd])?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod cache;
pub mod distiller;
pub mod embed;
pub mod features;
pub mod lm;
pub mod losses;
pub mod student;
pub mod teacher;
pub mod vocab;

pub use cache::{
    build_cache, build_cache_with_progress, CacheConfig, CacheManifest, CacheSpec, CachedOutputs,
    ShardInfo, TeacherCache,
};
pub use distiller::{Distiller, HiddenLoss, HiddenTerm, TeacherSource};
pub use teacher::{dataset_fingerprint, Teacher};

//! reuse-peft: parameter-efficient fine-tuning that moves both ways with Hugging Face
//! PEFT.
//!
//! Train under 1% of a model's weights, one adapter per task, merged or swapped at
//! will, and hand the adapter to Python (or take one from it):
//!
//! * [`LoraConfig`] has PEFT's field names and defaults (r=8, lora_alpha=8, target
//!   modules as suffixes or a full-match regex, rsLoRA, DoRA, rank/alpha patterns,
//!   layers_to_transform, modules_to_save, bias);
//! * [`LoraLayer`] plugs into reuse-core's `Linear` delta slots, so any reuse model
//!   (the BERT encoder, an MLP) takes adapters by Hugging Face path;
//! * [`LoraModel`] manages named adapters: add, load, save, set active (several sum),
//!   delete, merge / unmerge, merge-and-unload, mixed-adapter batches;
//! * [`io`] reads and writes `adapter_config.json` + `adapter_model.safetensors`
//!   exactly as PEFT does;
//! * [`bottleneck`] has Houlsby, Pfeiffer and parallel adapters on block outputs.
//!
//! What an adapter owns is found by structure, never by name matching: its tensors are
//! those of the linears that carry a delta of its name. An adapter name that is a
//! segment of one of the model's parameter names (`query`, `output`, `dense`, `0`,
//! `weight`...) is refused. A load writes only its own LoRA tensors, its
//! `modules_to_save` and the biases its `bias` setting names (any other key is an error
//! naming it, and nothing is attached); biases it writes into the base are put back by
//! `delete_adapter`. A `modules_to_save` module the model lacks (a classification head
//! loaded into a bare encoder) is set aside and reported in [`LoadedAdapter`], and
//! saving the adapter writes it back.
//!
//! ```no_run
//! use reuse_core::models::Bert;
//! use reuse_peft::{LoraConfig, LoraModel};
//! use tch::{Device, Kind};
//!
//! # fn main() -> reuse_peft::Result<()> {
//! let bert = Bert::load(std::path::Path::new("all-MiniLM-L6-v2"), Device::Cpu, Kind::Float)?;
//! let mut model = LoraModel::new(bert);
//! model.add_adapter("default", LoraConfig::new(8, 16.0, &["query", "value"]))?;
//! println!("trainable: {}", model.trainable_parameters().count()); // 73,728
//! model.save_adapter("default", std::path::Path::new("my-adapter"))?; // loads in PEFT
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod bottleneck;
pub mod config;
mod error;
pub mod io;
pub mod lora;
pub mod model;

pub use bottleneck::{BottleneckConfig, BottleneckKind};
pub use config::LoraConfig;
pub use error::{PeftError, Result};
pub use io::LoadedAdapter;
pub use lora::LoraLayer;
pub use model::{LoraModel, BASE};

//! Parameter-efficient fine-tuning (planned): LoRA, rsLoRA, DoRA and bottleneck adapters on reuse-core's `Linear` delta slots, reading and writing Hugging Face PEFT files.
//!
//! This crate is a placeholder in the workspace layout; its API arrives with its issue.
#![deny(missing_docs)]

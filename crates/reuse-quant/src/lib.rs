//! Quantization (planned): per-channel int8 and group-wise int4 weight storage that plugs into reuse-core's `Linear`, and a quantized base for QLoRA.
//!
//! This crate is a placeholder in the workspace layout; its API arrives with its issue.
#![deny(missing_docs)]

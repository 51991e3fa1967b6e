//! Knowledge distillation (planned): temperature-softened KL with the T^2 factor, feature and attention losses, offline teacher caches and student initialisation from teacher layers, all on reuse-core's models and trainer.
//!
//! This crate is a placeholder in the workspace layout; its API arrives with its issue.
#![deny(missing_docs)]

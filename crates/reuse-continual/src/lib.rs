//! Continual learning (planned): EWC and online EWC, replay buffers, PackNet-style parameter isolation and the Avalanche accuracy-matrix metrics, as techniques for reuse-core's trainer.
//!
//! This crate is a placeholder in the workspace layout; its API arrives with its issue.
#![deny(missing_docs)]

//! Knowledge distillation: temperature-softened KD with the T^2 factor, forward / reverse
//! KL and generalised JSD, top-k KD from cached teacher log-probs ([`losses`]), and
//! feature and attention losses with a layer map ([`features`]).
#![deny(missing_docs)]

pub mod features;
pub mod losses;
pub mod teacher;

pub use teacher::{dataset_fingerprint, Teacher};

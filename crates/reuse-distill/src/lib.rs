//! Knowledge distillation: temperature-softened KD with the T^2 factor, forward / reverse
//! KL and generalised JSD, top-k KD from cached teacher log-probs ([`losses`]), and
//! feature and attention losses with a layer map ([`features`]); students cut from their
//! teacher's layers and saved as complete model folders ([`student`]), and a smaller
//! sentence-embedding model trained on unlabeled text against a cached teacher
//! ([`embed`]).
#![deny(missing_docs)]

pub mod embed;
pub mod features;
pub mod losses;
pub mod student;
pub mod teacher;

pub use teacher::{dataset_fingerprint, Teacher};

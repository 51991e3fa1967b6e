//! Knowledge distillation: temperature-softened KD with the T^2 factor, forward / reverse
//! KL and generalised JSD, top-k KD from cached teacher log-probs ([`losses`]), feature
//! and attention losses with a layer map ([`features`]), and teacher caches that store a
//! teacher's outputs once so students train with no teacher in memory ([`cache`]).
#![deny(missing_docs)]

pub mod cache;
pub mod embed;
pub mod features;
pub mod losses;
pub mod student;
pub mod teacher;

pub use cache::{
    build_cache, build_cache_with_progress, CacheConfig, CacheManifest, CacheSpec, CachedOutputs,
    ShardInfo, TeacherCache,
};
pub use teacher::{dataset_fingerprint, Teacher};

//! Teacher caches: run the teacher once over a dataset, store its outputs in safetensors
//! shards, then distil students with no teacher in memory.
//!
//! A cache holds, per example (`[n, C]`) or per token (`[n, L, V]` with the mask), either
//! the teacher's full logits or its top-k log-probabilities (`log_softmax` at `T = 1`)
//! with their class indices, as [`topk_kd_loss`](crate::losses::topk_kd_loss) consumes
//! them, and optionally the pooled features the teacher's head sees.
//!
//! # On disk
//!
//! A folder with:
//!
//! * `shard-00000.safetensors`, `shard-00001.safetensors`, ...: shard `s` holds examples
//!   `s * shard_size .. min(n, (s + 1) * shard_size)` in index order. Tensors:
//!   `logits` (full logits) or `topk_logprobs` + `topk_indices` (i32), in the cache's
//!   dtype (f32, f16 or bf16), `[rows, C]` or `[rows, L_s, V]` per token, where `L_s` is
//!   the shard's longest example; per token also `mask` (u8 `[rows, L_s]`) and `lengths`
//!   (i64 `[rows]`: one past each row's last unmasked position); with `pooled`, `pooled`
//!   `[rows, H]`. Padded and masked positions hold zeros. Metadata: one key,
//!   `reuse_teacher_cache`, a JSON object of the [`CacheSpec`]'s fields plus `start`,
//!   `end`, `num_classes` and `tensors_sha256` (a hash of the tensors, so that a resumed
//!   build can trust the shard without a manifest; one key, so that a shard's bytes are
//!   reproducible).
//! * `manifest.json`, written last: the [`CacheManifest`] (spec, class count, every
//!   shard's file, range, size in bytes and SHA-256). A folder without it is a build in
//!   progress.
//! * `build.json` while a build runs: its [`CacheSpec`], so that a resumed build with
//!   another teacher, dataset or configuration is refused before anything is touched.
//!
//! Every file is written atomically (temporary file, fsync, rename), so a killed build
//! leaves only complete shards; [`build_cache`] run again with the same teacher, data and
//! configuration verifies them (a truncated or corrupt one is rebuilt, not trusted) and
//! runs the teacher over the missing ones only.
//!
//! # Reading
//!
//! [`TeacherCache::open`] reads the manifest and checks every shard's size; nothing else
//! is loaded. [`TeacherCache::lookup`] reads the asked rows straight from the shard files
//! (positioned reads of the rows' bytes, consecutive rows in one read), so memory stays
//! flat whatever the cache's size and the operating system's page cache keeps hot shards
//! in memory.
//!
//! # Example
//!
//! ```no_run
//! use std::path::Path;
//! use reuse_core::data::{epoch_batches, BatchSource, TensorDataset};
//! use reuse_core::{Activation, Mlp};
//! use reuse_distill::losses::{topk_kd_loss, KdConfig, TopKTail};
//! use reuse_distill::{build_cache, dataset_fingerprint, CacheConfig, Teacher, TeacherCache};
//! use tch::{Device, Kind, Tensor};
//!
//! # fn main() -> reuse_core::Result<()> {
//! let data = TensorDataset::new(
//!     Tensor::randn([1000, 64], (Kind::Float, Device::Cpu)),
//!     Tensor::zeros([1000], (Kind::Int64, Device::Cpu)),
//! )?;
//! let teacher = Mlp::new(&[64, 256, 10], Activation::Relu, Device::Cpu)?;
//! // Once: the teacher's top-4 log-probs in f16.
//! build_cache(&teacher, &data, Path::new("cache"), &CacheConfig::top_k(4), 256, Device::Cpu)?;
//!
//! // Then, with no teacher in memory (its fingerprint may be kept from the build):
//! let cache = TeacherCache::open(
//!     Path::new("cache"),
//!     Some(&teacher.fingerprint()),
//!     Some(&dataset_fingerprint(&data)?),
//! )?;
//! let student = Mlp::new(&[64, 32, 10], Activation::Relu, Device::Cpu)?;
//! cache.check_classes(10)?;
//! for idx in epoch_batches(data.len(), 32, Some(0), 0) {
//!     let batch = data.batch(&idx, Device::Cpu)?;
//!     let t = cache.lookup(&batch.indices, Device::Cpu)?;
//!     let logits = student.forward(&batch.inputs, true)?;
//!     let loss = topk_kd_loss(
//!         &logits,
//!         t.topk_logprobs.as_ref().unwrap(),
//!         t.topk_indices.as_ref().unwrap(),
//!         None,
//!         &KdConfig::new(2.0),
//!         TopKTail::Renormalize,
//!     )?;
//!     loss.backward();
//! }
//! # Ok(()) }
//! ```
//!
//! Files: `spec.rs` (configuration, spec, manifest), `build.rs` (the folder and its
//! resumption), `shard.rs` (one shard's layout and teacher pass), `read.rs`
//! ([`TeacherCache`]).

mod build;
mod read;
mod shard;
mod spec;

pub use build::{
    build_cache, build_cache_part, build_cache_with_progress, BuildPart, BuildProgress,
};
pub use read::{CachedOutputs, TeacherCache};
pub use spec::{CacheConfig, CacheManifest, CacheSpec, ShardInfo};

use std::fs;
use std::path::Path;

use reuse_core::checkpoint::write_atomic;
use reuse_core::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `format` field of every manifest.
pub const CACHE_FORMAT: &str = "reuse-teacher-cache";
/// The version of the on-disk format this code writes and reads.
pub const CACHE_VERSION: u32 = 1;
/// The manifest's file name.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The progress file of a build under way.
pub const BUILD_FILE: &str = "build.json";
/// The shard metadata key holding the [`CacheSpec`] as JSON.
pub(super) const SPEC_KEY: &str = "reuse_teacher_cache";

/// The file name of shard `s`.
pub fn shard_file_name(s: usize) -> String {
    format!("shard-{s:05}.safetensors")
}

// Checks and file helpers shared by building and reading.

pub(super) fn agree(have: &mut Option<usize>, found: usize, what: &str, path: &Path) -> Result<()> {
    match have {
        Some(h) if *h != found => Err(Error::invalid(
            "teacher cache",
            format!(
                "{}: the teacher gives a {what} of {found}, earlier shards have {h}",
                path.display()
            ),
        )),
        _ => {
            *have = Some(found);
            Ok(())
        }
    }
}

pub(super) fn agree_opt(have: &mut Option<usize>, found: usize, path: &Path) -> Result<()> {
    agree(have, found, "pooled width", path)
}

pub(super) fn truncated(path: &Path, expected: u64, found: u64) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        reason: format!(
            "truncated or changed shard: the manifest records {expected} bytes, the file has {found}"
        ),
    }
}

pub(super) fn check_format(spec: &CacheSpec, path: &Path) -> Result<()> {
    if spec.format != CACHE_FORMAT || spec.version != CACHE_VERSION {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            reason: format!(
                "format `{}` version {}, expected `{CACHE_FORMAT}` version {CACHE_VERSION}",
                spec.format, spec.version
            ),
        });
    }
    Ok(())
}

pub(super) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

pub(super) fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("plain struct");
    write_atomic(path, text.as_bytes())
}

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

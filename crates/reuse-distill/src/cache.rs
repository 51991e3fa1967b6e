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

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use reuse_core::checkpoint::write_atomic;
use reuse_core::data::BatchSource;
use reuse_core::trainer::ForwardOptions;
use reuse_core::{Checkpoint, Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::teacher::{dataset_fingerprint, fingerprint_tensors, Teacher};

/// The `format` field of every manifest.
pub const CACHE_FORMAT: &str = "reuse-teacher-cache";
/// The version of the on-disk format this code writes and reads.
pub const CACHE_VERSION: u32 = 1;
/// The manifest's file name.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The progress file of a build under way.
pub const BUILD_FILE: &str = "build.json";
/// The shard metadata key holding the [`CacheSpec`] as JSON.
const SPEC_KEY: &str = "reuse_teacher_cache";

/// The file name of shard `s`.
pub fn shard_file_name(s: usize) -> String {
    format!("shard-{s:05}.safetensors")
}

/// What a cache stores. Build with [`CacheConfig::full_logits`] or [`CacheConfig::top_k`]
/// and the `with_*` setters.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// `Some(k)`: the teacher's top-k log-probabilities (`log_softmax` at `T = 1`) and
    /// their indices; `None`: its full logits.
    pub top_k: Option<usize>,
    /// Storage kind of the stored values: `Kind::Float`, `Kind::Half` or
    /// `Kind::BFloat16`. Lookups return f32 whatever is stored.
    pub dtype: Kind,
    /// Per token: the teacher returns logits `[b, t, V]` and the cache keeps every
    /// position with the batch's mask. Otherwise per example: logits `[b, C]`.
    pub per_token: bool,
    /// Also store the pooled features (`StepOutputs::pooled`) the teacher gives.
    pub pooled: bool,
    /// Examples per shard (default 4096).
    pub shard_size: usize,
    /// The distillation temperature the cache is meant for. Recorded only: cached
    /// log-probs are at `T = 1`; the KD losses soften them.
    pub temperature: f64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self::full_logits()
    }
}

impl CacheConfig {
    /// Full logits in f32, per example, 4096 examples per shard, `T = 1`.
    pub fn full_logits() -> Self {
        Self {
            top_k: None,
            dtype: Kind::Float,
            per_token: false,
            pooled: false,
            shard_size: 4096,
            temperature: 1.0,
        }
    }

    /// Top-`k` log-probabilities in f16 and their indices, per example.
    pub fn top_k(k: usize) -> Self {
        Self {
            top_k: Some(k),
            dtype: Kind::Half,
            ..Self::full_logits()
        }
    }

    /// Sets the storage kind (f32, f16, bf16).
    pub fn with_dtype(mut self, dtype: Kind) -> Self {
        self.dtype = dtype;
        self
    }

    /// Per-token (`true`) or per-example outputs.
    pub fn with_per_token(mut self, on: bool) -> Self {
        self.per_token = on;
        self
    }

    /// Stores the teacher's pooled features too.
    pub fn with_pooled(mut self, on: bool) -> Self {
        self.pooled = on;
        self
    }

    /// Examples per shard.
    pub fn with_shard_size(mut self, n: usize) -> Self {
        self.shard_size = n;
        self
    }

    /// The temperature recorded with the cache.
    pub fn with_temperature(mut self, t: f64) -> Self {
        self.temperature = t;
        self
    }

    /// Checks every field.
    ///
    /// # Errors
    /// `top_k` of 0, a dtype other than f32/f16/bf16, a shard size of 0, a temperature
    /// that is not finite and positive.
    pub fn validate(&self) -> Result<()> {
        if self.top_k == Some(0) {
            return Err(Error::invalid("cache top-k", "k must be at least 1"));
        }
        dtype_name(self.dtype)?;
        if self.shard_size == 0 {
            return Err(Error::invalid("cache shard size", "must be at least 1"));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::invalid(
                "cache temperature",
                format!("expected a positive number, found {}", self.temperature),
            ));
        }
        Ok(())
    }
}

fn dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "f32",
        Kind::Half => "f16",
        Kind::BFloat16 => "bf16",
        other => {
            return Err(Error::invalid(
                "cache dtype",
                format!("{other:?} cannot hold cached values; use f32, f16 or bf16"),
            ))
        }
    })
}

fn dtype_kind(name: &str) -> Option<Kind> {
    match name {
        "f32" => Some(Kind::Float),
        "f16" => Some(Kind::Half),
        "bf16" => Some(Kind::BFloat16),
        _ => None,
    }
}

/// Which teacher, which data and which configuration made a cache: two builds with the
/// same spec write the same shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheSpec {
    /// Always [`CACHE_FORMAT`].
    pub format: String,
    /// [`CACHE_VERSION`] of the writer.
    pub version: u32,
    /// [`Teacher::fingerprint`] of the teacher.
    pub teacher_fingerprint: String,
    /// [`dataset_fingerprint`] of the data.
    pub dataset_fingerprint: String,
    /// Number of examples.
    pub num_examples: usize,
    /// Examples per shard.
    pub shard_size: usize,
    /// `k` of a top-k cache; `None` for full logits.
    pub top_k: Option<usize>,
    /// Storage dtype of the values: `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// The temperature recorded at build time (log-probs are at `T = 1`).
    pub temperature: f64,
    /// Per-token outputs with a mask.
    pub per_token: bool,
    /// Pooled features stored.
    pub pooled: bool,
}

impl CacheSpec {
    fn new(teacher: String, dataset: String, n: usize, cfg: &CacheConfig) -> Result<Self> {
        Ok(Self {
            format: CACHE_FORMAT.into(),
            version: CACHE_VERSION,
            teacher_fingerprint: teacher,
            dataset_fingerprint: dataset,
            num_examples: n,
            shard_size: cfg.shard_size,
            top_k: cfg.top_k,
            dtype: dtype_name(cfg.dtype)?.into(),
            temperature: cfg.temperature,
            per_token: cfg.per_token,
            pooled: cfg.pooled,
        })
    }

    /// Number of shards.
    pub fn num_shards(&self) -> usize {
        self.num_examples.div_ceil(self.shard_size.max(1))
    }

    /// The example range of shard `s`.
    pub fn shard_range(&self, s: usize) -> (usize, usize) {
        let start = s * self.shard_size;
        (start, (start + self.shard_size).min(self.num_examples))
    }

    /// `field: cache has A, this build has B` for every field that differs.
    fn differences(&self, other: &CacheSpec) -> Vec<String> {
        let a = serde_json::to_value(self).expect("plain struct");
        let b = serde_json::to_value(other).expect("plain struct");
        let (a, b) = (
            a.as_object().expect("struct"),
            b.as_object().expect("struct"),
        );
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(v))
            .map(|(k, v)| {
                let name = match k.as_str() {
                    "teacher_fingerprint" => "teacher (fingerprint)",
                    "dataset_fingerprint" => "dataset (fingerprint)",
                    other => other,
                };
                format!("{name}: cache has {v}, this build has {}", b[k])
            })
            .collect()
    }
}

/// One shard as the manifest records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name inside the cache folder.
    pub file: String,
    /// First example index.
    pub start: usize,
    /// One past the last example index.
    pub end: usize,
    /// File size in bytes.
    pub bytes: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    /// Stored sequence length `L_s` of a per-token shard (its longest example).
    pub max_len: Option<usize>,
}

/// `manifest.json`: the spec, what the teacher gave, and the shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheManifest {
    /// Teacher, data and configuration.
    #[serde(flatten)]
    pub spec: CacheSpec,
    /// The teacher's class count (its vocabulary size per token).
    pub num_classes: usize,
    /// Width of the pooled features, when stored.
    pub pooled_dim: Option<usize>,
    /// Every shard in index order.
    pub shards: Vec<ShardInfo>,
}

impl CacheManifest {
    /// Bytes of all shards together.
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }
}

/// Progress of [`build_cache_with_progress`], reported once per shard.
#[derive(Debug, Clone)]
pub struct BuildProgress<'a> {
    /// The shard just written or found complete.
    pub shard: &'a ShardInfo,
    /// Its position (0-based).
    pub index: usize,
    /// Number of shards.
    pub total: usize,
    /// True when the shard was already complete on disk and kept.
    pub reused: bool,
}

/// Runs `teacher` over `data` in index order, `batch_size` examples at a time on
/// `device`, and writes a cache to `out` (see the [module docs](self) for the format).
///
/// Resumes an interrupted build: complete shards that the same teacher, data and
/// configuration wrote are kept (each is read and checked; a truncated or corrupt one
/// is rebuilt); the teacher runs over the missing shards only. Batches never straddle
/// a shard, so a resumed cache equals an uninterrupted one. A complete cache of the
/// same spec is verified and returned as it is.
///
/// # Errors
/// An invalid config or empty data; an `out` that is not a folder or holds files that
/// are not this cache's; a cache or partial build in `out` made by another teacher,
/// dataset or configuration (naming each difference: nothing is changed on disk); a
/// teacher whose outputs do not fit the config (per-token logits for a per-example
/// cache, `k` above its class count, no pooled features, a class count that changes);
/// the teacher's own errors. On an error no file is left half-written; shards completed
/// before it stay for the next run.
pub fn build_cache(
    teacher: &dyn Teacher,
    data: &dyn BatchSource,
    out: &Path,
    cfg: &CacheConfig,
    batch_size: usize,
    device: Device,
) -> Result<CacheManifest> {
    build_cache_with_progress(teacher, data, out, cfg, batch_size, device, &mut |_| {})
}

/// [`build_cache`], calling `progress` after each shard.
pub fn build_cache_with_progress(
    teacher: &dyn Teacher,
    data: &dyn BatchSource,
    out: &Path,
    cfg: &CacheConfig,
    batch_size: usize,
    device: Device,
    progress: &mut dyn FnMut(BuildProgress<'_>),
) -> Result<CacheManifest> {
    let m = build(teacher, data, out, cfg, batch_size, device, None, progress)?;
    Ok(m.expect("a whole build writes its manifest"))
}

/// The part of a cache one of several processes builds: shard `s` when
/// `s % world == rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildPart {
    /// This process's rank, `0..world`.
    pub rank: usize,
    /// The number of processes sharing the build.
    pub world: usize,
}

/// One process's share of a cache build, for several processes (data-parallel ranks)
/// running the teacher over disjoint shards into the same folder. Every rank calls it;
/// once all have returned (a barrier), one process calls [`build_cache`], which finds
/// every shard complete, checks each, and writes the manifest; the teacher does not run
/// again. Checks and refusals are [`build_cache`]'s; this call neither writes the
/// manifest nor removes other processes' temporary files, and an error leaves the
/// folder for the others. Returns the number of shards this process wrote.
#[allow(clippy::too_many_arguments)]
pub fn build_cache_part(
    teacher: &dyn Teacher,
    data: &dyn BatchSource,
    out: &Path,
    cfg: &CacheConfig,
    batch_size: usize,
    device: Device,
    part: BuildPart,
    progress: &mut dyn FnMut(BuildProgress<'_>),
) -> Result<usize> {
    if part.world == 0 || part.rank >= part.world {
        return Err(Error::invalid(
            "cache build part",
            format!(
                "expected a rank below the world size, found rank {} of {}",
                part.rank, part.world
            ),
        ));
    }
    let mut written = 0;
    let mut count = |p: BuildProgress<'_>| {
        if !p.reused {
            written += 1;
        }
        progress(p)
    };
    build(
        teacher,
        data,
        out,
        cfg,
        batch_size,
        device,
        Some(part),
        &mut count,
    )?;
    Ok(written)
}

#[allow(clippy::too_many_arguments)]
fn build(
    teacher: &dyn Teacher,
    data: &dyn BatchSource,
    out: &Path,
    cfg: &CacheConfig,
    batch_size: usize,
    device: Device,
    part: Option<BuildPart>,
    progress: &mut dyn FnMut(BuildProgress<'_>),
) -> Result<Option<CacheManifest>> {
    cfg.validate()?;
    if batch_size == 0 {
        return Err(Error::invalid("cache batch size", "must be at least 1"));
    }
    let n = data.len();
    if n == 0 {
        return Err(Error::invalid("cache data", "the dataset has no examples"));
    }
    let spec = CacheSpec::new(teacher.fingerprint(), dataset_fingerprint(data)?, n, cfg)?;

    // Everything that can refuse the build is checked before anything is written.
    let existed = out.exists();
    if existed && !out.is_dir() {
        return Err(Error::invalid(
            "cache folder",
            format!("{} exists and is not a folder", out.display()),
        ));
    }
    let old_manifest = if existed {
        check_folder(out, &spec)?
    } else {
        None
    };
    let mut shards: Vec<Option<ShardInfo>> = vec![None; spec.num_shards()];
    let mut num_classes = old_manifest.as_ref().map(|m| m.num_classes);
    let mut pooled_dim = old_manifest.as_ref().and_then(|m| m.pooled_dim);
    if existed {
        for (s, slot) in shards.iter_mut().enumerate() {
            let path = out.join(shard_file_name(s));
            if !path.exists() {
                continue;
            }
            if let Some(found) = check_existing_shard(&path, &spec, s)? {
                agree(&mut num_classes, found.num_classes, "class count", &path)?;
                if let Some(p) = found.pooled_dim {
                    agree_opt(&mut pooled_dim, p, &path)?;
                }
                *slot = Some(found.info);
            }
        }
    }
    if let Some(m) = &old_manifest {
        if shards.iter().all(Option::is_some) {
            let infos: Vec<ShardInfo> = shards.into_iter().map(Option::unwrap).collect();
            if infos == m.shards {
                for (s, info) in infos.iter().enumerate() {
                    progress(BuildProgress {
                        shard: info,
                        index: s,
                        total: infos.len(),
                        reused: true,
                    });
                }
                if part.is_none() {
                    remove_stale_temps(out);
                }
                return Ok(Some(m.clone()));
            }
            shards = infos.into_iter().map(Some).collect();
        }
    }

    fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    if part.is_none() {
        // Another process's temporary file may be a shard in the making.
        remove_stale_temps(out);
    }
    let build_path = out.join(BUILD_FILE);
    let wrote_build = !build_path.exists();
    if wrote_build {
        write_json(&build_path, &spec)?;
    }
    let any_kept = shards.iter().any(Option::is_some);
    let total = shards.len();
    let mut written = 0usize;
    let result = (|| -> Result<Option<CacheManifest>> {
        for (s, slot) in shards.iter_mut().enumerate() {
            if part.is_some_and(|p| s % p.world != p.rank) {
                continue;
            }
            if let Some(info) = slot {
                progress(BuildProgress {
                    shard: info,
                    index: s,
                    total,
                    reused: true,
                });
                continue;
            }
            let built = build_shard(teacher, data, out, &spec, cfg, s, batch_size, device)?;
            let path = out.join(&built.info.file);
            agree(&mut num_classes, built.num_classes, "class count", &path)?;
            if let Some(p) = built.pooled_dim {
                agree_opt(&mut pooled_dim, p, &path)?;
            }
            written += 1;
            progress(BuildProgress {
                shard: &built.info,
                index: s,
                total,
                reused: false,
            });
            *slot = Some(built.info);
        }
        if part.is_some() {
            return Ok(None);
        }
        let manifest = CacheManifest {
            spec: spec.clone(),
            num_classes: num_classes.expect("at least one shard"),
            pooled_dim,
            shards: shards.iter().map(|s| s.clone().expect("built")).collect(),
        };
        write_json(&out.join(MANIFEST_FILE), &manifest)?;
        let _ = fs::remove_file(&build_path);
        Ok(Some(manifest))
    })();
    if result.is_err() && written == 0 && !any_kept && part.is_none() {
        // Nothing of this build is worth keeping: leave the folder as it was found.
        if wrote_build {
            let _ = fs::remove_file(&build_path);
        }
        if !existed {
            let _ = fs::remove_dir(out);
        }
    }
    result
}

fn agree(have: &mut Option<usize>, found: usize, what: &str, path: &Path) -> Result<()> {
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

fn agree_opt(have: &mut Option<usize>, found: usize, path: &Path) -> Result<()> {
    agree(have, found, "pooled width", path)
}

/// Checks that `out` holds nothing but this cache's files and that its manifest or
/// progress file, if any, has `spec`. Returns the manifest when there is one.
fn check_folder(out: &Path, spec: &CacheSpec) -> Result<Option<CacheManifest>> {
    let entries = fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    for e in entries {
        let e = e.map_err(|e| Error::io(out, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name == MANIFEST_FILE
            || name == BUILD_FILE
            || is_shard_name(&name)
            || is_temp_name(&name);
        if !ours {
            return Err(Error::invalid(
                "cache folder",
                format!(
                    "{} holds `{name}`, which is not part of a teacher cache; \
                     choose an empty or new folder",
                    out.display()
                ),
            ));
        }
    }
    let mismatch = |file: &Path, found: &CacheSpec| -> Error {
        Error::invalid(
            "teacher cache",
            format!(
                "{} was made by another teacher, dataset or configuration; refusing to \
                 resume or overwrite it ({}). Use another --out folder or remove this one",
                file.display(),
                found.differences(spec).join("; ")
            ),
        )
    };
    let manifest_path = out.join(MANIFEST_FILE);
    let manifest = if manifest_path.exists() {
        let m: CacheManifest = read_json(&manifest_path)?;
        check_format(&m.spec, &manifest_path)?;
        if m.spec != *spec {
            return Err(mismatch(&manifest_path, &m.spec));
        }
        Some(m)
    } else {
        None
    };
    let build_path = out.join(BUILD_FILE);
    if build_path.exists() {
        let b: CacheSpec = read_json(&build_path)?;
        check_format(&b, &build_path)?;
        if b != *spec {
            return Err(mismatch(&build_path, &b));
        }
    }
    Ok(manifest)
}

fn is_shard_name(name: &str) -> bool {
    name.strip_prefix("shard-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// A temporary file of [`write_atomic`] for one of the cache's files.
fn is_temp_name(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|r| r.split_once(".tmp-"))
        .is_some_and(|(f, _)| f == MANIFEST_FILE || f == BUILD_FILE || is_shard_name(f))
}

/// Removes temporary files a killed writer left behind.
fn remove_stale_temps(out: &Path) {
    if let Ok(entries) = fs::read_dir(out) {
        for e in entries.flatten() {
            if is_temp_name(&e.file_name().to_string_lossy()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

fn check_format(spec: &CacheSpec, path: &Path) -> Result<()> {
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

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("plain struct");
    write_atomic(path, text.as_bytes())
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The one metadata entry of a shard: the spec, the shard's example range and the
/// teacher's class count.
#[derive(Debug, Serialize, Deserialize)]
struct ShardMeta {
    #[serde(flatten)]
    spec: CacheSpec,
    start: usize,
    end: usize,
    num_classes: usize,
    /// [`fingerprint_tensors`] of the shard's tensors: a resumed build trusts a shard
    /// whose values still hash to it.
    tensors_sha256: String,
}

struct ShardFound {
    info: ShardInfo,
    num_classes: usize,
    pooled_dim: Option<usize>,
}

/// Reads a shard left by an earlier build. `Ok(None)`: unreadable (truncated, corrupt),
/// to be rebuilt. An error: a readable shard of another spec or range.
fn check_existing_shard(path: &Path, spec: &CacheSpec, s: usize) -> Result<Option<ShardFound>> {
    let Ok(bytes) = fs::read(path) else {
        return Ok(None);
    };
    let Ok(ck) = Checkpoint::from_bytes(&bytes, path, Device::Cpu) else {
        return Ok(None);
    };
    let Some(meta) = ck
        .metadata()
        .get(SPEC_KEY)
        .and_then(|j| serde_json::from_str::<ShardMeta>(j).ok())
    else {
        return Ok(None);
    };
    let found = &meta.spec;
    if found != spec {
        return Err(Error::invalid(
            "teacher cache",
            format!(
                "{} was made by another teacher, dataset or configuration; refusing to \
                 resume or overwrite it ({}). Use another --out folder or remove this one",
                path.display(),
                found.differences(spec).join("; ")
            ),
        ));
    }
    let (start, end) = spec.shard_range(s);
    if (meta.start, meta.end) != (start, end) {
        return Ok(None);
    }
    let mut named: Vec<(String, Tensor)> = ck
        .iter()
        .map(|(n, t)| (n.to_string(), t.shallow_clone()))
        .collect();
    if fingerprint_tensors(&mut named) != meta.tensors_sha256 {
        return Ok(None);
    }
    let num_classes = meta.num_classes;
    let layout = match ShardLayout::of(&ck, spec, num_classes, end - start) {
        Ok(l) => l,
        Err(_) => return Ok(None),
    };
    Ok(Some(ShardFound {
        info: ShardInfo {
            file: shard_file_name(s),
            start,
            end,
            bytes: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
            max_len: layout.max_len,
        },
        num_classes,
        pooled_dim: layout.pooled_dim,
    }))
}

/// Shapes of a shard's tensors, checked against the spec.
struct ShardLayout {
    max_len: Option<usize>,
    pooled_dim: Option<usize>,
}

impl ShardLayout {
    fn of(ck: &Checkpoint, spec: &CacheSpec, classes: usize, rows: usize) -> Result<Self> {
        let kind = dtype_kind(&spec.dtype).expect("checked spec");
        let rows = rows as i64;
        let max_len = if spec.per_token {
            let mask = ck.tensor("mask")?;
            let l = mask.size().get(1).copied().unwrap_or(-1);
            ck.tensor_with_shape("mask", &[rows, l])?;
            ck.tensor_with_shape("lengths", &[rows])?;
            Some(l as usize)
        } else {
            None
        };
        let lead: Vec<i64> = match max_len {
            Some(l) => vec![rows, l as i64],
            None => vec![rows],
        };
        let with = |last: usize| -> Vec<i64> {
            let mut v = lead.clone();
            v.push(last as i64);
            v
        };
        let check_kind = |name: &str, want: Kind| -> Result<()> {
            let t = ck.tensor(name)?;
            if t.kind() != want {
                return Err(Error::DtypeMismatch {
                    path: ck.source().map(Path::to_path_buf),
                    tensor: name.into(),
                    expected: format!("{want:?}"),
                    found: format!("{:?}", t.kind()),
                });
            }
            Ok(())
        };
        match spec.top_k {
            Some(k) => {
                ck.tensor_with_shape("topk_logprobs", &with(k))?;
                ck.tensor_with_shape("topk_indices", &with(k))?;
                check_kind("topk_logprobs", kind)?;
                check_kind("topk_indices", Kind::Int)?;
            }
            None => {
                ck.tensor_with_shape("logits", &with(classes))?;
                check_kind("logits", kind)?;
            }
        }
        let pooled_dim = if spec.pooled {
            let p = ck.tensor("pooled")?;
            let h = p.size().get(1).copied().unwrap_or(-1);
            ck.tensor_with_shape("pooled", &[rows, h])?;
            check_kind("pooled", kind)?;
            Some(h as usize)
        } else {
            None
        };
        Ok(Self {
            max_len,
            pooled_dim,
        })
    }
}

struct BuiltShard {
    info: ShardInfo,
    num_classes: usize,
    pooled_dim: Option<usize>,
}

/// One batch's outputs as stored (CPU, storage kinds).
struct Rows {
    values: Tensor,
    indices: Option<Tensor>,
    mask: Option<Tensor>,
    pooled: Option<Tensor>,
}

#[allow(clippy::too_many_arguments)]
fn build_shard(
    teacher: &dyn Teacher,
    data: &dyn BatchSource,
    out: &Path,
    spec: &CacheSpec,
    cfg: &CacheConfig,
    s: usize,
    batch_size: usize,
    device: Device,
) -> Result<BuiltShard> {
    let (start, end) = spec.shard_range(s);
    let path = out.join(shard_file_name(s));
    let opts = ForwardOptions {
        pooled: cfg.pooled,
        ..Default::default()
    };
    let mut parts: Vec<Rows> = Vec::new();
    let mut classes: Option<usize> = None;
    let mut b0 = start;
    while b0 < end {
        let b1 = (b0 + batch_size).min(end);
        let idx: Vec<i64> = (b0 as i64..b1 as i64).collect();
        let batch = data.batch(&idx, device)?;
        let out = teacher.teach(&batch, opts)?;
        let rows = tch::no_grad(|| process_batch(&out, batch.mask.as_ref(), cfg, idx.len()))?;
        let c = *out.logits.size().last().unwrap_or(&0) as usize;
        agree(&mut classes, c, "class count", &path)?;
        parts.push(rows);
        b0 = b1;
    }
    let classes = classes.expect("a shard has at least one row");
    let mut ck = Checkpoint::new();
    let max_len = if cfg.per_token {
        let masks: Vec<&Tensor> = parts
            .iter()
            .map(|p| p.mask.as_ref().expect("per token"))
            .collect();
        let lengths: Vec<Tensor> = masks.iter().map(|m| extent(m)).collect();
        let lengths = Tensor::cat(&lengths, 0);
        let l = lengths.max().int64_value(&[]).max(1);
        let fit = |t: &Tensor| -> Tensor {
            let have = t.size()[1];
            if have >= l {
                t.narrow(1, 0, l)
            } else {
                let mut pad = vec![0i64; 2 * (t.dim() - 1)];
                let last = pad.len() - 1;
                pad[last] = l - have;
                t.constant_pad_nd(pad.as_slice())
            }
        };
        let cat = |f: &dyn Fn(&Rows) -> &Tensor| -> Tensor {
            Tensor::cat(&parts.iter().map(|p| fit(f(p))).collect::<Vec<_>>(), 0)
        };
        ck.insert("mask", cat(&|p| p.mask.as_ref().expect("per token")));
        ck.insert("lengths", lengths);
        store_values(&mut ck, cfg, cat(&|p| &p.values), || {
            cat(&|p| p.indices.as_ref().expect("top-k"))
        });
        Some(l as usize)
    } else {
        let cat = |f: &dyn Fn(&Rows) -> &Tensor| -> Tensor {
            Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0)
        };
        store_values(&mut ck, cfg, cat(&|p| &p.values), || {
            cat(&|p| p.indices.as_ref().expect("top-k"))
        });
        None
    };
    let pooled_dim = if cfg.pooled {
        let p: Vec<&Tensor> = parts
            .iter()
            .map(|p| p.pooled.as_ref().expect("checked"))
            .collect();
        let p = Tensor::cat(&p, 0);
        let h = p.size()[1] as usize;
        ck.insert("pooled", p);
        Some(h)
    } else {
        None
    };
    // One metadata key: safetensors writes its metadata map in hash order, and a shard's
    // bytes (and SHA-256) must not depend on it.
    let mut named: Vec<(String, Tensor)> = ck
        .iter()
        .map(|(n, t)| (n.to_string(), t.shallow_clone()))
        .collect();
    let meta = ShardMeta {
        spec: spec.clone(),
        start,
        end,
        num_classes: classes,
        tensors_sha256: fingerprint_tensors(&mut named),
    };
    ck.set_metadata(
        SPEC_KEY,
        serde_json::to_string(&meta).expect("plain struct"),
    );
    let bytes = ck.to_bytes()?;
    write_atomic(&path, &bytes)?;
    Ok(BuiltShard {
        info: ShardInfo {
            file: shard_file_name(s),
            start,
            end,
            bytes: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
            max_len,
        },
        num_classes: classes,
        pooled_dim,
    })
}

fn store_values(
    ck: &mut Checkpoint,
    cfg: &CacheConfig,
    values: Tensor,
    indices: impl Fn() -> Tensor,
) {
    match cfg.top_k {
        Some(_) => {
            ck.insert("topk_logprobs", values);
            ck.insert("topk_indices", indices());
        }
        None => {
            ck.insert("logits", values);
        }
    }
}

/// One past the last unmasked position of each row of `mask` `[b, t]` (0 for none).
fn extent(mask: &Tensor) -> Tensor {
    let t = mask.size()[1];
    let pos = Tensor::arange_start(1, t + 1, (Kind::Int64, mask.device()));
    (mask.ne(0).to_kind(Kind::Int64) * pos)
        .amax([1i64].as_slice(), false)
        .to_kind(Kind::Int64)
}

fn process_batch(
    out: &reuse_core::StepOutputs,
    mask: Option<&Tensor>,
    cfg: &CacheConfig,
    b: usize,
) -> Result<Rows> {
    let logits = &out.logits;
    let size = logits.size();
    let want = if cfg.per_token { 3 } else { 2 };
    if size.len() != want || size[0] != b as i64 {
        let what = if cfg.per_token {
            format!("per-token logits [{b}, t, vocab]")
        } else {
            format!("per-example logits [{b}, classes]")
        };
        let hint = match (cfg.per_token, size.len()) {
            (false, 3) => " (a per-token teacher: build with per_token on)",
            (true, 2) => " (a per-example teacher: build with per_token off)",
            _ => "",
        };
        return Err(Error::invalid(
            "teacher outputs",
            format!("expected {what}, the teacher gave shape {size:?}{hint}"),
        ));
    }
    let classes = size[size.len() - 1];
    let logits = logits.to_kind(Kind::Float);
    let dev = logits.device();
    let (values, indices) = match cfg.top_k {
        Some(k) => {
            if k as i64 > classes {
                return Err(Error::invalid(
                    "cache top-k",
                    format!("k = {k} exceeds the teacher's {classes} classes"),
                ));
            }
            let (v, i) = logits
                .log_softmax(-1, Kind::Float)
                .topk(k as i64, -1, true, true);
            (v, Some(i))
        }
        None => (logits, None),
    };
    let (values, indices, mask) = if cfg.per_token {
        let m = match mask {
            Some(m) => {
                if m.size() != size[..2] {
                    return Err(Error::invalid(
                        "batch mask",
                        format!("shape {:?} does not fit logits {size:?}", m.size()),
                    ));
                }
                m.ne(0)
            }
            None => Tensor::ones([size[0], size[1]], (Kind::Bool, dev)),
        };
        // Masked positions hold zeros: their values depend on how batches are padded.
        let keep = m.unsqueeze(-1);
        let v = values.where_scalarother(&keep, 0.0);
        let i = indices.map(|i| i.where_scalarother(&keep, 0));
        (v, i, Some(m.to_kind(Kind::Uint8).to_device(Device::Cpu)))
    } else {
        (values, indices, None)
    };
    let pooled = if cfg.pooled {
        let p = out.pooled.as_ref().ok_or_else(|| {
            Error::invalid(
                "teacher outputs",
                "the cache stores pooled features but the teacher gives none",
            )
        })?;
        if p.dim() != 2 || p.size()[0] != b as i64 {
            return Err(Error::invalid(
                "teacher pooled features",
                format!("expected [{b}, hidden], found shape {:?}", p.size()),
            ));
        }
        Some(p.to_kind(cfg.dtype).to_device(Device::Cpu))
    } else {
        None
    };
    Ok(Rows {
        values: values.to_kind(cfg.dtype).to_device(Device::Cpu),
        indices: indices.map(|i| i.to_kind(Kind::Int).to_device(Device::Cpu)),
        mask,
        pooled,
    })
}

/// A teacher's outputs for a batch, read from a cache, in the order of the indices
/// asked for, on the device asked for.
#[derive(Debug)]
pub struct CachedOutputs {
    /// Full logits (f32) `[b, C]` or `[b, t, V]`, for a full-logits cache.
    pub logits: Option<Tensor>,
    /// Top-k log-probabilities at `T = 1` (f32) `[b, k]` or `[b, t, k]`, for a top-k
    /// cache.
    pub topk_logprobs: Option<Tensor>,
    /// Their class indices (i64), the shape of `topk_logprobs`.
    pub topk_indices: Option<Tensor>,
    /// Per token: the mask `[b, t]` (i64, 1 = token) the teacher saw. `t` is the
    /// longest asked-for example (at least 1), as a batch of the same examples has.
    pub mask: Option<Tensor>,
    /// Pooled features (f32) `[b, H]`, when the cache stores them.
    pub pooled: Option<Tensor>,
}

/// Where one stored tensor lies in a shard file.
#[derive(Debug, Clone)]
struct TensorLoc {
    kind: Kind,
    shape: Vec<i64>,
    offset: u64,
}

impl TensorLoc {
    /// Bytes of one row (everything after the first dimension).
    fn row_bytes(&self) -> usize {
        self.shape[1..].iter().product::<i64>() as usize * self.kind.elt_size_in_bytes()
    }
}

/// An open shard: its file and where its tensors lie.
#[derive(Debug)]
struct ShardReader {
    file: File,
    tensors: BTreeMap<String, TensorLoc>,
    lengths: Option<Vec<i64>>,
}

impl ShardReader {
    fn open(path: &Path, info: &ShardInfo, manifest: &CacheManifest) -> Result<Self> {
        let corrupt = |reason: String| Error::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if size != info.bytes {
            return Err(truncated(path, info.bytes, size));
        }
        let mut n8 = [0u8; 8];
        file.read_exact(&mut n8)
            .map_err(|e| corrupt(format!("cannot read the header size: {e}")))?;
        let n = u64::from_le_bytes(n8);
        if n > size.saturating_sub(8) || n > 100 << 20 {
            return Err(corrupt(format!(
                "header size {n} does not fit a {size}-byte file"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| corrupt(format!("cannot read the header: {e}")))?;
        let header: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| corrupt(format!("bad header: {e}")))?;
        let base = 8 + n;
        let rows = (info.end - info.start) as i64;
        let mut tensors = BTreeMap::new();
        let mut data_end = 0u64;
        for (name, v) in &header {
            if name == "__metadata__" {
                continue;
            }
            let dtype = v["dtype"].as_str().unwrap_or("");
            let kind = match dtype {
                "F32" => Kind::Float,
                "F16" => Kind::Half,
                "BF16" => Kind::BFloat16,
                "I32" => Kind::Int,
                "I64" => Kind::Int64,
                "U8" => Kind::Uint8,
                other => return Err(corrupt(format!("tensor `{name}` has dtype `{other}`"))),
            };
            let shape: Vec<i64> = v["shape"]
                .as_array()
                .map(|a| a.iter().filter_map(|d| d.as_i64()).collect())
                .unwrap_or_default();
            let offs: Vec<u64> = v["data_offsets"]
                .as_array()
                .map(|a| a.iter().filter_map(|d| d.as_u64()).collect())
                .unwrap_or_default();
            let numel: i64 = shape.iter().product();
            if offs.len() != 2
                || shape.first() != Some(&rows)
                || offs[1] < offs[0]
                || offs[1] - offs[0] != numel as u64 * kind.elt_size_in_bytes() as u64
            {
                return Err(corrupt(format!(
                    "tensor `{name}`: shape {shape:?} and offsets {offs:?} do not fit {rows} rows of {dtype}"
                )));
            }
            data_end = data_end.max(offs[1]);
            tensors.insert(
                name.clone(),
                TensorLoc {
                    kind,
                    shape,
                    offset: base + offs[0],
                },
            );
        }
        if base + data_end != size {
            return Err(corrupt(format!(
                "header describes {} bytes, the file has {size}",
                base + data_end
            )));
        }
        let spec = &manifest.spec;
        let need: &[&str] = match (spec.top_k, spec.per_token) {
            (Some(_), false) => &["topk_logprobs", "topk_indices"],
            (Some(_), true) => &["topk_logprobs", "topk_indices", "mask", "lengths"],
            (None, false) => &["logits"],
            (None, true) => &["logits", "mask", "lengths"],
        };
        for name in need.iter().chain(spec.pooled.then_some(&"pooled")) {
            if !tensors.contains_key(*name) {
                return Err(Error::MissingTensor {
                    path: Some(path.to_path_buf()),
                    tensor: name.to_string(),
                });
            }
        }
        let last = |name: &str| {
            tensors
                .get(name)
                .and_then(|t: &TensorLoc| t.shape.last().copied())
        };
        let lead = if spec.per_token { 3 } else { 2 };
        let values = if spec.top_k.is_some() {
            "topk_logprobs"
        } else {
            "logits"
        };
        let want = spec.top_k.unwrap_or(manifest.num_classes) as i64;
        if last(values) != Some(want) || tensors[values].shape.len() != lead {
            return Err(corrupt(format!(
                "tensor `{values}` has shape {:?}, expected {lead} dimensions ending in {want}",
                tensors[values].shape
            )));
        }
        if let (Some(h), true) = (manifest.pooled_dim, spec.pooled) {
            if last("pooled") != Some(h as i64) {
                return Err(corrupt(format!(
                    "tensor `pooled` has shape {:?}, expected [{rows}, {h}]",
                    tensors["pooled"].shape
                )));
            }
        }
        let mut reader = Self {
            file,
            tensors,
            lengths: None,
        };
        if spec.per_token {
            let loc = reader.tensors["lengths"].clone();
            let mut buf = vec![0u8; rows as usize * 8];
            read_at(&reader.file, &mut buf, loc.offset).map_err(|e| Error::io(path, e))?;
            reader.lengths = Some(
                buf.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            );
        }
        Ok(reader)
    }
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

fn truncated(path: &Path, expected: u64, found: u64) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        reason: format!(
            "truncated or changed shard: the manifest records {expected} bytes, the file has {found}"
        ),
    }
}

/// A teacher cache opened for reading.
///
/// Shards are opened on first use; lookups read only the rows asked for.
#[derive(Debug)]
pub struct TeacherCache {
    dir: PathBuf,
    manifest: CacheManifest,
    readers: Vec<Mutex<Option<Arc<ShardReader>>>>,
}

impl TeacherCache {
    /// Opens the cache in `dir`: reads `manifest.json` and checks that every shard
    /// exists with its recorded size. With `teacher_fingerprint` /
    /// `dataset_fingerprint` given, refuses a cache made by another teacher or dataset.
    ///
    /// # Errors
    /// No manifest (naming a build that has not finished when `build.json` is there), a
    /// manifest of another format or version, a fingerprint mismatch (naming both
    /// hashes), a missing shard, a shard whose size differs from the manifest's (naming
    /// the file, the expected and the found size).
    pub fn open(
        dir: &Path,
        teacher_fingerprint: Option<&str>,
        dataset_fingerprint: Option<&str>,
    ) -> Result<TeacherCache> {
        let path = dir.join(MANIFEST_FILE);
        if !path.exists() {
            let why = if dir.join(BUILD_FILE).exists() {
                "the cache's build has not finished (build.json is there); run the build again to resume it"
            } else {
                "no teacher cache here"
            };
            return Err(Error::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::NotFound, why),
            ));
        }
        let manifest: CacheManifest = read_json(&path)?;
        check_format(&manifest.spec, &path)?;
        let spec = &manifest.spec;
        if dtype_kind(&spec.dtype).is_none() {
            return Err(Error::Corrupt {
                path,
                reason: format!("dtype `{}`, expected f32, f16 or bf16", spec.dtype),
            });
        }
        let expected: Vec<(usize, usize)> = (0..spec.num_shards())
            .map(|s| spec.shard_range(s))
            .collect();
        let found: Vec<(usize, usize)> = manifest.shards.iter().map(|s| (s.start, s.end)).collect();
        if expected != found || spec.num_examples == 0 {
            return Err(Error::Corrupt {
                path,
                reason: format!(
                    "its shards do not cover examples 0..{} in blocks of {}",
                    spec.num_examples, spec.shard_size
                ),
            });
        }
        for (what, want, have) in [
            ("teacher", teacher_fingerprint, &spec.teacher_fingerprint),
            ("dataset", dataset_fingerprint, &spec.dataset_fingerprint),
        ] {
            if let Some(want) = want {
                if want != have {
                    return Err(Error::invalid(
                        "teacher cache",
                        format!(
                            "{} was made from another {what}: the cache records {what} \
                             fingerprint {have}, this {what} has {want}",
                            dir.display()
                        ),
                    ));
                }
            }
        }
        for s in &manifest.shards {
            let p = dir.join(&s.file);
            let size = fs::metadata(&p).map_err(|e| Error::io(&p, e))?.len();
            if size != s.bytes {
                return Err(truncated(&p, s.bytes, size));
            }
        }
        let readers = manifest.shards.iter().map(|_| Mutex::new(None)).collect();
        Ok(TeacherCache {
            dir: dir.to_path_buf(),
            manifest,
            readers,
        })
    }

    /// Checks every shard's SHA-256 against the manifest (reads the whole cache).
    ///
    /// # Errors
    /// A shard that cannot be read or whose hash differs, naming the file and both hashes.
    pub fn verify(&self) -> Result<()> {
        for s in &self.manifest.shards {
            let p = self.dir.join(&s.file);
            let bytes = fs::read(&p).map_err(|e| Error::io(&p, e))?;
            let h = sha256_hex(&bytes);
            if h != s.sha256 {
                return Err(Error::Corrupt {
                    path: p,
                    reason: format!("SHA-256 is {h}, the manifest records {}", s.sha256),
                });
            }
        }
        Ok(())
    }

    /// The manifest.
    pub fn manifest(&self) -> &CacheManifest {
        &self.manifest
    }

    /// The cache's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.manifest.spec.num_examples
    }

    /// True for a cache of no examples (never, once built).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The teacher's class count (vocabulary size for a per-token cache).
    pub fn num_classes(&self) -> usize {
        self.manifest.num_classes
    }

    /// Shard bytes per example.
    pub fn bytes_per_example(&self) -> f64 {
        self.manifest.total_bytes() as f64 / self.len().max(1) as f64
    }

    /// Refuses a student whose class count (vocabulary) differs from the teacher's.
    ///
    /// # Errors
    /// The counts differ; the message names both and the cache.
    pub fn check_classes(&self, student_classes: usize) -> Result<()> {
        if student_classes != self.num_classes() {
            return Err(Error::invalid(
                "teacher cache",
                format!(
                    "{}: the cached teacher has {} classes, the student has {student_classes}",
                    self.dir.display(),
                    self.num_classes()
                ),
            ));
        }
        Ok(())
    }

    fn reader(&self, s: usize) -> Result<Arc<ShardReader>> {
        let mut slot = self.readers[s].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = slot.as_ref() {
            return Ok(Arc::clone(r));
        }
        let info = &self.manifest.shards[s];
        let r = Arc::new(ShardReader::open(
            &self.dir.join(&info.file),
            info,
            &self.manifest,
        )?);
        *slot = Some(Arc::clone(&r));
        Ok(r)
    }

    /// The cached outputs of the examples `indices` (in that order) on `device`.
    ///
    /// # Errors
    /// An index outside `0..len()`; a shard that cannot be read or does not match the
    /// manifest.
    pub fn lookup(&self, indices: &[i64], device: Device) -> Result<CachedOutputs> {
        let spec = &self.manifest.spec;
        let n = self.len() as i64;
        if indices.is_empty() {
            return Err(Error::invalid("example indices", "no example asked for"));
        }
        if let Some(bad) = indices.iter().find(|&&i| i < 0 || i >= n) {
            return Err(Error::invalid(
                "example index",
                format!(
                    "{bad} is out of range for the teacher cache {} of {n} examples",
                    self.dir.display()
                ),
            ));
        }
        // (shard, row) of every asked example.
        let at: Vec<(usize, usize)> = indices
            .iter()
            .map(|&i| {
                let s = i as usize / spec.shard_size;
                (s, i as usize - s * spec.shard_size)
            })
            .collect();
        let mut readers: BTreeMap<usize, Arc<ShardReader>> = BTreeMap::new();
        for &(s, _) in &at {
            if let std::collections::btree_map::Entry::Vacant(e) = readers.entry(s) {
                e.insert(self.reader(s)?);
            }
        }
        let b = indices.len() as i64;
        // Per token, every tensor is cut or padded to the longest asked-for example.
        let t = if spec.per_token {
            let len = at
                .iter()
                .map(|&(s, r)| readers[&s].lengths.as_ref().expect("per token")[r])
                .max()
                .unwrap_or(1);
            Some(len.max(1))
        } else {
            None
        };
        let gather = |name: &str| -> Result<Tensor> {
            let first = &readers[&at.first().map_or(0, |a| a.0)];
            let proto = self.loc(first, name)?;
            // Shape of one output row: stored row with its length axis set to `t`.
            let per_pos = name != "lengths" && t.is_some() && name != "pooled";
            let mut row_shape: Vec<i64> = proto.shape[1..].to_vec();
            if per_pos {
                row_shape[0] = t.expect("per token");
            }
            let elt = proto.kind.elt_size_in_bytes();
            let out_row = row_shape.iter().product::<i64>() as usize * elt;
            let mut buf = vec![0u8; out_row * indices.len()];
            let mut p = 0usize;
            while p < at.len() {
                let (s, r) = at[p];
                let reader = &readers[&s];
                let loc = self.loc(reader, name)?;
                let src_row = loc.row_bytes();
                // Bytes of a stored row that fit an output row (a row is [L_s, ...]).
                let take = src_row.min(out_row);
                // Consecutive rows of one shard into consecutive outputs: one read.
                let mut q = p + 1;
                if src_row == out_row {
                    while q < at.len() && at[q] == (s, r + (q - p)) {
                        q += 1;
                    }
                }
                if src_row == out_row {
                    let dst = &mut buf[p * out_row..q * out_row];
                    read_at(&reader.file, dst, loc.offset + (r * src_row) as u64)
                        .map_err(|e| Error::io(self.dir.join(&self.manifest.shards[s].file), e))?;
                } else {
                    let dst = &mut buf[p * out_row..p * out_row + take];
                    read_at(&reader.file, dst, loc.offset + (r * src_row) as u64)
                        .map_err(|e| Error::io(self.dir.join(&self.manifest.shards[s].file), e))?;
                }
                p = q;
            }
            let mut shape = vec![b];
            shape.extend(row_shape);
            let t = Tensor::f_from_data_size(&buf, &shape, proto.kind)?.to_device(device);
            Ok(match proto.kind {
                Kind::Int | Kind::Uint8 => t.to_kind(Kind::Int64),
                _ => t.to_kind(Kind::Float),
            })
        };
        let opt = |on: bool, name: &str| -> Result<Option<Tensor>> {
            if on {
                gather(name).map(Some)
            } else {
                Ok(None)
            }
        };
        let topk = spec.top_k.is_some();
        Ok(CachedOutputs {
            logits: opt(!topk, "logits")?,
            topk_logprobs: opt(topk, "topk_logprobs")?,
            topk_indices: opt(topk, "topk_indices")?,
            mask: opt(spec.per_token, "mask")?,
            pooled: opt(spec.pooled, "pooled")?,
        })
    }

    fn loc<'a>(&self, reader: &'a ShardReader, name: &str) -> Result<&'a TensorLoc> {
        reader
            .tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                path: None,
                tensor: name.into(),
            })
    }
}

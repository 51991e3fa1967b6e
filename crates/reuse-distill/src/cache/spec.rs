//! What a cache is: its configuration, the spec recorded in every shard, and the
//! manifest.

use reuse_core::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::Kind;

use super::*;

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

pub(super) fn dtype_name(kind: Kind) -> Result<&'static str> {
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

pub(super) fn dtype_kind(name: &str) -> Option<Kind> {
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
    pub(super) fn new(
        teacher: String,
        dataset: String,
        n: usize,
        cfg: &CacheConfig,
    ) -> Result<Self> {
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
    pub(super) fn differences(&self, other: &CacheSpec) -> Vec<String> {
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

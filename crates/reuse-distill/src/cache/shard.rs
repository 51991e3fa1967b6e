//! One shard: checking one already written, laying one out, running the teacher over
//! its examples.

use std::fs::{self};
use std::path::Path;

use reuse_core::checkpoint::write_atomic;
use reuse_core::data::BatchSource;
use reuse_core::trainer::ForwardOptions;
use reuse_core::{Checkpoint, Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::spec::*;
use super::*;
use crate::teacher::{fingerprint_tensors, Teacher};

/// The one metadata entry of a shard: the spec, the shard's example range and the
/// teacher's class count.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ShardMeta {
    #[serde(flatten)]
    pub(super) spec: CacheSpec,
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) num_classes: usize,
    /// [`fingerprint_tensors`] of the shard's tensors: a resumed build trusts a shard
    /// whose values still hash to it.
    tensors_sha256: String,
}

pub(super) struct ShardFound {
    pub(super) info: ShardInfo,
    pub(super) num_classes: usize,
    pub(super) pooled_dim: Option<usize>,
}

/// Reads a shard left by an earlier build. `Ok(None)`: unreadable (truncated, corrupt),
/// to be rebuilt. An error: a readable shard of another spec or range.
pub(super) fn check_existing_shard(
    path: &Path,
    spec: &CacheSpec,
    s: usize,
) -> Result<Option<ShardFound>> {
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
pub(super) struct ShardLayout {
    pub(super) max_len: Option<usize>,
    pub(super) pooled_dim: Option<usize>,
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

pub(super) struct BuiltShard {
    pub(super) info: ShardInfo,
    pub(super) num_classes: usize,
    pub(super) pooled_dim: Option<usize>,
}

/// One batch's outputs as stored (CPU, storage kinds).
pub(super) struct Rows {
    pub(super) values: Tensor,
    pub(super) indices: Option<Tensor>,
    pub(super) mask: Option<Tensor>,
    pub(super) pooled: Option<Tensor>,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn build_shard(
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
        // Causal LMs leave per-token logits out unless asked.
        logits: true,
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

pub(super) fn store_values(
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
pub(super) fn extent(mask: &Tensor) -> Tensor {
    let t = mask.size()[1];
    let pos = Tensor::arange_start(1, t + 1, (Kind::Int64, mask.device()));
    (mask.ne(0).to_kind(Kind::Int64) * pos)
        .amax([1i64].as_slice(), false)
        .to_kind(Kind::Int64)
}

pub(super) fn process_batch(
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

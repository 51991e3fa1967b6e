//! Reading a cache: [`TeacherCache`] and its per-shard readers.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use reuse_core::{Error, Result};
use tch::{Device, Kind, Tensor};

use super::spec::*;
use super::*;

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
pub(super) struct TensorLoc {
    pub(super) kind: Kind,
    pub(super) shape: Vec<i64>,
    pub(super) offset: u64,
}

impl TensorLoc {
    /// Bytes of one row (everything after the first dimension).
    fn row_bytes(&self) -> usize {
        self.shape[1..].iter().product::<i64>() as usize * self.kind.elt_size_in_bytes()
    }
}

/// An open shard: its file and where its tensors lie.
#[derive(Debug)]
pub(super) struct ShardReader {
    pub(super) file: File,
    pub(super) tensors: BTreeMap<String, TensorLoc>,
    pub(super) lengths: Option<Vec<i64>>,
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
pub(super) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
pub(super) fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
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

/// A teacher cache opened for reading.
///
/// Shards are opened on first use; lookups read only the rows asked for.
#[derive(Debug)]
pub struct TeacherCache {
    pub(super) dir: PathBuf,
    pub(super) manifest: CacheManifest,
    pub(super) readers: Vec<Mutex<Option<Arc<ShardReader>>>>,
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

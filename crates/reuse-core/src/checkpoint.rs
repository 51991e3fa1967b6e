//! Named tensors plus string metadata, stored as safetensors.
//!
//! Reads validate everything before returning (header, offsets, dtypes, sizes) and never
//! modify the file. Writes are atomic: the bytes go to a temporary file in the same
//! directory, which is fsynced and then renamed over the target, so a crash or an error
//! part-way leaves the old file as it was.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{SafeTensors, TensorView};
use tch::{Device, Tensor};

use crate::dtype::{dtype_of, element_size, kind_of};
use crate::{Error, Result};

/// Named tensors and string metadata, saved and loaded as one safetensors file.
///
/// Tensor names are kept sorted (as safetensors writes them).
#[derive(Debug, Default)]
pub struct Checkpoint {
    tensors: BTreeMap<String, Tensor>,
    metadata: BTreeMap<String, String>,
    /// The file this was loaded from, for error messages.
    source: Option<PathBuf>,
}

impl Checkpoint {
    /// An empty checkpoint.
    pub fn new() -> Self {
        Self::default()
    }

    /// A second checkpoint holding the same tensors (shallow: storage is shared, so the
    /// copy costs no tensor memory), metadata and source. For loaders that take tensors
    /// out of a checkpoint while the original is still needed.
    pub fn shallow_copy(&self) -> Self {
        Self {
            tensors: self
                .tensors
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            metadata: self.metadata.clone(),
            source: self.source.clone(),
        }
    }

    /// Adds or replaces a tensor (stored as given; moved to CPU when saved).
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> &mut Self {
        self.tensors.insert(name.into(), tensor);
        self
    }

    /// Removes a tensor, returning it.
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    /// Sets a metadata entry.
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// All metadata.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The file this checkpoint was loaded from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// Tensor names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Tensors by name in sorted order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The tensor `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The tensor `name`, or [`Error::MissingTensor`] naming the file.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.source.clone(),
            tensor: name.to_string(),
        })
    }

    /// The tensor `name`, checked to have `shape`.
    pub fn tensor_with_shape(&self, name: &str, shape: &[i64]) -> Result<&Tensor> {
        let t = self.tensor(name)?;
        if t.size() != shape {
            return Err(Error::ShapeMismatch {
                path: self.source.clone(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: t.size(),
            });
        }
        Ok(t)
    }

    /// Takes the tensor `name` out, checked to have `shape`.
    pub fn take_with_shape(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.tensor_with_shape(name, shape)?;
        Ok(self.tensors.remove(name).expect("checked above"))
    }

    /// Serialises to safetensors bytes. Tensors of unsupported kinds are an error.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut views = Vec::with_capacity(self.tensors.len());
        for (name, t) in &self.tensors {
            let kind = t.kind();
            let dtype = dtype_of(kind).ok_or_else(|| {
                Error::invalid(
                    format!("tensor `{name}`"),
                    format!(
                        "kind {kind:?} cannot be stored; use f32, f64, f16, bf16, i8, u8, i32 or i64"
                    ),
                )
            })?;
            let t = t.detach().to_device(Device::Cpu).contiguous();
            let numel = t.numel();
            let mut data = vec![0u8; numel * element_size(kind)];
            t.f_copy_data_u8(&mut data, numel)?;
            let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            views.push((name.clone(), OwnedView { dtype, shape, data }));
        }
        let meta: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        let meta = if meta.is_empty() { None } else { Some(meta) };
        let bytes = safetensors::serialize(views, meta)
            .map_err(|e| Error::invalid("checkpoint", e.to_string()))?;
        canonical_header(bytes)
    }

    /// Parses safetensors bytes; `path` is used in error messages only.
    pub fn from_bytes(bytes: &[u8], path: &Path, device: Device) -> Result<Self> {
        let corrupt = |reason: String| Error::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| corrupt(e.to_string()))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let t = tensor_from_view(&name, &view, path)?;
            tensors.insert(name, t.to_device(device));
        }
        let metadata = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        Ok(Self {
            tensors,
            metadata,
            source: Some(path.to_path_buf()),
        })
    }

    /// Loads a safetensors file onto `device`. The file is only read.
    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<Self> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, path, device)
    }

    /// Loads a model folder's weights: `model.safetensors`, or the shards that
    /// `model.safetensors.index.json` lists (its `weight_map`, tensor name to file), all
    /// into one checkpoint. A shard that holds a tensor the index puts elsewhere, or a
    /// tensor the index names but no shard holds, is an error naming both.
    pub fn load_folder(dir: &Path, device: Device) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if !index.exists() || single.exists() {
            return Self::load(single, device);
        }
        let text = fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let corrupt = |reason: String| Error::Corrupt {
            path: index.clone(),
            reason,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| corrupt(format!("not JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| corrupt("no `weight_map` object".into()))?;
        let mut files = std::collections::BTreeSet::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| corrupt(format!("`weight_map.{name}` is not a file name")))?;
            // Shards sit beside the index: no paths out of the folder.
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(corrupt(format!(
                    "`weight_map.{name}` names `{file}`, not a file in the folder"
                )));
            }
            files.insert(file.to_string());
        }
        let mut out = Checkpoint {
            source: Some(index.clone()),
            ..Default::default()
        };
        for file in &files {
            let shard = Self::load(dir.join(file), device)?;
            for (name, t) in shard.tensors {
                if map.get(&name).and_then(|f| f.as_str()) != Some(file.as_str()) {
                    return Err(corrupt(format!(
                        "shard `{file}` holds `{name}`, which the index puts in {}",
                        map.get(&name)
                            .map_or("no file".to_string(), |f| f.to_string())
                    )));
                }
                out.tensors.insert(name, t);
            }
            out.metadata.extend(shard.metadata);
        }
        if let Some(missing) = map.keys().find(|n| !out.tensors.contains_key(*n)) {
            return Err(corrupt(format!(
                "`{missing}` is in the index but in none of its shards"
            )));
        }
        Ok(out)
    }

    /// Saves atomically (temp file, fsync, rename): on any failure the old file, if
    /// there was one, is left as it was.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let bytes = self.to_bytes()?;
        write_atomic(path.as_ref(), &bytes)
    }
}

fn tensor_from_view(name: &str, view: &TensorView<'_>, path: &Path) -> Result<Tensor> {
    let kind = kind_of(view.dtype()).ok_or_else(|| Error::UnknownDtype {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        dtype: format!("{:?}", view.dtype()),
    })?;
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Tensor::f_from_data_size(view.data(), &shape, kind).map_err(|e| Error::Corrupt {
        path: path.to_path_buf(),
        reason: format!("tensor `{name}`: {e}"),
    })
}

struct OwnedView {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for OwnedView {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes `bytes` to `path` atomically. See [`write_atomic_with`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Writes a file atomically: `write` fills a temporary file in the same directory,
/// which is fsynced and renamed over `path` only if `write` succeeded. On failure the
/// temporary file is removed and whatever was at `path` stays untouched.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid("path", format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        write(&mut f)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e: std::io::Error| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// safetensors writes the metadata from a `HashMap`, whose order changes from run to run,
/// so two saves of the same checkpoint could differ in bytes (and hashes). This rewrites
/// the header as JSON with every object's keys sorted (serde_json's map is ordered),
/// padded with spaces to 8 bytes as safetensors pads it; the tensor data is untouched
/// (its offsets are relative to the end of the header).
fn canonical_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let bad = |reason: String| Error::invalid("checkpoint header", reason);
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
        .ok_or_else(|| bad("shorter than 8 bytes".into()))?;
    let header = bytes
        .get(8..8 + n)
        .ok_or_else(|| bad(format!("header of {n} bytes past the end")))?;
    let value: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| bad(e.to_string()))?;
    let mut h = serde_json::to_vec(&value).map_err(|e| bad(e.to_string()))?;
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + h.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

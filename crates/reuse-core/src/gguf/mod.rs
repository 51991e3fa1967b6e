//! GGUF files (llama.cpp's model format): metadata, tensor infos and tensor data, read
//! defensively, and turned into what the rest of reuse expects: f32 tensors in PyTorch
//! order with Hugging Face names ([`llama`]), and a `tokenizers` tokenizer
//! ([`tokenizer()`]).
//!
//! The format (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>): magic `GGUF`,
//! a u32 version (2 or 3; both use 64-bit counts), u64 tensor and metadata counts, typed
//! metadata (arrays typed and counted), then one info per tensor (name, dimensions
//! `ne0, ne1, ...` with `ne0` varying fastest, ggml type, offset into the data section).
//! The data section starts at the next multiple of `general.alignment` (default 32).
//!
//! # Invariants
//!
//! * **Nothing is allocated on the file's word.** GGUF files come from strangers. Every
//!   count, string length, array length and dimension is compared with the bytes that
//!   remain in the file before a buffer is made for it, so a file can make
//!   [`GgufFile::open`] fail but never allocate more than a small multiple of its own
//!   size. A truncated file, an unknown value or tensor type, a tensor past the end of the
//!   file, overlapping or misaligned tensors, a first dimension that is not a multiple of
//!   its type's block size, an element count that overflows: each is a one-line
//!   [`Error::Corrupt`] naming the file and the key or tensor, never a panic.
//! * **Tensor data is read lazily**, with positioned reads, when a tensor is asked for.
//! * **Output is in PyTorch's layout.** GGUF dimensions `[ne0, ne1]` are PyTorch shape
//!   `[ne1, ne0]`: [`TensorInfo::shape`] and every tensor returned here use the latter.
//!   [`llama`] also undoes llama.cpp's row permutation of `attn_q` / `attn_k`, so weights
//!   are Hugging Face's.
//!
//! ```no_run
//! use reuse_core::gguf::{self, GgufFile};
//! # fn main() -> reuse_core::Result<()> {
//! let file = GgufFile::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! println!("{} with {} tensors", file.architecture()?, file.tensors().len());
//! let config = gguf::llama::hf_config(&file)?; // a Hugging Face config.json
//! let weights = gguf::llama::load_state_dict(&file, tch::Device::Cpu)?;
//! let tokenizer = gguf::tokenizer(&file)?;
//! # Ok(()) }
//! ```

mod codes;
mod dequant;
mod int4pack;
pub mod llama;
mod parse;
mod source;
mod tokenizer;
mod types;
mod value;
mod write;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

pub use codes::CodesStorage;
pub use dequant::quantize;
pub use parse::DEFAULT_ALIGNMENT;
pub use tokenizer::{chat_template, tokenizer, tokenizer_json};
pub use types::GgmlType;
pub use value::{Array, Value, ValueType};
pub use write::GgufWriter;

use crate::error::{Error, Result};
use source::Source;

/// `` `s` `` for an error message, with control characters escaped: names and keys come
/// from the file, and a newline in one must not break the one-line message.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('`');
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('`');
    out
}

/// One tensor's description from the header, validated against the file.
///
/// Invariants: `ne0` is a multiple of the type's block size, the element count fits in
/// `i64`, and the data lies inside the file at an aligned offset, overlapping no other
/// tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    name: String,
    ggml_type: GgmlType,
    dims: Vec<u64>,
    offset: u64,
    file_offset: u64,
    n_bytes: u64,
    n_elements: u64,
}

impl TensorInfo {
    /// The tensor's name in the file (`blk.0.attn_q.weight`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its element type.
    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// Its dimensions in GGUF order: `ne0` (contiguous) first.
    pub fn dims(&self) -> &[u64] {
        &self.dims
    }

    /// Its shape in PyTorch order (the GGUF dimensions reversed).
    pub fn shape(&self) -> Vec<i64> {
        // Each dimension was checked to fit in i64.
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }

    /// Offset of its data from the start of the data section.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Offset of its data from the start of the file.
    pub fn file_offset(&self) -> u64 {
        self.file_offset
    }

    /// Size of its data in bytes.
    pub fn n_bytes(&self) -> u64 {
        self.n_bytes
    }

    /// Number of weights.
    pub fn n_elements(&self) -> u64 {
        self.n_elements
    }

    /// `[rows, cols]` for the row-wise views ([`GgufFile::quant_parts`]): `cols` is `ne0`,
    /// `rows` the product of the other dimensions.
    pub fn rows_cols(&self) -> (i64, i64) {
        // Each factor of n_elements, so each product fits in i64.
        let rows: u64 = self.dims[1..].iter().product();
        (rows as i64, self.dims[0] as i64)
    }
}

/// The codes and scales of a Q8_0, Q4_0 or Q4_1 tensor, row by row, so that a layer can
/// keep the file's own quantization as its weight storage.
///
/// For a tensor of PyTorch shape `[rows, cols]` (higher-dimensional tensors are flattened
/// to `rows` = all but the last dimension) with `groups = cols / 32`:
///
/// * Q8_0: `weight = codes · scales` with `codes` i8.
/// * Q4_0: `weight = (codes − 8) · scales` with `codes` u8 in 0..=15.
/// * Q4_1: `weight = codes · scales + mins` with `codes` u8 in 0..=15.
///
/// where `scales` and `mins` apply to the 32 consecutive weights of their group.
#[derive(Debug)]
pub struct QuantParts {
    /// Q8_0, Q4_0 or Q4_1.
    pub ggml_type: GgmlType,
    /// f32 `[rows, groups]`: each block's f16 scale `d`, widened.
    pub scales: Tensor,
    /// f32 `[rows, groups]`: each block's f16 minimum `m` (Q4_1 only).
    pub mins: Option<Tensor>,
    /// `[rows, cols]`: i8 for Q8_0, u8 in 0..=15 for Q4_0 and Q4_1 (unpacked nibbles).
    pub codes: Tensor,
}

impl QuantParts {
    /// The f32 weights the parts stand for, `[rows, cols]`: the same values as
    /// [`GgufFile::dequantize`] (bit for bit: same f32 operations in the same order).
    pub fn dequantize(&self) -> Result<Tensor> {
        let (rows, cols) = self.codes.size2()?;
        let scales = self
            .scales
            .f_repeat_interleave_self_int(32, 1, None::<i64>)?;
        let q = self.codes.f_to_kind(Kind::Float)?;
        let w = match self.ggml_type {
            GgmlType::Q8_0 => q.f_mul(&scales)?,
            GgmlType::Q4_0 => scales.f_mul(&q.f_sub_scalar(8.0)?)?,
            _ => {
                let mins = match &self.mins {
                    Some(m) => m.f_repeat_interleave_self_int(32, 1, None::<i64>)?,
                    None => return Err(Error::invalid("QuantParts", "Q4_1 parts without mins")),
                };
                scales.f_mul(&q)?.f_add(&mins)?
            }
        };
        Ok(w.f_reshape([rows, cols])?)
    }
}

/// Dequantizes `bytes` (rows of `cols` weights) into `out`, on a few threads when the
/// tensor is large (the 135M-parameter file's embedding alone is 28M weights). With
/// `source_rows`, output row `r` is the file's row `source_rows[r]` (a row permutation
/// applied for free: rows are whole blocks).
fn dequantize_rows_into(
    t: GgmlType,
    bytes: &[u8],
    out: &mut [f32],
    cols: usize,
    source_rows: Option<&[usize]>,
) {
    const PER_THREAD: usize = 1 << 20;
    let row_bytes = cols / t.block_size() as usize * t.type_size() as usize;
    let rows = out.len() / cols;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8)
        .min(out.len() / PER_THREAD)
        .max(1);
    let work = |first: usize, out: &mut [f32]| match source_rows {
        None => {
            let n = out.len() / cols;
            dequant::dequantize(t, &bytes[first * row_bytes..(first + n) * row_bytes], out);
        }
        Some(src) => {
            for (r, o) in out.chunks_mut(cols).enumerate() {
                let s = src[first + r];
                dequant::dequantize(t, &bytes[s * row_bytes..(s + 1) * row_bytes], o);
            }
        }
    };
    if threads == 1 {
        work(0, out);
        return;
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (i, o) in out.chunks_mut(per * cols).enumerate() {
            let work = &work;
            s.spawn(move || work(i * per, o));
        }
    });
}

/// An open GGUF file: its parsed header and a handle to read tensor data from.
pub struct GgufFile {
    path: PathBuf,
    source: Source,
    len: u64,
    version: u32,
    metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates `path`'s header; tensor data is read later, on demand.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        Self::from_source(Source::File(file), path.to_path_buf())
    }

    /// Parses a GGUF held in memory; `name` stands for the file in error messages.
    pub fn from_bytes(bytes: Vec<u8>, name: impl Into<PathBuf>) -> Result<GgufFile> {
        Self::from_source(Source::Bytes(bytes), name.into())
    }

    fn from_source(source: Source, path: PathBuf) -> Result<GgufFile> {
        let h = parse::parse(&source, &path)?;
        let len = source.len().map_err(|e| Error::io(&path, e))?;
        Ok(GgufFile {
            path,
            source,
            len,
            version: h.version,
            metadata: h.metadata,
            index: h.index,
            tensors: h.tensors,
            tensor_index: h.tensor_index,
            alignment: h.alignment,
            data_offset: h.data_offset,
        })
    }

    /// The file's path (or the name given to [`from_bytes`](Self::from_bytes)).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size in bytes.
    pub fn file_size(&self) -> u64 {
        self.len
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where the data section starts, from the start of the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Every metadata entry, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| self.bad(format!("metadata key {} is missing", quote(key))))
    }

    fn bad(&self, reason: String) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    fn wrong(&self, key: &str, expected: &str, v: &Value) -> Error {
        self.bad(format!(
            "metadata key {}: expected {expected}, found {}",
            quote(key),
            v.describe()
        ))
    }

    /// `general.architecture` (`llama`, `qwen2`...).
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// A string value; an error naming the key when it is missing or not a string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.wrong(key, "a string", v))
    }

    /// An integer value of any integer type, as i128, or an error naming the key.
    fn get_int(&self, key: &str, expected: &str) -> Result<i128> {
        let v = self.require(key)?;
        v.as_i128().ok_or_else(|| self.wrong(key, expected, v))
    }

    /// A value of any integer type that fits in u32.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let i = self.get_int(key, "an integer that fits in u32")?;
        u32::try_from(i).map_err(|_| {
            self.bad(format!(
                "metadata key {}: expected an integer that fits in u32, found {i}",
                quote(key)
            ))
        })
    }

    /// A value of any integer type that fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let i = self.get_int(key, "an integer that fits in u64")?;
        u64::try_from(i).map_err(|_| {
            self.bad(format!(
                "metadata key {}: expected an integer that fits in u64, found {i}",
                quote(key)
            ))
        })
    }

    /// A value of any integer type that fits in i64.
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        let i = self.get_int(key, "an integer that fits in i64")?;
        i64::try_from(i).map_err(|_| {
            self.bad(format!(
                "metadata key {}: expected an integer that fits in i64, found {i}",
                quote(key)
            ))
        })
    }

    /// A float32 value; float64 and integer values are converted.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        v.as_f64()
            .map(|f| f as f32)
            .ok_or_else(|| self.wrong(key, "a number", v))
    }

    /// A bool value.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(self.wrong(key, "a bool", v)),
        }
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        let v = self.require(key)?;
        v.as_array()
            .and_then(Array::as_strs)
            .ok_or_else(|| self.wrong(key, "an array of strings", v))
    }

    /// An array of any integer type, as i64 (an error if an element does not fit).
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>> {
        let v = self.require(key)?;
        let ints = v
            .as_array()
            .and_then(Array::to_i128s)
            .ok_or_else(|| self.wrong(key, "an array of integers", v))?;
        ints.into_iter()
            .map(|i| {
                i64::try_from(i).map_err(|_| {
                    self.bad(format!(
                        "metadata key {}: element {i} does not fit in i64",
                        quote(key)
                    ))
                })
            })
            .collect()
    }

    /// An array of float or integer type, as f32.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        let v = self.require(key)?;
        v.as_array()
            .and_then(Array::to_f64s)
            .map(|v| v.into_iter().map(|f| f as f32).collect())
            .ok_or_else(|| self.wrong(key, "an array of numbers", v))
    }

    /// Every tensor's info, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of tensor `name`, or None.
    pub fn find_tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The info of tensor `name`; [`Error::MissingTensor`] when the file has none.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.find_tensor(name).ok_or_else(|| Error::MissingTensor {
            path: Some(self.path.clone()),
            tensor: name.to_string(),
        })
    }

    /// The tensor's bytes exactly as stored (blocks for quantized types).
    pub fn tensor_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let info = self.tensor(name)?;
        self.read(info)
    }

    fn read(&self, info: &TensorInfo) -> Result<Vec<u8>> {
        // n_bytes was checked to lie inside the file when the header was parsed.
        let mut buf = vec![0u8; info.n_bytes as usize];
        self.source
            .read_at(info.file_offset, &mut buf)
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(buf)
    }

    /// Tensor `name` as f32 in PyTorch shape, on `device`. Handles F32, F16, BF16, F64,
    /// Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K and Q6_K (see [`GgmlType::can_dequantize`]); the
    /// values are those gguf-py's `dequantize` gives, bit for bit.
    pub fn dequantize(&self, name: &str, device: Device) -> Result<Tensor> {
        self.dequantize_rows(name, device, None)
    }

    /// [`dequantize`](Self::dequantize) with the rows (the PyTorch shape's first
    /// dimension of a 2-D tensor) reordered: output row `r` is the file's row
    /// `source_rows[r]`; `source_rows` must be a permutation of the rows.
    pub(crate) fn dequantize_rows(
        &self,
        name: &str,
        device: Device,
        source_rows: Option<&[usize]>,
    ) -> Result<Tensor> {
        let info = self.tensor(name)?;
        let t = info.ggml_type;
        if !t.can_dequantize() {
            return Err(self.bad(format!(
                "tensor {} has type {t}, which reuse cannot dequantize (it handles F32, \
                 F16, BF16, F64, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K)",
                quote(name)
            )));
        }
        let (rows, cols) = info.rows_cols();
        if let Some(src) = source_rows {
            let mut seen = vec![false; rows as usize];
            let ok = info.dims.len() == 2
                && src.len() == rows as usize
                && src
                    .iter()
                    .all(|&r| r < seen.len() && !std::mem::replace(&mut seen[r], true));
            if !ok {
                return Err(Error::invalid(
                    format!("row order for tensor {}", quote(name)),
                    format!("expected a permutation of the {rows} rows of a 2-D tensor"),
                ));
            }
        }
        let bytes = self.read(info)?;
        let n = info.n_elements as usize;
        let tensor = Tensor::f_empty([n as i64], (Kind::Float, Device::Cpu))?;
        if n > 0 {
            // SAFETY: `tensor` was just made by us: a contiguous CPU f32 tensor of `n` > 0
            // elements (so its data pointer is non-null and aligned) that nothing else
            // references, so its storage is `n` valid, exclusively borrowed f32s for the
            // life of this slice (which ends before `tensor` is used). Writing in place
            // spares a second 4-bytes-a-weight buffer and its copy.
            let out = unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut f32, n) };
            dequantize_rows_into(t, &bytes, out, cols as usize, source_rows);
        }
        drop(bytes);
        let tensor = tensor.f_reshape(info.shape())?;
        Ok(if device == Device::Cpu {
            tensor
        } else {
            tensor.f_to_device(device)?
        })
    }

    /// The codes and scales of a Q8_0, Q4_0 or Q4_1 tensor, on `device` (see
    /// [`QuantParts`] for the layout and formulas).
    pub fn quant_parts(&self, name: &str, device: Device) -> Result<QuantParts> {
        let info = self.tensor(name)?;
        let t = info.ggml_type;
        if !t.has_parts() {
            return Err(self.bad(format!(
                "tensor {} has type {t}; quantization parts exist for Q8_0, Q4_0 and Q4_1",
                quote(name)
            )));
        }
        let (rows, cols) = info.rows_cols();
        let groups = cols / 32;
        let bytes = self.read(info)?;
        let n_blocks = info.n_elements as usize / 32;
        let mut scales = Vec::with_capacity(n_blocks);
        let mut mins = Vec::with_capacity(if t == GgmlType::Q4_1 { n_blocks } else { 0 });
        let mut codes = Vec::with_capacity(info.n_elements as usize);
        dequant::split_parts(t, &bytes, &mut scales, &mut mins, &mut codes);
        drop(bytes);
        let to = |x: Tensor, shape: [i64; 2]| -> Result<Tensor> {
            Ok(x.f_reshape(shape)?.f_to_device(device)?)
        };
        let codes = if t == GgmlType::Q8_0 {
            let signed: Vec<i8> = codes.into_iter().map(|c| c as i8).collect();
            Tensor::f_from_slice(&signed)?
        } else {
            Tensor::f_from_slice(&codes)?
        };
        Ok(QuantParts {
            ggml_type: t,
            scales: to(Tensor::f_from_slice(&scales)?, [rows, groups])?,
            mins: if t == GgmlType::Q4_1 {
                Some(to(Tensor::f_from_slice(&mins)?, [rows, groups])?)
            } else {
                None
            },
            codes: to(codes, [rows, cols])?,
        })
    }
}

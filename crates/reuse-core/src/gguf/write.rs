//! A small GGUF writer: enough to make test files (tiny models, damaged headers) and
//! to write a model back in the format llama.cpp reads.

use std::path::Path;

use half::{bf16, f16};
use tch::{Kind, Tensor};

use super::dequant;
use super::parse::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS};
use super::types::GgmlType;
use super::value::{Array, Value};
use crate::error::{Error, Result};

/// Builds a GGUF file: metadata entries and tensors, in the order they are added.
///
/// ```
/// use reuse_core::gguf::{GgmlType, GgufFile, GgufWriter, Value};
/// # fn main() -> reuse_core::Result<()> {
/// let mut w = GgufWriter::new();
/// w.metadata("general.architecture", Value::String("llama".into()));
/// w.tensor_f32("token_embd.weight", &[2, 32], &[0.5; 64], GgmlType::Q8_0)?;
/// let file = GgufFile::from_bytes(w.to_bytes(), "tiny.gguf")?;
/// assert_eq!(file.tensor("token_embd.weight")?.dims(), &[32, 2]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct GgufWriter {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, GgmlType, Vec<u64>, Vec<u8>)>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty GGUF v3 file.
    pub fn new() -> Self {
        GgufWriter {
            version: 3,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Writes this version number in the header instead of 3 (the layout stays v2/v3's).
    pub fn version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Adds a metadata entry (a `general.alignment` uint32 sets the data alignment).
    pub fn metadata(&mut self, key: impl Into<String>, value: Value) -> &mut Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Adds a tensor from its stored bytes; `dims` in GGUF order (`ne0` first).
    pub fn tensor_bytes(
        &mut self,
        name: impl Into<String>,
        ggml_type: GgmlType,
        dims: &[u64],
        bytes: Vec<u8>,
    ) -> Result<&mut Self> {
        let name = name.into();
        let n: u64 = dims.iter().product();
        let block = ggml_type.block_size();
        if dims.is_empty() || dims.len() > MAX_DIMS as usize || dims[0] % block != 0 {
            return Err(Error::invalid(
                format!("GGUF tensor `{name}`"),
                format!("dims {dims:?} do not suit {ggml_type} (1 to 4 dims, ne0 a multiple of {block})"),
            ));
        }
        let want = n / block * ggml_type.type_size();
        if bytes.len() as u64 != want {
            return Err(Error::invalid(
                format!("GGUF tensor `{name}`"),
                format!(
                    "{dims:?} of {ggml_type} take {want} bytes, got {}",
                    bytes.len()
                ),
            ));
        }
        self.tensors.push((name, ggml_type, dims.to_vec(), bytes));
        Ok(self)
    }

    /// Adds f32 values of PyTorch shape `shape` (row-major), stored as `ggml_type`: F32,
    /// F16, BF16, or Q8_0 / Q4_0 / Q4_1 with gguf-py's reference rounding.
    pub fn tensor_f32(
        &mut self,
        name: impl Into<String>,
        shape: &[i64],
        values: &[f32],
        ggml_type: GgmlType,
    ) -> Result<&mut Self> {
        let name = name.into();
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d.max(0) as u64).collect();
        let n: u64 = dims.iter().product();
        if n != values.len() as u64 {
            return Err(Error::invalid(
                format!("GGUF tensor `{name}`"),
                format!("shape {shape:?} holds {n} values, got {}", values.len()),
            ));
        }
        let bytes = match ggml_type {
            GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            GgmlType::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            GgmlType::BF16 => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            t if t.has_parts() && dims.first().is_some_and(|d| d % 32 == 0) => {
                dequant::quantize(t, values).unwrap_or_default()
            }
            t => {
                return Err(Error::invalid(
                    format!("GGUF tensor `{name}`"),
                    format!("cannot store {shape:?} as {t} (F32, F16, BF16, or Q8_0/Q4_0/Q4_1 with a last dimension that is a multiple of 32)"),
                ))
            }
        };
        self.tensor_bytes(name, ggml_type, &dims, bytes)
    }

    /// Adds a tch tensor (any float kind, PyTorch shape), stored as `ggml_type` (see
    /// [`tensor_f32`](Self::tensor_f32)).
    pub fn tensor(
        &mut self,
        name: impl Into<String>,
        t: &Tensor,
        ggml_type: GgmlType,
    ) -> Result<&mut Self> {
        let shape = t.size();
        let flat = t
            .f_to_kind(Kind::Float)?
            .f_to_device(tch::Device::Cpu)?
            .f_contiguous()?
            .f_view([-1])?;
        let values = Vec::<f32>::try_from(&flat)?;
        self.tensor_f32(name, &shape, &values, ggml_type)
    }

    fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find_map(|(k, v)| match v {
                Value::U32(a) if k == ALIGNMENT_KEY && a.is_power_of_two() => Some(u64::from(*a)),
                _ => None,
            })
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment() as usize;
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&v.value_type().id().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for (name, t, dims, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + bytes.len()).next_multiple_of(align);
        }
        out.resize(out.len().next_multiple_of(align), 0);
        for (_, _, _, bytes) in &self.tensors {
            out.extend_from_slice(bytes);
            out.resize(out.len().next_multiple_of(align), 0);
        }
        out
    }

    /// Writes the file atomically (a temp file in the same folder, fsync, rename).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::checkpoint::write_atomic(path.as_ref(), &self.to_bytes())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(a) => put_array(out, a),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    out.extend_from_slice(&a.element_type().id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => each!(v),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        Array::String(v) => v.iter().for_each(|s| put_str(out, s)),
        Array::Array(v) => v.iter().for_each(|a| put_array(out, a)),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F64(v) => each!(v),
    }
}

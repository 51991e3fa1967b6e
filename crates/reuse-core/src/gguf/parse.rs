//! The header parser. Every length, count and offset read from the file is compared with
//! the bytes that remain before anything is allocated for it, so a stranger's file can
//! make the parser fail but never allocate more than a small multiple of its own size.

use std::collections::HashMap;
use std::path::Path;

use super::source::Source;
use super::types::GgmlType;
use super::value::{Array, Value, ValueType};
use super::{quote, TensorInfo};
use crate::error::{Error, Result};

/// `GGUF` in the file's first four bytes.
pub(crate) const MAGIC: [u8; 4] = *b"GGUF";
/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that sets the alignment.
pub(crate) const ALIGNMENT_KEY: &str = "general.alignment";
/// llama.cpp's GGML_MAX_DIMS.
pub(crate) const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are refused (a deep nest would recurse without end).
const MAX_NESTING: usize = 8;
/// Bytes read from the file at a time while parsing the header.
const CHUNK: u64 = 1 << 20;
/// Fewest bytes a metadata entry takes: key length, value type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Fewest bytes a tensor info takes: name length, n_dims, one dim, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// What the header holds.
pub(crate) struct Header {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    pub tensor_index: HashMap<String, usize>,
    pub alignment: u64,
    pub data_offset: u64,
}

/// A buffered cursor over the source that knows how many bytes remain.
struct Cursor<'a> {
    src: &'a Source,
    path: &'a Path,
    len: u64,
    pos: u64,
    buf: Vec<u8>,
    buf_start: u64,
    /// What is being read, for error messages ("metadata key `x`", "tensor `y`").
    ctx: String,
}

impl<'a> Cursor<'a> {
    fn corrupt(&self, reason: String) -> Error {
        Error::Corrupt {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    /// The next `n` bytes; an error naming the context when the file ends first.
    fn bytes(&mut self, n: u64) -> Result<&[u8]> {
        if n > self.remaining() {
            return Err(self.corrupt(format!(
                "{}: needs {n} bytes at offset {}, but the file ends {} bytes later (truncated?)",
                self.ctx,
                self.pos,
                self.remaining()
            )));
        }
        let buf_end = self.buf_start + self.buf.len() as u64;
        if self.pos < self.buf_start || self.pos + n > buf_end {
            // n <= remaining <= file size: this allocation is justified by the file.
            let want = n.max(CHUNK).min(self.remaining());
            self.buf.resize(want as usize, 0);
            self.src
                .read_at(self.pos, &mut self.buf)
                .map_err(|e| Error::io(self.path, e))?;
            self.buf_start = self.pos;
        }
        let start = (self.pos - self.buf_start) as usize;
        self.pos += n;
        Ok(&self.buf[start..start + n as usize])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let b = self.bytes(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A GGUF string: u64 length, then that many bytes of UTF-8.
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > self.remaining() {
            return Err(self.corrupt(format!(
                "{}: string length {n} is larger than the {} bytes left in the file",
                self.ctx,
                self.remaining()
            )));
        }
        let bytes = self.bytes(n)?.to_vec();
        String::from_utf8(bytes)
            .map_err(|e| self.corrupt(format!("{}: string is not valid UTF-8 ({e})", self.ctx)))
    }

    fn value_type(&mut self) -> Result<ValueType> {
        let id = self.u32()?;
        ValueType::from_id(id).ok_or_else(|| {
            self.corrupt(format!(
                "{}: unknown value type {id} (expected 0 to 12)",
                self.ctx
            ))
        })
    }

    fn value(&mut self, t: ValueType, depth: usize) -> Result<Value> {
        Ok(match t {
            ValueType::U8 => Value::U8(self.array::<1>()?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array()?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array()?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array()?)),
            ValueType::U32 => Value::U32(self.u32()?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array()?)),
            ValueType::U64 => Value::U64(self.u64()?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array()?)),
            ValueType::Bool => {
                let b = self.array::<1>()?[0];
                Value::Bool(self.bool(b)?)
            }
            ValueType::String => Value::String(self.string()?),
            ValueType::Array => Value::Array(self.array_value(depth)?),
        })
    }

    fn bool(&self, b: u8) -> Result<bool> {
        match b {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.corrupt(format!("{}: bool byte is {b}, expected 0 or 1", self.ctx))),
        }
    }

    /// An array: element type, u64 count, elements. The count is capped by the bytes left
    /// divided by the element's smallest size before the Vec is made.
    fn array_value(&mut self, depth: usize) -> Result<Array> {
        if depth >= MAX_NESTING {
            return Err(self.corrupt(format!(
                "{}: arrays nested more than {MAX_NESTING} deep",
                self.ctx
            )));
        }
        let t = self.value_type()?;
        let n = self.u64()?;
        let min = t.min_size();
        if n > self.remaining() / min {
            return Err(self.corrupt(format!(
                "{}: array of {n} {t} needs at least {} bytes, but only {} remain",
                self.ctx,
                n.saturating_mul(min),
                self.remaining()
            )));
        }
        // n * min <= remaining: the fixed-size reads below are in bounds and their Vecs
        // are no larger than the bytes they come from (times the element's size).
        fn fixed<T, const N: usize>(
            c: &mut Cursor<'_>,
            n: u64,
            f: impl Fn([u8; N]) -> T,
        ) -> Result<Vec<T>> {
            let b = c.bytes(n * N as u64)?;
            Ok(b.chunks_exact(N)
                .map(|ch| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(ch);
                    f(a)
                })
                .collect())
        }
        Ok(match t {
            ValueType::U8 => Array::U8(fixed(self, n, |a: [u8; 1]| a[0])?),
            ValueType::I8 => Array::I8(fixed(self, n, i8::from_le_bytes)?),
            ValueType::U16 => Array::U16(fixed(self, n, u16::from_le_bytes)?),
            ValueType::I16 => Array::I16(fixed(self, n, i16::from_le_bytes)?),
            ValueType::U32 => Array::U32(fixed(self, n, u32::from_le_bytes)?),
            ValueType::I32 => Array::I32(fixed(self, n, i32::from_le_bytes)?),
            ValueType::F32 => Array::F32(fixed(self, n, f32::from_le_bytes)?),
            ValueType::U64 => Array::U64(fixed(self, n, u64::from_le_bytes)?),
            ValueType::I64 => Array::I64(fixed(self, n, i64::from_le_bytes)?),
            ValueType::F64 => Array::F64(fixed(self, n, f64::from_le_bytes)?),
            ValueType::Bool => {
                let raw = fixed(self, n, |a: [u8; 1]| a[0])?;
                let mut v = Vec::with_capacity(raw.len());
                for b in raw {
                    v.push(self.bool(b)?);
                }
                Array::Bool(v)
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.string()?);
                }
                Array::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.array_value(depth + 1)?);
                }
                Array::Array(v)
            }
        })
    }
}

/// Parses and validates the header of `src` (named `path` in errors).
pub(crate) fn parse(src: &Source, path: &Path) -> Result<Header> {
    let len = src.len().map_err(|e| Error::io(path, e))?;
    let mut c = Cursor {
        src,
        path,
        len,
        pos: 0,
        buf: Vec::new(),
        buf_start: 0,
        ctx: "header".to_string(),
    };
    let magic: [u8; 4] = c.array()?;
    if magic != MAGIC {
        return Err(c.corrupt(format!(
            "not a GGUF file: the first bytes are {magic:02x?}, expected \"GGUF\""
        )));
    }
    let version = c.u32()?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(c.corrupt(
                "GGUF version 1 is not supported (expected 2 or 3; v1 used 32-bit counts)".into(),
            ))
        }
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(c.corrupt(format!(
                "a big-endian GGUF (version {}); only little-endian files are supported",
                v.swap_bytes()
            )))
        }
        v => return Err(c.corrupt(format!("unsupported GGUF version {v} (expected 2 or 3)"))),
    }
    c.ctx = "tensor count".into();
    let n_tensors = c.u64()?;
    c.ctx = "metadata count".into();
    let n_kv = c.u64()?;
    if n_kv > c.remaining() / MIN_KV_BYTES {
        return Err(c.corrupt(format!(
            "the header declares {n_kv} metadata entries, more than the {} bytes left can hold",
            c.remaining()
        )));
    }

    let mut metadata = Vec::with_capacity(n_kv as usize);
    let mut index = HashMap::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        c.ctx = format!("metadata entry #{i}: key");
        let key = c.string()?;
        let qk = quote(&key);
        c.ctx = format!("metadata key {qk}");
        let t = c.value_type()?;
        let v = c.value(t, 0)?;
        if index.insert(key.clone(), metadata.len()).is_some() {
            return Err(c.corrupt(format!("metadata key {qk} appears twice")));
        }
        metadata.push((key, v));
    }

    let alignment = match metadata.get(index.get(ALIGNMENT_KEY).copied().unwrap_or(usize::MAX)) {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if *a != 0 && a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => {
            return Err(c.corrupt(format!(
                "metadata key `{ALIGNMENT_KEY}`: expected a uint32 power of two, found {}",
                v.describe()
            )))
        }
    };

    c.ctx = "tensor infos".into();
    if n_tensors > c.remaining() / MIN_TENSOR_INFO_BYTES {
        return Err(c.corrupt(format!(
            "the header declares {n_tensors} tensors, more than the {} bytes left can describe",
            c.remaining()
        )));
    }
    let mut raw = Vec::with_capacity(n_tensors as usize);
    let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        c.ctx = format!("tensor info #{i}: name");
        let name = c.string()?;
        let q = quote(&name);
        c.ctx = format!("tensor {q}");
        let n_dims = c.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(c.corrupt(format!(
                "tensor {q}: {n_dims} dimensions, expected 1 to {MAX_DIMS}"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = c.u64()?;
            if d > i64::MAX as u64 {
                return Err(c.corrupt(format!("tensor {q}: dimension {d} is larger than 2^63 - 1")));
            }
            dims.push(d);
        }
        let type_id = c.u32()?;
        let ggml_type = GgmlType::from_id(type_id)
            .ok_or_else(|| c.corrupt(format!("tensor {q}: unknown ggml type {type_id}")))?;
        let offset = c.u64()?;
        if tensor_index.insert(name.clone(), raw.len()).is_some() {
            return Err(c.corrupt(format!("tensor {q} appears twice")));
        }
        raw.push((name, dims, ggml_type, offset));
    }
    let header_end = c.pos;
    let data_offset = header_end
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| c.corrupt("the data section's offset overflows".into()))?;

    let mut tensors = Vec::with_capacity(raw.len());
    for (name, dims, ggml_type, offset) in raw {
        tensors.push(check_tensor(
            &c,
            name,
            dims,
            ggml_type,
            offset,
            alignment,
            data_offset,
            len,
        )?);
    }
    check_overlaps(&c, &tensors)?;
    Ok(Header {
        version,
        metadata,
        index,
        tensors,
        tensor_index,
        alignment,
        data_offset,
    })
}

/// Shape, size and placement of one tensor, against its type and the file.
#[allow(clippy::too_many_arguments)]
fn check_tensor(
    c: &Cursor<'_>,
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    offset: u64,
    alignment: u64,
    data_offset: u64,
    len: u64,
) -> Result<TensorInfo> {
    let q = quote(&name);
    let block = ggml_type.block_size();
    if dims[0] % block != 0 {
        return Err(c.corrupt(format!(
            "tensor {q}: {ggml_type} stores blocks of {block} weights, but its first \
             dimension (ne0) is {}, not a multiple of {block}",
            dims[0]
        )));
    }
    // Zero dimensions count as one here, so that every partial product (rows, columns)
    // of a tensor with no elements fits in i64 too.
    let n_elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d.max(1)))
        .filter(|&n| n <= i64::MAX as u64)
        .map(|n| if dims.contains(&0) { 0 } else { n })
        .ok_or_else(|| {
            c.corrupt(format!(
                "tensor {q}: dimensions {dims:?} hold more than 2^63 - 1 elements"
            ))
        })?;
    let n_bytes = (n_elements / block)
        .checked_mul(ggml_type.type_size())
        .ok_or_else(|| {
            c.corrupt(format!(
                "tensor {q}: its size in bytes overflows ({dims:?} of {ggml_type})"
            ))
        })?;
    if offset % alignment != 0 {
        return Err(c.corrupt(format!(
            "tensor {q}: data offset {offset} is not a multiple of the alignment {alignment}"
        )));
    }
    let start = data_offset.checked_add(offset);
    let end = start.and_then(|s| s.checked_add(n_bytes));
    match (start, end) {
        (Some(start), Some(end)) if end <= len => Ok(TensorInfo {
            name,
            ggml_type,
            dims,
            offset,
            file_offset: start,
            n_bytes,
            n_elements,
        }),
        _ => Err(c.corrupt(format!(
            "tensor {q}: its {n_bytes} bytes at data offset {offset} (file offset {}) \
             end past the end of the file ({len} bytes)",
            start.map_or_else(|| "overflowing".to_string(), |s| s.to_string())
        ))),
    }
}

fn check_overlaps(c: &Cursor<'_>, tensors: &[TensorInfo]) -> Result<()> {
    let mut spans: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    spans.sort_by_key(|t| t.offset);
    for w in spans.windows(2) {
        let (a, b) = (w[0], w[1]);
        if a.offset + a.n_bytes > b.offset {
            return Err(c.corrupt(format!(
                "tensors {} (data bytes {}..{}) and {} (from {}) overlap",
                quote(&a.name),
                a.offset,
                a.offset + a.n_bytes,
                quote(&b.name),
                b.offset
            )));
        }
    }
    Ok(())
}

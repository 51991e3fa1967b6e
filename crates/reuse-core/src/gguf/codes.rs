//! A GGUF weight kept in its file's codes: the [`WeightStorage`] behind
//! [`LoadOptions::keep_codes`](crate::models::LoadOptions::keep_codes), so a Q8_0 / Q4_0 /
//! Q4_1 model holds about its file's bytes instead of four bytes a weight.
//!
//! What is held, per 32-weight group (the file's own bytes, rows possibly reordered):
//!
//! | type | codes | scales | file bytes |
//! |------|-------|--------|------------|
//! | Q8_0 | 32 × i8 | f16 `d` | 34 |
//! | Q4_0 | 16 bytes of nibbles | f16 `d` | 18 |
//! | Q4_1 | 16 bytes of nibbles | f16 `d`, f16 `m` | 20 |
//!
//! The scales stay f16, as in the file (widening them to f32 would add 2 or 4 bytes a
//! group for nothing: f16 → f32 is exact). With bf16 activations on the CPU, a Q4_0 /
//! Q4_1 weight's nibbles are held in libtorch's int4 kernel layout instead of the file's
//! (the same bytes, reordered; see [`int4pack`](super::int4pack)), plus the kernel's bf16
//! scale-and-zero pairs: 4 more bytes a group, 24 instead of 20 for Q4_1 (1.2×).
//!
//! * [`WeightStorage::dequantize`] is exact: in f32 it is bit for bit
//!   [`GgufFile::dequantize`] (the same f32 operations in the same order), and in bf16 /
//!   f16 those values rounded once.
//! * [`WeightStorage::matmul`] with bf16 activations on the CPU and no gradient runs
//!   `_weight_int4pack_mm_for_cpu` for Q4_0 / Q4_1, which reads the 4-bit codes directly.
//!   Its scales and zeros are bf16 (the kernel's only fast dtype on x86), so it differs
//!   from the exact weight by up to 2⁻⁹ of each group's scale, about what a dense bf16
//!   copy of the weight differs by. Everything else (f32 or f16 activations, Q8_0, a
//!   gradient to propagate, another device) dequantizes into the activations' dtype and
//!   multiplies, dropping the dense copy after the call: exact, but it writes four bytes
//!   a weight on every call. When a gradient flows through `x` (LoRA training on this
//!   frozen base: QLoRA on the file's codes), the matmul is one autograd node
//!   (`cpp/codes_shim.cpp`) that saves the codes and rebuilds the weight in backward, so
//!   no dense copy lives from forward to backward. (The int4 kernel's packed layout
//!   takes the dense path then: load in f32 or f16 to train on kept codes.)

use std::any::Any;

use half::f16;
use tch::{Device, Kind, Tensor};

use super::int4pack::{self, Layout};
use super::{quote, GgmlType, GgufFile};
use crate::linear::WeightStorage;
use crate::{Error, Result};

/// The most input rows (tokens) the int4 kernel multiplies; more go through a dequantized
/// bf16 weight. The kernel is a GEMV-style loop that re-expands every code for each
/// block of 4 rows, so its cost grows with the rows where a dense GEMM's barely does:
/// measured on the 2-core EPYC (AVX512) with SmolLM2's `ffn_up` (1536 × 576, one
/// thread), 0.026 ms against 1.1 ms at 1 row, 1.4 against 1.7 at 128, 5.8 against 3.1
/// at 512.
const KERNEL_MAX_ROWS: i64 = 128;

/// Where the 4-bit or 8-bit codes are.
enum Codes {
    /// Q8_0: i8 `[out, in]`. Q4_0 / Q4_1: u8 `[out, in / 2]` in the file's layout (each
    /// group's 16 bytes hold weight `j` in the low nibble of byte `j`, `j + 16` in the
    /// high nibble).
    File(Tensor),
    /// Q4_0 / Q4_1 packed for libtorch's CPU kernel (u8 `[out, in / 2]` in `layout`), with
    /// the kernel's `qScaleAndZeros` (bf16 `[in / 32, out, 2]`).
    Int4Pack {
        packed: Tensor,
        layout: Layout,
        scale_zeros: Tensor,
    },
}

/// A linear weight `[out, in]` of type Q8_0, Q4_0 or Q4_1 held in its GGUF codes and f16
/// scales (and, for Q4_1, f16 minimums), computing in `kind` (see the module docs).
///
/// Invariants: every tensor is contiguous and on one device; the codes hold `out` rows
/// of `in` weights, `in` a multiple of 32; scales and minimums are `[out, in / 32]`.
pub struct CodesStorage {
    ggml_type: GgmlType,
    shape: [i64; 2],
    kind: Kind,
    codes: Codes,
    scales: Tensor,
    mins: Option<Tensor>,
}

impl std::fmt::Debug for CodesStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodesStorage")
            .field("ggml_type", &self.ggml_type)
            .field("shape", &self.shape)
            .field("kind", &self.kind)
            .field("int4pack", &self.uses_int4pack())
            .finish()
    }
}

/// A contiguous CPU tensor's elements as a slice.
///
/// # Safety
/// `t` must be a contiguous CPU tensor whose element type is `T`, and nothing may write
/// to its storage while the slice lives.
unsafe fn host<T>(t: &Tensor) -> &[T] {
    debug_assert!(t.device() == Device::Cpu && t.is_contiguous());
    let n = t.numel();
    if n == 0 {
        return &[];
    }
    // SAFETY: per the contract, `data_ptr` points at `n` initialised, aligned `T`s.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, n) }
}

impl CodesStorage {
    /// Tensor `name` of `file` (2-D, Q8_0, Q4_0 or Q4_1) in the file's row order, on
    /// `device`, computing in `kind` (f32, f16 or bf16).
    pub fn load(file: &GgufFile, name: &str, device: Device, kind: Kind) -> Result<Self> {
        Self::load_rows(file, name, None, device, kind)
    }

    /// [`load`](Self::load) with output row `r` taken from the file's row
    /// `source_rows[r]` (a permutation of the rows: whole blocks move, so the codes are
    /// unchanged).
    pub(crate) fn load_rows(
        file: &GgufFile,
        name: &str,
        source_rows: Option<&[usize]>,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let what = || format!("{}: tensor {}", file.path().display(), quote(name));
        let info = file.tensor(name)?;
        let t = info.ggml_type();
        if !t.has_parts() || info.dims().len() != 2 {
            return Err(Error::invalid(
                what(),
                format!(
                    "expected a 2-D Q8_0, Q4_0 or Q4_1 weight to keep in its codes, found {t} with shape {:?}",
                    info.shape()
                ),
            ));
        }
        if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16) {
            return Err(Error::invalid(
                what(),
                format!("compute dtype must be f32, f16 or bf16, found {kind:?}"),
            ));
        }
        let (rows, cols) = info.rows_cols();
        let (n, k) = (rows as usize, cols as usize);
        if let Some(src) = source_rows {
            let mut seen = vec![false; n];
            let ok = src.len() == n
                && src
                    .iter()
                    .all(|&r| r < n && !std::mem::replace(&mut seen[r], true));
            if !ok {
                return Err(Error::invalid(
                    what(),
                    format!("row order: expected a permutation of the {n} rows"),
                ));
            }
        }
        let bytes = file.tensor_bytes(name)?;
        let block = t.type_size() as usize;
        let groups = k / 32;
        let row_bytes = groups * block;
        let per_group = if t == GgmlType::Q8_0 { 32 } else { 16 };
        let mut codes = Vec::with_capacity(n * groups * per_group);
        let mut scales = Vec::with_capacity(n * groups);
        let mut mins = Vec::with_capacity(if t == GgmlType::Q4_1 { n * groups } else { 0 });
        let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]);
        for r in 0..n {
            let s = source_rows.map_or(r, |src| src[r]);
            for b in bytes[s * row_bytes..(s + 1) * row_bytes].chunks_exact(block) {
                scales.push(f16_at(b, 0));
                match t {
                    GgmlType::Q8_0 => codes.extend_from_slice(&b[2..34]),
                    GgmlType::Q4_0 => codes.extend_from_slice(&b[2..18]),
                    _ => {
                        mins.push(f16_at(b, 2));
                        codes.extend_from_slice(&b[4..20]);
                    }
                }
            }
        }
        drop(bytes);
        let grid = |v: &[f16]| -> Result<Tensor> {
            Ok(Tensor::f_from_slice(v)?
                .f_view([rows, groups as i64])?
                .f_to_device(device)?)
        };
        let packed = if t != GgmlType::Q8_0 && kind == Kind::BFloat16 && device == Device::Cpu {
            int4pack::pack(&codes, rows, cols)
        } else {
            None
        };
        let codes = match packed {
            Some((packed, layout)) => {
                // (s, z) per group and row: the kernel computes (q - 8) s + z.
                let mut sz = vec![0f32; groups * n * 2];
                for r in 0..n {
                    for g in 0..groups {
                        let d = scales[r * groups + g].to_f32();
                        let z = match mins.get(r * groups + g) {
                            Some(m) => m.to_f32() + 8.0 * d,
                            None => 0.0,
                        };
                        let i = (g * n + r) * 2;
                        sz[i] = d;
                        sz[i + 1] = z;
                    }
                }
                let scale_zeros = Tensor::f_from_slice(&sz)?
                    .f_view([groups as i64, rows, 2])?
                    .f_to_kind(Kind::BFloat16)?;
                Codes::Int4Pack {
                    packed,
                    layout,
                    scale_zeros,
                }
            }
            None if t == GgmlType::Q8_0 => {
                let signed: Vec<i8> = codes.into_iter().map(|c| c as i8).collect();
                Codes::File(
                    Tensor::f_from_slice(&signed)?
                        .f_view([rows, cols])?
                        .f_to_device(device)?,
                )
            }
            None => Codes::File(
                Tensor::f_from_slice(&codes)?
                    .f_view([rows, cols / 2])?
                    .f_to_device(device)?,
            ),
        };
        Ok(Self {
            ggml_type: t,
            shape: [rows, cols],
            kind,
            codes,
            scales: grid(&scales)?,
            mins: if t == GgmlType::Q4_1 {
                Some(grid(&mins)?)
            } else {
                None
            },
        })
    }

    /// Q8_0, Q4_0 or Q4_1.
    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// The dtype [`WeightStorage::dequantize`] returns and the kernel computes in.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether [`WeightStorage::matmul`] can run libtorch's int4 kernel (bf16 on the CPU,
    /// Q4_0 / Q4_1, a shape it takes).
    pub fn uses_int4pack(&self) -> bool {
        matches!(self.codes, Codes::Int4Pack { .. })
    }

    /// Bytes held: codes, scales, minimums, and the kernel's scale-and-zero pairs.
    pub fn stored_bytes(&self) -> usize {
        let b = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let codes = match &self.codes {
            Codes::File(c) => b(c),
            Codes::Int4Pack {
                packed,
                scale_zeros,
                ..
            } => b(packed) + b(scale_zeros),
        };
        codes + b(&self.scales) + self.mins.as_ref().map_or(0, b)
    }

    /// The codes in the file's layout (unpacked from the kernel's when packed).
    fn file_codes(&self) -> Tensor {
        match &self.codes {
            Codes::File(c) => c.shallow_clone(),
            Codes::Int4Pack { packed, layout, .. } => {
                let [n, k] = self.shape;
                // SAFETY: `packed` is a contiguous CPU u8 tensor this storage owns and
                // never writes.
                let bytes = unsafe { host::<u8>(packed) };
                let nibbles = int4pack::unpack(*layout, bytes, n as usize, k as usize);
                Tensor::from_slice(&nibbles).view([n, k / 2])
            }
        }
    }

    /// The exact f32 weight on the CPU, written in place, rows split over a few threads.
    fn dequantize_cpu(&self, codes: &Tensor) -> Tensor {
        let [n, k] = self.shape;
        let out = Tensor::empty([n, k], (Kind::Float, Device::Cpu));
        if n == 0 || k == 0 {
            return out;
        }
        let (n, k) = (n as usize, k as usize);
        // SAFETY: codes, scales and minimums are contiguous CPU tensors of the element
        // types named (u8 / i8 codes read as bytes), owned by this storage or made just
        // now, and nothing writes to them meanwhile.
        let (codes, scales, mins) = unsafe {
            (
                host::<u8>(codes),
                host::<f16>(&self.scales),
                self.mins.as_ref().map(|m| host::<f16>(m)),
            )
        };
        // SAFETY: `out` was just made: a contiguous CPU f32 tensor of n·k > 0 elements
        // that nothing else references, so its storage is n·k valid, exclusively borrowed
        // f32s for the life of this slice, which ends before `out` is returned.
        let o = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n * k) };
        let t = self.ggml_type;
        let code_row = codes.len() / n;
        let groups = k / 32;
        let threads = std::thread::available_parallelism()
            .map_or(1, |p| p.get())
            .min(8)
            .min(n * k / (1 << 18))
            .max(1);
        let per = n.div_ceil(threads);
        let work = |first: usize, o: &mut [f32]| {
            let rows = o.len() / k;
            let g = first * groups..(first + rows) * groups;
            dequantize_rows(
                t,
                &codes[first * code_row..(first + rows) * code_row],
                &scales[g.clone()],
                mins.map(|m| &m[g]),
                o,
            );
        };
        if threads == 1 {
            work(0, o);
        } else {
            std::thread::scope(|s| {
                for (i, o) in o.chunks_mut(per * k).enumerate() {
                    let work = &work;
                    s.spawn(move || work(i * per, o));
                }
            });
        }
        out
    }

    /// The exact f32 weight with tensor operations, on any device: the same f32
    /// operations in the same order as [`dequantize_rows`].
    fn dequantize_ops(&self, codes: &Tensor) -> Tensor {
        let [n, k] = self.shape;
        let groups = k / 32;
        let d = self.scales.to_kind(Kind::Float).view([n, groups, 1]);
        let w = match self.ggml_type {
            GgmlType::Q8_0 => codes.to_kind(Kind::Float).view([n, groups, 32]) * d,
            t => {
                let c = codes.view([n, groups, 16]);
                let q = Tensor::cat(
                    &[c.bitwise_and(0x0f), c.bitwise_right_shift_tensor_scalar(4)],
                    2,
                )
                .to_kind(Kind::Float);
                match (t, &self.mins) {
                    (GgmlType::Q4_1, Some(m)) => {
                        d * q + m.to_kind(Kind::Float).view([n, groups, 1])
                    }
                    _ => d * (q - 8.0),
                }
            }
        };
        w.view([n, k])
    }

    /// The exact f32 weight (see [`dequantize_ops`](Self::dequantize_ops)), for tests.
    #[cfg(test)]
    fn dequantize_with_ops(&self) -> Tensor {
        self.dequantize_ops(&self.file_codes())
    }
}

/// Dequantizes whole rows: `codes` in the file's layout, one scale (and minimum) a
/// group of 32, into `out`; the formulas and f32 operation order of `dequant.rs`.
fn dequantize_rows(
    t: GgmlType,
    codes: &[u8],
    scales: &[f16],
    mins: Option<&[f16]>,
    out: &mut [f32],
) {
    let groups = out.chunks_exact_mut(32).zip(scales).enumerate();
    match (t, mins) {
        (GgmlType::Q8_0, _) => {
            for (g, (o, d)) in groups {
                let d = d.to_f32();
                for (o, &q) in o.iter_mut().zip(&codes[g * 32..g * 32 + 32]) {
                    *o = f32::from(q as i8) * d;
                }
            }
        }
        (GgmlType::Q4_1, Some(mins)) => {
            for (g, (o, d)) in groups {
                let (d, m) = (d.to_f32(), mins[g].to_f32());
                let (lo, hi) = o.split_at_mut(16);
                for (j, &q) in codes[g * 16..g * 16 + 16].iter().enumerate() {
                    lo[j] = d * f32::from(q & 0x0f) + m;
                    hi[j] = d * f32::from(q >> 4) + m;
                }
            }
        }
        _ => {
            for (g, (o, d)) in groups {
                let d = d.to_f32();
                let (lo, hi) = o.split_at_mut(16);
                for (j, &q) in codes[g * 16..g * 16 + 16].iter().enumerate() {
                    lo[j] = d * f32::from((q & 0x0f) as i8 - 8);
                    hi[j] = d * f32::from((q >> 4) as i8 - 8);
                }
            }
        }
    }
}

impl WeightStorage for CodesStorage {
    fn shape(&self) -> [i64; 2] {
        self.shape
    }

    fn dequantize(&self) -> Tensor {
        let w = match &self.codes {
            Codes::File(c) if c.device() != Device::Cpu => self.dequantize_ops(c),
            Codes::File(c) => self.dequantize_cpu(c),
            Codes::Int4Pack { .. } => self.dequantize_cpu(&self.file_codes()),
        };
        if self.kind == Kind::Float {
            w
        } else {
            w.to_kind(self.kind)
        }
    }

    fn matmul(&self, x: &Tensor) -> Tensor {
        if let Codes::Int4Pack {
            packed,
            scale_zeros,
            ..
        } = &self.codes
        {
            // The kernel has no backward: a gradient to propagate takes the dense path.
            let [n, k] = self.shape;
            let rows = x.numel() as i64 / k.max(1);
            if x.kind() == Kind::BFloat16
                && x.device() == Device::Cpu
                && !x.requires_grad()
                && rows <= KERNEL_MAX_ROWS
            {
                let mut shape = x.size();
                let y = x
                    .f_reshape([-1, k])
                    .and_then(|x2| x2.f_contiguous())
                    .and_then(|x2| {
                        x2.f_internal_weight_int4pack_mm_for_cpu(
                            packed,
                            int4pack::GROUP,
                            scale_zeros,
                        )
                    });
                if let (Ok(y), Some(last)) = (y, shape.last_mut()) {
                    *last = n;
                    return y.reshape(shape);
                }
            }
        }
        // A gradient to propagate through x (adapters training on this frozen base):
        // one autograd node that rebuilds the weight in backward rather than keeping a
        // dense copy from forward to backward.
        if x.requires_grad() {
            if let Codes::File(codes) = &self.codes {
                let t = match self.ggml_type {
                    GgmlType::Q8_0 => 0,
                    GgmlType::Q4_0 => 1,
                    _ => 2,
                };
                return crate::shim::codes_matmul(
                    x,
                    codes,
                    &self.scales,
                    self.mins.as_ref(),
                    t,
                    self.shape,
                )
                .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let w = self.dequantize();
        let w = if w.kind() == x.kind() {
            w
        } else {
            w.to_kind(x.kind())
        };
        x.linear::<&Tensor>(&w, None)
    }

    /// `weight_codes` (i8 `[out, in]` for Q8_0, u8 `[out, in / 2]` nibbles in the file's
    /// layout for Q4_0 / Q4_1: the kernel's packing is unpacked, so what is saved does not
    /// depend on the CPU), `weight_scale` (f16 `[out, in / 32]`) and, for Q4_1,
    /// `weight_min` (f16 `[out, in / 32]`).
    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![
            ("weight_codes".to_string(), self.file_codes()),
            ("weight_scale".to_string(), self.scales.shallow_clone()),
        ];
        if let Some(m) = &self.mins {
            v.push(("weight_min".to_string(), m.shallow_clone()));
        }
        v
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufWriter;

    /// A GGUF in memory with one `[rows, cols]` weight of type `t` (random values).
    fn one_weight(t: GgmlType, rows: i64, cols: i64) -> (GgufFile, Tensor) {
        let w = Tensor::randn([rows, cols], (Kind::Float, Device::Cpu)) * 0.1 - 0.02;
        let mut g = GgufWriter::new();
        g.tensor("w", &w, t).unwrap();
        let file = GgufFile::from_bytes(g.to_bytes(), "one.gguf").unwrap();
        (file, w)
    }

    fn same_bits(a: &Tensor, b: &Tensor) -> bool {
        a.size() == b.size()
            && Vec::<f32>::try_from(a.view([-1]))
                .unwrap()
                .iter()
                .zip(Vec::<f32>::try_from(b.view([-1])).unwrap())
                .all(|(x, y)| x.to_bits() == y.to_bits())
    }

    #[test]
    fn dequantize_is_the_files_values_bit_for_bit() {
        for t in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let (file, _) = one_weight(t, 48, 96);
            let want = file.dequantize("w", Device::Cpu).unwrap();
            for kind in [Kind::Float, Kind::BFloat16] {
                let s = CodesStorage::load(&file, "w", Device::Cpu, kind).unwrap();
                assert_eq!(
                    s.uses_int4pack(),
                    kind == Kind::BFloat16 && t != GgmlType::Q8_0
                );
                let got = s.dequantize();
                assert_eq!(got.kind(), kind);
                assert!(
                    same_bits(
                        &got.to_kind(Kind::Float),
                        &want.to_kind(kind).to_kind(Kind::Float)
                    ),
                    "{t} {kind:?}"
                );
                assert!(
                    same_bits(&s.dequantize_with_ops(), &want),
                    "{t} {kind:?} with tensor ops"
                );
            }
        }
    }

    #[test]
    fn rows_can_be_reordered() {
        let (file, _) = one_weight(GgmlType::Q4_1, 32, 64);
        let order: Vec<usize> = (0..32).rev().collect();
        let s =
            CodesStorage::load_rows(&file, "w", Some(&order), Device::Cpu, Kind::Float).unwrap();
        let want = file.dequantize("w", Device::Cpu).unwrap().flip([0]);
        assert!(same_bits(&s.dequantize(), &want));
        let bad = CodesStorage::load_rows(&file, "w", Some(&[0; 32]), Device::Cpu, Kind::Float);
        assert!(bad.unwrap_err().to_string().contains("permutation"));
    }

    #[test]
    fn f32_matmul_is_the_dense_one() {
        for t in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let (file, _) = one_weight(t, 64, 128);
            let s = CodesStorage::load(&file, "w", Device::Cpu, Kind::Float).unwrap();
            let w = file.dequantize("w", Device::Cpu).unwrap();
            let x = Tensor::randn([3, 5, 128], (Kind::Float, Device::Cpu));
            let got = s.matmul(&x);
            let want = x.linear::<&Tensor>(&w, None);
            assert_eq!(got.size(), [3, 5, 64]);
            // The same dense weight through the same GEMM: equal, not merely close.
            assert!(same_bits(&got, &want), "{t}");
        }
    }

    #[test]
    fn the_int4_kernel_matches_the_dequantized_weight_to_bf16_precision() {
        for t in [GgmlType::Q4_0, GgmlType::Q4_1] {
            let (file, _) = one_weight(t, 96, 256);
            let s = CodesStorage::load(&file, "w", Device::Cpu, Kind::BFloat16).unwrap();
            assert!(s.uses_int4pack());
            let w = file.dequantize("w", Device::Cpu).unwrap();
            let x = Tensor::randn([2, 3, 256], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
            let got = s.matmul(&x).to_kind(Kind::Float);
            // Against the exact weight and the same bf16 inputs, in f32.
            let want = x.to_kind(Kind::Float).linear::<&Tensor>(&w, None);
            let err = (&got - &want).abs().max().double_value(&[]);
            let scale = want.abs().max().double_value(&[]);
            // bf16 scales (2^-9 relative) and a bf16 output (2^-9 relative).
            assert!(
                err <= 2e-2 * scale,
                "{t}: max error {err} against outputs up to {scale}"
            );
            // With a gradient to propagate it takes the dense path, and the gradient flows.
            let xg = x.to_kind(Kind::BFloat16).set_requires_grad(true);
            let y = s.matmul(&xg);
            y.sum(Kind::Float).backward();
            assert_eq!(xg.grad().size(), [2, 3, 256]);
        }
    }

    #[test]
    fn with_a_gradient_the_matmul_rebuilds_the_weight_in_backward() {
        for t in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let (file, _) = one_weight(t, 64, 96);
            let s = CodesStorage::load(&file, "w", Device::Cpu, Kind::Float).unwrap();
            let w = file.dequantize("w", Device::Cpu).unwrap();
            let x0 = Tensor::randn([2, 3, 96], (Kind::Float, Device::Cpu));
            let dy = Tensor::randn([2, 3, 64], (Kind::Float, Device::Cpu));
            let x = x0.copy().set_requires_grad(true);
            let y = s.matmul(&x);
            // One autograd node of the shim, not a saved dense weight: its outputs and
            // the input gradient are the dense matmul's, bit for bit (same weight, same
            // GEMMs).
            (&y * &dy).sum(Kind::Float).backward();
            let xr = x0.copy().set_requires_grad(true);
            let yr = xr.linear::<&Tensor>(&w, None);
            (&yr * &dy).sum(Kind::Float).backward();
            assert!(same_bits(&y.detach(), &yr.detach()), "{t} forward");
            assert!(same_bits(&x.grad(), &xr.grad()), "{t} input gradient");
        }
    }

    #[test]
    fn buffers_are_the_files_codes_whatever_the_layout() {
        let (file, _) = one_weight(GgmlType::Q4_1, 64, 64);
        let a = CodesStorage::load(&file, "w", Device::Cpu, Kind::Float).unwrap();
        let b = CodesStorage::load(&file, "w", Device::Cpu, Kind::BFloat16).unwrap();
        let (na, nb) = (a.named_buffers(), b.named_buffers());
        let names: Vec<_> = na.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["weight_codes", "weight_scale", "weight_min"]);
        for ((_, x), (_, y)) in na.iter().zip(&nb) {
            assert!(x.equal(y));
        }
        assert_eq!(na[0].1.size(), [64, 32]);
        assert_eq!(na[1].1.kind(), Kind::Half);
        // The file's 20 bytes a group; packed for the kernel, 4 more for bf16 (s, z).
        assert_eq!(a.stored_bytes(), 64 * 2 * 20);
        assert_eq!(b.stored_bytes(), 64 * 2 * 24);
    }

    #[test]
    fn other_types_and_shapes_are_refused_naming_the_tensor() {
        let w = Tensor::randn([4, 32], (Kind::Float, Device::Cpu));
        let mut g = GgufWriter::new();
        g.tensor("norm", &w, GgmlType::F32).unwrap();
        let file = GgufFile::from_bytes(g.to_bytes(), "f.gguf").unwrap();
        let e = CodesStorage::load(&file, "norm", Device::Cpu, Kind::Float).unwrap_err();
        assert!(
            e.to_string().contains("`norm`") && e.to_string().contains("F32"),
            "{e}"
        );
    }
}

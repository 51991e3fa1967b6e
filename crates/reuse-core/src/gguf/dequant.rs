//! Dequantization over the file's bytes, and the reverse for the 32-weight block types.
//!
//! Formulas (llama.cpp `ggml-quants.c`, gguf-py `quants.py`), each computed in f32 in the
//! same order as gguf-py so the results are bit-identical to its dequantization:
//!
//! | type | block bytes | value of weight `j` |
//! |------|-------------|---------------------|
//! | Q8_0 | f16 `d`, 32 × i8 `q` | `q[j] · d` |
//! | Q4_0 | f16 `d`, 16 bytes of nibbles | `d · (q[j] − 8)` |
//! | Q4_1 | f16 `d`, f16 `m`, 16 bytes of nibbles | `d · q[j] + m` |
//! | Q5_0 | f16 `d`, u32 high bits, 16 bytes of nibbles | `d · (q[j] − 16)` |
//! | Q5_1 | f16 `d`, f16 `m`, u32 high bits, nibbles | `d · q[j] + m` |
//!
//! In the nibble types the low nibble of byte `i` is weight `i` and the high nibble weight
//! `i + 16`; Q5's fifth bit of weight `j` is bit `j` of the little-endian u32. Q4_K and
//! Q6_K are 256-weight super-blocks with 6-bit (Q4_K) or 8-bit (Q6_K) sub-block scales.

use half::f16;

use super::types::GgmlType;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantizes `bytes` (whole blocks of `t`) into `out` (`block_size` values a block).
/// Returns false, writing nothing, for a type this module does not handle.
pub(crate) fn dequantize(t: GgmlType, bytes: &[u8], out: &mut [f32]) -> bool {
    let bs = t.type_size() as usize;
    let n = t.block_size() as usize;
    debug_assert_eq!(bytes.len() / bs * n, out.len());
    let blocks = bytes.chunks_exact(bs).zip(out.chunks_exact_mut(n));
    match t {
        GgmlType::F32 => {
            for (b, o) in blocks {
                o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F64 => {
            for (b, o) in blocks {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                o[0] = f64::from_le_bytes(a) as f32;
            }
        }
        GgmlType::F16 => {
            for (b, o) in blocks {
                o[0] = f16_at(b, 0);
            }
        }
        GgmlType::BF16 => {
            for (b, o) in blocks {
                o[0] = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
            }
        }
        GgmlType::Q8_0 => {
            for (b, o) in blocks {
                let d = f16_at(b, 0);
                for (o, &q) in o.iter_mut().zip(&b[2..34]) {
                    *o = f32::from(q as i8) * d;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (b, o) in blocks {
                let d = f16_at(b, 0);
                let (lo, hi) = o.split_at_mut(16);
                for (j, &q) in b[2..18].iter().enumerate() {
                    lo[j] = d * f32::from((q & 0x0f) as i8 - 8);
                    hi[j] = d * f32::from((q >> 4) as i8 - 8);
                }
            }
        }
        GgmlType::Q4_1 => {
            for (b, o) in blocks {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let (lo, hi) = o.split_at_mut(16);
                for (j, &q) in b[4..20].iter().enumerate() {
                    lo[j] = d * f32::from(q & 0x0f) + m;
                    hi[j] = d * f32::from(q >> 4) + m;
                }
            }
        }
        GgmlType::Q5_0 => {
            for (b, o) in blocks {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for (j, &q) in b[6..22].iter().enumerate() {
                    let h0 = ((qh >> j) & 1) as u8;
                    let h1 = ((qh >> (j + 16)) & 1) as u8;
                    o[j] = d * f32::from(((q & 0x0f) | (h0 << 4)) as i8 - 16);
                    o[j + 16] = d * f32::from(((q >> 4) | (h1 << 4)) as i8 - 16);
                }
            }
        }
        GgmlType::Q5_1 => {
            for (b, o) in blocks {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                for (j, &q) in b[8..24].iter().enumerate() {
                    let h0 = ((qh >> j) & 1) as u8;
                    let h1 = ((qh >> (j + 16)) & 1) as u8;
                    o[j] = d * f32::from((q & 0x0f) | (h0 << 4)) + m;
                    o[j + 16] = d * f32::from((q >> 4) | (h1 << 4)) + m;
                }
            }
        }
        GgmlType::Q4_K => {
            for (b, o) in blocks {
                q4_k_block(b, o);
            }
        }
        GgmlType::Q6_K => {
            for (b, o) in blocks {
                q6_k_block(b, o);
            }
        }
        _ => return false,
    }
    true
}

/// Q4_K: f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit scales and mins for 8 sub-blocks
/// of 32, then 128 bytes of nibbles (chunk `c` of 32 bytes holds sub-block `2c` in its low
/// nibbles and `2c + 1` in its high ones). Weight = `d·sc[s]·q − dmin·m[s]`.
fn q4_k_block(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let s = &b[4..16];
    let qs = &b[16..144];
    for sub in 0..8 {
        let (sc, m) = if sub < 4 {
            (s[sub] & 0x3f, s[sub + 4] & 0x3f)
        } else {
            (
                (s[sub + 4] & 0x0f) | ((s[sub - 4] >> 2) & 0x30),
                (s[sub + 4] >> 4) | ((s[sub] >> 2) & 0x30),
            )
        };
        let dl = d * f32::from(sc);
        let ml = dmin * f32::from(m);
        let chunk = &qs[(sub / 2) * 32..(sub / 2) * 32 + 32];
        let shift = if sub % 2 == 0 { 0 } else { 4 };
        for (l, &q) in chunk.iter().enumerate() {
            o[sub * 32 + l] = dl * f32::from((q >> shift) & 0x0f) - ml;
        }
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 i8 scales (one per
/// 16 weights), f16 `d`. Weight = `d·scale[i/16]·(q − 32)`.
fn q6_k_block(b: &[u8], o: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    for half in 0..2 {
        for i in 0..128 {
            // ql: byte half*64 + (i % 64), low nibble for i < 64, high for i >= 64.
            let lo = (ql[half * 64 + i % 64] >> (4 * (i / 64))) & 0x0f;
            // qh: byte half*32 + (i % 32), bits 2*(i / 32).
            let hi = (qh[half * 32 + i % 32] >> (2 * (i / 32))) & 0x03;
            let q = ((lo | (hi << 4)) as i8) - 32;
            let idx = half * 128 + i;
            let sc = d * f32::from(scales[idx / 16] as i8);
            o[idx] = sc * f32::from(q);
        }
    }
}

/// The codes and scales of a Q8_0 / Q4_0 / Q4_1 tensor's bytes, one block of 32 at a time:
/// `scales` and `mins` get one value a block, `codes` 32 a block (i8 for Q8_0 as u8 bits,
/// 0..=15 for the 4-bit types), in weight order.
pub(crate) fn split_parts(
    t: GgmlType,
    bytes: &[u8],
    scales: &mut Vec<f32>,
    mins: &mut Vec<f32>,
    codes: &mut Vec<u8>,
) {
    let bs = t.type_size() as usize;
    for b in bytes.chunks_exact(bs) {
        scales.push(f16_at(b, 0));
        match t {
            GgmlType::Q8_0 => codes.extend_from_slice(&b[2..34]),
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let nib = if t == GgmlType::Q4_1 {
                    mins.push(f16_at(b, 2));
                    &b[4..20]
                } else {
                    &b[2..18]
                };
                codes.extend(nib.iter().map(|q| q & 0x0f));
                codes.extend(nib.iter().map(|q| q >> 4));
            }
            _ => unreachable!("split_parts is called for Q8_0, Q4_0 and Q4_1 only"),
        }
    }
}

/// Quantizes `values` (a multiple of 32 long) to Q8_0, Q4_0 or Q4_1 blocks with gguf-py's
/// reference rounding. None for another type or a length that is not whole blocks.
pub fn quantize(t: GgmlType, values: &[f32]) -> Option<Vec<u8>> {
    if !t.has_parts() || values.len() % 32 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(values.len() / 32 * t.type_size() as usize);
    for x in values.chunks_exact(32) {
        match t {
            GgmlType::Q8_0 => {
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
            }
            GgmlType::Q4_0 => {
                // The value of largest magnitude, sign kept (the first one on a tie).
                let max = x
                    .iter()
                    .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let d = max / -8.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                let q: Vec<u8> = x
                    .iter()
                    .map(|v| ((v * id + 8.5).trunc()).clamp(0.0, 15.0) as u8)
                    .collect();
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
            }
            GgmlType::Q4_1 => {
                let max = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                let min = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                let d = (max - min) / 15.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                let q: Vec<u8> = x
                    .iter()
                    .map(|v| (((v - min) * id + 0.5).trunc()).clamp(0.0, 15.0) as u8)
                    .collect();
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                out.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
            }
            _ => return None,
        }
    }
    Some(out)
}

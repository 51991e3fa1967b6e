//! Element types: the mapping between safetensors dtypes and libtorch kinds, and the
//! f32 <-> f16 / bf16 casts used where tensors cross into Rust memory.
//!
//! Inside libtorch a cast is just `Tensor::to_kind`; the functions here are for data
//! that lives in Rust slices (file bytes, user buffers), where the `half` crate does the
//! rounding (round-to-nearest-even, as libtorch does).

use half::{bf16, f16};
use safetensors::Dtype;
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// The kinds a [`crate::Checkpoint`] stores, with their safetensors names.
pub const SUPPORTED: [(Dtype, Kind); 8] = [
    (Dtype::F32, Kind::Float),
    (Dtype::F64, Kind::Double),
    (Dtype::F16, Kind::Half),
    (Dtype::BF16, Kind::BFloat16),
    (Dtype::I8, Kind::Int8),
    (Dtype::U8, Kind::Uint8),
    (Dtype::I32, Kind::Int),
    (Dtype::I64, Kind::Int64),
];

/// The libtorch kind for a safetensors dtype, if reuse handles it.
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    SUPPORTED.iter().find(|(d, _)| *d == dtype).map(|(_, k)| *k)
}

/// The safetensors dtype for a libtorch kind, if reuse handles it.
pub fn dtype_of(kind: Kind) -> Option<Dtype> {
    SUPPORTED.iter().find(|(_, k)| *k == kind).map(|(d, _)| *d)
}

/// Bytes per element of a supported kind.
pub fn element_size(kind: Kind) -> usize {
    match kind {
        Kind::Float | Kind::Int => 4,
        Kind::Half | Kind::BFloat16 => 2,
        Kind::Int8 | Kind::Uint8 => 1,
        _ => 8,
    }
}

/// Converts f32 values to IEEE half precision.
pub fn f32_to_f16(values: &[f32]) -> Vec<f16> {
    values.iter().map(|&v| f16::from_f32(v)).collect()
}

/// Converts f32 values to bfloat16.
pub fn f32_to_bf16(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// Copies a floating tensor (f32, f16, bf16; any device) into Rust memory as f32.
/// Half-precision values are read as raw bits and widened with `half`, which is exact.
pub fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    let t = t.to_device(tch::Device::Cpu).contiguous();
    let n = t.numel();
    match t.kind() {
        Kind::Float => Ok(Vec::<f32>::try_from(t.flatten(0, -1))?),
        Kind::Half | Kind::BFloat16 => {
            let mut bytes = vec![0u8; n * 2];
            t.f_copy_data_u8(&mut bytes, n)?;
            let bits = bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]));
            Ok(if t.kind() == Kind::Half {
                bits.map(|b| f16::from_bits(b).to_f32()).collect()
            } else {
                bits.map(|b| bf16::from_bits(b).to_f32()).collect()
            })
        }
        k => Err(Error::invalid(
            "tensor kind",
            format!("expected a floating tensor (f32, f16, bf16), found {k:?}"),
        )),
    }
}

/// Builds a CPU f16 tensor of `shape` from Rust half values.
pub fn tensor_from_f16(values: &[f16], shape: &[i64]) -> Result<Tensor> {
    let bytes: Vec<u8> = values
        .iter()
        .flat_map(|v| v.to_bits().to_le_bytes())
        .collect();
    Ok(Tensor::f_from_data_size(&bytes, shape, Kind::Half)?)
}

/// Builds a CPU bf16 tensor of `shape` from Rust bfloat16 values.
pub fn tensor_from_bf16(values: &[bf16], shape: &[i64]) -> Result<Tensor> {
    let bytes: Vec<u8> = values
        .iter()
        .flat_map(|v| v.to_bits().to_le_bytes())
        .collect();
    Ok(Tensor::f_from_data_size(&bytes, shape, Kind::BFloat16)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_casts_match_libtorch_rounding() {
        let xs: Vec<f32> = (0..1000)
            .map(|i| (i as f32 - 500.0) * 0.01237 + 1e-5)
            .collect();
        let t = Tensor::from_slice(&xs);
        for (kind, ours) in [
            (
                Kind::Half,
                tensor_from_f16(&f32_to_f16(&xs), &[1000]).unwrap(),
            ),
            (
                Kind::BFloat16,
                tensor_from_bf16(&f32_to_bf16(&xs), &[1000]).unwrap(),
            ),
        ] {
            let theirs = t.to_kind(kind);
            assert_eq!(ours.kind(), kind);
            assert!(
                ours.equal(&theirs),
                "{kind:?} rounding differs from libtorch"
            );
            let back = to_f32_vec(&ours).unwrap();
            let expect = Vec::<f32>::try_from(theirs.to_kind(Kind::Float)).unwrap();
            assert_eq!(back, expect);
        }
    }

    #[test]
    fn every_supported_kind_maps_both_ways() {
        for (d, k) in SUPPORTED {
            assert_eq!(kind_of(d), Some(k));
            assert_eq!(dtype_of(k), Some(d));
        }
        assert_eq!(kind_of(Dtype::BOOL), None);
        assert_eq!(element_size(Kind::Double), 8);
    }
}

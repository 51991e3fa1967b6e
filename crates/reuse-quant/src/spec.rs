//! What a quantized weight holds: bits, group size, symmetry; and the grid that maps
//! a group of weights to integer codes and back.

use reuse_core::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How a weight is quantized. Stored in a model folder's `config.json` under
/// `quantization_config` (see [`crate::layout`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantSpec {
    /// 8 (codes -127..=127, zero point 0) or 4 (codes 0..=15, two per byte).
    pub bits: u32,
    /// Weights per scale along the input dimension; `None`: one scale per output row
    /// (per channel).
    pub group_size: Option<i64>,
    /// Symmetric: no stored zero point (int8: 0; int4: the code 8 stands for 0).
    /// Asymmetric (int4 only): a zero point per group, so a group's range need not be
    /// centred on 0.
    pub symmetric: bool,
}

impl QuantSpec {
    /// Per-channel symmetric int8: one scale per output row, `max |w_row| / 127`.
    pub fn int8() -> Self {
        Self {
            bits: 8,
            group_size: None,
            symmetric: true,
        }
    }

    /// Group-wise int4 with `group_size` weights per scale along the input dimension,
    /// with zero points unless `symmetric`.
    pub fn int4(group_size: i64, symmetric: bool) -> Self {
        Self {
            bits: 4,
            group_size: Some(group_size),
            symmetric,
        }
    }

    /// Checks the spec against a weight with `in_features` inputs; `what` names the
    /// weight in the error.
    pub fn check(&self, what: &str, in_features: i64) -> Result<()> {
        let bad = |reason: String| Err(Error::invalid(format!("quantization of {what}"), reason));
        if self.bits != 8 && self.bits != 4 {
            return bad(format!("bits must be 8 or 4, found {}", self.bits));
        }
        if self.bits == 8 && !self.symmetric {
            return bad("int8 is symmetric only (per-channel or per-group scales)".into());
        }
        if let Some(g) = self.group_size {
            if g <= 0 || in_features % g != 0 {
                return bad(format!(
                    "group size {g} does not divide the input dimension {in_features}"
                ));
            }
        }
        if self.bits == 4 && in_features % 2 != 0 {
            return bad(format!(
                "int4 packs two inputs per byte: the input dimension {in_features} must be even"
            ));
        }
        Ok(())
    }

    /// The group size for a weight with `in_features` inputs.
    pub fn group(&self, in_features: i64) -> i64 {
        self.group_size.unwrap_or(in_features)
    }

    /// The codes' range, inclusive.
    pub fn code_range(&self) -> (f64, f64) {
        if self.bits == 8 {
            (-127.0, 127.0)
        } else {
            (0.0, 15.0)
        }
    }

    /// Bits per weight on disk, scales and zero points included (f32 scales, u8 zero
    /// points), for a weight with `in_features` inputs.
    pub fn bits_per_weight(&self, in_features: i64) -> f64 {
        let g = self.group(in_features) as f64;
        let zero = if self.symmetric { 0.0 } else { 8.0 };
        self.bits as f64 + (32.0 + zero) / g
    }
}

/// The scales and zero points of one column group of a weight: code = clamp(round(w /
/// scale) + zero, qmin, qmax), value = (code - zero) * scale. One entry per output row.
pub(crate) struct Grid {
    /// `[out]`, f32, never 0.
    pub scale: Tensor,
    /// `[out]`, f32 holding integers.
    pub zero: Tensor,
}

impl Grid {
    /// The grid for a group of columns `w` (`[out, g]`): symmetric grids cover
    /// `[-max|w|, max|w|]`; asymmetric ones `[min(w, 0), max(w, 0)]` (GPTQ's choice,
    /// so 0 is always exact). An all-zero row gets scale 1.
    pub fn find(spec: &QuantSpec, w: &Tensor) -> Grid {
        let w = w.to_kind(Kind::Float);
        let (scale, zero) = if spec.symmetric {
            let amax = w.abs().amax([1].as_slice(), false);
            let steps = if spec.bits == 8 { 127.0 } else { 7.0 };
            let zero = if spec.bits == 8 { 0.0 } else { 8.0 };
            (&amax / steps, amax.zeros_like() + zero)
        } else {
            let lo = w.amin([1].as_slice(), false).clamp_max(0.0);
            let hi = w.amax([1].as_slice(), false).clamp_min(0.0);
            let scale = (&hi - &lo) / 15.0;
            let safe = scale.where_scalarother(&scale.gt(0.0), 1.0);
            let zero = (-lo / &safe).round();
            (scale, zero)
        };
        let scale = scale.where_scalarother(&scale.gt(0.0), 1.0);
        Grid { scale, zero }
    }

    /// Integer codes (as f32) for columns `w` (`[out, k]`) on this grid.
    pub fn codes(&self, spec: &QuantSpec, w: &Tensor) -> Tensor {
        let (lo, hi) = spec.code_range();
        (w.to_kind(Kind::Float) / self.scale.unsqueeze(1))
            .round()
            .g_add(&self.zero.unsqueeze(1))
            .clamp(lo, hi)
    }

    /// The values codes (`[out, k]`) stand for.
    pub fn values(&self, codes: &Tensor) -> Tensor {
        (codes - self.zero.unsqueeze(1)) * self.scale.unsqueeze(1)
    }
}

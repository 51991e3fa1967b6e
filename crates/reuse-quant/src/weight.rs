//! [`QuantizedWeight`]: an int8 or int4 weight with its scales and zero points, the
//! [`WeightStorage`] that core's `Linear` holds in place of a dense weight.

use std::any::Any;
use std::ffi::{c_char, c_void};
use std::sync::Mutex;

use reuse_core::{Error, Result, WeightStorage};
use tch::{Device, Kind, Tensor};

use crate::spec::{Grid, QuantSpec};

/// A quantized `[out, in]` weight.
///
/// * int8: `qweight` is `Int8 [out, in]` (codes -127..=127), `scale` `f32 [out, groups]`
///   (one group per row when per-channel), value = code * scale.
/// * int4: `qweight` is `Uint8 [out, in / 2]`, two codes (0..=15) per byte, the even
///   input column in the low nibble and the odd one in the high nibble; `scale`
///   `f32 [out, groups]`; `zero` `Uint8 [out, groups]` when asymmetric (symmetric: the
///   code 8 stands for 0); value = (code - zero) * scale.
///
/// The tensors are buffers, never trainable. The dense weight is rebuilt on every
/// [`WeightStorage::dequantize`] call, or once and kept when built
/// [`QuantizedWeight::cached`] (faster forwards, the f32 weight's memory back).
pub struct QuantizedWeight {
    spec: QuantSpec,
    shape: [i64; 2],
    qweight: Tensor,
    scale: Tensor,
    zero: Option<Tensor>,
    cache: Option<Mutex<Option<Tensor>>>,
    /// The dtype the dense weight is rebuilt in (the model's compute dtype).
    kind: Kind,
}

impl std::fmt::Debug for QuantizedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedWeight")
            .field("spec", &self.spec)
            .field("shape", &self.shape)
            .field("cached", &self.cache.is_some())
            .finish()
    }
}

fn pack_nibbles(codes: &Tensor) -> Tensor {
    let [out, inp] = two(codes);
    let c = codes.to_kind(Kind::Uint8).view([out, inp / 2, 2]);
    c.select(2, 0)
        .bitwise_or_tensor(&c.select(2, 1).bitwise_left_shift_tensor_scalar(4))
}

fn unpack_nibbles(packed: &Tensor) -> Tensor {
    let [out, half] = two(packed);
    let lo = packed.bitwise_and(15);
    let hi = packed.bitwise_right_shift_tensor_scalar(4);
    Tensor::stack(&[lo, hi], 2).view([out, half * 2])
}

fn two(t: &Tensor) -> [i64; 2] {
    let s = t.size();
    [s[0], s[1]]
}

impl QuantizedWeight {
    /// Round-to-nearest quantization of `weight` (`[out, in]`, any float dtype).
    pub fn quantize(weight: &Tensor, spec: QuantSpec) -> Result<Self> {
        let shape = check_weight("weight", weight)?;
        spec.check("weight", shape[1])?;
        let g = spec.group(shape[1]);
        let w = weight.detach().to_kind(Kind::Float);
        let groups = shape[1] / g;
        // One grid per group: all groups at once through a [out * groups, g] view.
        let flat = w.reshape([shape[0] * groups, g]);
        let grid = Grid::find(&spec, &flat);
        let codes = grid.codes(&spec, &flat).view([shape[0], shape[1]]);
        Ok(Self::from_codes(
            spec,
            &codes,
            &grid.scale.view([shape[0], groups]),
            &grid.zero.view([shape[0], groups]),
        ))
    }

    /// Builds the storage from integer codes `[out, in]` (as any numeric dtype) and the
    /// per-group scales and zero points `[out, groups]`. The inputs must be consistent
    /// (the quantizers here guarantee it).
    pub(crate) fn from_codes(
        spec: QuantSpec,
        codes: &Tensor,
        scale: &Tensor,
        zero: &Tensor,
    ) -> Self {
        let shape = two(codes);
        let qweight = if spec.bits == 8 {
            codes.to_kind(Kind::Int8)
        } else {
            pack_nibbles(codes)
        };
        let zero = (spec.bits == 4 && !spec.symmetric).then(|| zero.to_kind(Kind::Uint8));
        Self {
            spec,
            shape,
            qweight,
            scale: scale.to_kind(Kind::Float),
            zero,
            cache: None,
            kind: Kind::Float,
        }
    }

    /// Rebuilds the storage from the tensors a file holds (see [`crate::layout`]),
    /// checking every dtype and shape; `what` names the weight (its dotted path) in
    /// errors. An int8 per-channel scale may be `[out]` or `[out, 1]`.
    pub fn from_buffers(
        what: &str,
        spec: QuantSpec,
        shape: [i64; 2],
        qweight: Tensor,
        scale: Tensor,
        zero: Option<Tensor>,
    ) -> Result<Self> {
        let [out, inp] = shape;
        spec.check(what, inp)?;
        let groups = inp / spec.group(inp);
        let (kind, qshape) = if spec.bits == 8 {
            (Kind::Int8, vec![out, inp])
        } else {
            (Kind::Uint8, vec![out, inp / 2])
        };
        expect(what, "", &qweight, kind, &qshape)?;
        let scale = if spec.bits == 8 && groups == 1 && scale.size() == [out] {
            scale.unsqueeze(1)
        } else {
            scale
        };
        expect(what, "_scale", &scale, Kind::Float, &[out, groups])?;
        let zero = match (spec.bits == 4 && !spec.symmetric, zero) {
            (true, Some(z)) => {
                expect(what, "_zero", &z, Kind::Uint8, &[out, groups])?;
                Some(z)
            }
            (true, None) => {
                return Err(Error::MissingTensor {
                    path: None,
                    tensor: format!("{what}_zero (asymmetric int4 needs zero points)"),
                })
            }
            (false, Some(_)) => {
                return Err(Error::invalid(
                    format!("{what}_zero"),
                    "zero points given for a symmetric quantization".to_string(),
                ))
            }
            (false, None) => None,
        };
        Ok(Self {
            spec,
            shape,
            qweight,
            scale,
            zero,
            cache: None,
            kind: Kind::Float,
        })
    }

    /// The same storage, keeping the dense weight after its first dequantization.
    pub fn cached(mut self) -> Self {
        self.cache = Some(Mutex::new(None));
        self
    }

    /// The quantization settings.
    pub fn spec(&self) -> &QuantSpec {
        &self.spec
    }

    /// The packed codes (`Int8 [out, in]` or `Uint8 [out, in / 2]`).
    pub fn qweight(&self) -> &Tensor {
        &self.qweight
    }

    /// The scales, `f32 [out, groups]`.
    pub fn scale(&self) -> &Tensor {
        &self.scale
    }

    /// The zero points, `Uint8 [out, groups]` (asymmetric int4 only).
    pub fn zero(&self) -> Option<&Tensor> {
        self.zero.as_ref()
    }

    /// The codes unpacked, `Int64 [out, in]`.
    pub fn codes(&self) -> Tensor {
        if self.spec.bits == 8 {
            self.qweight.to_kind(Kind::Int64)
        } else {
            unpack_nibbles(&self.qweight).to_kind(Kind::Int64)
        }
    }

    /// The zero points as f32 `[out, groups]` (symmetric: 0 for int8, 8 for int4).
    fn zero_f32(&self) -> Tensor {
        match &self.zero {
            Some(z) => z.to_kind(Kind::Float),
            None => {
                let z = if self.spec.bits == 8 { 0.0 } else { 8.0 };
                self.scale.zeros_like() + z
            }
        }
    }

    fn build(&self) -> Tensor {
        let [out, inp] = self.shape;
        let groups = self.scale.size()[1];
        let codes = if self.spec.bits == 8 {
            self.qweight.to_kind(Kind::Float)
        } else {
            unpack_nibbles(&self.qweight).to_kind(Kind::Float)
        }
        .view([out, groups, inp / groups]);
        ((codes - self.zero_f32().unsqueeze(2)) * self.scale.unsqueeze(2))
            .view([out, inp])
            .to_kind(self.kind)
    }

    /// Bytes the quantized tensors take (codes, scales, zero points).
    pub fn nbytes(&self) -> i64 {
        let n = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        n(&self.qweight) + n(&self.scale) + self.zero.as_ref().map_or(0, n)
    }

    /// The same storage on `device`.
    pub fn to_device(&self, device: Device) -> Self {
        Self {
            spec: self.spec,
            shape: self.shape,
            qweight: self.qweight.to_device(device),
            scale: self.scale.to_device(device),
            zero: self.zero.as_ref().map(|z| z.to_device(device)),
            cache: self.cache.as_ref().map(|_| Mutex::new(None)),
            kind: self.kind,
        }
    }

    /// The same storage, rebuilding the dense weight in `kind` (f32 by default; f16 or
    /// bf16 for a model that computes in them).
    pub fn with_kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self.cache = self.cache.map(|_| Mutex::new(None));
        self
    }
}

fn check_weight(what: &str, w: &Tensor) -> Result<[i64; 2]> {
    let s = w.size();
    if s.len() != 2 || !w.is_floating_point() {
        return Err(Error::invalid(
            what.to_string(),
            format!(
                "expected a 2-D float [out, in] weight, found {:?} of shape {s:?}",
                w.kind()
            ),
        ));
    }
    Ok([s[0], s[1]])
}

fn expect(what: &str, suffix: &str, t: &Tensor, kind: Kind, shape: &[i64]) -> Result<()> {
    let tensor = format!("{what}{suffix}");
    if t.kind() != kind {
        return Err(Error::DtypeMismatch {
            path: None,
            tensor,
            expected: format!("{kind:?}"),
            found: format!("{:?}", t.kind()),
        });
    }
    if t.size() != shape {
        return Err(Error::ShapeMismatch {
            path: None,
            tensor,
            expected: shape.to_vec(),
            found: t.size(),
        });
    }
    Ok(())
}

extern "C" {
    /// `x W^T` by the autograd function of `cpp/dequant_matmul.cpp`: W rebuilt from
    /// the codes in forward and again in backward, never saved. Returns a new
    /// `at::Tensor*`, or null with a message in `err`.
    fn reuse_quant_dequant_matmul(
        x: *const c_void,
        q: *const c_void,
        scale: *const c_void,
        zero: *const c_void,
        bits: i64,
        out: i64,
        inp: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
}

impl QuantizedWeight {
    /// `x W^T` through the C++ autograd function, which keeps only the codes for
    /// backward (the gradient of `x` is `dy W`, W dequantized again).
    fn matmul_recomputed(&self, x: &Tensor) -> Tensor {
        let zero = self.zero_f32();
        let [out, inp] = self.shape;
        let mut err = [0 as c_char; 512];
        // SAFETY: the four pointers are live `at::Tensor`s owned by tensors that outlive
        // the call; the function catches every C++ exception and returns either null or a
        // new heap `at::Tensor`, whose ownership `from_ptr` takes.
        unsafe {
            let p = reuse_quant_dequant_matmul(
                x.as_ptr() as *const c_void,
                self.qweight.as_ptr() as *const c_void,
                self.scale.as_ptr() as *const c_void,
                zero.as_ptr() as *const c_void,
                self.spec.bits as i64,
                out,
                inp,
                err.as_mut_ptr(),
                err.len(),
            );
            if p.is_null() {
                let msg = std::ffi::CStr::from_ptr(err.as_ptr()).to_string_lossy();
                panic!(
                    "quantized matmul of x {:?} by W {:?}: {msg}",
                    x.size(),
                    self.shape
                );
            }
            Tensor::from_ptr(p as *mut _)
        }
    }
}

impl WeightStorage for QuantizedWeight {
    fn shape(&self) -> [i64; 2] {
        self.shape
    }

    /// Without a cache, when `x` needs a gradient (a frozen quantized base under
    /// trainable adapters: QLoRA), the dense weight is rebuilt in backward instead of
    /// being kept from forward to backward, so training holds no dense copy of the
    /// weights. Otherwise: dequantize (or read the cache) and multiply.
    fn matmul(&self, x: &Tensor) -> Tensor {
        if self.cache.is_none() && x.requires_grad() {
            self.matmul_recomputed(x)
        } else {
            x.matmul(&self.dequantize().tr())
        }
    }

    fn dequantize(&self) -> Tensor {
        match &self.cache {
            None => self.build(),
            Some(c) => {
                let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
                c.get_or_insert_with(|| self.build()).shallow_clone()
            }
        }
    }

    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("weight".to_string(), self.qweight.shallow_clone())];
        let scale = if self.spec.bits == 8 && self.scale.size()[1] == 1 {
            self.scale.squeeze_dim(1)
        } else {
            self.scale.shallow_clone()
        };
        v.push(("weight_scale".into(), scale));
        if let Some(z) = &self.zero {
            v.push(("weight_zero".into(), z.shallow_clone()));
        }
        v
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

//! Quantizing a whole model's linears in place: round-to-nearest, or GPTQ on Hessians
//! gathered by running the model on calibration inputs.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use reuse_core::{Error, Linear, LinearDelta, Model, Result, WeightStorage};
use tch::Tensor;

use crate::gptq::{self, GptqOptions, Hessian};
use crate::spec::QuantSpec;
use crate::weight::QuantizedWeight;

/// How [`quantize_model`] chooses the codes.
pub enum Method<'a> {
    /// Round to nearest, weight by weight.
    Rtn,
    /// GPTQ, with each linear's Hessian (from [`calibrate`]) by dotted path.
    Gptq {
        /// Per linear.
        hessians: &'a BTreeMap<String, Hessian>,
        /// GPTQ's settings.
        options: GptqOptions,
    },
}

/// The delta name [`calibrate`] attaches while it records.
const RECORDER: &str = "reuse_quant_calibration";

/// A delta that changes nothing and accumulates `X^T X` of the layer's inputs.
struct Recorder(Arc<Mutex<Hessian>>);

impl LinearDelta for Recorder {
    fn forward(&self, x: &Tensor, _: &Tensor, _: &Tensor, _: bool) -> Tensor {
        let _ = self.add(x);
        Tensor::zeros([1], (x.kind(), x.device()))
    }
    fn add_to(&self, out: Tensor, x: &Tensor, _: &Tensor, _: &Tensor, _: bool) -> Tensor {
        let _ = self.add(x);
        out
    }
    fn delta_weight(&self, _: &Tensor) -> Option<Tensor> {
        None
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    fn needs_base_out(&self) -> bool {
        false
    }
    fn needs_base_weight(&self) -> bool {
        false
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Recorder {
    fn add(&self, x: &Tensor) -> Result<()> {
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        tch::no_grad(|| h.add(x))
    }
}

/// Runs `run` (forward passes over calibration inputs) with a recorder on every linear
/// that `select` accepts, and returns each one's Hessian of its inputs, by dotted path.
/// The model is unchanged afterwards. Every layer's inputs come from the model as it
/// is (all layers at full precision: one pass, not GPTQ's layer-by-layer sequence).
pub fn calibrate<M: Model + ?Sized>(
    model: &mut M,
    select: &dyn Fn(&str) -> bool,
    run: &mut dyn FnMut(&mut M) -> Result<()>,
) -> Result<BTreeMap<String, Hessian>> {
    let mut cells: BTreeMap<String, Arc<Mutex<Hessian>>> = BTreeMap::new();
    model.try_visit_linears(&mut |path, lin| {
        if !select(path) {
            return Ok(());
        }
        let cell = Arc::new(Mutex::new(Hessian::new(lin.in_features(), device_of(lin))));
        lin.add_delta(RECORDER, Box::new(Recorder(cell.clone())))?;
        cells.insert(path.to_string(), cell);
        Ok(())
    })?;
    let result = run(model);
    model.visit_linears(&mut |path, lin| {
        if cells.contains_key(path) {
            let _ = lin.remove_delta(RECORDER);
        }
    });
    result?;
    let mut out = BTreeMap::new();
    for (path, cell) in cells {
        let h = Arc::try_unwrap(cell)
            .map_err(|_| Error::invalid("calibration", "a recorder is still attached"))?
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        if h.rows() == 0 {
            return Err(Error::invalid(
                "calibration",
                format!("`{path}` saw no inputs: the calibration run never reached it"),
            ));
        }
        out.insert(path.to_string(), h);
    }
    Ok(out)
}

fn device_of(lin: &Linear) -> tch::Device {
    match &lin.bias {
        Some(b) => b.device(),
        None => lin.dense_weight().device(),
    }
}

/// Quantizes every linear that `select` accepts, in place: each one's dense weight is
/// replaced by a [`QuantizedWeight`] (its bias stays f32). Returns the quantized paths
/// in forward order. Refused for a layer with a merged delta (its weight is not the
/// base weight) or one already quantized.
pub fn quantize_model<M: Model + ?Sized>(
    model: &mut M,
    spec: QuantSpec,
    method: &Method,
    select: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>> {
    let mut done = Vec::new();
    model.try_visit_linears(&mut |path, lin| {
        if !select(path) {
            return Ok(());
        }
        if lin.storage().is_some() {
            return Err(Error::invalid(
                format!("`{path}`"),
                "already quantized".to_string(),
            ));
        }
        let what = format!("{path}.weight");
        spec.check(&what, lin.in_features())?;
        let w = lin.weight.detach();
        let q = match method {
            Method::Rtn => QuantizedWeight::quantize(&w, spec),
            Method::Gptq { hessians, options } => {
                let h = hessians.get(path).ok_or_else(|| {
                    Error::invalid(
                        "GPTQ",
                        format!("no Hessian for `{path}`: calibrate it first"),
                    )
                })?;
                tch::no_grad(|| gptq::quantize(&what, &w, &h.matrix(), spec, options))
            }
        }?
        .with_kind(w.kind());
        lin.set_storage(Box::new(q))?;
        done.push(path.to_string());
        Ok(())
    })?;
    Ok(done)
}

/// What merging a delta into quantized weights added to the error.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergeError {
    /// Linears merged.
    pub layers: usize,
    /// Largest |requantized - (dequantized base + delta)| over all merged weights.
    pub max_abs: f64,
    /// ||requantized - (base + delta)||_F / ||base + delta||_F over all merged weights.
    pub relative: f64,
}

/// Merges the delta `name` into every linear of `model` that holds it on a quantized
/// base: the base is dequantized, the delta's weight added, and the sum quantized again
/// with the base's settings (round to nearest); the delta is removed. Unmerged, the
/// model computes `dequantized base + delta` exactly; merged, it computes the
/// requantized sum, and the returned [`MergeError`] says how far that is. A linear with
/// the delta on a dense base is merged as core merges (exactly). A delta that cannot
/// merge (no dense weight change) is an error, and nothing is changed for that layer.
pub fn merge_requantize<M: Model + ?Sized>(model: &mut M, name: &str) -> Result<MergeError> {
    let (mut layers, mut max_abs, mut err2, mut norm2) = (0, 0f64, 0f64, 0f64);
    model.try_visit_linears(&mut |path, lin| {
        if lin.delta(name).is_none() {
            return Ok(());
        }
        let Some(stored) = lin.storage() else {
            lin.merge(name)?;
            layers += 1;
            return Ok(());
        };
        let q = stored
            .as_any()
            .downcast_ref::<QuantizedWeight>()
            .ok_or_else(|| {
                Error::invalid(
                    format!("`{path}`"),
                    "its weight storage is not reuse-quant's".to_string(),
                )
            })?;
        let base = q.dequantize();
        let (spec, kind) = (*q.spec(), base.kind());
        let delta = lin.delta(name).expect("checked above");
        let dw = tch::no_grad(|| delta.delta_weight(&base)).ok_or_else(|| {
            Error::invalid(
                "merge",
                format!("delta `{name}` on `{path}` cannot be merged"),
            )
        })?;
        let merged = (&base + dw.detach().to_kind(base.kind())).to_kind(tch::Kind::Float);
        let requant = QuantizedWeight::quantize(&merged, spec)
            .map_err(|e| Error::invalid(format!("`{path}`"), e.to_string()))?
            .with_kind(kind);
        let diff = requant.dequantize().to_kind(tch::Kind::Float) - &merged;
        max_abs = max_abs.max(diff.abs().max().double_value(&[]));
        err2 += diff.square().sum(tch::Kind::Double).double_value(&[]);
        norm2 += merged.square().sum(tch::Kind::Double).double_value(&[]);
        lin.remove_delta(name)?;
        lin.set_storage(Box::new(requant))?;
        layers += 1;
        Ok(())
    })?;
    if layers == 0 {
        return Err(Error::invalid(
            "merge",
            format!("no linear holds a delta named `{name}`"),
        ));
    }
    Ok(MergeError {
        layers,
        max_abs,
        relative: if norm2 > 0.0 {
            (err2 / norm2).sqrt()
        } else {
            0.0
        },
    })
}

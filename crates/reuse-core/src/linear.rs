//! `Linear` with named delta slots: the attachment point for LoRA, DoRA, IA3 and
//! quantized storage, which live in other crates and implement [`LinearDelta`].
//!
//! The weight is `[out, in]` and the bias `[out]`, named `weight` / `bias` as in
//! PyTorch. Initialisation follows `torch.nn.Linear` (kaiming-uniform with a = sqrt(5),
//! i.e. U(-1/sqrt(in), 1/sqrt(in)), and the same bound for the bias); tch's own
//! `nn::linear` uses a different bound.

use std::any::Any;
use std::cell::RefCell;

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Where a [`Linear`]'s weight lives when it is not a dense trainable tensor: int8/int4
/// storage (the quantization crate) implements this. The layer asks it for its logical
/// shape, for `x W^T`, and for the dense weight when a delta or a merge needs it. Its
/// tensors (packed values, scales, zero points) are buffers, never trainable parameters.
pub trait WeightStorage: Send {
    /// The logical weight shape `[out_features, in_features]`.
    fn shape(&self) -> [i64; 2];
    /// The dense weight `[out, in]` in the compute dtype.
    fn dequantize(&self) -> Tensor;
    /// `x W^T` for `x` `[..., in]`. The default dequantizes and multiplies; storage with
    /// a fused kernel overrides it.
    fn matmul(&self, x: &Tensor) -> Tensor {
        x.matmul(&self.dequantize().tr())
    }
    /// Its tensors by local name (`weight`, `weight_scale`, ...), saved with the model.
    fn named_buffers(&self) -> Vec<(String, Tensor)>;
    /// For downcasting to the concrete type.
    fn as_any(&self) -> &dyn Any;
}

/// Builds the [`WeightStorage`] of the weight `name` (a linear's `<path>.weight`, or an
/// embedding table) from a checkpoint, taking its tensors out of `ck`, given the
/// weight's logical shape, the model folder's `quantization_config` (from its
/// `config.json`), and the device and float dtype the model computes in. `Ok(None)`:
/// this weight is stored dense. Crates that define a storage export a loader under a
/// `quant_method`; a caller passes it in [`crate::models::LoadOptions::storage`] and
/// model loaders pick it by the folder's `quantization_config.quant_method`, as Hugging
/// Face `transformers` finds a quantizer. Nothing global needs priming.
pub type StorageLoader = fn(
    name: &str,
    shape: [i64; 2],
    quantization_config: &serde_json::Value,
    ck: &mut crate::Checkpoint,
    device: Device,
    kind: Kind,
) -> Result<Option<Box<dyn WeightStorage>>>;

/// A function of the weight applied on every forward (an inference mask: `w * mask`),
/// so a masked layer costs one element-wise product, not an extra GEMM.
pub type WeightTransform = Box<dyn Fn(&Tensor) -> Tensor + Send>;

/// A change to a [`Linear`]'s output, implemented by technique crates.
pub trait LinearDelta: Send {
    /// Extra output added to the base output. `base_out` is `x W^T` without the bias
    /// (DoRA-like deltas need it) and `base_weight` is the current weight.
    fn forward(&self, x: &Tensor, base_weight: &Tensor, base_out: &Tensor, train: bool) -> Tensor;
    /// The dense weight change this delta equals, for merging; `None` if it cannot merge.
    fn delta_weight(&self, base_weight: &Tensor) -> Option<Tensor>;
    /// Its parameters by local name (`lora_A.weight`, ...).
    fn named_parameters(&self) -> Vec<(String, Tensor)>;
    /// Whether [`LinearDelta::forward`] reads `base_out`; when no live delta does, the
    /// layer does not compute it.
    fn needs_base_out(&self) -> bool {
        true
    }
    /// Whether [`LinearDelta::forward`] reads `base_weight`; when no live delta does and
    /// the weight is in a [`WeightStorage`], the layer does not dequantize it and passes
    /// an undefined tensor.
    fn needs_base_weight(&self) -> bool {
        true
    }
    /// Adds this delta's output to `out`, the layer's output so far. The default is
    /// `out + forward(..)`; implementations may fuse the addition (LoRA does, into its
    /// up-projection GEMM). `base_out` is undefined when `needs_base_out` is false.
    fn add_to(
        &self,
        out: Tensor,
        x: &Tensor,
        base_weight: &Tensor,
        base_out: &Tensor,
        train: bool,
    ) -> Tensor {
        out + self.forward(x, base_weight, base_out, train)
    }
    /// For downcasting to the concrete type.
    fn as_any(&self) -> &dyn Any;
    /// For downcasting to the concrete type.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// What one [`Linear`] forward saw while [`capture_linears`] was running: enough to form
/// per-sample gradients of its weight and bias (`dW_b = d_b^T x_b`, `db_b = sum_t d_b`)
/// from the gradient `d` of a loss with respect to `probe`.
pub struct CapturedLinear {
    /// The layer's dense weight (a shallow handle: the model's own parameter).
    pub weight: Tensor,
    /// The layer's bias (a shallow handle), if it has one.
    pub bias: Option<Tensor>,
    /// The input `x` `[b, ..., in]`, detached.
    pub input: Tensor,
    /// A zero tensor shaped like the output that was added to it; the gradient of a loss
    /// with respect to it is the gradient with respect to the layer's output.
    pub probe: Tensor,
    /// True when the output is exactly `x W^T + b` of the dense `weight` (no storage,
    /// weight transform, live delta or routing): only then are `d^T x` and `sum d` the
    /// gradients of `weight` and `bias`.
    pub plain: bool,
}

thread_local! {
    static CAPTURE: RefCell<Option<Vec<CapturedLinear>>> = const { RefCell::new(None) };
}

/// Runs `f` (typically one forward pass) and returns what every [`Linear`] forward on
/// this thread saw meanwhile, in call order. Used for per-sample gradients without a
/// per-sample loop (the exact Fisher of EWC): the caller backpropagates to the probes.
/// Outside a capture a forward costs one thread-local read.
pub fn capture_linears<T>(f: impl FnOnce() -> T) -> (T, Vec<CapturedLinear>) {
    let previous = CAPTURE.with(|c| c.borrow_mut().replace(Vec::new()));
    let out = f();
    let got = CAPTURE.with(|c| std::mem::replace(&mut *c.borrow_mut(), previous));
    (out, got.unwrap_or_default())
}

struct Slot {
    name: String,
    delta: Box<dyn LinearDelta>,
    active: bool,
    /// The exact tensor added to the weight by `merge`, subtracted again by `unmerge`.
    merged: Option<Tensor>,
}

/// A fully connected layer `y = x W^T + b` plus zero or more named deltas.
///
/// The weight is either the dense tensor `weight` (the usual case, trainable) or a
/// [`WeightStorage`] object (quantized); with storage set, `weight` is an undefined
/// tensor and [`Linear::dense_weight`] dequantizes on request. `in_features` and
/// `out_features` come from the logical shape either way.
pub struct Linear {
    /// Dense weight, `[out_features, in_features]` (undefined while a storage is set).
    pub weight: Tensor,
    /// Optional bias, `[out_features]`.
    pub bias: Option<Tensor>,
    storage: Option<Box<dyn WeightStorage>>,
    transform: Option<WeightTransform>,
    slots: Vec<Slot>,
    /// Per-sample routing for mixed-delta batches: (delta name, sample indices), and the
    /// smallest batch the indices fit.
    routing: Option<(Vec<(String, Tensor)>, i64)>,
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linear")
            .field("shape", &self.shape())
            .field("stored", &self.storage.is_some())
            .field("bias", &self.bias.is_some())
            .field("deltas", &self.delta_names())
            .finish()
    }
}

impl Linear {
    /// A new layer initialised as `torch.nn.Linear` does, trainable.
    pub fn new(in_features: i64, out_features: i64, bias: bool, device: Device) -> Self {
        let bound = 1.0 / (in_features as f64).sqrt();
        let weight = Tensor::empty([out_features, in_features], (Kind::Float, device))
            .uniform_(-bound, bound)
            .set_requires_grad(true);
        let bias = bias.then(|| {
            Tensor::empty([out_features], (Kind::Float, device))
                .uniform_(-bound, bound)
                .set_requires_grad(true)
        });
        Self {
            weight,
            bias,
            storage: None,
            transform: None,
            slots: Vec::new(),
            routing: None,
        }
    }

    /// Wraps existing tensors. `weight` must be 2-D and `bias` match its rows.
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let ws = weight.size();
        if ws.len() != 2 {
            return Err(Error::invalid(
                "linear weight",
                format!("expected 2-D [out, in], found shape {ws:?}"),
            ));
        }
        if let Some(b) = &bias {
            if b.size() != [ws[0]] {
                return Err(Error::ShapeMismatch {
                    path: None,
                    tensor: "bias".into(),
                    expected: vec![ws[0]],
                    found: b.size(),
                });
            }
        }
        Ok(Self {
            weight,
            bias,
            storage: None,
            transform: None,
            slots: Vec::new(),
            routing: None,
        })
    }

    /// A layer whose weight lives in `storage` (quantized); `bias` must match its rows.
    pub fn from_storage(storage: Box<dyn WeightStorage>, bias: Option<Tensor>) -> Result<Self> {
        let [out, _] = storage.shape();
        if let Some(b) = &bias {
            if b.size() != [out] {
                return Err(Error::ShapeMismatch {
                    path: None,
                    tensor: "bias".into(),
                    expected: vec![out],
                    found: b.size(),
                });
            }
        }
        Ok(Self {
            weight: Tensor::new(),
            bias,
            storage: Some(storage),
            transform: None,
            slots: Vec::new(),
            routing: None,
        })
    }

    /// The logical weight shape `[out, in]`.
    pub fn shape(&self) -> [i64; 2] {
        match &self.storage {
            Some(s) => s.shape(),
            None => {
                let s = self.weight.size();
                [s[0], s[1]]
            }
        }
    }

    /// `in_features`.
    pub fn in_features(&self) -> i64 {
        self.shape()[1]
    }

    /// `out_features`.
    pub fn out_features(&self) -> i64 {
        self.shape()[0]
    }

    /// Replaces the dense weight by a storage object of the same logical shape. Refused
    /// while a delta is merged (its change lives in the dense weight).
    pub fn set_storage(&mut self, storage: Box<dyn WeightStorage>) -> Result<()> {
        if storage.shape() != self.shape() {
            return Err(Error::ShapeMismatch {
                path: None,
                tensor: "weight storage".into(),
                expected: self.shape().to_vec(),
                found: storage.shape().to_vec(),
            });
        }
        if let Some(s) = self.slots.iter().find(|s| s.merged.is_some()) {
            return Err(Error::invalid(
                "weight storage",
                format!("delta `{}` is merged; unmerge it first", s.name),
            ));
        }
        self.storage = Some(storage);
        self.weight = Tensor::new();
        Ok(())
    }

    /// The storage object, if the weight is not dense.
    pub fn storage(&self) -> Option<&dyn WeightStorage> {
        self.storage.as_deref()
    }

    /// Removes the storage and makes its dequantized weight the dense `weight` again
    /// (trainable if `requires_grad`).
    pub fn densify(&mut self, requires_grad: bool) -> Option<Box<dyn WeightStorage>> {
        let s = self.storage.take()?;
        self.weight = s.dequantize().detach().set_requires_grad(requires_grad);
        Some(s)
    }

    /// Sets (or clears) a function applied to the weight on every forward.
    pub fn set_weight_transform(&mut self, transform: Option<WeightTransform>) {
        self.transform = transform;
    }

    /// Whether a weight transform is set.
    pub fn has_weight_transform(&self) -> bool {
        self.transform.is_some()
    }

    /// The dense weight as the forward pass sees it: dequantized if stored, with the
    /// weight transform applied.
    pub fn dense_weight(&self) -> Tensor {
        let w = match &self.storage {
            Some(s) => s.dequantize(),
            None => self.weight.shallow_clone(),
        };
        match &self.transform {
            Some(f) => f(&w),
            None => w,
        }
    }

    /// The dense weight and bias, when forward is exactly `x W^T + b` through autograd's
    /// `linear`: no weight storage or transform, no routing, no live unmerged delta, a
    /// bias, and no per-sample capture running. Fused paths over several layers
    /// (the ReLU MLP node) use the layer only then.
    pub(crate) fn plain_dense(&self) -> Option<(&Tensor, &Tensor)> {
        let plain = self.computes_dense() && !CAPTURE.with(|c| c.borrow().is_some());
        match (&self.bias, plain) {
            (Some(b), true) => Some((&self.weight, b)),
            _ => None,
        }
    }

    /// Whether forward computes `x W^T (+ b)` with the dense weight alone: no weight
    /// storage or transform, no routing, no live unmerged delta.
    fn computes_dense(&self) -> bool {
        self.storage.is_none()
            && self.transform.is_none()
            && self.routing.is_none()
            && !self.slots.iter().any(|s| s.active && s.merged.is_none())
    }

    pub(crate) fn check_input(&self, x: &Tensor) -> Result<()> {
        let inp = self.in_features();
        match x.size().last() {
            Some(&d) if d == inp => Ok(()),
            _ => Err(Error::invalid(
                "linear input",
                format!(
                    "expected [..., {inp}] (in_features {inp}), found shape {:?}",
                    x.size()
                ),
            )),
        }
    }

    /// `x W^T` (no bias) with the layer's weight, stored or dense.
    fn base_matmul(&self, x: &Tensor, w: Option<&Tensor>) -> Tensor {
        match (w, &self.storage) {
            (Some(w), _) => x.linear::<&Tensor>(w, None),
            (None, Some(s)) => s.matmul(x),
            (None, None) => x.linear::<&Tensor>(&self.weight, None),
        }
    }

    /// `x W^T + b`, plus the output of every active, unmerged delta; or, while a
    /// routing is set ([`Linear::set_routing`]), each sample gets only its own delta.
    /// An input whose last dimension is not `in_features` is an error.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let out = self.forward_inner(x, train)?;
        let capturing = CAPTURE.with(|c| c.borrow().is_some());
        if !capturing {
            return Ok(out);
        }
        let probe = out.zeros_like().set_requires_grad(true);
        let plain = self.computes_dense();
        CAPTURE.with(|c| {
            if let Some(v) = c.borrow_mut().as_mut() {
                v.push(CapturedLinear {
                    weight: self.weight.shallow_clone(),
                    bias: self.bias.as_ref().map(Tensor::shallow_clone),
                    input: x.detach(),
                    probe: probe.shallow_clone(),
                    plain,
                });
            }
        });
        Ok(out + probe)
    }

    fn forward_inner(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.check_input(x)?;
        // The weight as forward sees it; None = use the storage's own matmul.
        let w: Option<Tensor> = match (&self.storage, &self.transform) {
            (None, None) => Some(self.weight.shallow_clone()),
            (Some(_), None) => None,
            _ => Some(self.dense_weight()),
        };
        if let Some((routes, need)) = &self.routing {
            let b = x.size().first().copied().unwrap_or(0);
            if b < *need {
                return Err(Error::invalid(
                    "mixed-delta batch",
                    format!(
                        "routing names samples up to index {}, but the batch has {b} samples",
                        need - 1
                    ),
                ));
            }
            return Ok(self.forward_routed(x, w.as_ref(), routes, train));
        }
        let live: Vec<&Slot> = self
            .slots
            .iter()
            .filter(|s| s.active && s.merged.is_none())
            .collect();
        if live.is_empty() {
            return Ok(match (&w, &self.bias) {
                (Some(w), b) => x.linear(w, b.as_ref()),
                (None, Some(b)) => self.base_matmul(x, None) + b,
                (None, None) => self.base_matmul(x, None),
            });
        }
        // `x W^T` without the bias, only for deltas that read it (DoRA).
        let needs_base = live.iter().any(|s| s.delta.needs_base_out());
        let (mut out, base) = if needs_base {
            let base = self.base_matmul(x, w.as_ref());
            let out = match &self.bias {
                Some(b) => &base + b,
                None => base.shallow_clone(),
            };
            (out, base)
        } else {
            let out = match (&w, &self.bias) {
                (Some(w), b) => x.linear(w, b.as_ref()),
                (None, Some(b)) => self.base_matmul(x, None) + b,
                (None, None) => self.base_matmul(x, None),
            };
            (out, Tensor::new())
        };
        let dense = match &w {
            Some(w) => w.shallow_clone(),
            None if live.iter().any(|s| s.delta.needs_base_weight()) => self.dense_weight(),
            None => Tensor::new(),
        };
        for s in live {
            out = s.delta.add_to(out, x, &dense, &base, train);
        }
        Ok(out)
    }

    fn forward_routed(
        &self,
        x: &Tensor,
        w: Option<&Tensor>,
        routes: &[(String, Tensor)],
        train: bool,
    ) -> Tensor {
        // The base output is computed once for the whole batch; each delta adds its
        // output to its own samples only.
        let base = self.base_matmul(x, w);
        let mut out = match &self.bias {
            Some(b) => &base + b,
            None => base.shallow_clone(),
        };
        let dense = match w {
            Some(w) => w.shallow_clone(),
            None => self.dense_weight(),
        };
        for (name, idx) in routes {
            let Some(s) = self.slots.iter().find(|s| &s.name == name) else {
                continue;
            };
            let xs = x.index_select(0, idx);
            let d = s
                .delta
                .forward(&xs, &dense, &base.index_select(0, idx), train);
            out = out.index_add(0, idx, &d.to_kind(out.kind()));
        }
        out
    }

    /// Routes samples to deltas for mixed batches: `routes` pairs a delta name with
    /// the indices (i64, on the input's device) of the samples that use it; samples in
    /// no route get the base output. Merged deltas are in the weight for every sample,
    /// so routing is refused while any delta is merged; negative indices are refused,
    /// and a forward on a batch too small for the indices is an error. `None` ends
    /// routing.
    pub fn set_routing(&mut self, routes: Option<Vec<(String, Tensor)>>) -> Result<()> {
        let Some(r) = routes else {
            self.routing = None;
            return Ok(());
        };
        if let Some(s) = self.slots.iter().find(|s| s.merged.is_some()) {
            return Err(Error::invalid(
                "mixed-delta batch",
                format!(
                    "delta `{}` is merged; unmerge before routing samples",
                    s.name
                ),
            ));
        }
        let mut need = 0i64;
        for (name, idx) in &r {
            self.index(name)?;
            if idx.numel() > 0 {
                // Set once per mixed batch, not per micro-batch: reading back is fine.
                let (lo, hi) = (idx.min().int64_value(&[]), idx.max().int64_value(&[]));
                if lo < 0 {
                    return Err(Error::invalid(
                        "mixed-delta batch",
                        format!("negative sample index {lo} for delta `{name}`"),
                    ));
                }
                need = need.max(hi + 1);
            }
        }
        self.routing = Some((r, need));
        Ok(())
    }

    /// Output of the base layer alone (no deltas): for mixed-adapter batches.
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let w = match (&self.storage, &self.transform) {
            (None, None) => Some(self.weight.shallow_clone()),
            (Some(_), None) => None,
            _ => Some(self.dense_weight()),
        };
        let out = self.base_matmul(x, w.as_ref());
        Ok(match &self.bias {
            Some(b) => out + b,
            None => out,
        })
    }

    /// Adds a delta under `name`, active. A name already in use is an error.
    pub fn add_delta(&mut self, name: &str, delta: Box<dyn LinearDelta>) -> Result<()> {
        if self.slots.iter().any(|s| s.name == name) {
            return Err(Error::invalid(
                "delta name",
                format!("`{name}` is already attached"),
            ));
        }
        self.slots.push(Slot {
            name: name.to_string(),
            delta,
            active: true,
            merged: None,
        });
        Ok(())
    }

    /// Removes the delta `name` (unmerging it first if merged) and returns it.
    pub fn remove_delta(&mut self, name: &str) -> Result<Box<dyn LinearDelta>> {
        if self.is_merged(name)? {
            self.unmerge(name)?;
        }
        let i = self.index(name)?;
        Ok(self.slots.remove(i).delta)
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.slots
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| Error::NoMatch {
                what: "delta".into(),
                pattern: name.into(),
                available: Error::list(&self.delta_names()),
            })
    }

    /// Names of the attached deltas, in attachment order.
    pub fn delta_names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.name.as_str()).collect()
    }

    /// The delta `name`.
    pub fn delta(&self, name: &str) -> Option<&dyn LinearDelta> {
        self.slots
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.delta.as_ref())
    }

    /// The delta `name`, mutably.
    pub fn delta_mut(&mut self, name: &str) -> Option<&mut (dyn LinearDelta + 'static)> {
        self.slots
            .iter_mut()
            .find(|s| s.name == name)
            .map(|s| s.delta.as_mut())
    }

    /// Makes exactly the deltas in `names` active (their outputs sum); others are kept
    /// but ignored by `forward`.
    pub fn set_active(&mut self, names: &[&str]) {
        for s in &mut self.slots {
            s.active = names.contains(&s.name.as_str());
        }
    }

    /// Whether `name` is active.
    pub fn is_active(&self, name: &str) -> Result<bool> {
        Ok(self.slots[self.index(name)?].active)
    }

    /// Whether `name` is merged into the weight.
    pub fn is_merged(&self, name: &str) -> Result<bool> {
        Ok(self.slots[self.index(name)?].merged.is_some())
    }

    /// Adds the delta's dense weight into `weight`; `forward` then skips it. Merging a
    /// delta whose weight change is non-finite is refused and leaves the weight as it was.
    pub fn merge(&mut self, name: &str) -> Result<()> {
        let i = self.index(name)?;
        if self.slots[i].merged.is_some() {
            return Ok(());
        }
        if self.storage.is_some() {
            return Err(Error::invalid(
                "merge",
                format!("delta `{name}`: the weight is in a storage object (quantized); densify it, or merge through the storage's own requantizing merge"),
            ));
        }
        let dw = tch::no_grad(|| self.slots[i].delta.delta_weight(&self.weight))
            .ok_or_else(|| Error::invalid("merge", format!("delta `{name}` cannot be merged")))?
            .detach()
            .to_kind(self.weight.kind());
        let finite = dw.isfinite().all().int64_value(&[]) != 0;
        if !finite {
            return Err(Error::invalid(
                "merge",
                format!("delta `{name}` has NaN or Inf values"),
            ));
        }
        tch::no_grad(|| {
            let mut w = self.weight.shallow_clone();
            w.f_add_(&dw).map(drop)
        })?;
        self.slots[i].merged = Some(dw);
        Ok(())
    }

    /// Subtracts a merged delta's weight again (exactly what `merge` added).
    pub fn unmerge(&mut self, name: &str) -> Result<()> {
        let i = self.index(name)?;
        if let Some(dw) = self.slots[i].merged.take() {
            tch::no_grad(|| {
                let mut w = self.weight.shallow_clone();
                w.f_sub_(&dw).map(drop)
            })?;
        }
        Ok(())
    }

    /// Merges every delta and drops them all: a plain layer again.
    pub fn merge_and_unload(&mut self) -> Result<()> {
        let names: Vec<String> = self
            .slots
            .iter()
            .filter(|s| s.active)
            .map(|s| s.name.clone())
            .collect();
        for n in &names {
            self.merge(n)?;
        }
        self.slots.clear();
        Ok(())
    }

    /// `weight` (when dense), `bias`, then each delta's parameters as
    /// `<delta name>.<local name>`.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        if self.storage.is_none() {
            v.push(("weight".to_string(), self.weight.shallow_clone()));
        }
        if let Some(b) = &self.bias {
            v.push(("bias".to_string(), b.shallow_clone()));
        }
        for s in &self.slots {
            for (n, t) in s.delta.named_parameters() {
                v.push((format!("{}.{}", s.name, n), t));
            }
        }
        v
    }

    /// Buffers: the storage object's tensors, by local name (none for a dense weight).
    pub fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.storage
            .as_ref()
            .map(|s| s.named_buffers())
            .unwrap_or_default()
    }
}

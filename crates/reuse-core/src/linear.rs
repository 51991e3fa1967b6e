//! `Linear` with named delta slots: the attachment point for LoRA, DoRA, IA3 and
//! quantized storage, which live in other crates and implement [`LinearDelta`].
//!
//! The weight is `[out, in]` and the bias `[out]`, named `weight` / `bias` as in
//! PyTorch. Initialisation follows `torch.nn.Linear` (kaiming-uniform with a = sqrt(5),
//! i.e. U(-1/sqrt(in), 1/sqrt(in)), and the same bound for the bias); tch's own
//! `nn::linear` uses a different bound.

use std::any::Any;

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

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

struct Slot {
    name: String,
    delta: Box<dyn LinearDelta>,
    active: bool,
    /// The exact tensor added to the weight by `merge`, subtracted again by `unmerge`.
    merged: Option<Tensor>,
}

/// A fully connected layer `y = x W^T + b` plus zero or more named deltas.
pub struct Linear {
    /// Weight, `[out_features, in_features]`.
    pub weight: Tensor,
    /// Optional bias, `[out_features]`.
    pub bias: Option<Tensor>,
    slots: Vec<Slot>,
    /// Per-sample routing for mixed-delta batches: (delta name, sample indices).
    routing: Option<Vec<(String, Tensor)>>,
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linear")
            .field("weight", &self.weight.size())
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
            slots: Vec::new(),
            routing: None,
        })
    }

    /// `in_features`.
    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }

    /// `out_features`.
    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    /// `x W^T + b`, plus the output of every active, unmerged delta; or, while a
    /// routing is set ([`Linear::set_routing`]), each sample gets only its own delta.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        if let Some(routes) = &self.routing {
            return self.forward_routed(x, routes, train);
        }
        let live: Vec<&Slot> = self
            .slots
            .iter()
            .filter(|s| s.active && s.merged.is_none())
            .collect();
        let mut out = x.linear(&self.weight, self.bias.as_ref());
        if live.is_empty() {
            return out;
        }
        // `x W^T` without the bias, only for deltas that read it (DoRA).
        let base = if live.iter().any(|s| s.delta.needs_base_out()) {
            match &self.bias {
                Some(b) => &out - b,
                None => out.shallow_clone(),
            }
        } else {
            Tensor::new()
        };
        for s in live {
            out = s.delta.add_to(out, x, &self.weight, &base, train);
        }
        out
    }

    fn forward_routed(&self, x: &Tensor, routes: &[(String, Tensor)], train: bool) -> Tensor {
        // The base output is computed once for the whole batch; each delta adds its
        // output to its own samples only.
        let base = x.linear::<&Tensor>(&self.weight, None);
        let mut out = match &self.bias {
            Some(b) => &base + b,
            None => base.shallow_clone(),
        };
        for (name, idx) in routes {
            let Some(s) = self.slots.iter().find(|s| &s.name == name) else {
                continue;
            };
            let xs = x.index_select(0, idx);
            let d = s
                .delta
                .forward(&xs, &self.weight, &base.index_select(0, idx), train);
            out = out.index_add(0, idx, &d.to_kind(out.kind()));
        }
        out
    }

    /// Routes samples to deltas for mixed batches: `routes` pairs a delta name with
    /// the indices (i64, on the input's device) of the samples that use it; samples in
    /// no route get the base output. Merged deltas are in the weight for every sample,
    /// so routing is refused while any delta is merged. `None` ends routing.
    pub fn set_routing(&mut self, routes: Option<Vec<(String, Tensor)>>) -> Result<()> {
        if let Some(r) = &routes {
            if let Some(s) = self.slots.iter().find(|s| s.merged.is_some()) {
                return Err(Error::invalid(
                    "mixed-delta batch",
                    format!(
                        "delta `{}` is merged; unmerge before routing samples",
                        s.name
                    ),
                ));
            }
            for (name, _) in r {
                self.index(name)?;
            }
        }
        self.routing = routes;
        Ok(())
    }

    /// Output of the base layer alone (no deltas): for mixed-adapter batches.
    pub fn forward_base(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
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

    /// `weight`, `bias`, then each delta's parameters as `<delta name>.<local name>`.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("weight".to_string(), self.weight.shallow_clone())];
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
}

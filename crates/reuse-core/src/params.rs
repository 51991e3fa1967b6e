//! Parameters by dotted name: select, freeze, count, snapshot and restore.
//!
//! A [`Params`] holds shallow handles to a model's tensors (the storage is shared), so
//! freezing or restoring through it changes the model itself.

use std::collections::BTreeMap;

use globset::Glob;
use regex::Regex;
use tch::Tensor;

use crate::{Checkpoint, Error, Result};

/// A set of named parameters sharing storage with the model they came from.
#[derive(Debug)]
pub struct Params {
    entries: Vec<(String, Tensor)>,
}

/// Copies of parameter values, by name; see [`Params::snapshot`].
#[derive(Debug)]
pub struct Snapshot {
    values: BTreeMap<String, Tensor>,
}

impl Snapshot {
    /// The saved value of `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.values.get(name)
    }

    /// Names in the snapshot.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }
}

impl Clone for Params {
    fn clone(&self) -> Self {
        Self::new(
            self.entries
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
        )
    }
}

impl Params {
    /// Wraps named tensors (typically a model's `named_parameters()`).
    pub fn new(entries: Vec<(String, Tensor)>) -> Self {
        Self { entries }
    }

    /// Names and tensors, in model order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Names in model order.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no tensor is selected.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The parameter `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    fn filter(&self, what: &str, pattern: &str, keep: impl Fn(&str) -> bool) -> Result<Params> {
        let picked: Vec<_> = self
            .entries
            .iter()
            .filter(|(n, _)| keep(n))
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        if picked.is_empty() {
            return Err(Error::NoMatch {
                what: what.into(),
                pattern: pattern.into(),
                available: Error::list(&self.names()),
            });
        }
        Ok(Params::new(picked))
    }

    /// The parameters whose names match a glob (`encoder.layer.*.attention.*`,
    /// `*bias`). `*` crosses dots. Selecting nothing is an error listing the names.
    pub fn select_glob(&self, pattern: &str) -> Result<Params> {
        let m = Glob::new(pattern)
            .map_err(|e| Error::invalid(format!("glob `{pattern}`"), e.to_string()))?
            .compile_matcher();
        self.filter("parameter glob", pattern, |n| m.is_match(n))
    }

    /// The parameters whose names match a regex anywhere (anchor it for a full match).
    pub fn select_regex(&self, pattern: &str) -> Result<Params> {
        let re = Regex::new(pattern)
            .map_err(|e| Error::invalid(format!("regex `{pattern}`"), e.to_string()))?;
        self.filter("parameter regex", pattern, |n| re.is_match(n))
    }

    /// The parameters that currently require gradients.
    pub fn trainable(&self) -> Params {
        Params::new(
            self.entries
                .iter()
                .filter(|(_, t)| t.requires_grad())
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
        )
    }

    /// Stops gradients for every selected parameter: optimizers then leave them alone.
    pub fn freeze(&self) -> &Self {
        for (_, t) in &self.entries {
            let _ = t.set_requires_grad(false);
        }
        self
    }

    /// Turns gradients back on for every selected parameter.
    pub fn unfreeze(&self) -> &Self {
        for (_, t) in &self.entries {
            let _ = t.set_requires_grad(true);
        }
        self
    }

    /// Total number of scalar values.
    pub fn count(&self) -> usize {
        self.entries.iter().map(|(_, t)| t.numel()).sum()
    }

    /// Number of scalar values that require gradients.
    pub fn count_trainable(&self) -> usize {
        self.entries
            .iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(_, t)| t.numel())
            .sum()
    }

    /// Drops every gradient (leaves it undefined), as PyTorch's
    /// `zero_grad(set_to_none=True)`, its default: the next backward hands its gradient
    /// to the parameter instead of adding it into a zeroed buffer, which saves a pass
    /// over the weights per step. Code reading gradients must expect undefined ones
    /// (the optimizers, clipping and the techniques skip them). Use
    /// [`Params::zero_grad_in_place`] to keep zero-filled buffers.
    pub fn zero_grad(&self) {
        let ts: Vec<&Tensor> = self.entries.iter().map(|(_, t)| t).collect();
        if !crate::shim::clear_grads(&ts) {
            self.zero_grad_in_place();
        }
    }

    /// Fills every existing gradient with zeros, keeping its buffer.
    pub fn zero_grad_in_place(&self) {
        for (_, t) in &self.entries {
            let mut t = t.shallow_clone();
            t.zero_grad();
        }
    }

    /// Scales gradients so their global L2 norm is at most `max_norm`, as
    /// `torch.nn.utils.clip_grad_norm_` does: every gradient is multiplied by
    /// `min(1, max_norm / (norm + 1e-6))`, computed on the device, so nothing is read
    /// back. Returns the norm before clipping (a 0-d f32 tensor on the gradients' device;
    /// undefined when no parameter has a gradient).
    pub fn clip_grad_norm(&self, max_norm: f64) -> Result<Tensor> {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self
                .entries
                .iter()
                .map(|(_, t)| t.grad())
                .filter(|g| g.defined())
                .collect();
            if grads.is_empty() {
                return Ok(Tensor::new());
            }
            let sq: Vec<Tensor> = grads
                .iter()
                .map(|g| g.to_kind(tch::Kind::Float).square().sum(tch::Kind::Float))
                .collect();
            let total = Tensor::stack(&sq, 0).sum(tch::Kind::Float).f_sqrt()?;
            let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
            for g in &grads {
                let mut g = g.shallow_clone();
                let _ = g.f_mul_(&coef.to_kind(g.kind()))?;
            }
            Ok(total)
        })
    }

    /// Copies of the current values.
    pub fn snapshot(&self) -> Snapshot {
        let values = tch::no_grad(|| {
            self.entries
                .iter()
                .map(|(n, t)| (n.clone(), t.detach().copy()))
                .collect()
        });
        Snapshot { values }
    }

    /// Writes snapshot values back into the parameters (in place, shared storage).
    /// Every selected parameter must be in the snapshot with the same shape.
    pub fn restore(&self, snapshot: &Snapshot) -> Result<()> {
        for (n, t) in &self.entries {
            let v = snapshot.values.get(n).ok_or_else(|| Error::MissingTensor {
                path: None,
                tensor: n.clone(),
            })?;
            check_shape(n, v, t)?;
        }
        tch::no_grad(|| {
            for (n, t) in &self.entries {
                let mut t = t.shallow_clone();
                t.f_copy_(&snapshot.values[n])?;
            }
            Ok(())
        })
    }

    /// The current values as a checkpoint (detached copies, same names).
    pub fn to_checkpoint(&self) -> Checkpoint {
        let mut ck = Checkpoint::new();
        tch::no_grad(|| {
            for (n, t) in &self.entries {
                ck.insert(n.clone(), t.detach().copy());
            }
        });
        ck
    }

    /// Copies values from a checkpoint into the parameters, by name, converting dtype and
    /// device. Every selected parameter must be present with the right shape; nothing is
    /// written unless all of them are.
    pub fn load_checkpoint(&self, ck: &Checkpoint) -> Result<()> {
        for (n, t) in &self.entries {
            ck.tensor_with_shape(n, &t.size())?;
        }
        tch::no_grad(|| {
            for (n, t) in &self.entries {
                let mut t = t.shallow_clone();
                t.f_copy_(ck.tensor(n)?)?;
            }
            Ok(())
        })
    }
}

fn check_shape(name: &str, src: &Tensor, dst: &Tensor) -> Result<()> {
    if src.size() != dst.size() {
        return Err(Error::ShapeMismatch {
            path: None,
            tensor: name.to_string(),
            expected: dst.size(),
            found: src.size(),
        });
    }
    Ok(())
}

//! Net2Net for core's [`Mlp`] (Chen et al. 2016, <https://arxiv.org/abs/1511.05641>):
//! [`widen_mlp`] replicates hidden units (Net2WiderNet, exact for any element-wise
//! activation) and [`deepen_mlp`] inserts an identity layer (Net2DeeperNet, exact when
//! `phi(phi(x)) = phi(x)`: ReLU, not tanh or sigmoid).
//!
//! Growth pays in pretraining rather than on small data: on digits, growing a 32-unit
//! MLP to 512 units cost more compute than training 512 units from scratch (the issue's
//! measurement, -15% to -280% over 5 seeds).

use reuse_core::{Activation, Checkpoint, Error, Linear, Mlp, Model, Result};
use tch::{Kind, Tensor};

use crate::plan::{unit_map, Axis, Growth, Source};

/// A growth plan for an MLP and its grown widths.
#[derive(Debug)]
pub struct GrownMlp {
    /// The grown widths `[in, hidden..., out]`.
    pub widths: Vec<i64>,
    /// Where each grown tensor comes from (`layers.{i}.weight` / `.bias`).
    pub growth: Growth,
}

impl GrownMlp {
    /// Builds the grown MLP from `mlp`'s weights (same activation and dropout, same
    /// device), with every parameter trainable.
    ///
    /// # Errors
    /// `mlp` does not have the widths this plan was made for.
    pub fn apply(&self, mlp: &Mlp) -> Result<Mlp> {
        let mut ck = Checkpoint::new();
        for (n, t) in mlp.named_parameters() {
            ck.insert(n, t.detach());
        }
        let mut grown = self.growth.apply(&ck)?;
        let device = mlp.layers[0].dense_weight().device();
        let mut layers = Vec::new();
        for i in 0..self.widths.len() - 1 {
            let (o, inp) = (self.widths[i + 1], self.widths[i]);
            let w = grown
                .take_with_shape(&format!("layers.{i}.weight"), &[o, inp])?
                .to_device(device)
                .set_requires_grad(true);
            let b = grown
                .remove(&format!("layers.{i}.bias"))
                .map(|b| b.to_device(device).set_requires_grad(true));
            layers.push(Linear::from_tensors(w, b)?);
        }
        Ok(Mlp {
            layers,
            activation: mlp.activation,
            dropout: mlp.dropout,
        })
    }
}

fn check_hidden(widths: &[i64], hidden: usize) -> Result<()> {
    if hidden == 0 || hidden + 1 >= widths.len() {
        return Err(Error::invalid(
            "mlp growth",
            format!(
                "width index {hidden} is not a hidden layer of widths {widths:?} (hidden ones are 1..={})",
                widths.len().saturating_sub(2)
            ),
        ));
    }
    Ok(())
}

fn copy_layer(tensors: &mut Vec<(String, Source)>, from: usize, to: usize) {
    tensors.push((
        format!("layers.{to}.weight"),
        Source::Tensor {
            name: format!("layers.{from}.weight"),
            axes: vec![None, None],
        },
    ));
    tensors.push((
        format!("layers.{to}.bias"),
        Source::Tensor {
            name: format!("layers.{from}.bias"),
            axes: vec![None],
        },
    ));
}

/// Plans widening hidden layer `hidden` (an index into `widths`, `1..widths.len()-1`)
/// to `new_width` units: units keep their place, each extra one copies a seeded random
/// unit; the next layer's input columns are divided by the replica counts.
///
/// # Errors
/// `hidden` not a hidden layer; `new_width` below the current width.
pub fn widen_mlp(widths: &[i64], hidden: usize, new_width: i64, seed: u64) -> Result<GrownMlp> {
    check_hidden(widths, hidden)?;
    let old = widths[hidden];
    if new_width < old {
        return Err(Error::invalid(
            "mlp width",
            format!("growth cannot shrink hidden layer {hidden} from {old} to {new_width} units"),
        ));
    }
    let g = unit_map(old, new_width, seed, false);
    let c = Axis::gather(g.clone()).counts(old);
    let out_axis = Axis {
        index: g.clone(),
        scale: vec![1.0; g.len()],
        grad_scale: g.iter().map(|&u| 1.0 / c[u as usize]).collect(),
    };
    let in_axis = Axis {
        index: g.clone(),
        scale: g.iter().map(|&u| 1.0 / c[u as usize]).collect(),
        grad_scale: vec![1.0; g.len()],
    };
    let mut tensors = Vec::new();
    for l in 0..widths.len() - 1 {
        let (rows, cols) = if l + 1 == hidden {
            (Some(out_axis.clone()), None)
        } else if l == hidden {
            (None, Some(in_axis.clone()))
        } else {
            (None, None)
        };
        tensors.push((
            format!("layers.{l}.weight"),
            Source::Tensor {
                name: format!("layers.{l}.weight"),
                axes: vec![rows.clone(), cols],
            },
        ));
        tensors.push((
            format!("layers.{l}.bias"),
            Source::Tensor {
                name: format!("layers.{l}.bias"),
                axes: vec![rows],
            },
        ));
    }
    let mut widths = widths.to_vec();
    widths[hidden] = new_width;
    Ok(GrownMlp {
        widths,
        growth: Growth {
            tensors,
            ..Default::default()
        },
    })
}

/// Plans inserting an identity layer after hidden layer `hidden` (an index into
/// `widths`): `act(I · act(h) + 0) = act(h)` when `act` is idempotent, so only ReLU
/// (and the identity) are accepted. Later layers move up by one.
///
/// # Errors
/// `hidden` not a hidden layer; an activation with `phi(phi(x)) != phi(x)`.
pub fn deepen_mlp(widths: &[i64], activation: Activation, hidden: usize) -> Result<GrownMlp> {
    check_hidden(widths, hidden)?;
    if !matches!(activation, Activation::Relu | Activation::Identity) {
        return Err(Error::invalid(
            "mlp depth",
            format!(
                "an identity layer is exact only when phi(phi(x)) = phi(x) (ReLU); this MLP uses {activation:?}"
            ),
        ));
    }
    let w = widths[hidden];
    let mut tensors = Vec::new();
    for l in 0..widths.len() - 1 {
        let to = if l < hidden { l } else { l + 1 };
        copy_layer(&mut tensors, l, to);
    }
    tensors.push((
        format!("layers.{hidden}.weight"),
        Source::Fresh(Tensor::eye(w, (Kind::Float, tch::Device::Cpu))),
    ));
    tensors.push((
        format!("layers.{hidden}.bias"),
        Source::Fresh(Tensor::zeros([w], (Kind::Float, tch::Device::Cpu))),
    ));
    let mut widths = widths.to_vec();
    widths.insert(hidden, w);
    Ok(GrownMlp {
        widths,
        growth: Growth {
            tensors,
            ..Default::default()
        },
    })
}

//! Per-task heads (multi-head, task-incremental learning): one shared body, one output
//! layer per task, each example routed to its task's head by the task id its batch
//! carries.
//!
//! As Avalanche's `MultiHeadClassifier`, every head speaks the global label space and a
//! head may be limited to its task's classes ([`MultiHead::limit_classes`]): the other
//! logits are set to -1000, so the head is effectively a `k`-way classifier and needs no
//! label remapping.

use tch::{Device, Kind, Tensor};

use reuse_core::data::Batch;
use reuse_core::{Error, ForwardOptions, Linear, Mlp, Model, Result, StepOutputs, Trainable};

/// A body that turns a batch into features `[b, d]`.
pub trait Features: Model {
    /// The features of `batch` (dropout on when `train`).
    fn features(&self, batch: &Batch, train: bool) -> Result<Tensor>;
}

/// An MLP used whole as a body: every layer followed by the activation.
impl Features for Mlp {
    fn features(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        let mut h = batch.inputs.shallow_clone();
        for l in &self.layers {
            h = self.activation.apply(&l.forward(&h, train)?);
            if self.dropout > 0.0 {
                h = h.dropout(self.dropout, train);
            }
        }
        Ok(h)
    }
}

/// A body with one linear head per task (`heads.{t}`), routed by task id.
#[derive(Debug)]
pub struct MultiHead<B> {
    /// The shared body (`body.*`).
    pub body: B,
    /// One head per task (`heads.{t}`), each `[classes, features]`.
    pub heads: Vec<Linear>,
    /// Per head, an additive logit mask `[classes]` (0 for the task's classes, -1000
    /// for the others), when limited.
    masks: Vec<Option<Tensor>>,
    classes: i64,
}

impl<B: Features> MultiHead<B> {
    /// `tasks` heads from `features` to `classes` logits each, on `device`.
    pub fn new(body: B, features: i64, classes: i64, tasks: usize, device: Device) -> Result<Self> {
        if tasks == 0 || classes < 1 {
            return Err(Error::invalid(
                "multi-head model",
                format!("needs at least one task and one class, found {tasks} tasks and {classes} classes"),
            ));
        }
        Ok(Self {
            body,
            heads: (0..tasks)
                .map(|_| Linear::new(features, classes, true, device))
                .collect(),
            masks: (0..tasks).map(|_| None).collect(),
            classes,
        })
    }

    /// Limits head `task` to `classes` (the others get logit -1000), as Avalanche's
    /// multi-head classifier does with the classes a task has seen.
    pub fn limit_classes(&mut self, task: usize, classes: &[i64]) -> Result<()> {
        let n = self.heads.len();
        if task >= n {
            return Err(Error::invalid(
                "task id",
                format!("task {task} is beyond the model's {n} heads"),
            ));
        }
        if let Some(c) = classes.iter().find(|&&c| c < 0 || c >= self.classes) {
            return Err(Error::invalid(
                "head classes",
                format!("class {c} is outside 0..{}", self.classes),
            ));
        }
        let device = self.heads[task].weight.device();
        let mask = Tensor::full([self.classes], -1000.0, (Kind::Float, device));
        let idx = Tensor::from_slice(classes).to_device(device);
        let mask = mask.index_fill(0, &idx, 0.0);
        self.masks[task] = Some(mask);
        Ok(())
    }

    /// Freezes every head but `task`'s (and unfreezes that one), so a task-incremental
    /// run trains one head per task and earlier heads never move (weight decay and
    /// optimizer momentum update every parameter that requires grad).
    pub fn train_only_head(&self, task: usize) -> Result<()> {
        let n = self.heads.len();
        if task >= n {
            return Err(Error::invalid(
                "task id",
                format!("task {task} is beyond the model's {n} heads"),
            ));
        }
        for (t, h) in self.heads.iter().enumerate() {
            for (_, p) in h.named_parameters() {
                let _ = p.set_requires_grad(t == task);
            }
        }
        Ok(())
    }

    /// The number of heads.
    pub fn tasks(&self) -> usize {
        self.heads.len()
    }
}

impl<B: Features> Model for MultiHead<B> {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.body
            .visit_linears(&mut |p, l| f(&format!("body.{p}"), l));
        for (t, h) in self.heads.iter_mut().enumerate() {
            f(&format!("heads.{t}"), h);
        }
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .body
            .named_parameters()
            .into_iter()
            .map(|(n, t)| (format!("body.{n}"), t))
            .collect();
        for (t, h) in self.heads.iter().enumerate() {
            v.extend(
                h.named_parameters()
                    .into_iter()
                    .map(|(n, x)| (format!("heads.{t}.{n}"), x)),
            );
        }
        v
    }

    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.body
            .named_buffers()
            .into_iter()
            .map(|(n, t)| (format!("body.{n}"), t))
            .collect()
    }
}

impl<B: Features> Trainable for MultiHead<B> {
    /// Every example goes to the head of its task id; a batch without task ids, or with
    /// a task id beyond the heads, is an error naming it.
    fn forward(&self, batch: &Batch, train: bool, _opts: ForwardOptions) -> Result<StepOutputs> {
        let tasks = batch.task_ids.as_ref().ok_or_else(|| {
            Error::invalid(
                "multi-head batch",
                "the batch has no task ids; a multi-head model routes each example by its task id",
            )
        })?;
        let n = self.heads.len() as i64;
        if tasks.numel() > 0 {
            let (lo, hi) = (tasks.min().int64_value(&[]), tasks.max().int64_value(&[]));
            if lo < 0 || hi >= n {
                let bad = if lo < 0 { lo } else { hi };
                return Err(Error::invalid(
                    "task id",
                    format!(
                        "task id {bad} is beyond the model's {n} heads (0..{})",
                        n - 1
                    ),
                ));
            }
        }
        let h = self.body.features(batch, train)?;
        let mut outs = Vec::with_capacity(self.heads.len());
        for (head, mask) in self.heads.iter().zip(&self.masks) {
            let o = head.forward(&h, train)?;
            outs.push(match mask {
                Some(m) => o + m,
                None => o,
            });
        }
        // [heads, b, c] -> pick each example's head.
        let all = Tensor::stack(&outs, 0);
        let b = h.size()[0];
        let idx = tasks.view([1, b, 1]).expand([1, b, self.classes], false);
        let logits = all.gather(0, &idx, false).squeeze_dim(0);
        let mut out = StepOutputs::logits(logits);
        out.pooled = Some(h);
        Ok(out)
    }
}

//! PackNet (Mallya and Lazebnik 2018): several tasks packed into one network by
//! iterative magnitude pruning, each task owning the weights it kept.
//!
//! Every managed weight (2-D parameters matching the configured glob) has an owner:
//! [`FREE`] or the task that kept it. For task `t`:
//! 1. **train** ([`Trainer::fit`]): only free weights change; weights owned by earlier
//!    tasks have their gradients zeroed and, after every optimizer step, their values
//!    restored bit for bit (so weight decay and optimizer momentum cannot move them).
//!    Biases (1-D managed parameters) train in task 0 only and are fixed afterwards, as
//!    in the paper.
//! 2. **prune** ([`PackNet::prune`]): per layer, of the weights that were free, the
//!    lowest-|w| `ratio` are set to 0 and stay free; the rest become task `t`'s.
//! 3. **retrain** (a second `fit`): only task `t`'s weights change; the pruned ones stay 0.
//! 4. [`Trainer::end_task`] freezes them.
//!
//! Inference on task `t` uses the weights owned by tasks `0..=t` only:
//! [`PackNet::apply_inference_mask`] sets a weight transform (`w * mask`) on each
//! managed linear. Heads are per task (see [`crate::heads`]), not managed here.
//!
//! [`Trainer::fit`]: reuse_core::Trainer::fit
//! [`Trainer::end_task`]: reuse_core::Trainer::end_task

use std::collections::BTreeMap;

use globset::{Glob, GlobMatcher};
use tch::{Kind, Tensor};

use reuse_core::{Checkpoint, Error, Model, Params, Result, StepContext, TaskContext, Technique};

/// Owner id of a weight no task has kept.
pub const FREE: i64 = -1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Train,
    Retrain,
}

/// PackNet as a technique. See the module docs for the per-task protocol.
pub struct PackNet {
    ratio: f64,
    include: GlobMatcher,
    pattern: String,
    task: i64,
    phase: Phase,
    /// Owner per weight (i64, same shape), per managed 2-D parameter.
    owners: BTreeMap<String, Tensor>,
    /// Values that must not change in the current phase, and where (bool mask).
    fixed: BTreeMap<String, (Tensor, Tensor)>,
}

impl std::fmt::Debug for PackNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackNet")
            .field("ratio", &self.ratio)
            .field("include", &self.pattern)
            .field("task", &self.task)
            .field("managed", &self.owners.len())
            .finish()
    }
}

impl PackNet {
    /// PackNet pruning `ratio` of each task's free weights per layer (0 < ratio < 1),
    /// managing the parameters whose names match the glob `include` (e.g. `layers.*`;
    /// `*` matches every parameter). A ratio outside (0, 1) is an error.
    pub fn new(ratio: f64, include: &str) -> Result<Self> {
        if !(ratio > 0.0 && ratio < 1.0) {
            return Err(Error::invalid(
                "packnet pruning ratio",
                format!("must be in (0, 1), found {ratio}"),
            ));
        }
        let include_m = Glob::new(include)
            .map_err(|e| Error::invalid("packnet include glob", e.to_string()))?
            .compile_matcher();
        Ok(Self {
            ratio,
            include: include_m,
            pattern: include.to_string(),
            task: 0,
            phase: Phase::Train,
            owners: BTreeMap::new(),
            fixed: BTreeMap::new(),
        })
    }

    /// The owner tensor of managed weight `name` ([`FREE`] or a task id).
    pub fn owners(&self, name: &str) -> Option<&Tensor> {
        self.owners.get(name)
    }

    fn managed<'a>(&self, params: &'a Params) -> Vec<(&'a str, &'a Tensor)> {
        params
            .iter()
            .filter(|(n, t)| self.include.is_match(n) && (t.dim() == 2 || t.dim() == 1))
            .collect()
    }

    /// Fixes the values of what must not change in the current phase.
    fn snapshot_fixed(&mut self, params: &Params) {
        let task = self.task;
        let phase = self.phase;
        let mut fixed = BTreeMap::new();
        tch::no_grad(|| {
            for (n, t) in self.managed(params) {
                let mask = if t.dim() == 1 {
                    // Biases train in task 0's first phase and retraining only.
                    if task == 0 {
                        continue;
                    }
                    t.ones_like().to_kind(Kind::Bool)
                } else {
                    let owner = self
                        .owners
                        .entry(n.to_string())
                        .or_insert_with(|| t.full_like(FREE).to_kind(Kind::Int64));
                    match phase {
                        Phase::Train => owner.not_equal(FREE),
                        Phase::Retrain => owner.not_equal(task),
                    }
                };
                fixed.insert(n.to_string(), (t.detach().copy(), mask));
            }
        });
        self.fixed = fixed;
    }

    /// Prunes this task's weights (the ones free at its start): per layer, the lowest
    /// `ratio` of them by |w| are set to 0 and stay free, the rest become this task's.
    /// Call it between the training and the retraining `fit` of a task.
    pub fn prune(&mut self, params: &Params) -> Result<()> {
        if self.phase != Phase::Train {
            return Err(Error::invalid(
                "packnet prune",
                format!("task {} is already pruned; call end_task first", self.task),
            ));
        }
        let task = self.task;
        tch::no_grad(|| -> Result<()> {
            for (n, t) in self.managed(params) {
                if t.dim() != 2 {
                    continue;
                }
                let owner = self
                    .owners
                    .entry(n.to_string())
                    .or_insert_with(|| t.full_like(FREE).to_kind(Kind::Int64));
                let free = Tensor::eq(&*owner, FREE);
                let n_free = free.sum(Kind::Int64).int64_value(&[]);
                if n_free == 0 {
                    continue;
                }
                let n_prune = ((n_free as f64) * self.ratio).round() as i64;
                let mag = t.abs().to_kind(Kind::Float);
                // Owned weights sort last so the lowest n_prune are free ones.
                let score = mag.where_self(&free, &mag.full_like(f64::INFINITY));
                let flat = score.flatten(0, -1);
                let mut pruned = Tensor::zeros_like(&flat).to_kind(Kind::Bool);
                if n_prune > 0 {
                    let (_, idx) = flat.topk(n_prune, 0, false, true);
                    let _ = pruned.f_index_fill_(0, &idx, 1)?;
                }
                let pruned = pruned.view_as(t);
                let keep = free.logical_and(&pruned.logical_not());
                let new_owner = owner.where_self(&keep.logical_not(), &owner.full_like(task));
                *owner = new_owner;
                let mut w = t.shallow_clone();
                let _ = w.f_masked_fill_(&pruned, 0.0)?;
            }
            Ok(())
        })?;
        self.phase = Phase::Retrain;
        self.snapshot_fixed(params);
        Ok(())
    }

    /// Sets a weight transform on every managed linear so that it uses only the weights
    /// of tasks `0..=task` (and none that are free). [`PackNet::clear_inference_mask`]
    /// removes them.
    pub fn apply_inference_mask(&self, model: &mut dyn Model, task: usize) -> Result<()> {
        let task = task as i64;
        let mut masks = BTreeMap::new();
        for (n, owner) in &self.owners {
            let m = owner.ge(0).logical_and(&owner.le(task));
            masks.insert(n.clone(), m);
        }
        let mut missing = masks
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>();
        model.visit_linears(&mut |path, l| {
            let key = format!("{path}.weight");
            if let Some(m) = masks.get(&key) {
                missing.remove(&key);
                let m = m.to_kind(l.weight.kind());
                l.set_weight_transform(Some(Box::new(move |w: &Tensor| w * &m)));
            }
        });
        if let Some(n) = missing.first() {
            return Err(Error::invalid(
                "packnet inference mask",
                format!("managed weight `{n}` is not the weight of any linear of this model"),
            ));
        }
        Ok(())
    }

    /// Removes the inference masks.
    pub fn clear_inference_mask(&self, model: &mut dyn Model) {
        let owners = &self.owners;
        model.visit_linears(&mut |path, l| {
            if owners.contains_key(&format!("{path}.weight")) {
                l.set_weight_transform(None);
            }
        });
    }

    fn restore(&self, params: &Params, grads: bool) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for (n, t) in params.iter() {
                let Some((value, mask)) = self.fixed.get(n) else {
                    continue;
                };
                if grads {
                    let mut g = t.grad();
                    if g.defined() {
                        let _ = g.f_masked_fill_(mask, 0.0)?;
                    }
                } else {
                    let mut t = t.shallow_clone();
                    let v = value.where_self(mask, &t);
                    t.f_copy_(&v)?;
                }
            }
            Ok(())
        })
    }
}

impl Technique for PackNet {
    fn name(&self) -> &str {
        "packnet"
    }

    fn begin_task(&mut self, ctx: &TaskContext<'_>) -> Result<()> {
        self.task = ctx.task as i64;
        self.phase = Phase::Train;
        self.snapshot_fixed(&ctx.model.params());
        Ok(())
    }

    fn after_backward(&mut self, params: &Params, _ctx: &StepContext) -> Result<()> {
        self.restore(params, true)
    }

    fn after_step(&mut self, params: &Params, _ctx: &StepContext) -> Result<()> {
        self.restore(params, false)
    }

    fn end_task(&mut self, _ctx: &TaskContext<'_>) -> Result<()> {
        if self.phase != Phase::Retrain {
            return Err(Error::invalid(
                "packnet end_task",
                format!(
                    "task {} was never pruned; call prune before end_task",
                    self.task
                ),
            ));
        }
        self.fixed.clear();
        Ok(())
    }

    fn state(&self) -> Result<Checkpoint> {
        let mut ck = Checkpoint::new();
        ck.set_metadata("task", self.task.to_string());
        ck.set_metadata(
            "phase",
            match self.phase {
                Phase::Train => "train",
                Phase::Retrain => "retrain",
            },
        );
        for (n, o) in &self.owners {
            ck.insert(format!("owner.{n}"), o.shallow_clone());
        }
        for (n, (v, m)) in &self.fixed {
            ck.insert(format!("fixed.{n}"), v.shallow_clone());
            ck.insert(format!("fixed_mask.{n}"), m.to_kind(Kind::Uint8));
        }
        Ok(ck)
    }

    fn load_state(&mut self, state: &Checkpoint) -> Result<()> {
        let meta = state.metadata();
        self.task = meta
            .get("task")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::invalid("packnet state", "metadata `task` is missing"))?;
        self.phase = match meta.get("phase").map(String::as_str) {
            Some("train") => Phase::Train,
            Some("retrain") => Phase::Retrain,
            other => {
                return Err(Error::invalid(
                    "packnet state",
                    format!("phase must be train or retrain, found {other:?}"),
                ))
            }
        };
        let mut owners = BTreeMap::new();
        let mut values = BTreeMap::new();
        let mut masks = BTreeMap::new();
        for (name, t) in state.iter() {
            if let Some(n) = name.strip_prefix("owner.") {
                owners.insert(n.to_string(), t.shallow_clone());
            } else if let Some(n) = name.strip_prefix("fixed_mask.") {
                masks.insert(n.to_string(), t.to_kind(Kind::Bool));
            } else if let Some(n) = name.strip_prefix("fixed.") {
                values.insert(n.to_string(), t.shallow_clone());
            }
        }
        let mut fixed = BTreeMap::new();
        for (n, v) in values {
            let m = masks.remove(&n).ok_or_else(|| {
                Error::invalid("packnet state", format!("`fixed.{n}` has no mask"))
            })?;
            fixed.insert(n, (v, m));
        }
        self.owners = owners;
        self.fixed = fixed;
        Ok(())
    }
}

//! One delta per task on a frozen base: parameter isolation through core's delta slots.
//!
//! Each task gets its own [`reuse_core::LinearDelta`] (a LoRA adapter from reuse-peft,
//! say) under a name, in every layer the caller attached it to; the base stays frozen.
//! [`TaskDeltas`] wraps the model and, for each batch, selects every example's delta by
//! its task id: a batch of one task activates that task's delta (the plain fast path), a
//! mixed batch (replay mixes tasks) routes each example to its own delta with core's
//! per-sample routing. Because a task's delta is trained alone and never again, earlier
//! tasks cannot be forgotten: their outputs are bit for bit what they were.
//!
//! This crate does not depend on reuse-peft; the caller attaches the deltas
//! (`Linear::add_delta`) before wrapping the model.

use std::cell::{Ref, RefCell, RefMut};

use tch::{Device, Tensor};

use reuse_core::data::Batch;
use reuse_core::{Error, ForwardOptions, Linear, Model, Result, StepOutputs, Trainable};

/// A model whose per-task deltas are chosen by each example's task id.
#[derive(Debug)]
pub struct TaskDeltas<M> {
    inner: RefCell<M>,
    names: Vec<String>,
}

impl<M: Trainable> TaskDeltas<M> {
    /// Wraps `model`, whose linears carry deltas named `names[t]` for task `t`. A name
    /// that no linear carries is an error.
    pub fn new(mut model: M, names: Vec<String>) -> Result<Self> {
        if names.is_empty() {
            return Err(Error::invalid("task deltas", "no task delta names given"));
        }
        for n in &names {
            let mut found = false;
            model.visit_linears(&mut |_, l| found |= l.delta(n).is_some());
            if !found {
                return Err(Error::invalid(
                    "task deltas",
                    format!("no linear of the model carries a delta named `{n}`"),
                ));
            }
        }
        Ok(Self {
            inner: RefCell::new(model),
            names,
        })
    }

    /// The wrapped model.
    pub fn inner(&self) -> Ref<'_, M> {
        self.inner.borrow()
    }

    /// The wrapped model, mutably (to attach heads, merge, save).
    pub fn inner_mut(&self) -> RefMut<'_, M> {
        self.inner.borrow_mut()
    }

    /// The model back.
    pub fn into_inner(self) -> M {
        self.inner.into_inner()
    }

    /// The delta name of each task.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    fn check_task(&self, task: usize) -> Result<()> {
        let n = self.names.len();
        if task >= n {
            return Err(Error::invalid(
                "task id",
                format!("task {task} is beyond the model's {n} task deltas"),
            ));
        }
        Ok(())
    }

    /// Makes task `task`'s delta parameters the only trainable ones among the task
    /// deltas and freezes every other parameter of the linears that carry them (the
    /// base). Parameters outside those linears (a head) are left as they are.
    pub fn train_only(&self, task: usize) -> Result<()> {
        self.check_task(task)?;
        let names = &self.names;
        self.inner
            .borrow_mut()
            .visit_linears(&mut |_, l: &mut Linear| {
                if !names.iter().any(|n| l.delta(n).is_some()) {
                    return;
                }
                let _ = l.weight.set_requires_grad(false);
                if let Some(b) = &l.bias {
                    let _ = b.set_requires_grad(false);
                }
                for (t, n) in names.iter().enumerate() {
                    if let Some(d) = l.delta(n) {
                        for (_, p) in d.named_parameters() {
                            let _ = p.set_requires_grad(t == task);
                        }
                    }
                }
            });
        Ok(())
    }

    /// Selects deltas for `tasks` (one task id per example, on the host).
    fn select(&self, tasks: &[i64], device: Device) -> Result<()> {
        let mut uniq: Vec<i64> = tasks.to_vec();
        uniq.sort_unstable();
        uniq.dedup();
        for &t in &uniq {
            if t < 0 {
                return Err(Error::invalid("task id", format!("negative task id {t}")));
            }
            self.check_task(t as usize)?;
        }
        let names = &self.names;
        let mut err = None;
        let mut inner = self.inner.borrow_mut();
        if let [t] = uniq[..] {
            let mine = names[t as usize].as_str();
            inner.visit_linears(&mut |_, l| {
                if err.is_some() || !names.iter().any(|n| l.delta(n).is_some()) {
                    return;
                }
                if let Err(e) = l.set_routing(None) {
                    err = Some(e);
                    return;
                }
                // Keep every non-task delta as it was; of the task deltas only `mine`.
                let keep: Vec<String> = l
                    .delta_names()
                    .into_iter()
                    .filter(|d| {
                        *d == mine
                            || (!names.iter().any(|n| n == d) && l.is_active(d).unwrap_or(false))
                    })
                    .map(str::to_string)
                    .collect();
                let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
                l.set_active(&keep);
            });
        } else {
            let routes: Vec<(String, Tensor)> = uniq
                .iter()
                .map(|&t| {
                    let idx: Vec<i64> = tasks
                        .iter()
                        .enumerate()
                        .filter(|(_, x)| **x == t)
                        .map(|(i, _)| i as i64)
                        .collect();
                    (
                        names[t as usize].clone(),
                        Tensor::from_slice(&idx).to_device(device),
                    )
                })
                .collect();
            inner.visit_linears(&mut |_, l| {
                if err.is_some() {
                    return;
                }
                let here: Vec<(String, Tensor)> = routes
                    .iter()
                    .filter(|(n, _)| l.delta(n).is_some())
                    .map(|(n, i)| (n.clone(), i.shallow_clone()))
                    .collect();
                if here.is_empty() {
                    return;
                }
                if let Err(e) = l.set_routing(Some(here)) {
                    err = Some(e);
                }
            });
        }
        err.map_or(Ok(()), Err)
    }
}

impl<M: Trainable> Model for TaskDeltas<M> {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.inner.get_mut().visit_linears(f)
    }

    fn visit_block_outputs(&mut self, f: &mut dyn FnMut(&str, &mut reuse_core::OutputSlots)) {
        self.inner.get_mut().visit_block_outputs(f)
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.inner.borrow().named_parameters()
    }

    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.inner.borrow().named_buffers()
    }
}

impl<M: Trainable> Trainable for TaskDeltas<M> {
    /// Routes by the batch's task ids (required); a task id beyond the deltas is an
    /// error naming it.
    fn forward(&self, batch: &Batch, train: bool, opts: ForwardOptions) -> Result<StepOutputs> {
        let tasks = batch.task_ids.as_ref().ok_or_else(|| {
            Error::invalid(
                "task-delta batch",
                "the batch has no task ids; each example's delta is chosen by its task id",
            )
        })?;
        let host = Vec::<i64>::try_from(tasks.to_device(Device::Cpu))?;
        self.select(&host, tasks.device())?;
        let out = self.inner.borrow().forward(batch, train, opts);
        out
    }

    fn loss(&self, out: &StepOutputs, batch: &Batch) -> Result<Tensor> {
        self.inner.borrow().loss(out, batch)
    }

    fn predicts_next_token(&self) -> bool {
        self.inner.borrow().predicts_next_token()
    }
}

//! A small training loop that composes techniques.
//!
//! A [`Technique`] hooks into the loop at fixed points, each with a [`StepContext`]
//! (global step, epoch, task, learning rate, device): it may ask the model for extra
//! outputs ([`ForwardOptions`]), prepare for a task, rewrite a batch (replay), weight the
//! task loss and add loss terms (KD, EWC), edit gradients after backward (PackNet masks),
//! fix weights after the optimizer update (re-zero pruned weights that weight decay and
//! momentum still move), do end-of-task work (Fisher, pruning) and carry state that is
//! saved with the run. Every hook defaults to doing nothing, so several techniques run
//! together in one loop, in the order given, and each is still usable by hand from a
//! user's own loop.
//!
//! # Loss
//! For each micro-batch the loss is `w * task_loss + sum(extra terms)`, where `w` is the
//! product of every technique's [`Technique::task_loss_weight`] (KD's `alpha` sets it and
//! adds `(1 - alpha) * kd` as its extra term), divided by the accumulation count.
//!
//! # Saving and resuming a run
//! With [`TrainConfig::run_state`] set, the trainer writes one safetensors file,
//! atomically, every `every` optimizer steps and at the end: the parameters that train
//! (or all of them), the optimizer state, every technique's [`Technique::state`], the
//! step, epoch and position in the epoch, and the loss history. [`Trainer::resume`]
//! loads it; the next [`Trainer::fit`] continues where the run stopped and ends with the
//! same weights an uninterrupted run has. No random generator state needs saving: the
//! data order is a function of `(seed, epoch)` and libtorch's generator (dropout) is
//! re-seeded from `(seed, step, micro-batch)` before every micro-batch.
//!
//! # Device syncs
//! The loop does not read from the device per micro-batch: losses accumulate on the
//! device and are read once every [`TrainConfig::log_every`] steps; gradient clipping
//! scales by a device tensor.
//!
//! # Files
//! This module holds the configuration, the [`Technique`] hooks and the [`Trainer`];
//! `fit.rs` the loop, `run_state.rs` the run file (save and resume), `eval.rs`
//! prediction and accuracy. The forward contract ([`Trainable`], [`StepOutputs`],
//! [`ForwardOptions`]) lives beside [`crate::Model`] in [`crate::model`].

use std::path::PathBuf;

use tch::{Device, Tensor};

use crate::data::{Batch, BatchSource};
use crate::optim::{Optimizer, OptimizerKind, Schedule};
use crate::{Checkpoint, Error, Params, Result};

mod eval;
mod fit;
mod run_state;

pub use crate::model::{ForwardOptions, StepOutputs, Trainable};
pub use eval::{accuracy, count_correct, evaluate, predict};

/// Where the loop is, as every hook sees it.
#[derive(Debug, Clone, Copy)]
pub struct StepContext {
    /// Optimizer steps taken so far in this run (0 during the first step).
    pub step: usize,
    /// Optimizer steps the run will take.
    pub total_steps: usize,
    /// Micro-batch index within the current optimizer step.
    pub micro: usize,
    /// Epoch over the training data (0-based).
    pub epoch: usize,
    /// The current task (see [`Trainer::begin_task`]).
    pub task: usize,
    /// Learning rate of the current step.
    pub lr: f64,
    /// Device of the run.
    pub device: Device,
}

/// What a technique sees at the beginning and end of a task.
pub struct TaskContext<'a> {
    /// Index of the task.
    pub task: usize,
    /// The model.
    pub model: &'a dyn Trainable,
    /// The task's training data.
    pub data: &'a dyn BatchSource,
    /// Device of the run.
    pub device: Device,
}

/// A training technique that composes with others in one loop. Every hook but
/// [`Technique::name`] has a default that does nothing.
pub trait Technique {
    /// A short name, used for its state in run files; unique among a run's techniques.
    fn name(&self) -> &str;
    /// Extra outputs this technique needs from the forward pass.
    fn forward_options(&self) -> ForwardOptions {
        ForwardOptions::default()
    }
    /// Work before training on a task (a new head, a new delta, a fresh mask).
    fn begin_task(&mut self, _ctx: &TaskContext<'_>) -> Result<()> {
        Ok(())
    }
    /// Work at the start of every [`Trainer::fit`] (and of a resumed one), before the
    /// first step, with every parameter of the model: data parallelism makes every
    /// process start from rank 0's values here.
    fn begin_fit(&mut self, _params: &Params, _ctx: &StepContext) -> Result<()> {
        Ok(())
    }
    /// Rewrites a batch before the forward pass (replay mixes stored examples in).
    fn rewrite_batch(&mut self, batch: Batch, _ctx: &StepContext) -> Result<Batch> {
        Ok(batch)
    }
    /// A factor on the task loss (KD's alpha). The factors of all techniques multiply.
    fn task_loss_weight(&self, _ctx: &StepContext) -> f64 {
        1.0
    }
    /// An extra loss term for this batch (EWC penalty, KD loss).
    fn extra_loss(
        &mut self,
        _batch: &Batch,
        _out: &StepOutputs,
        _params: &Params,
        _ctx: &StepContext,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Edits gradients after backward, before clipping and the optimizer step (masks).
    fn after_backward(&mut self, _params: &Params, _ctx: &StepContext) -> Result<()> {
        Ok(())
    }
    /// The loss of an optimizer step as the run reports it (0-d, on the device), called
    /// after the optimizer update: data parallelism replaces this process's loss by the
    /// loss over every process's examples. Default: unchanged.
    fn reduce_step_loss(&mut self, loss: Tensor, _ctx: &StepContext) -> Result<Tensor> {
        Ok(loss)
    }
    /// Whether this process writes the run file ([`TrainConfig::run_state`]); the trainer
    /// writes it only when every technique agrees. Data parallelism lets rank 0 alone
    /// write, and every rank reads it on [`Trainer::resume`]. Default: true.
    fn writes_run_state(&self) -> bool {
        true
    }
    /// Runs after the optimizer update (re-zero pruned weights, EMA, counters).
    fn after_step(&mut self, _params: &Params, _ctx: &StepContext) -> Result<()> {
        Ok(())
    }
    /// Work at the end of a task (Fisher information, pruning).
    fn end_task(&mut self, _ctx: &TaskContext<'_>) -> Result<()> {
        Ok(())
    }
    /// State to save with the run.
    fn state(&self) -> Result<Checkpoint> {
        Ok(Checkpoint::new())
    }
    /// Restores state saved by [`Technique::state`].
    fn load_state(&mut self, _state: &Checkpoint) -> Result<()> {
        Ok(())
    }
}

/// Which parameters a run file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaveParams {
    /// Those that require grad (an adapter run saves only the adapter).
    #[default]
    Trainable,
    /// Every parameter of the model.
    All,
}

/// Where and how often a run saves its resumable state.
#[derive(Debug, Clone)]
pub struct RunStateConfig {
    /// The run file (safetensors), written atomically.
    pub path: PathBuf,
    /// Save every this many optimizer steps (and always at the end of `fit`).
    pub every: usize,
    /// Which parameters to save.
    pub params: SaveParams,
}

/// Trainer settings. Defaults: AdamW, lr 1e-3, no weight decay, batch 32, 1 epoch.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Epochs over the training data (ignored when `max_steps` is set).
    pub epochs: usize,
    /// Stop after this many optimizer steps.
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Base learning rate.
    pub lr: f64,
    /// Weight decay (decoupled for AdamW).
    pub weight_decay: f64,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Clip the global gradient norm to this.
    pub clip_grad_norm: Option<f64>,
    /// Evaluate on the eval set every N optimizer steps (and at the end).
    pub eval_every: Option<usize>,
    /// Read the losses back from the device every N optimizer steps (progress bar,
    /// report); 1 reads every step.
    pub log_every: usize,
    /// Seeds libtorch (dropout, re-seeded per micro-batch) and the data order; a `fit`
    /// after `begin_task(t)` with t > 0 mixes the task in, so every task of a stream
    /// draws its own batch orders.
    pub seed: u64,
    /// Where to train.
    pub device: Device,
    /// CUDA autocast for the forward pass (ignored on CPU). libtorch's autocast dtype
    /// is float16 and tch offers no way to choose bf16, and there is no gradient
    /// scaler yet; for bf16 training load the model in bf16 instead (the optimizer then
    /// keeps f32 master weights).
    pub autocast: bool,
    /// Show a progress bar with loss and throughput.
    pub progress: bool,
    /// Save a resumable run state (see the module docs).
    pub run_state: Option<RunStateConfig>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: None,
            batch_size: 32,
            grad_accum: 1,
            lr: 1e-3,
            weight_decay: 0.0,
            optimizer: OptimizerKind::default(),
            schedule: Schedule::Constant,
            clip_grad_norm: None,
            eval_every: None,
            log_every: 10,
            seed: 0,
            device: Device::Cpu,
            autocast: false,
            progress: false,
            run_state: None,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct TrainReport {
    /// Optimizer steps taken (including those before a resume).
    pub steps: usize,
    /// Loss (task + extra terms, summed over micro-batches) of each optimizer step.
    pub losses: Vec<f64>,
    /// (step, figure) of each evaluation: the model's [`crate::Evaluation`] (accuracy
    /// for classifiers, mean token NLL for causal LMs), named by `eval_metric`.
    pub evals: Vec<(usize, f64)>,
    /// The name of the evaluations' figure (`accuracy`, `token_nll`); empty before one.
    pub eval_metric: &'static str,
    /// Wall-clock seconds of this `fit` call.
    pub seconds: f64,
    /// Training examples per second in this `fit` call.
    pub examples_per_second: f64,
    /// The step this `fit` resumed from, if it resumed.
    pub resumed_from: Option<usize>,
}

/// Where a run is: the part of a run file that is not tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Position {
    step: usize,
    epoch: usize,
    batch_in_epoch: usize,
}

/// The training loop. Holds the optimizer, so successive `fit` calls (one per task in
/// continual learning) continue with the same optimizer state.
#[derive(Debug)]
pub struct Trainer {
    /// Settings.
    pub config: TrainConfig,
    optimizer: Optimizer,
    task: usize,
    resume: Option<(Position, TrainReport)>,
}

impl Trainer {
    /// A trainer with a fresh optimizer, on task 0.
    pub fn new(config: TrainConfig) -> Self {
        let optimizer = Optimizer::new(config.optimizer, config.weight_decay);
        Self {
            config,
            optimizer,
            task: 0,
            resume: None,
        }
    }

    /// The optimizer (for saving its state).
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// The optimizer, mutably (for loading or remapping its state).
    pub fn optimizer_mut(&mut self) -> &mut Optimizer {
        &mut self.optimizer
    }

    /// The current task.
    pub fn task(&self) -> usize {
        self.task
    }

    /// Optimizer steps this run takes with the current settings on `train`.
    pub fn total_steps(&self, train: &dyn BatchSource) -> usize {
        let c = &self.config;
        let per_epoch = train.len().div_ceil(c.batch_size.max(1));
        c.max_steps
            .unwrap_or_else(|| (per_epoch * c.epochs).div_ceil(c.grad_accum.max(1)))
    }

    fn check_config(&self) -> Result<()> {
        let c = &self.config;
        if c.batch_size == 0 || c.grad_accum == 0 || c.log_every == 0 {
            return Err(Error::invalid(
                "train config",
                format!(
                    "batch_size ({}), grad_accum ({}) and log_every ({}) must be at least 1",
                    c.batch_size, c.grad_accum, c.log_every
                ),
            ));
        }
        if !(c.lr.is_finite() && c.lr >= 0.0) {
            return Err(Error::invalid(
                "train config",
                format!("lr must be finite and >= 0, found {}", c.lr),
            ));
        }
        if let Some(r) = &c.run_state {
            if r.every == 0 {
                return Err(Error::invalid("run_state.every", "must be at least 1"));
            }
        }
        Ok(())
    }

    /// Starts task `task`: resets the position in the data and calls every technique's
    /// [`Technique::begin_task`].
    pub fn begin_task(
        &mut self,
        task: usize,
        model: &dyn Trainable,
        data: &dyn BatchSource,
        techniques: &mut [&mut dyn Technique],
    ) -> Result<()> {
        self.task = task;
        self.resume = None;
        let ctx = self.task_context(task, model, data);
        techniques.iter_mut().try_for_each(|t| t.begin_task(&ctx))
    }

    fn task_context<'a>(
        &self,
        task: usize,
        model: &'a dyn Trainable,
        data: &'a dyn BatchSource,
    ) -> TaskContext<'a> {
        TaskContext {
            task,
            model,
            data,
            device: self.config.device,
        }
    }

    /// Tells every technique that task `task` ended (after training on `data`).
    pub fn end_task(
        &self,
        task: usize,
        model: &dyn Trainable,
        data: &dyn BatchSource,
        techniques: &mut [&mut dyn Technique],
    ) -> Result<()> {
        let ctx = self.task_context(task, model, data);
        techniques.iter_mut().try_for_each(|t| t.end_task(&ctx))
    }
}

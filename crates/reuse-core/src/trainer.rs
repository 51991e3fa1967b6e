//! A small training loop that composes techniques.
//!
//! A [`Technique`] hooks into the loop at fixed points: it may rewrite a batch (replay),
//! add loss terms (EWC penalty, KD loss), edit gradients after backward (PackNet
//! masks), do end-of-task work (Fisher, pruning) and carry state that is saved with the
//! run. Every hook defaults to doing nothing, so several techniques run together in one
//! loop, in the order given, and each is still usable by hand from a user's own loop.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use tch::{Device, Kind, Tensor};

use crate::data::{epoch_batches, Batch, BatchSource};
use crate::optim::{cross_entropy, Optimizer, OptimizerKind, Schedule};
use crate::{Checkpoint, Params, Result};

/// What a model's forward pass returns to the trainer and to techniques.
#[derive(Debug)]
pub struct StepOutputs {
    /// Class logits `[b, c]`.
    pub logits: Tensor,
    /// Hidden states, when the model exposes them (feature distillation).
    pub hidden_states: Vec<Tensor>,
}

impl StepOutputs {
    /// Outputs with logits only.
    pub fn logits(logits: Tensor) -> Self {
        Self {
            logits,
            hidden_states: Vec::new(),
        }
    }
}

/// A model the trainer can train.
pub trait Trainable {
    /// Every parameter (frozen ones too); the optimizer updates those requiring grad.
    fn parameters(&self) -> Params;
    /// Forward pass for a batch; `train` enables dropout.
    fn forward(&self, batch: &Batch, train: bool) -> Result<StepOutputs>;
    /// The task loss. Default: cross-entropy of the logits against the labels.
    fn loss(&self, out: &StepOutputs, batch: &Batch) -> Tensor {
        cross_entropy(&out.logits, &batch.labels)
    }
}

/// What a technique sees at the end of a task.
pub struct TaskContext<'a> {
    /// Index of the task that just ended.
    pub task: usize,
    /// The model.
    pub model: &'a dyn Trainable,
    /// The task's training data.
    pub data: &'a dyn BatchSource,
    /// Device of the run.
    pub device: Device,
}

/// A training technique that composes with others in one loop.
pub trait Technique {
    /// A short name, used for its state in checkpoints.
    fn name(&self) -> &str;
    /// Rewrites a batch before the forward pass (replay mixes stored examples in).
    fn rewrite_batch(&mut self, batch: Batch) -> Result<Batch> {
        Ok(batch)
    }
    /// An extra loss term for this batch (EWC penalty, KD loss).
    fn extra_loss(
        &mut self,
        _batch: &Batch,
        _out: &StepOutputs,
        _params: &Params,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Edits gradients after backward, before the optimizer step (masks).
    fn after_backward(&mut self, _params: &Params) -> Result<()> {
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
    /// Seeds libtorch (init, dropout) and the data order.
    pub seed: u64,
    /// Where to train.
    pub device: Device,
    /// CUDA autocast for the forward pass (ignored on CPU). libtorch's autocast dtype
    /// is float16 and tch offers no way to choose bf16, and there is no gradient
    /// scaler yet; for bf16 training load the model in bf16 instead.
    pub autocast: bool,
    /// Show a progress bar with loss and throughput.
    pub progress: bool,
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
            seed: 0,
            device: Device::Cpu,
            autocast: false,
            progress: false,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct TrainReport {
    /// Optimizer steps taken.
    pub steps: usize,
    /// Mean loss (task + extra terms) of each optimizer step.
    pub losses: Vec<f64>,
    /// (step, accuracy) of each evaluation.
    pub evals: Vec<(usize, f64)>,
    /// Wall-clock seconds of the run.
    pub seconds: f64,
    /// Training examples per second.
    pub examples_per_second: f64,
}

/// The training loop. Holds the optimizer, so successive `fit` calls (one per task in
/// continual learning) continue with the same optimizer state.
#[derive(Debug)]
pub struct Trainer {
    /// Settings.
    pub config: TrainConfig,
    optimizer: Optimizer,
}

impl Trainer {
    /// A trainer with a fresh optimizer.
    pub fn new(config: TrainConfig) -> Self {
        let optimizer = Optimizer::new(config.optimizer, config.weight_decay);
        Self { config, optimizer }
    }

    /// The optimizer (for saving its state).
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// The optimizer, mutably (for loading its state).
    pub fn optimizer_mut(&mut self) -> &mut Optimizer {
        &mut self.optimizer
    }

    /// Trains `model` on `train`, composing `techniques` in order.
    pub fn fit(
        &mut self,
        model: &dyn Trainable,
        train: &dyn BatchSource,
        eval: Option<&dyn BatchSource>,
        techniques: &mut [&mut dyn Technique],
    ) -> Result<TrainReport> {
        let c = self.config.clone();
        tch::manual_seed(c.seed as i64);
        let params = model.parameters();
        let trainable = params.trainable();
        let per_epoch = train.len().div_ceil(c.batch_size.max(1));
        let total = c
            .max_steps
            .unwrap_or_else(|| (per_epoch * c.epochs).div_ceil(c.grad_accum.max(1)));
        let bar = if c.progress {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
                )
                .expect("valid template"),
            );
            b
        } else {
            ProgressBar::hidden()
        };
        let start = Instant::now();
        let mut report = TrainReport::default();
        let mut examples = 0usize;
        let mut micro = 0usize;
        let mut step_loss = 0.0;
        let mut epoch = 0u64;
        'outer: loop {
            for idx in epoch_batches(train.len(), c.batch_size, Some(c.seed), epoch) {
                if report.steps >= total {
                    break 'outer;
                }
                let mut batch = train.batch(&idx, c.device)?;
                for t in techniques.iter_mut() {
                    batch = t.rewrite_batch(batch)?;
                }
                examples += batch.len();
                let autocast = c.autocast && c.device.is_cuda();
                let out = tch::autocast(autocast, || model.forward(&batch, true))?;
                let mut loss = model.loss(&out, &batch);
                for t in techniques.iter_mut() {
                    if let Some(extra) = t.extra_loss(&batch, &out, &params)? {
                        loss = &loss + extra.to_kind(Kind::Float);
                    }
                }
                let loss = loss / c.grad_accum.max(1) as f64;
                loss.backward();
                step_loss += loss.double_value(&[]);
                micro += 1;
                if micro % c.grad_accum.max(1) != 0 {
                    continue;
                }
                for t in techniques.iter_mut() {
                    t.after_backward(&trainable)?;
                }
                if let Some(max) = c.clip_grad_norm {
                    trainable.clip_grad_norm(max);
                }
                let lr = c.lr * c.schedule.factor(report.steps, total);
                self.optimizer.step(&trainable, lr);
                trainable.zero_grad();
                report.steps += 1;
                report.losses.push(step_loss);
                let secs = start.elapsed().as_secs_f64();
                bar.set_position(report.steps as u64);
                bar.set_message(format!(
                    "loss {step_loss:.4} {:.0} ex/s",
                    examples as f64 / secs.max(1e-9)
                ));
                step_loss = 0.0;
                if let (Some(every), Some(ev)) = (c.eval_every, eval) {
                    if report.steps % every == 0 {
                        report
                            .evals
                            .push((report.steps, accuracy(model, ev, c.batch_size, c.device)?));
                    }
                }
            }
            epoch += 1;
            if per_epoch == 0 {
                break;
            }
        }
        if let Some(ev) = eval {
            if report.evals.last().map(|e| e.0) != Some(report.steps) {
                report
                    .evals
                    .push((report.steps, accuracy(model, ev, c.batch_size, c.device)?));
            }
        }
        bar.finish_and_clear();
        report.seconds = start.elapsed().as_secs_f64();
        report.examples_per_second = examples as f64 / report.seconds.max(1e-9);
        Ok(report)
    }

    /// Tells every technique that task `task` ended (after training on `data`).
    pub fn end_task(
        &self,
        task: usize,
        model: &dyn Trainable,
        data: &dyn BatchSource,
        techniques: &mut [&mut dyn Technique],
    ) -> Result<()> {
        let ctx = TaskContext {
            task,
            model,
            data,
            device: self.config.device,
        };
        for t in techniques.iter_mut() {
            t.end_task(&ctx)?;
        }
        Ok(())
    }
}

/// Predicted classes and labels for every example of `data`, in order (eval mode, no grad).
pub fn predict(
    model: &dyn Trainable,
    data: &dyn BatchSource,
    batch_size: usize,
    device: Device,
) -> Result<(Vec<i64>, Vec<i64>)> {
    let mut preds = Vec::with_capacity(data.len());
    let mut labels = Vec::with_capacity(data.len());
    tch::no_grad(|| -> Result<()> {
        for idx in epoch_batches(data.len(), batch_size, None, 0) {
            let b = data.batch(&idx, device)?;
            let out = model.forward(&b, false)?;
            preds.extend(Vec::<i64>::try_from(
                out.logits.argmax(-1, false).to_device(Device::Cpu),
            )?);
            labels.extend(Vec::<i64>::try_from(b.labels.to_device(Device::Cpu))?);
        }
        Ok(())
    })?;
    Ok((preds, labels))
}

/// Fraction of examples whose predicted class equals the label.
pub fn accuracy(
    model: &dyn Trainable,
    data: &dyn BatchSource,
    batch_size: usize,
    device: Device,
) -> Result<f64> {
    let (preds, labels) = predict(model, data, batch_size, device)?;
    let right = preds.iter().zip(&labels).filter(|(p, y)| p == y).count();
    Ok(right as f64 / labels.len().max(1) as f64)
}

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

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use tch::{Device, Kind, Tensor};

use crate::data::{epoch_batches, Batch, BatchSource};
use crate::optim::{cross_entropy, Optimizer, OptimizerKind, Schedule};
use crate::{Checkpoint, Error, Model, Params, Result};

/// What a forward pass should return besides logits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Hidden states of every layer (embedding output first).
    pub hidden_states: bool,
    /// Attention probabilities of every layer.
    pub attentions: bool,
    /// The pooled representation the head sees.
    pub pooled: bool,
}

impl ForwardOptions {
    /// Everything either asks for.
    pub fn union(self, o: ForwardOptions) -> ForwardOptions {
        ForwardOptions {
            hidden_states: self.hidden_states || o.hidden_states,
            attentions: self.attentions || o.attentions,
            pooled: self.pooled || o.pooled,
        }
    }
}

/// What a model's forward pass returns to the trainer and to techniques.
#[derive(Debug)]
pub struct StepOutputs {
    /// Class logits `[b, c]`.
    pub logits: Tensor,
    /// Hidden states, when asked for and the model has them (feature distillation).
    pub hidden_states: Vec<Tensor>,
    /// Attention probabilities `[b, heads, t, t]` per layer, when asked for.
    pub attentions: Vec<Tensor>,
    /// The pooled features `[b, h]` the head sees, when asked for.
    pub pooled: Option<Tensor>,
}

impl StepOutputs {
    /// Outputs with logits only.
    pub fn logits(logits: Tensor) -> Self {
        Self {
            logits,
            hidden_states: Vec::new(),
            attentions: Vec::new(),
            pooled: None,
        }
    }
}

/// A model the trainer can train: a [`Model`] (its parameters by name) with a forward
/// pass over batches and a task loss.
pub trait Trainable: Model {
    /// Forward pass for a batch; `train` enables dropout; `opts` asks for extra outputs.
    fn forward(&self, batch: &Batch, train: bool, opts: ForwardOptions) -> Result<StepOutputs>;
    /// The task loss. Default: cross-entropy of the logits against the labels.
    fn loss(&self, out: &StepOutputs, batch: &Batch) -> Result<Tensor> {
        cross_entropy(&out.logits, &batch.labels)
    }
}

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
    /// (step, accuracy) of each evaluation.
    pub evals: Vec<(usize, f64)>,
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

/// The seed of a `fit` on task `task`: the configured seed for task 0 (so single-task
/// runs are as they were), a distinct one per later task. Each task's `fit` starts at
/// epoch 0 and step 0, so without it tasks of the same size would draw the same batch
/// orders and dropout masks (Avalanche's and PyTorch's loaders draw fresh ones).
fn task_seed(seed: u64, task: usize) -> u64 {
    if task == 0 {
        seed
    } else {
        seed ^ (task as u64).wrapping_mul(0xA24B_AED4_963E_E407)
    }
}

fn seed_for(seed: u64, step: usize, micro: usize) -> i64 {
    // splitmix64 of (seed, step, micro): distinct streams for every micro-batch.
    let mut z = seed
        .wrapping_add((step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add((micro as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

const META_KEYS: [&str; 6] = [
    "step",
    "epoch",
    "batch_in_epoch",
    "total_steps",
    "batch_size",
    "seed",
];

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

    /// Trains `model` on `train`, composing `techniques` in order. After
    /// [`Trainer::resume`], continues from the saved position.
    pub fn fit(
        &mut self,
        model: &dyn Trainable,
        train: &dyn BatchSource,
        eval: Option<&dyn BatchSource>,
        techniques: &mut [&mut dyn Technique],
    ) -> Result<TrainReport> {
        self.check_config()?;
        let c = self.config.clone();
        let seed = task_seed(c.seed, self.task);
        let mut names: Vec<&str> = techniques.iter().map(|t| t.name()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::invalid(
                "techniques",
                format!("two techniques are named `{}`; names must be unique", w[0]),
            ));
        }
        let opts = techniques.iter().fold(ForwardOptions::default(), |o, t| {
            o.union(t.forward_options())
        });
        let params = model.params();
        let trainable = params.trainable();
        let per_epoch = train.len().div_ceil(c.batch_size);
        let total = self.total_steps(train);
        let (mut pos, mut report) = match self.resume.take() {
            Some((p, mut r)) => {
                r.resumed_from = Some(p.step);
                (p, r)
            }
            None => (Position::default(), TrainReport::default()),
        };
        let bar = if c.progress {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
                )
                .expect("valid template"),
            );
            b.set_position(pos.step as u64);
            b
        } else {
            ProgressBar::hidden()
        };
        let begin = StepContext {
            step: pos.step,
            total_steps: total,
            micro: 0,
            epoch: pos.epoch,
            task: self.task,
            lr: c.lr * c.schedule.factor(pos.step, total),
            device: c.device,
        };
        for t in techniques.iter_mut() {
            t.begin_fit(&params, &begin)?;
        }
        let start = Instant::now();
        let mut examples = 0usize;
        let mut micro = 0usize;
        // Per-step losses still on the device, read every `log_every` steps.
        let mut pending: Vec<Tensor> = Vec::new();
        let mut step_loss: Option<Tensor> = None;
        let autocast = c.autocast && c.device.is_cuda();
        let flush = |pending: &mut Vec<Tensor>, report: &mut TrainReport| -> Result<()> {
            if pending.is_empty() {
                return Ok(());
            }
            let v = Tensor::stack(pending, 0)
                .to_kind(Kind::Double)
                .to_device(Device::Cpu);
            report.losses.extend(Vec::<f64>::try_from(&v)?);
            pending.clear();
            Ok(())
        };
        'outer: while per_epoch > 0 && pos.step < total {
            let batches = epoch_batches(train.len(), c.batch_size, Some(seed), pos.epoch as u64);
            while pos.batch_in_epoch < batches.len() {
                if pos.step >= total {
                    break 'outer;
                }
                let idx = &batches[pos.batch_in_epoch];
                pos.batch_in_epoch += 1;
                let lr = c.lr * c.schedule.factor(pos.step, total);
                let ctx = StepContext {
                    step: pos.step,
                    total_steps: total,
                    micro,
                    epoch: pos.epoch,
                    task: self.task,
                    lr,
                    device: c.device,
                };
                tch::manual_seed(seed_for(seed, pos.step, micro));
                let mut batch = train.batch(idx, c.device)?;
                for t in techniques.iter_mut() {
                    batch = t.rewrite_batch(batch, &ctx)?;
                }
                examples += batch.len();
                let out = tch::autocast(autocast, || model.forward(&batch, true, opts))?;
                let weight: f64 = techniques
                    .iter()
                    .map(|t| t.task_loss_weight(&ctx))
                    .product();
                let mut loss = model.loss(&out, &batch)?.to_kind(Kind::Float);
                if weight != 1.0 {
                    loss = loss.f_mul_scalar(weight)?;
                }
                for t in techniques.iter_mut() {
                    if let Some(extra) = t.extra_loss(&batch, &out, &params, &ctx)? {
                        loss = loss.f_add(&extra.to_kind(Kind::Float))?;
                    }
                }
                let loss = loss / c.grad_accum as f64;
                loss.f_backward()?;
                let l = loss.detach();
                step_loss = Some(match step_loss {
                    Some(s) => s + l,
                    None => l,
                });
                micro += 1;
                if micro < c.grad_accum {
                    continue;
                }
                micro = 0;
                for t in techniques.iter_mut() {
                    t.after_backward(&trainable, &ctx)?;
                }
                if let Some(max) = c.clip_grad_norm {
                    let _norm = trainable.clip_grad_norm(max)?;
                }
                self.optimizer.step(&trainable, lr)?;
                for t in techniques.iter_mut() {
                    t.after_step(&trainable, &ctx)?;
                }
                trainable.zero_grad();
                pos.step += 1;
                if let Some(mut s) = step_loss.take() {
                    for t in techniques.iter_mut() {
                        s = t.reduce_step_loss(s, &ctx)?;
                    }
                    pending.push(s);
                }
                if pos.step % c.log_every == 0 || pos.step == total {
                    flush(&mut pending, &mut report)?;
                    let secs = start.elapsed().as_secs_f64();
                    bar.set_position(pos.step as u64);
                    bar.set_message(format!(
                        "loss {:.4} {:.0} ex/s",
                        report.losses.last().copied().unwrap_or(f64::NAN),
                        examples as f64 / secs.max(1e-9)
                    ));
                }
                if let (Some(every), Some(ev)) = (c.eval_every, eval) {
                    if pos.step % every == 0 {
                        report
                            .evals
                            .push((pos.step, accuracy(model, ev, c.batch_size, c.device)?));
                    }
                }
                if let Some(rs) = &c.run_state {
                    if pos.step % rs.every == 0 && pos.step < total {
                        flush(&mut pending, &mut report)?;
                        report.steps = pos.step;
                        self.save_run(rs, model, techniques, pos, total, &report)?;
                    }
                }
            }
            pos.epoch += 1;
            pos.batch_in_epoch = 0;
        }
        flush(&mut pending, &mut report)?;
        report.steps = pos.step;
        if let Some(ev) = eval {
            if report.evals.last().map(|e| e.0) != Some(pos.step) {
                report
                    .evals
                    .push((pos.step, accuracy(model, ev, c.batch_size, c.device)?));
            }
        }
        if let Some(rs) = &c.run_state {
            self.save_run(rs, model, techniques, pos, total, &report)?;
        }
        bar.finish_and_clear();
        report.seconds = start.elapsed().as_secs_f64();
        report.examples_per_second = examples as f64 / report.seconds.max(1e-9);
        Ok(report)
    }

    fn save_run(
        &self,
        rs: &RunStateConfig,
        model: &dyn Trainable,
        techniques: &[&mut dyn Technique],
        pos: Position,
        total: usize,
        report: &TrainReport,
    ) -> Result<()> {
        if techniques.iter().any(|t| !t.writes_run_state()) {
            return Ok(());
        }
        let c = &self.config;
        let mut ck = Checkpoint::new();
        let params = match rs.params {
            SaveParams::Trainable => model.params().trainable(),
            SaveParams::All => model.params(),
        };
        tch::no_grad(|| {
            for (n, t) in params.iter() {
                ck.insert(
                    format!("param.{n}"),
                    t.detach().to_device(Device::Cpu).copy(),
                );
            }
        });
        let opt = self.optimizer.state();
        for (n, t) in opt.iter() {
            ck.insert(format!("optim.{n}"), t.to_device(Device::Cpu));
        }
        for (k, v) in opt.metadata() {
            ck.set_metadata(format!("optim.{k}"), v.clone());
        }
        for t in techniques {
            let st = t.state()?;
            let name = t.name();
            for (n, v) in st.iter() {
                ck.insert(
                    format!("technique.{name}.{n}"),
                    v.to_device(Device::Cpu).copy(),
                );
            }
            for (k, v) in st.metadata() {
                ck.set_metadata(format!("technique.{name}.{k}"), v.clone());
            }
        }
        ck.insert("report.losses", Tensor::from_slice(&report.losses));
        let evals: Vec<f64> = report
            .evals
            .iter()
            .flat_map(|&(s, a)| [s as f64, a])
            .collect();
        ck.insert(
            "report.evals",
            Tensor::from_slice(&evals).view([report.evals.len() as i64, 2]),
        );
        for (k, v) in META_KEYS.iter().zip([
            pos.step,
            pos.epoch,
            pos.batch_in_epoch,
            total,
            c.batch_size,
            c.seed as usize,
        ]) {
            ck.set_metadata(*k, v.to_string());
        }
        ck.set_metadata("task", self.task.to_string());
        ck.set_metadata("format", "reuse-run-1");
        ck.save(&rs.path)
    }

    /// Loads the run file named by [`TrainConfig::run_state`] if it exists: parameters
    /// into `model`, the optimizer state, every technique's state and the position; the
    /// next [`Trainer::fit`] continues from there. Returns the step resumed from, or
    /// `None` when there is no file (a fresh run). A file written with another batch
    /// size or seed, a parameter missing or of another shape, or a technique's state
    /// missing is an error naming it, and nothing is changed.
    pub fn resume(
        &mut self,
        model: &dyn Trainable,
        techniques: &mut [&mut dyn Technique],
    ) -> Result<Option<usize>> {
        let Some(rs) = self.config.run_state.clone() else {
            return Err(Error::invalid(
                "resume",
                "TrainConfig::run_state is not set, so there is no run file to resume from",
            ));
        };
        if !rs.path.exists() {
            return Ok(None);
        }
        let ck = Checkpoint::load(&rs.path, Device::Cpu)?;
        let corrupt = |reason: String| Error::Corrupt {
            path: rs.path.clone(),
            reason,
        };
        if ck.metadata().get("format").map(String::as_str) != Some("reuse-run-1") {
            return Err(corrupt(
                "not a reuse run file (metadata `format` is not `reuse-run-1`)".into(),
            ));
        }
        let meta = |k: &str| -> Result<usize> {
            ck.metadata()
                .get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| corrupt(format!("metadata `{k}` missing or not a number")))
        };
        let c = &self.config;
        for (k, want) in [("batch_size", c.batch_size), ("seed", c.seed as usize)] {
            let found = meta(k)?;
            if found != want {
                return Err(Error::invalid(
                    "resume",
                    format!(
                        "{}: the run was saved with {k} {found}, this trainer has {want}",
                        rs.path.display()
                    ),
                ));
            }
        }
        let pos = Position {
            step: meta("step")?,
            epoch: meta("epoch")?,
            batch_in_epoch: meta("batch_in_epoch")?,
        };
        // Validate everything before changing anything.
        let all = model.params();
        let mut targets = Vec::new();
        let mut values = Checkpoint::new();
        for (n, t) in ck.iter() {
            if let Some(p) = n.strip_prefix("param.") {
                let dst = all.get(p).ok_or_else(|| {
                    corrupt(format!("tensor `{n}`: the model has no parameter `{p}`"))
                })?;
                if dst.size() != t.size() {
                    return Err(Error::ShapeMismatch {
                        path: Some(rs.path.clone()),
                        tensor: n.to_string(),
                        expected: dst.size(),
                        found: t.size(),
                    });
                }
                targets.push((p.to_string(), dst.shallow_clone()));
                values.insert(p, t.shallow_clone());
            }
        }
        let mut opt_ck = Checkpoint::new();
        for (n, t) in ck.iter() {
            if let Some(k) = n.strip_prefix("optim.") {
                opt_ck.insert(k, t.shallow_clone());
            }
        }
        for (k, v) in ck.metadata() {
            if let Some(k) = k.strip_prefix("optim.") {
                opt_ck.set_metadata(k, v.clone());
            }
        }
        let mut optimizer = Optimizer::new(c.optimizer, c.weight_decay);
        optimizer.load_state(&opt_ck, &all)?;
        let mut states = Vec::new();
        for t in techniques.iter() {
            let prefix = format!("technique.{}.", t.name());
            let mut st = Checkpoint::new();
            for (n, v) in ck.iter() {
                if let Some(k) = n.strip_prefix(&prefix) {
                    st.insert(k, v.shallow_clone());
                }
            }
            for (k, v) in ck.metadata() {
                if let Some(k) = k.strip_prefix(&prefix) {
                    st.set_metadata(k, v.clone());
                }
            }
            states.push(st);
        }
        let losses: Vec<f64> = match ck.get("report.losses") {
            Some(t) => Vec::<f64>::try_from(&t.to_kind(Kind::Double))?,
            None => Vec::new(),
        };
        let evals: Vec<(usize, f64)> = match ck.get("report.evals") {
            Some(t) if t.numel() > 0 => {
                Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1))?
                    .chunks(2)
                    .map(|p| (p[0] as usize, p[1]))
                    .collect()
            }
            _ => Vec::new(),
        };
        Params::new(targets).load_checkpoint(&values)?;
        for (t, st) in techniques.iter_mut().zip(&states) {
            t.load_state(st)?;
        }
        self.optimizer = optimizer;
        self.task = meta("task")?;
        self.resume = Some((
            pos,
            TrainReport {
                steps: pos.step,
                losses,
                evals,
                ..Default::default()
            },
        ));
        Ok(Some(pos.step))
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
            let out = model.forward(&b, false, ForwardOptions::default())?;
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

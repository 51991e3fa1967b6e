//! The training loop: [`Trainer::fit`].

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use tch::{Device, Kind, Tensor};

use super::eval::evaluate;
use super::{Position, StepContext, Technique, TrainReport, Trainer};
use crate::data::{epoch_batches, BatchSource};
use crate::model::ForwardOptions;
use crate::model::Trainable;
use crate::{Error, Result};

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

impl Trainer {
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
                        let e = evaluate(model, ev, c.batch_size, c.device)?;
                        report.eval_metric = e.name();
                        report.evals.push((pos.step, e.value()));
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
                let e = evaluate(model, ev, c.batch_size, c.device)?;
                report.eval_metric = e.name();
                report.evals.push((pos.step, e.value()));
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
}

//! Optimizers and learning-rate schedules written over tensor ops, so their state is
//! plain tensors that a [`Checkpoint`] can hold and a killed run can resume from
//! (libtorch's built-in optimizers keep their state where it cannot be saved).
//!
//! AdamW follows `torch.optim.AdamW` (decoupled weight decay, bias correction); SGD
//! follows `torch.optim.SGD` (L2 weight decay added to the gradient, classic momentum).

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::{Checkpoint, Params, Result};

/// Which optimizer, with its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerKind {
    /// AdamW.
    AdamW {
        /// beta1, beta2.
        betas: (f64, f64),
        /// Added to the denominator.
        eps: f64,
    },
    /// Stochastic gradient descent with optional momentum.
    Sgd {
        /// Momentum factor (0 = none).
        momentum: f64,
    },
}

impl Default for OptimizerKind {
    fn default() -> Self {
        OptimizerKind::AdamW {
            betas: (0.9, 0.999),
            eps: 1e-8,
        }
    }
}

/// An optimizer whose state is named tensors.
#[derive(Debug)]
pub struct Optimizer {
    kind: OptimizerKind,
    weight_decay: f64,
    step: i64,
    /// Per parameter: (exp_avg or momentum buffer, exp_avg_sq).
    state: BTreeMap<String, (Tensor, Option<Tensor>)>,
}

impl Optimizer {
    /// A new optimizer with empty state.
    pub fn new(kind: OptimizerKind, weight_decay: f64) -> Self {
        Self {
            kind,
            weight_decay,
            step: 0,
            state: BTreeMap::new(),
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> i64 {
        self.step
    }

    /// One update of every parameter in `params` that requires grad and has a gradient.
    pub fn step(&mut self, params: &Params, lr: f64) {
        self.step += 1;
        let t = self.step as f64;
        let wd = self.weight_decay;
        let kind = self.kind;
        tch::no_grad(|| {
            for (name, p) in params.iter() {
                if !p.requires_grad() {
                    continue;
                }
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                match kind {
                    OptimizerKind::AdamW {
                        betas: (b1, b2),
                        eps,
                    } => {
                        let (m, v) = self
                            .state
                            .entry(name.to_string())
                            .or_insert_with(|| (p.zeros_like(), Some(p.zeros_like())));
                        let v = v.as_mut().expect("adam state has exp_avg_sq");
                        if wd != 0.0 {
                            let _ = p.f_mul_scalar_(1.0 - lr * wd);
                        }
                        let _ = m
                            .f_mul_scalar_(b1)
                            .and_then(|mut m| m.f_add_(&(&g * (1.0 - b1))));
                        let _ = v
                            .f_mul_scalar_(b2)
                            .and_then(|mut v| v.f_add_(&(&g * &g * (1.0 - b2))));
                        let bc1 = 1.0 - b1.powf(t);
                        let bc2 = 1.0 - b2.powf(t);
                        let denom = v.sqrt() / bc2.sqrt() + eps;
                        let _ = p.f_sub_(&(&*m / denom * (lr / bc1)));
                    }
                    OptimizerKind::Sgd { momentum } => {
                        let g = if wd != 0.0 { &g + &p * wd } else { g };
                        let d = if momentum != 0.0 {
                            match self.state.get_mut(name) {
                                Some((buf, _)) => {
                                    let _ =
                                        buf.f_mul_scalar_(momentum).and_then(|mut b| b.f_add_(&g));
                                    buf.shallow_clone()
                                }
                                None => {
                                    let buf = g.copy();
                                    self.state
                                        .insert(name.to_string(), (buf.shallow_clone(), None));
                                    buf
                                }
                            }
                        } else {
                            g
                        };
                        let _ = p.f_sub_(&(d * lr));
                    }
                }
            }
        });
    }

    /// The state as a checkpoint: `exp_avg.<name>`, `exp_avg_sq.<name>` (or
    /// `momentum_buffer.<name>`), and the step count in metadata.
    pub fn state(&self) -> Checkpoint {
        let mut ck = Checkpoint::new();
        for (n, (a, b)) in &self.state {
            match b {
                Some(b) => {
                    ck.insert(format!("exp_avg.{n}"), a.copy());
                    ck.insert(format!("exp_avg_sq.{n}"), b.copy());
                }
                None => {
                    ck.insert(format!("momentum_buffer.{n}"), a.copy());
                }
            }
        }
        ck.set_metadata("optimizer_step", self.step.to_string());
        ck
    }

    /// Restores state saved by [`Optimizer::state`].
    pub fn load_state(&mut self, ck: &Checkpoint) -> Result<()> {
        let step = ck
            .metadata()
            .get("optimizer_step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                crate::Error::invalid("optimizer state", "metadata key `optimizer_step` missing")
            })?;
        let mut state = BTreeMap::new();
        for (n, t) in ck.iter() {
            if let Some(p) = n.strip_prefix("exp_avg.") {
                let sq = ck.tensor(&format!("exp_avg_sq.{p}"))?;
                state.insert(p.to_string(), (t.copy(), Some(sq.copy())));
            } else if let Some(p) = n.strip_prefix("momentum_buffer.") {
                state.insert(p.to_string(), (t.copy(), None));
            }
        }
        self.step = step;
        self.state = state;
        Ok(())
    }
}

/// Learning-rate schedules, as a multiplier of the base rate by step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Schedule {
    /// The base rate throughout.
    #[default]
    Constant,
    /// Linear warmup from 0, then linear decay to 0 at the last step
    /// (`get_linear_schedule_with_warmup`).
    Linear {
        /// Warmup steps.
        warmup: usize,
    },
    /// Linear warmup, then half a cosine to 0 (`get_cosine_schedule_with_warmup`).
    Cosine {
        /// Warmup steps.
        warmup: usize,
    },
}

impl Schedule {
    /// The multiplier at `step` (0-based) of `total` steps.
    pub fn factor(self, step: usize, total: usize) -> f64 {
        let warm = |w: usize| (w > 0 && step < w).then(|| step as f64 / w as f64);
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear { warmup } => warm(warmup).unwrap_or_else(|| {
                ((total - step.min(total)) as f64 / (total - warmup.min(total)).max(1) as f64)
                    .max(0.0)
            }),
            Schedule::Cosine { warmup } => warm(warmup).unwrap_or_else(|| {
                let p =
                    (step - warmup.min(step)) as f64 / (total - warmup.min(total)).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * p).cos())).max(0.0)
            }),
        }
    }
}

/// Cross-entropy between logits `[b, c]` and labels `[b]`, computed in f32.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Tensor {
    logits
        .to_kind(Kind::Float)
        .log_softmax(-1, Kind::Float)
        .nll_loss(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_the_pytorch_update_rule() {
        // One parameter, constant gradient g: after step 1 AdamW moves by exactly
        // lr * g/|g| (bias correction makes m/sqrt(v) = sign(g)) plus decay.
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let params = Params::new(vec![("p".into(), p.shallow_clone())]);
        let mut opt = Optimizer::new(OptimizerKind::default(), 0.1);
        (&p * &Tensor::from_slice(&[3.0f32, -0.5]))
            .sum(Kind::Float)
            .backward();
        opt.step(&params, 0.01);
        let v = Vec::<f32>::try_from(&p.detach()).unwrap();
        let expect = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (a, b) in v.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // state round-trips
        let ck = opt.state();
        let mut o2 = Optimizer::new(OptimizerKind::default(), 0.1);
        o2.load_state(&ck).unwrap();
        assert_eq!(o2.steps(), 1);
    }

    #[test]
    fn sgd_momentum_accumulates() {
        let p = Tensor::from_slice(&[0.0f32]).set_requires_grad(true);
        let params = Params::new(vec![("p".into(), p.shallow_clone())]);
        let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9 }, 0.0);
        for _ in 0..2 {
            params.zero_grad();
            (&p * 1.0).sum(Kind::Float).backward();
            opt.step(&params, 0.1);
        }
        // step1: -0.1; step2: buf = 0.9*1+1 = 1.9 -> -0.19; total -0.29
        let v = p.double_value(&[0]);
        assert!((v + 0.29).abs() < 1e-6, "{v}");
    }

    #[test]
    fn schedules_warm_up_and_decay() {
        let l = Schedule::Linear { warmup: 10 };
        assert_eq!(l.factor(0, 100), 0.0);
        assert!((l.factor(5, 100) - 0.5).abs() < 1e-12);
        assert!((l.factor(10, 100) - 1.0).abs() < 1e-12);
        assert!((l.factor(55, 100) - 0.5).abs() < 1e-12);
        let c = Schedule::Cosine { warmup: 0 };
        assert!((c.factor(0, 100) - 1.0).abs() < 1e-12);
        assert!((c.factor(50, 100) - 0.5).abs() < 1e-12);
        assert!(c.factor(100, 100).abs() < 1e-12);
    }
}

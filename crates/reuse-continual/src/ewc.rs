//! Elastic weight consolidation (Kirkpatrick et al. 2017) and online EWC (Schwarz et al.
//! 2018).
//!
//! After each task the diagonal Fisher information `F` of the trained parameters and the
//! parameters themselves (the anchor `θ*`) are kept; while later tasks train, the loss
//! gains `λ Σ_i F_i (θ_i - θ*_i)²`.
//!
//! # Two Fishers, two lambda scales
//! - [`FisherKind::Exact`] (van de Ven's choice, and what the name means): per sample,
//!   the expectation over the model's own predicted distribution,
//!   `F = 1/N Σ_x Σ_c p(c|x) (∇ log p(c|x))²`. No labels are used.
//! - [`FisherKind::Empirical`] (Avalanche's `EWCPlugin`): the square of the gradient of
//!   the **minibatch-mean** cross-entropy with the true labels, averaged over minibatches
//!   (model in eval mode, data in order).
//!
//! The second is not a per-sample quantity: squaring a mean of `B` per-sample gradients
//! shrinks the uncorrelated part by about `B`, so for the same data the batched empirical
//! Fisher is typically one to two orders of magnitude smaller than the exact one, and a
//! lambda tuned for one is far off for the other (on permuted digits with batch 32 the
//! dev split chose 1e4 for the empirical Fisher, ours and Avalanche's alike, and 300 for
//! the exact one; `continual.permuted_digits` lists the whole grid). Choose lambda on a
//! dev split for the kind you use. The penalty here is `λ Σ F (θ-θ*)²` with no `1/2`,
//! as Avalanche writes it; Kirkpatrick and van de Ven write `λ/2`, so their lambda is
//! twice this one.
//!
//! # Modes
//! [`EwcMode::Separate`] keeps one (F, θ*) pair per past task and sums their penalties.
//! [`EwcMode::Online`] keeps one: `F* ← γ F* + F_t` and `θ* ← θ_t`.
//!
//! # Cost of the exact Fisher
//! When every trained parameter is the weight or bias of a plain core [`Linear`]
//! (an MLP, a BERT without adapters...), the per-sample gradients come from one forward
//! per batch and one backward per class, through the layer inputs and output gradients
//! that [`capture_linears`] records (`dW_b = δ_bᵀ x_b`). Otherwise (adapters, layer
//! norms, embeddings) it falls back to one forward per sample and one backward per class
//! and sample: exact, and slow for big models; `max_samples` bounds it.
//!
//! [`Linear`]: reuse_core::Linear

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use reuse_core::data::{epoch_batches, BatchSource};
use reuse_core::{
    capture_linears, CapturedLinear, Checkpoint, Error, ForwardOptions, Params, Result,
    StepContext, TaskContext, Technique, Trainable,
};

/// Which diagonal Fisher to estimate. See the module docs for how their scales differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FisherKind {
    /// Per sample, expectation over the model's predicted distribution (no labels).
    Exact,
    /// Squared gradient of the minibatch-mean loss with true labels, averaged over
    /// minibatches (Avalanche's).
    Empirical,
}

/// Separate penalties per task, or one online penalty.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EwcMode {
    /// One (F, θ*) per past task.
    Separate,
    /// One (F*, θ*): `F* ← gamma F* + F_t`, `θ* ← θ_t` (Schwarz et al.).
    Online {
        /// Decay of the accumulated Fisher, in [0, 1].
        gamma: f64,
    },
}

/// A diagonal Fisher: one tensor per parameter, shaped like it.
pub type Fisher = BTreeMap<String, Tensor>;

/// Settings of [`Ewc`].
#[derive(Debug, Clone)]
pub struct EwcConfig {
    /// Penalty strength λ (`λ Σ F (θ-θ*)²`).
    pub lambda: f64,
    /// Which Fisher.
    pub kind: FisherKind,
    /// Separate or online.
    pub mode: EwcMode,
    /// Minibatch size for the Fisher (the empirical Fisher's value depends on it:
    /// Avalanche uses the training batch size).
    pub batch_size: usize,
    /// Estimate the Fisher on at most this many examples of the task (the first ones).
    pub max_samples: Option<usize>,
}

impl EwcConfig {
    /// Separate-mode EWC with strength `lambda` and Fisher `kind`, batch 32.
    pub fn new(lambda: f64, kind: FisherKind) -> Self {
        Self {
            lambda,
            kind,
            mode: EwcMode::Separate,
            batch_size: 32,
            max_samples: None,
        }
    }

    fn check(&self) -> Result<()> {
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(Error::invalid(
                "ewc lambda",
                format!("must be finite and >= 0, found {}", self.lambda),
            ));
        }
        if let EwcMode::Online { gamma } = self.mode {
            if !(0.0..=1.0).contains(&gamma) {
                return Err(Error::invalid(
                    "online ewc gamma",
                    format!("must be in [0, 1], found {gamma}"),
                ));
            }
        }
        if self.batch_size == 0 || self.max_samples == Some(0) {
            return Err(Error::invalid(
                "ewc config",
                "batch_size and max_samples must be at least 1",
            ));
        }
        Ok(())
    }
}

/// One consolidated task: its Fisher and the parameters it anchors to.
#[derive(Debug)]
pub struct Anchor {
    /// Diagonal Fisher per parameter.
    pub fisher: Fisher,
    /// θ* per parameter.
    pub theta: BTreeMap<String, Tensor>,
}

fn example_count(data: &dyn BatchSource, max_samples: Option<usize>) -> usize {
    max_samples.map_or(data.len(), |m| m.min(data.len()))
}

fn zeros_like_params(params: &Params) -> Fisher {
    params
        .iter()
        .map(|(n, t)| (n.to_string(), t.zeros_like().to_kind(Kind::Float)))
        .collect()
}

/// The empirical Fisher as Avalanche computes it: for each minibatch (in order, eval
/// mode) the squared gradient of the mean cross-entropy, averaged over minibatches.
/// Gradients flow to the model's trainable parameters; their `.grad` is left zeroed.
pub fn fisher_empirical(
    model: &dyn Trainable,
    data: &dyn BatchSource,
    batch_size: usize,
    max_samples: Option<usize>,
    device: Device,
) -> Result<Fisher> {
    let params = model.params().trainable();
    let names: Vec<&str> = params.names();
    let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
    let mut fisher = zeros_like_params(&params);
    let n = example_count(data, max_samples);
    let batches = epoch_batches(n, batch_size.max(1), None, 0);
    for idx in &batches {
        let b = data.batch(idx, device)?;
        let out = model.forward(&b, false, ForwardOptions::default())?;
        let loss = model.loss(&out, &b)?;
        let grads = Tensor::f_run_backward(&[&loss], &tensors, false, false)?;
        tch::no_grad(|| {
            for (name, g) in names.iter().zip(&grads) {
                if g.defined() {
                    let f = fisher.get_mut(*name).expect("same names");
                    *f += g.to_kind(Kind::Float).square();
                }
            }
        });
    }
    let k = batches.len().max(1) as f64;
    Ok(fisher.into_iter().map(|(n, f)| (n, f / k)).collect())
}

/// The exact diagonal Fisher `1/N Σ_x Σ_c p(c|x) (∇ log p(c|x))²` over the model's
/// trainable parameters (eval mode, no labels used). Fast through captured linears when
/// every trainable parameter is a plain [`reuse_core::Linear`]'s weight or bias; exact
/// either way.
pub fn fisher_exact(
    model: &dyn Trainable,
    data: &dyn BatchSource,
    batch_size: usize,
    max_samples: Option<usize>,
    device: Device,
) -> Result<Fisher> {
    let params = model.params().trainable();
    let n = example_count(data, max_samples);
    let mut fisher = zeros_like_params(&params);
    if n == 0 {
        return Ok(fisher);
    }
    let batches = epoch_batches(n, batch_size.max(1), None, 0);
    // Try the batched path on the first batch; fall back when it cannot cover every
    // trainable parameter exactly.
    let mut fast = true;
    for idx in &batches {
        let b = data.batch(idx, device)?;
        if fast {
            let (out, caps) =
                capture_linears(|| model.forward(&b, false, ForwardOptions::default()));
            let out = out?;
            match cover(&params, &caps) {
                Some(owner) => {
                    accumulate_captured(&mut fisher, &params, &caps, &owner, &out.logits)?;
                    continue;
                }
                None => fast = false,
            }
        }
        accumulate_per_sample(&mut fisher, model, &params, &b)?;
    }
    let k = n as f64;
    Ok(fisher.into_iter().map(|(n, f)| (n, f / k)).collect())
}

/// The exact Fisher computed one sample at a time (one forward per sample, one backward
/// per class and sample) for any model: the reference that [`fisher_exact`]'s batched
/// path is checked against, and its fallback.
pub fn fisher_exact_per_sample(
    model: &dyn Trainable,
    data: &dyn BatchSource,
    max_samples: Option<usize>,
    device: Device,
) -> Result<Fisher> {
    let params = model.params().trainable();
    let n = example_count(data, max_samples);
    let mut fisher = zeros_like_params(&params);
    for idx in epoch_batches(n, 256, None, 0) {
        let b = data.batch(&idx, device)?;
        accumulate_per_sample(&mut fisher, model, &params, &b)?;
    }
    let k = n.max(1) as f64;
    Ok(fisher.into_iter().map(|(n, f)| (n, f / k)).collect())
}

/// For each trainable parameter, the captured linears (index, is_bias) it is the weight
/// or bias of; `None` when some parameter is not covered or a covering linear is not
/// plain.
fn cover(params: &Params, caps: &[CapturedLinear]) -> Option<Vec<Vec<(usize, bool)>>> {
    let mut owner = Vec::new();
    for (_, t) in params.iter() {
        let ptr = t.data_ptr();
        let mut uses = Vec::new();
        for (i, c) in caps.iter().enumerate() {
            if c.weight.defined() && c.weight.data_ptr() == ptr && c.weight.size() == t.size() {
                uses.push((i, false));
            } else if let Some(b) = &c.bias {
                if b.data_ptr() == ptr && b.size() == t.size() {
                    uses.push((i, true));
                }
            }
        }
        if uses.is_empty() || uses.iter().any(|&(i, _)| !caps[i].plain) {
            return None;
        }
        owner.push(uses);
    }
    Some(owner)
}

fn accumulate_captured(
    fisher: &mut Fisher,
    params: &Params,
    caps: &[CapturedLinear],
    owner: &[Vec<(usize, bool)>],
    logits: &Tensor,
) -> Result<()> {
    let logp = logits.to_kind(Kind::Float).log_softmax(-1, Kind::Float);
    let p = logp.detach().exp();
    let classes = logp.size()[1];
    let probes: Vec<&Tensor> = caps.iter().map(|c| &c.probe).collect();
    for c in 0..classes {
        let target = logp.select(1, c).sum(Kind::Float);
        let deltas = Tensor::f_run_backward(&[&target], &probes, true, false)?;
        let pc = p.select(1, c);
        tch::no_grad(|| -> Result<()> {
            for ((name, t), uses) in params.iter().zip(owner) {
                let f = fisher.get_mut(name).expect("same names");
                // Per-sample gradients summed over every use of the parameter, then
                // squared, weighted by p(c|x) and summed over samples.
                let single_2d = uses.len() == 1 && caps[uses[0].0].input.dim() == 2;
                if single_2d {
                    let (i, is_bias) = uses[0];
                    let d = &deltas[i];
                    if !d.defined() {
                        continue;
                    }
                    let d2 = d.to_kind(Kind::Float).square() * pc.unsqueeze(1);
                    if is_bias {
                        *f += d2.sum_dim_intlist(0, false, Kind::Float);
                    } else {
                        let a2 = caps[i].input.to_kind(Kind::Float).square();
                        *f += d2.tr().matmul(&a2);
                    }
                    continue;
                }
                let b = pc.size()[0];
                let mut g: Option<Tensor> = None;
                for &(i, is_bias) in uses {
                    let d = &deltas[i];
                    if !d.defined() {
                        continue;
                    }
                    let d = d
                        .to_kind(Kind::Float)
                        .reshape([b, -1, d.size()[d.dim() - 1]]);
                    let per = if is_bias {
                        d.sum_dim_intlist(1, false, Kind::Float)
                    } else {
                        let x = caps[i].input.to_kind(Kind::Float);
                        let x = x.reshape([b, -1, x.size()[x.dim() - 1]]);
                        d.transpose(1, 2).bmm(&x)
                    };
                    g = Some(match g {
                        Some(g) => g + per,
                        None => per,
                    });
                }
                if let Some(g) = g {
                    let w = pc.reshape([b, 1, 1]);
                    let w = if g.dim() == 2 { w.squeeze_dim(2) } else { w };
                    *f += (g.square() * w).sum_dim_intlist(0, false, Kind::Float);
                }
                let _ = t;
            }
            Ok(())
        })?;
    }
    Ok(())
}

fn accumulate_per_sample(
    fisher: &mut Fisher,
    model: &dyn Trainable,
    params: &Params,
    batch: &reuse_core::data::Batch,
) -> Result<()> {
    let names: Vec<&str> = params.names();
    let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
    for r in 0..batch.len() as i64 {
        let one = batch.select(&[r])?;
        let out = model.forward(&one, false, ForwardOptions::default())?;
        let logp = out
            .logits
            .to_kind(Kind::Float)
            .log_softmax(-1, Kind::Float)
            .squeeze_dim(0);
        let p = Vec::<f64>::try_from(logp.detach().exp().to_kind(Kind::Double))?;
        for (c, &pc) in p.iter().enumerate() {
            let grads =
                Tensor::f_run_backward(&[&logp.select(0, c as i64)], &tensors, true, false)?;
            tch::no_grad(|| {
                for (name, g) in names.iter().zip(&grads) {
                    if g.defined() {
                        let f = fisher.get_mut(*name).expect("same names");
                        *f += g.to_kind(Kind::Float).square() * pc;
                    }
                }
            });
        }
    }
    Ok(())
}

/// An anchor tensor of `name` must have the parameter's shape (a model grown or changed
/// since consolidation is an error naming the parameter).
fn check_anchor(name: &str, param: &Tensor, anchor: &Tensor) -> Result<()> {
    if anchor.size() != param.size() {
        return Err(Error::ShapeMismatch {
            path: None,
            tensor: format!("ewc anchor for {name}"),
            expected: param.size(),
            found: anchor.size(),
        });
    }
    Ok(())
}

/// `lambda Σ_anchors Σ_i F_i (θ_i - θ*_i)²` over the parameters in `params` that the
/// anchors hold (others are skipped, as Avalanche skips parameters added later). A
/// parameter whose shape changed since its anchor is an error naming it.
pub fn ewc_penalty(params: &Params, anchors: &[Anchor], lambda: f64) -> Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for a in anchors {
        for (name, theta) in params.iter() {
            let (Some(f), Some(star)) = (a.fisher.get(name), a.theta.get(name)) else {
                continue;
            };
            check_anchor(name, theta, f)?;
            let term = (f * (theta.to_kind(Kind::Float) - star).square()).sum(Kind::Float);
            total = Some(match total {
                Some(t) => t + term,
                None => term,
            });
        }
    }
    Ok(total.map(|t| t * lambda))
}

/// EWC as a technique for core's trainer. At the end of each task the Fisher (of the
/// kind configured) is computed on that task's training data and the anchor is stored;
/// anchors are part of the saved run state.
///
/// While later tasks train, the penalty enters through its exact gradient,
/// `2 λ Σ_k F_k (θ - θ*_k) = A θ - b` with `A = 2 λ Σ_k F_k` and `b = 2 λ Σ_k F_k θ*_k`
/// kept per parameter, added to the gradients after backward (before clipping and the
/// optimizer): two element-wise operations per parameter whatever the number of past
/// tasks, where autograd through [`ewc_penalty`] costs a dozen per parameter and task.
/// The update is the same; the loss the trainer reports does not include the penalty's
/// value ([`Ewc::penalty`] computes it). A parameter that got no gradient in a step
/// (unused by that batch) is not pulled back in that step.
pub struct Ewc {
    config: EwcConfig,
    anchors: Vec<Anchor>,
    /// Per parameter: (A, b) of the fused gradient.
    fused: BTreeMap<String, (Tensor, Tensor)>,
}

impl Ewc {
    /// EWC with `config`; an invalid lambda, gamma or batch size is an error.
    pub fn new(config: EwcConfig) -> Result<Self> {
        config.check()?;
        Ok(Self {
            config,
            anchors: Vec::new(),
            fused: BTreeMap::new(),
        })
    }

    /// The penalty `λ Σ F (θ-θ*)²` of `params` now (for logging; training uses its
    /// gradient directly).
    pub fn penalty(&self, params: &Params) -> Result<Option<Tensor>> {
        tch::no_grad(|| ewc_penalty(params, &self.anchors, self.config.lambda))
    }

    fn rebuild_fused(&mut self) {
        let two_lambda = 2.0 * self.config.lambda;
        let mut fused: BTreeMap<String, (Tensor, Tensor)> = BTreeMap::new();
        tch::no_grad(|| {
            for a in &self.anchors {
                for (n, f) in &a.fisher {
                    let Some(star) = a.theta.get(n) else {
                        continue;
                    };
                    let fa = f * two_lambda;
                    let fb = &fa * star;
                    match fused.get_mut(n) {
                        Some((ea, eb)) if ea.size() == fa.size() => {
                            *ea += fa;
                            *eb += fb;
                        }
                        _ => {
                            fused.insert(n.clone(), (fa, fb));
                        }
                    }
                }
            }
        });
        self.fused = fused;
    }

    /// The settings.
    pub fn config(&self) -> &EwcConfig {
        &self.config
    }

    /// The consolidated tasks (one in online mode).
    pub fn anchors(&self) -> &[Anchor] {
        &self.anchors
    }

    /// Consolidates: computes the Fisher of `model` on `data` and adds (or, online,
    /// folds in) an anchor at the model's current trainable parameters.
    pub fn consolidate(
        &mut self,
        model: &dyn Trainable,
        data: &dyn BatchSource,
        device: Device,
    ) -> Result<()> {
        let c = &self.config;
        let fisher = match c.kind {
            FisherKind::Exact => fisher_exact(model, data, c.batch_size, c.max_samples, device)?,
            FisherKind::Empirical => {
                fisher_empirical(model, data, c.batch_size, c.max_samples, device)?
            }
        };
        let theta: BTreeMap<String, Tensor> = tch::no_grad(|| {
            model
                .params()
                .trainable()
                .iter()
                .map(|(n, t)| (n.to_string(), t.detach().to_kind(Kind::Float).copy()))
                .collect()
        });
        self.fold(Anchor { fisher, theta });
        Ok(())
    }

    /// Adds an anchor computed elsewhere (separate mode) or folds it into the online one.
    pub fn fold(&mut self, new: Anchor) {
        self.fold_inner(new);
        self.rebuild_fused();
    }

    fn fold_inner(&mut self, new: Anchor) {
        match (self.config.mode, self.anchors.last_mut()) {
            (EwcMode::Online { gamma }, Some(old)) => {
                let mut fisher = Fisher::new();
                for (n, f) in new.fisher {
                    let v = match old.fisher.get(&n) {
                        Some(o) if o.size() == f.size() => o * gamma + f,
                        _ => f,
                    };
                    fisher.insert(n, v);
                }
                *old = Anchor {
                    fisher,
                    theta: new.theta,
                };
            }
            _ => self.anchors.push(new),
        }
    }
}

impl Technique for Ewc {
    fn name(&self) -> &str {
        "ewc"
    }

    fn after_backward(&mut self, params: &Params, _ctx: &StepContext) -> Result<()> {
        if self.fused.is_empty() || self.config.lambda == 0.0 {
            return Ok(());
        }
        tch::no_grad(|| -> Result<()> {
            for (name, p) in params.iter() {
                let Some((a, b)) = self.fused.get(name) else {
                    continue;
                };
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                check_anchor(name, p, a)?;
                if g.kind() == Kind::Float && p.kind() == Kind::Float {
                    let _ = g.f_addcmul_(a, p)?.f_sub_(b)?;
                } else {
                    let d = (a * p.to_kind(Kind::Float) - b).to_kind(g.kind());
                    let _ = g.f_add_(&d)?;
                }
            }
            Ok(())
        })
    }

    fn end_task(&mut self, ctx: &TaskContext<'_>) -> Result<()> {
        self.consolidate(ctx.model, ctx.data, ctx.device)
    }

    fn state(&self) -> Result<Checkpoint> {
        let mut ck = Checkpoint::new();
        ck.set_metadata("anchors", self.anchors.len().to_string());
        for (i, a) in self.anchors.iter().enumerate() {
            for (n, f) in &a.fisher {
                ck.insert(format!("{i}.fisher.{n}"), f.shallow_clone());
            }
            for (n, t) in &a.theta {
                ck.insert(format!("{i}.theta.{n}"), t.shallow_clone());
            }
        }
        Ok(ck)
    }

    fn load_state(&mut self, state: &Checkpoint) -> Result<()> {
        let n: usize = match state.metadata().get("anchors") {
            Some(v) => v.parse().map_err(|_| {
                Error::invalid("ewc state", format!("`anchors` is not a count: {v}"))
            })?,
            None => 0,
        };
        let mut anchors: Vec<Anchor> = (0..n)
            .map(|_| Anchor {
                fisher: Fisher::new(),
                theta: BTreeMap::new(),
            })
            .collect();
        for (name, t) in state.iter() {
            let parsed = name.split_once('.').and_then(|(i, rest)| {
                let i: usize = i.parse().ok()?;
                let (kind, p) = rest.split_once('.')?;
                Some((i, kind, p))
            });
            match parsed {
                Some((i, "fisher", p)) if i < n => {
                    anchors[i].fisher.insert(p.to_string(), t.shallow_clone());
                }
                Some((i, "theta", p)) if i < n => {
                    anchors[i].theta.insert(p.to_string(), t.shallow_clone());
                }
                _ => {
                    return Err(Error::invalid(
                        "ewc state",
                        format!("unexpected tensor `{name}` for {n} anchors"),
                    ))
                }
            }
        }
        for (i, a) in anchors.iter().enumerate() {
            if a.fisher.len() != a.theta.len() {
                return Err(Error::invalid(
                    "ewc state",
                    format!(
                        "anchor {i} has {} Fisher tensors and {} anchors",
                        a.fisher.len(),
                        a.theta.len()
                    ),
                ));
            }
        }
        self.anchors = anchors;
        self.rebuild_fused();
        Ok(())
    }
}

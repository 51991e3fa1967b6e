//! The [`Distiller`] technique: knowledge distillation inside reuse-core's trainer.
//!
//! Each step the student's task loss (cross-entropy on the hard labels; rows labelled
//! -100, such as teacher-labelled text, are left out of it) is weighted by `alpha`, and
//! the distillation loss by `1 - alpha`:
//!
//! `loss = alpha * CE(student, labels) + (1 - alpha) * KD(student, teacher) + sum_i w_i * F_i`
//!
//! where KD is [`kd_loss`] (temperature, T², divergence from [`KdConfig`]) against the
//! live teacher's logits, or [`topk_kd_loss`] against a [`TeacherCache`]'s top-k
//! log-probabilities (full cached logits go through [`kd_loss`]), looked up by the
//! example indices the batch carries; and the `F_i` are optional hidden-state terms
//! (MSE or cosine, through a [`LayerMap`]) against a live teacher.
//!
//! Before the first step ([`Technique::begin_task`]) the student and the teacher each
//! run on two examples of the training data: different class counts, different
//! vocabularies (word-embedding rows) or a layer map past either model's depth are an
//! error there, before any training.

use reuse_core::data::Batch;
use reuse_core::trainer::{StepContext, StepOutputs, TaskContext};
use reuse_core::ForwardOptions;
use reuse_core::{Error, Params, Result, Technique};
use tch::{Kind, Tensor};

use crate::cache::TeacherCache;
use crate::features::{cosine_loss, hidden_mse, LayerMap};
use crate::losses::{kd_loss, topk_kd_loss, KdConfig, TopKTail};
use crate::teacher::{vocab_rows, Teacher};

/// Where the teacher's outputs come from.
pub enum TeacherSource<'t> {
    /// A teacher run on every batch (no graph, eval mode).
    Live(&'t dyn Teacher),
    /// Outputs computed once, looked up by example index.
    Cached(&'t TeacherCache),
}

/// A hidden-state term: which student layer learns from which teacher layer, and how.
#[derive(Debug, Clone)]
pub struct HiddenTerm {
    /// Pairs of indices into `StepOutputs::hidden_states` (0 = embedding output).
    pub map: LayerMap,
    /// Mean squared error (TinyBERT) or 1 - cosine (DistilBERT).
    pub kind: HiddenLoss,
    /// Weight of the term in the total loss.
    pub weight: f64,
}

/// The hidden-state loss of a [`HiddenTerm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenLoss {
    /// [`hidden_mse`] (same widths; a projection is not trained by this technique).
    Mse,
    /// [`cosine_loss`].
    Cosine,
}

/// Knowledge distillation as a technique for core's trainer (see the module docs).
pub struct Distiller<'t> {
    source: TeacherSource<'t>,
    /// Temperature, T², divergence.
    pub kd: KdConfig,
    /// Weight of the hard-label loss; the KD loss gets `1 - alpha`.
    pub alpha: f64,
    /// How a top-k cache's missing tail is treated.
    pub tail: TopKTail,
    /// Hidden-state terms (live teachers only).
    pub hidden: Vec<HiddenTerm>,
}

impl<'t> Distiller<'t> {
    /// Distillation from `source` with `kd`, hard labels weighted by `alpha` in [0, 1].
    pub fn new(source: TeacherSource<'t>, kd: KdConfig, alpha: f64) -> Result<Self> {
        kd.validate()?;
        if !(0.0..=1.0).contains(&alpha) {
            return Err(Error::invalid(
                "distiller alpha",
                format!("expected a weight in [0, 1], found {alpha}"),
            ));
        }
        Ok(Self {
            source,
            kd,
            alpha,
            tail: TopKTail::default(),
            hidden: Vec::new(),
        })
    }

    /// Adds a hidden-state term (live teachers only).
    pub fn with_hidden(mut self, term: HiddenTerm) -> Result<Self> {
        if matches!(self.source, TeacherSource::Cached(_)) {
            return Err(Error::invalid(
                "distiller hidden-state term",
                "a teacher cache holds logits, not hidden states: use a live teacher",
            ));
        }
        self.hidden.push(term);
        Ok(self)
    }

    fn teacher_options(&self) -> ForwardOptions {
        ForwardOptions {
            hidden_states: !self.hidden.is_empty(),
            ..Default::default()
        }
    }

    /// The KD loss (unweighted) and the teacher's outputs, for a batch the student gave
    /// `out` for.
    fn kd_term(&self, batch: &Batch, out: &StepOutputs) -> Result<(Tensor, Option<StepOutputs>)> {
        match &self.source {
            TeacherSource::Live(t) => {
                let tout = t.teach(batch, self.teacher_options())?;
                let loss = kd_loss(&out.logits, &tout.logits, None, &self.kd)?;
                Ok((loss, Some(tout)))
            }
            TeacherSource::Cached(c) => {
                let got = c.lookup(&batch.indices, out.logits.device())?;
                let loss = match (&got.logits, &got.topk_logprobs, &got.topk_indices) {
                    (Some(l), _, _) => kd_loss(&out.logits, l, None, &self.kd)?,
                    (None, Some(v), Some(i)) => {
                        topk_kd_loss(&out.logits, v, i, None, &self.kd, self.tail)?
                    }
                    _ => {
                        return Err(Error::invalid(
                            "teacher cache",
                            "holds neither logits nor top-k log-probabilities",
                        ))
                    }
                };
                Ok((loss, None))
            }
        }
    }

    /// The student's and the teacher's class counts, vocabularies and depths agree
    /// with each other and with the layer maps: checked on two examples of `ctx.data`.
    fn check(&self, ctx: &TaskContext<'_>) -> Result<()> {
        let n = ctx.data.len().min(2) as i64;
        if n == 0 {
            return Ok(());
        }
        let batch = ctx.data.batch(&(0..n).collect::<Vec<_>>(), ctx.device)?;
        let opts = self.teacher_options();
        let sout = tch::no_grad(|| ctx.model.forward(&batch, false, opts))?;
        let s_classes = *sout.logits.size().last().unwrap_or(&0);
        let s_vocab = vocab_rows(&ctx.model.named_parameters());
        let (t_classes, t_vocab, tout) = match &self.source {
            TeacherSource::Live(t) => {
                let tout = t.teach(&batch, opts)?;
                (
                    *tout.logits.size().last().unwrap_or(&0),
                    t.vocab_size(),
                    Some(tout),
                )
            }
            TeacherSource::Cached(c) => (c.num_classes() as i64, None, None),
        };
        if s_classes != t_classes {
            return Err(Error::invalid(
                "distillation",
                format!(
                    "the student predicts {s_classes} classes but the teacher {t_classes}: \
                     both must score the same labels"
                ),
            ));
        }
        if let (Some(s), Some(t)) = (s_vocab, t_vocab) {
            if s != t {
                return Err(Error::invalid(
                    "distillation",
                    format!(
                        "the student's vocabulary has {s} tokens but the teacher's {t}: both \
                         read the same token ids, so they need the same tokenizer"
                    ),
                ));
            }
        }
        if let Some(tout) = tout {
            for term in &self.hidden {
                term.map
                    .check(sout.hidden_states.len(), tout.hidden_states.len())?;
            }
        }
        Ok(())
    }
}

impl Technique for Distiller<'_> {
    fn name(&self) -> &str {
        "distill"
    }

    fn forward_options(&self) -> ForwardOptions {
        self.teacher_options()
    }

    fn begin_task(&mut self, ctx: &TaskContext<'_>) -> Result<()> {
        self.check(ctx)
    }

    fn task_loss_weight(&self, _ctx: &StepContext) -> f64 {
        self.alpha
    }

    fn extra_loss(
        &mut self,
        batch: &Batch,
        out: &StepOutputs,
        _params: &Params,
        _ctx: &StepContext,
    ) -> Result<Option<Tensor>> {
        let (kd, tout) = self.kd_term(batch, out)?;
        let mut total = kd * (1.0 - self.alpha);
        if let Some(tout) = tout {
            let mask = if batch.padded {
                batch.mask.as_ref()
            } else {
                None
            };
            for term in &self.hidden {
                for (s, t) in term.map.as_pairs() {
                    let (sh, th) = (
                        hidden(&out.hidden_states, *s, "student")?,
                        hidden(&tout.hidden_states, *t, "teacher")?,
                    );
                    let l = match term.kind {
                        HiddenLoss::Mse => hidden_mse(sh, th, mask, None)?,
                        HiddenLoss::Cosine => cosine_loss(sh, th, mask, None)?,
                    };
                    total += l.to_kind(Kind::Float) * term.weight;
                }
            }
        }
        Ok(Some(total))
    }
}

fn hidden<'a>(states: &'a [Tensor], i: usize, who: &str) -> Result<&'a Tensor> {
    states.get(i).ok_or_else(|| {
        Error::invalid(
            "distillation layer map",
            format!(
                "{who} hidden state {i} asked for, but the {who} returned {}",
                states.len()
            ),
        )
    })
}

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
//! # Causal LMs
//!
//! With per-token logits `[b, t, vocab]` (a causal LM student, [`reuse_core::Trainable::predicts_next_token`]),
//! KD is token-level as TRL's GKD trainer and DistillKit compute it: position `j`'s
//! distributions (teacher's and student's alike predict token `j + 1`) are compared at
//! every labelled target, i.e. where `labels[:, j + 1]` is not -100 (prompt tokens of a
//! prompt/response pair and right padding are not), and the divergence is averaged over
//! those tokens. A cached teacher's per-token rows are read by example index and cut or
//! padded to the batch's length, then shifted the same way.
//!
//! Before the first step ([`Technique::begin_task`]) the student and the teacher each
//! run on two examples of the training data: different class counts, different
//! vocabularies (word-embedding rows) or a layer map past either model's depth are an
//! error there, before any training. Whether the tokens themselves agree (not only their
//! count) is a tokenizer question: [`crate::lm::check_same_vocabulary`].

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
    /// Whether the student's per-token logits predict the next token (read from the
    /// student at [`Technique::begin_task`]).
    next_token: Option<bool>,
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
            next_token: None,
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
            logits: true,
            ..Default::default()
        }
    }

    /// The KD loss (unweighted) and the teacher's outputs, for a batch the student gave
    /// `out` for.
    fn kd_term(&self, batch: &Batch, out: &StepOutputs) -> Result<(Tensor, Option<StepOutputs>)> {
        let tokens = self.token_alignment(batch, &out.logits)?;
        // The student's logits, the teacher's per-row tensors and the mask, lined up.
        let align = |t: &Tensor| -> Tensor {
            match &tokens {
                Some((len, _)) => fit_len(t, *len),
                None => t.shallow_clone(),
            }
        };
        let mask = tokens.as_ref().map(|(_, m)| m);
        let student = align(&out.logits);
        match &self.source {
            TeacherSource::Live(t) => {
                let tout = t.teach(batch, self.teacher_options())?;
                let loss = kd_loss(&student, &align(&tout.logits), mask, &self.kd)?;
                Ok((loss, Some(tout)))
            }
            TeacherSource::Cached(c) => {
                let got = c.lookup(&batch.indices, out.logits.device())?;
                let loss = match (&got.logits, &got.topk_logprobs, &got.topk_indices) {
                    (Some(l), _, _) => kd_loss(&student, &align(l), mask, &self.kd)?,
                    (None, Some(v), Some(i)) => {
                        topk_kd_loss(&student, &align(v), &align(i), mask, &self.kd, self.tail)?
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

    /// For per-token logits `[b, t, C]`: how many positions take part (`t - 1` when the
    /// student predicts the next token, else `t`) and which of them count (a labelled
    /// target, inside the batch's mask). `None` for per-example logits.
    fn token_alignment(&self, batch: &Batch, logits: &Tensor) -> Result<Option<(i64, Tensor)>> {
        if logits.dim() != 3 {
            return Ok(None);
        }
        let next = self.next_token.ok_or_else(|| {
            Error::invalid(
                "distillation",
                "per-token logits before Trainer::begin_task: begin_task reads whether the \
                 student predicts the next token (a causal LM), which decides which \
                 positions are compared",
            )
        })?;
        let size = logits.size();
        let labels = &batch.labels;
        if labels.size() != size[..2] {
            return Err(Error::invalid(
                "distillation labels",
                format!(
                    "per-token logits {size:?} need token labels [batch, tokens] = {:?}, \
                     found {:?}",
                    &size[..2],
                    labels.size()
                ),
            ));
        }
        let (start, len) = if next { (1, size[1] - 1) } else { (0, size[1]) };
        let mut mask = labels.narrow(1, start, len).ne(-100);
        if let (true, Some(m)) = (batch.padded, &batch.mask) {
            mask = mask.logical_and(&m.narrow(1, start, len).ne(0));
        }
        Ok(Some((len, mask.to_device(logits.device()))))
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
        self.next_token = Some(ctx.model.predicts_next_token());
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

/// The first `len` positions of a per-token tensor `[b, l, ..]`, zero-padded when `l`
/// is shorter (a cached row stored at its own length).
fn fit_len(t: &Tensor, len: i64) -> Tensor {
    let have = t.size()[1];
    if have >= len {
        return t.narrow(1, 0, len);
    }
    let mut pad = vec![0i64; 2 * (t.dim() - 1)];
    let last = pad.len() - 1;
    pad[last] = len - have;
    t.constant_pad_nd(pad.as_slice())
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

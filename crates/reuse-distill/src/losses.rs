//! Logit distillation losses: temperature-softened KD (Hinton et al. 2015, DistilBERT),
//! forward / reverse KL and the generalised Jensen-Shannon divergence (GKD, Agarwal et
//! al. 2023), hard-label cross-entropy mixed in by `alpha`, and KD from a cached
//! teacher top-k.
//!
//! # Shapes
//! Logits are `[rows, classes]` (one prediction per example) or `[b, l, vocab]` (one per
//! token); every leading dimension is a *row*. An optional mask has the leading shape
//! (`[rows]` or `[b, l]`): non-zero (or `true`) rows count, the others are ignored
//! entirely, so what masked rows hold (padding, garbage, even NaN) changes neither the
//! loss nor its gradient.
//!
//! # Reduction
//! Every loss here is *batchmean*: the divergence is summed over the classes of a row and
//! averaged over the counted rows (all rows without a mask, the unmasked rows with one).
//! For `[b, l, vocab]` logits that is the mean over unmasked tokens, as DistilBERT and TRL
//! do; note that `torch.nn.functional.kl_div(..., reduction="batchmean")` on 3-D input
//! divides by `b` alone. A mask that keeps no row gives a loss of 0.
//!
//! # Numerics and gradients
//! Logits of any floating dtype (f16/bf16 included) are computed on in f32 (f64 stays
//! f64); the loss is an f32 (f64) scalar. Teacher tensors are detached: gradients reach
//! the student only.
//!
//! ```no_run
//! use reuse_distill::losses::{kd_ce_loss, topk_kd_loss, Divergence, KdConfig, TopKTail};
//! use tch::{Device, Kind, Tensor};
//!
//! # fn main() -> reuse_core::Result<()> {
//! let opts = (Kind::Float, Device::Cpu);
//! let student = Tensor::randn([2, 7, 100], opts).set_requires_grad(true); // [b, l, vocab]
//! let teacher = Tensor::randn([2, 7, 100], opts);
//! let labels = Tensor::randint(100, [2, 7], (Kind::Int64, Device::Cpu));
//! let mask = Tensor::ones([2, 7], (Kind::Bool, Device::Cpu)); // padding: false
//! // DistilBERT: forward KL at T = 2 with T^2; 0.5 * CE + 0.5 * KD.
//! let loss = kd_ce_loss(&student, &teacher, &labels, Some(&mask), 0.5, &KdConfig::default())?;
//! loss.backward();
//! // GKD's JSD(0.5) from a cached top-8 of the teacher (its log-probs at T = 1).
//! let (values, indices) = teacher.log_softmax(-1, Kind::Float).topk(8, -1, true, true);
//! let jsd = KdConfig::new(1.0).with_divergence(Divergence::Jsd { beta: 0.5 });
//! let sparse = topk_kd_loss(
//!     &student,
//!     &values.to_kind(Kind::Half),
//!     &indices,
//!     Some(&mask),
//!     &jsd,
//!     TopKTail::RestBucket,
//! )?;
//! # let _ = sparse;
//! # Ok(()) }
//! ```

use reuse_core::{Error, Result};
use tch::{Kind, Tensor};

/// Which divergence compares the teacher's distribution `p` with the student's `q`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Divergence {
    /// `KL(p || q) = sum p (log p - log q)`: Hinton's KD and DistilBERT's loss
    /// (mode-covering). Minimising it equals minimising the cross-entropy of the
    /// student against the teacher's soft targets.
    ForwardKl,
    /// `KL(q || p)` (mode-seeking; MiniLLM, GKD with beta = 1).
    ReverseKl,
    /// Generalised Jensen-Shannon divergence as in GKD and TRL's `generalized_jsd_loss`:
    /// `beta * KL(p || m) + (1 - beta) * KL(q || m)` with `m = beta * p + (1 - beta) * q`,
    /// where `p` is the **teacher** and `q` the **student**. `beta` must lie strictly
    /// inside (0, 1); use [`Divergence::ForwardKl`] (GKD's beta = 0) or
    /// [`Divergence::ReverseKl`] (beta = 1) for the ends.
    Jsd {
        /// Interpolation weight of the teacher in the mixture, in (0, 1).
        beta: f64,
    },
}

/// How the soft-target term is computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdConfig {
    /// Softmax temperature applied to both teacher and student logits (> 0).
    pub temperature: f64,
    /// Multiply the divergence by `T^2` (Hinton, DistilBERT), which keeps the
    /// soft-target gradients at the same scale as `T` changes. TinyBERT and TextBrewer
    /// leave it out.
    pub t_squared: bool,
    /// The divergence between teacher and student.
    pub divergence: Divergence,
}

impl Default for KdConfig {
    /// DistilBERT's setting: `T = 2`, `T^2` scaling on, forward KL.
    fn default() -> Self {
        Self {
            temperature: 2.0,
            t_squared: true,
            divergence: Divergence::ForwardKl,
        }
    }
}

impl KdConfig {
    /// Forward KL at `temperature`, with the `T^2` factor.
    pub fn new(temperature: f64) -> Self {
        Self {
            temperature,
            ..Self::default()
        }
    }

    /// The same with another divergence.
    pub fn with_divergence(mut self, divergence: Divergence) -> Self {
        self.divergence = divergence;
        self
    }

    /// The same with the `T^2` factor switched on or off.
    pub fn with_t_squared(mut self, on: bool) -> Self {
        self.t_squared = on;
        self
    }

    /// Checks the temperature (finite, > 0) and the JSD beta (in (0, 1)).
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t > 0.0) {
            return Err(invalid(
                "KD temperature",
                format!("expected a finite value > 0, found {t}"),
            ));
        }
        if let Divergence::Jsd { beta } = self.divergence {
            if !(beta > 0.0 && beta < 1.0) {
                return Err(invalid(
                    "JSD beta",
                    format!(
                        "expected a value strictly between 0 and 1, found {beta}; \
                         use Divergence::ForwardKl for beta = 0 and Divergence::ReverseKl for beta = 1"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The factor the divergence is multiplied by: `T^2` or 1.
    pub fn scale(&self) -> f64 {
        if self.t_squared {
            self.temperature * self.temperature
        } else {
            1.0
        }
    }
}

/// Where the teacher's probability mass outside its cached top-k goes
/// ([`topk_kd_loss`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TopKTail {
    /// Dropped (the default): the teacher's top-k probabilities are renormalised over
    /// the `k` kept classes at temperature `T` (`softmax(log p_topk / T)`, which equals
    /// `softmax(z / T)` restricted to the kept set exactly, since `log p = z - log Z`),
    /// and the loss is `sum_k p_k (log p_k - log q_k)` with `q` the student's **full**
    /// `log_softmax(z_s / T)` gathered at the indices. The student is thus also pushed
    /// to put its mass on the kept classes. With `k = vocab` this is exactly
    /// [`kd_loss`]. Forward KL only: the student's gathered `q` is no distribution over
    /// the kept set, so reverse KL and JSD are refused here.
    #[default]
    Renormalize,
    /// One extra "rest" class: the teacher's missing mass `1 - sum(exp(topk))` against
    /// the student's mass outside the kept indices (a logsumexp), giving two
    /// distributions over `k + 1` buckets that any [`Divergence`] compares. The cache
    /// holds log-probs at `T = 1` only, so at `T != 1` both sides are softened bucket-wise
    /// (`log_softmax(bucket_logp / T)`), treating the rest as one class; exact at `T = 1`.
    /// Both rest log-masses are floored at `ln(1e-30)`. An f16 cache rounds each top-k
    /// log-prob by up to ~5e-4 relative, so the teacher's rest mass is only that precise.
    RestBucket,
}

/// Log-probabilities at or below this are taken as probability 0 (f16's minimum is
/// -65504; caches may also hold `-inf`).
const LOGP_MIN: f64 = -1e4;
/// `ln(1e-30)`: the floor on rest-bucket log-masses.
const LOG_REST_FLOOR: f64 = -69.077_552_789_821_37;
/// Fill for excluded logits before a softmax: finite, so no `inf - inf` reaches a gradient.
const NEG_FILL: f64 = -1e30;

/// The temperature-softened KD loss of `student_logits` against `teacher_logits`
/// (`[rows, c]` or `[b, l, c]`, the same shape), batchmean over the rows `mask` keeps,
/// times `T^2` when [`KdConfig::t_squared`] is on.
///
/// With the default forward KL this is DistilBERT's
/// `KLDivLoss(reduction="batchmean")(log_softmax(s/T), softmax(t/T)) * T^2` over the
/// unmasked positions.
///
/// # Errors
/// An invalid config; logits that are not floating point, differ in shape (a
/// class-count mismatch names both shapes), or lie on different devices; a mask whose
/// shape is not the logits' leading shape.
pub fn kd_loss(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    mask: Option<&Tensor>,
    cfg: &KdConfig,
) -> Result<Tensor> {
    cfg.validate()?;
    check_logit_pair(student_logits, teacher_logits)?;
    let lead = leading(student_logits);
    let mask = row_mask(mask, &lead, "KD mask", student_logits)?;
    let t = cfg.temperature;
    let s = masked_rows(&upcast(student_logits), mask.as_ref()) / t;
    let te = masked_rows(&upcast(&teacher_logits.detach()), mask.as_ref()) / t;
    let per_row = divergence_rows(
        &s.log_softmax(-1, None),
        &te.log_softmax(-1, None),
        cfg.divergence,
    );
    Ok(batchmean(&per_row, mask.as_ref()) * cfg.scale())
}

/// Hard-label cross-entropy `-log softmax(z)[y]` at temperature 1, averaged over the
/// rows `mask` keeps. `labels` has the logits' leading shape, i64; labels of masked rows
/// are not read (so `-100` padding is fine under a mask such as `labels.ne(-100)`).
///
/// # Errors
/// Bad shapes or dtypes, or an unmasked label outside `[0, classes)` (checked with one
/// read from the device).
pub fn cross_entropy_loss(
    logits: &Tensor,
    labels: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    check_floating(logits, "logits")?;
    let lead = leading(logits);
    if lead.is_empty() {
        return Err(invalid(
            "logits",
            format!(
                "expected [rows, classes] or [b, l, classes], found shape {:?}",
                logits.size()
            ),
        ));
    }
    if labels.size() != lead {
        return Err(shape_err("labels", &lead, labels));
    }
    if labels.kind() != Kind::Int64 {
        return Err(Error::DtypeMismatch {
            path: None,
            tensor: "labels".into(),
            expected: "Int64".into(),
            found: format!("{:?}", labels.kind()),
        });
    }
    same_device(&[(logits, "logits"), (labels, "labels")])?;
    let mask = row_mask(mask, &lead, "cross-entropy mask", logits)?;
    let classes = *logits.size().last().expect("at least 2-D");
    let labels = match &mask {
        Some(m) => labels.where_scalarother(m, 0),
        None => labels.shallow_clone(),
    };
    let bad = labels.lt(0).logical_or(&labels.ge(classes)).any();
    if bad.int64_value(&[]) != 0 {
        let lo = labels.min().int64_value(&[]);
        let hi = labels.max().int64_value(&[]);
        return Err(invalid(
            "labels",
            format!(
                "expected class indices in [0, {classes}) at unmasked rows, found values in [{lo}, {hi}]"
            ),
        ));
    }
    let logp = masked_rows(&upcast(logits), mask.as_ref()).log_softmax(-1, None);
    let nll = -logp
        .gather(-1, &labels.unsqueeze(-1), false)
        .squeeze_dim(-1);
    Ok(batchmean(&nll, mask.as_ref()))
}

/// KD mixed with hard-label cross-entropy: `alpha * CE(labels, z_s) + (1 - alpha) * KD`,
/// where KD is [`kd_loss`] (with its `T^2` factor if on) and CE is
/// [`cross_entropy_loss`] at `T = 1`, both over the rows `mask` keeps.
///
/// `alpha` weights the **hard-label** term, as reuse-core's trainer does (a KD technique
/// sets the task-loss weight to `alpha` and adds `(1 - alpha) * KD`). Hinton's paper
/// writes the same mix with `alpha` on the soft term: its `alpha` is `1 - alpha` here.
///
/// # Errors
/// `alpha` outside `[0, 1]`, and every error of [`kd_loss`] and [`cross_entropy_loss`].
pub fn kd_ce_loss(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    labels: &Tensor,
    mask: Option<&Tensor>,
    alpha: f64,
    cfg: &KdConfig,
) -> Result<Tensor> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(invalid(
            "KD alpha",
            format!("expected a weight in [0, 1] on the hard-label term, found {alpha}"),
        ));
    }
    let kd = kd_loss(student_logits, teacher_logits, mask, cfg)?;
    let ce = cross_entropy_loss(student_logits, labels, mask)?;
    Ok(ce * alpha + kd * (1.0 - alpha))
}

/// KD against a cached teacher top-k: `teacher_logprobs` `[.., k]` are the teacher's
/// `log_softmax` at `T = 1` (f32, f16 or bf16) at the classes `teacher_indices`
/// `[.., k]` (i64 or i32, distinct within a row, as `torch.topk` gives), with the
/// student's leading shape. [`TopKTail`] says how the mass outside the top-k is handled;
/// [`TopKTail::Renormalize`] with `k = vocab` equals [`kd_loss`].
///
/// Log-probs at or below -1e4 (`-inf` included) count as probability 0.
///
/// # Errors
/// Those of [`kd_loss`]; `k` of 0 or above the student's class count; values and
/// indices of different shapes; an index outside `[0, classes)` (checked with one read
/// from the device); a divergence other than forward KL with
/// [`TopKTail::Renormalize`].
pub fn topk_kd_loss(
    student_logits: &Tensor,
    teacher_logprobs: &Tensor,
    teacher_indices: &Tensor,
    mask: Option<&Tensor>,
    cfg: &KdConfig,
    tail: TopKTail,
) -> Result<Tensor> {
    cfg.validate()?;
    check_floating(student_logits, "student logits")?;
    check_floating(teacher_logprobs, "teacher top-k log-probs")?;
    let ss = student_logits.size();
    let vs = teacher_logprobs.size();
    if ss.len() < 2 {
        return Err(invalid(
            "student logits",
            format!("expected [rows, classes] or [b, l, classes], found shape {ss:?}"),
        ));
    }
    if teacher_indices.size() != vs {
        return Err(invalid(
            "teacher top-k indices",
            format!(
                "shape {:?} differs from the top-k log-probs' shape {vs:?}",
                teacher_indices.size()
            ),
        ));
    }
    let lead = leading(student_logits);
    let classes = ss[ss.len() - 1];
    if vs.len() != ss.len() || vs[..vs.len() - 1] != lead[..] {
        return Err(invalid(
            "teacher top-k log-probs",
            format!(
                "shape {vs:?} does not fit student logits of shape {ss:?}: \
                 expected the leading shape {lead:?} followed by k"
            ),
        ));
    }
    let k = vs[vs.len() - 1];
    if k < 1 || k > classes {
        return Err(invalid(
            "teacher top-k",
            format!("k = {k} for a student with {classes} classes; expected 1 <= k <= {classes}"),
        ));
    }
    let idx = match teacher_indices.kind() {
        Kind::Int64 => teacher_indices.shallow_clone(),
        Kind::Int => teacher_indices.to_kind(Kind::Int64),
        other => {
            return Err(Error::DtypeMismatch {
                path: None,
                tensor: "teacher top-k indices".into(),
                expected: "Int64 (or Int)".into(),
                found: format!("{other:?}"),
            })
        }
    };
    same_device(&[
        (student_logits, "student logits"),
        (teacher_logprobs, "teacher top-k log-probs"),
        (teacher_indices, "teacher top-k indices"),
    ])?;
    if tail == TopKTail::Renormalize && cfg.divergence != Divergence::ForwardKl {
        return Err(invalid(
            "top-k KD divergence",
            format!(
                "{:?} needs a student distribution over the kept classes; \
                 TopKTail::Renormalize supports forward KL only (use TopKTail::RestBucket)",
                cfg.divergence
            ),
        ));
    }
    let mask = row_mask(mask, &lead, "top-k KD mask", student_logits)?;
    let idx = match &mask {
        // Masked rows may hold anything (padding ids): point them at class 0..k-1.
        Some(m) => idx.where_self(
            &m.unsqueeze(-1),
            &Tensor::arange(k, (Kind::Int64, idx.device())),
        ),
        None => idx,
    };
    let bad = idx.lt(0).logical_or(&idx.ge(classes)).any();
    if bad.int64_value(&[]) != 0 {
        return Err(invalid(
            "teacher top-k indices",
            format!(
                "expected class indices in [0, {classes}), found values in [{}, {}]",
                idx.min().int64_value(&[]),
                idx.max().int64_value(&[])
            ),
        ));
    }
    let t = cfg.temperature;
    let s = masked_rows(&upcast(student_logits), mask.as_ref());
    let tv = masked_rows(&upcast(&teacher_logprobs.detach()), mask.as_ref()).clamp_min(LOGP_MIN);
    let per_row = match tail {
        TopKTail::Renormalize => {
            let t_logp = (tv / t).log_softmax(-1, None);
            let s_logp = (s / t).log_softmax(-1, None).gather(-1, &idx, false);
            divergence_rows(&s_logp, &t_logp, Divergence::ForwardKl)
        }
        TopKTail::RestBucket => {
            let kept = tv.exp().sum_dim_intlist(-1, true, None);
            let t_rest = (kept.ones_like() - kept).clamp_min(1e-30).log();
            let t_buckets = Tensor::cat(&[tv, t_rest], -1);
            let s_all = s.log_softmax(-1, None);
            let s_kept = s_all.gather(-1, &idx, false);
            // The student's mass outside the kept classes, from its logits (stable even
            // when the kept classes hold nearly all of it).
            let outside = s.scatter_value(-1, &idx, NEG_FILL);
            let s_rest =
                (outside.logsumexp([-1], true) - s.logsumexp([-1], true)).clamp_min(LOG_REST_FLOOR);
            let s_buckets = Tensor::cat(&[s_kept, s_rest], -1);
            divergence_rows(
                &(s_buckets / t).log_softmax(-1, None),
                &(t_buckets / t).log_softmax(-1, None),
                cfg.divergence,
            )
        }
    };
    Ok(batchmean(&per_row, mask.as_ref()) * cfg.scale())
}

/// Per-row divergence between the teacher's log-probs `t` and the student's `s` (both
/// `[.., c]`), summed over the last dimension.
pub(crate) fn divergence_rows(s: &Tensor, t: &Tensor, div: Divergence) -> Tensor {
    let kl = |a: &Tensor, b: &Tensor| (a.exp() * (a - b)).sum_dim_intlist(-1, false, None);
    match div {
        Divergence::ForwardKl => kl(t, s),
        Divergence::ReverseKl => kl(s, t),
        Divergence::Jsd { beta } => {
            let m = Tensor::stack(&[t + beta.ln(), s + (-beta).ln_1p()], 0).logsumexp([0], false);
            kl(t, &m) * beta + kl(s, &m) * (1.0 - beta)
        }
    }
}

/// Mean of `per_row` over the rows `mask` keeps (0 when it keeps none).
pub(crate) fn batchmean(per_row: &Tensor, mask: Option<&Tensor>) -> Tensor {
    match mask {
        None => per_row.mean(None),
        Some(m) => {
            per_row.where_scalarother(m, 0.0).sum(None) / m.sum(per_row.kind()).clamp_min(1.0)
        }
    }
}

/// `x` with the rows `mask` drops replaced by zeros, so whatever they held reaches
/// neither the loss nor the gradient.
pub(crate) fn masked_rows(x: &Tensor, mask: Option<&Tensor>) -> Tensor {
    match mask {
        Some(m) => x.where_scalarother(&m.unsqueeze(-1), 0.0),
        None => x.shallow_clone(),
    }
}

/// f32 for any floating dtype but f64.
pub(crate) fn upcast(x: &Tensor) -> Tensor {
    match x.kind() {
        Kind::Double | Kind::Float => x.shallow_clone(),
        _ => x.to_kind(Kind::Float),
    }
}

/// All dimensions but the last.
pub(crate) fn leading(x: &Tensor) -> Vec<i64> {
    let s = x.size();
    s[..s.len().saturating_sub(1)].to_vec()
}

pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Invalid {
        what: what.into(),
        reason: reason.into(),
    }
}

pub(crate) fn shape_err(tensor: &str, expected: &[i64], found: &Tensor) -> Error {
    Error::ShapeMismatch {
        path: None,
        tensor: tensor.into(),
        expected: expected.to_vec(),
        found: found.size(),
    }
}

pub(crate) fn check_floating(x: &Tensor, what: &str) -> Result<()> {
    match x.kind() {
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16 => Ok(()),
        k => Err(Error::DtypeMismatch {
            path: None,
            tensor: what.into(),
            expected: "a floating dtype (f32, f64, f16, bf16)".into(),
            found: format!("{k:?}"),
        }),
    }
}

pub(crate) fn same_device(ts: &[(&Tensor, &str)]) -> Result<()> {
    let (first, name) = ts[0];
    for (t, n) in &ts[1..] {
        if t.device() != first.device() {
            return Err(invalid(
                *n,
                format!(
                    "expected device {:?} (that of {name}), found {:?}",
                    first.device(),
                    t.device()
                ),
            ));
        }
    }
    Ok(())
}

/// Student and teacher logits: floating, at least 2-D, one shape, one device.
fn check_logit_pair(s: &Tensor, t: &Tensor) -> Result<()> {
    check_floating(s, "student logits")?;
    check_floating(t, "teacher logits")?;
    let (ss, ts) = (s.size(), t.size());
    if ss.len() < 2 {
        return Err(invalid(
            "student logits",
            format!("expected [rows, classes] or [b, l, classes], found shape {ss:?}"),
        ));
    }
    if ss != ts {
        let reason = if ss.len() == ts.len() && ss[..ss.len() - 1] == ts[..ts.len() - 1] {
            format!(
                "student logits have shape {ss:?} and teacher logits {ts:?}: \
                 {} student classes vs {} teacher classes",
                ss[ss.len() - 1],
                ts[ts.len() - 1]
            )
        } else {
            format!(
                "student logits have shape {ss:?} and teacher logits {ts:?}; expected one shape"
            )
        };
        return Err(invalid("KD logits", reason));
    }
    same_device(&[(s, "student logits"), (t, "teacher logits")])
}

/// The mask as a bool tensor of shape `lead`, on `like`'s device, or an error naming it.
pub(crate) fn row_mask(
    mask: Option<&Tensor>,
    lead: &[i64],
    what: &str,
    like: &Tensor,
) -> Result<Option<Tensor>> {
    let Some(m) = mask else { return Ok(None) };
    if m.size() != lead {
        return Err(shape_err(what, lead, m));
    }
    same_device(&[(like, "the inputs"), (m, what)])?;
    Ok(Some(if m.kind() == Kind::Bool {
        m.shallow_clone()
    } else {
        m.ne(0)
    }))
}

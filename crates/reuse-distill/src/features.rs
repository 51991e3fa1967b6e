//! Feature distillation: hidden-state MSE with an optional learned [`Projection`]
//! (TinyBERT, sentence-embedding distillation), the cosine loss of DistilBERT,
//! attention-probability MSE (TinyBERT), MiniLM's attention- and value-relation KL, and
//! the [`LayerMap`] that pairs student layers with teacher layers.
//!
//! # Shapes and masks
//! Hidden states are `[.., hidden]` (`[b, l, hidden]` per token, `[b, hidden]` pooled);
//! their mask has the leading shape. Attention probabilities are `[b, heads, l, l]` and
//! value vectors `[b, heads, l, head_dim]` ([`split_heads`] makes them from `[b, l,
//! hidden]`); their mask is the `[b, l]` padding mask, applied to queries and keys.
//! Masked positions are ignored entirely (what they hold changes neither the loss nor
//! its gradient); a mask that keeps nothing gives 0. Inputs of any floating dtype are
//! computed on in f32 (f64 stays f64). Teacher tensors are detached.
//!
//! # Reductions
//! * [`hidden_mse`]: mean over kept positions and hidden units (`nn.MSELoss` over the
//!   kept positions).
//! * [`cosine_loss`]: `1 - cos` over the hidden dimension, mean over kept positions
//!   (DistilBERT's `CosineEmbeddingLoss` with target 1).
//! * [`attention_mse`]: mean over heads and the (query, key) pairs where both are kept.
//!   TinyBERT's code compares pre-softmax scores with masked ones zeroed and averages
//!   over every element; reuse's BERT returns probabilities, and padded pairs are left
//!   out of the mean rather than counted as zeros.
//! * [`attention_kl`], [`value_relation_kl`]: `KL(teacher || student)` over the kept
//!   keys of each query row, mean over heads and kept queries (MiniLM's
//!   `1 / (heads * |x|) sum_a sum_t KL`).
//!
//! ```no_run
//! use reuse_distill::features::{attention_kl, hidden_mse, LayerMap, Projection};
//! use tch::{Device, Kind, Tensor};
//!
//! # fn main() -> reuse_core::Result<()> {
//! let opts = (Kind::Float, Device::Cpu);
//! // Hidden states as reuse's BERT returns them: embeddings first, then one per layer.
//! let student: Vec<Tensor> = (0..=3).map(|_| Tensor::randn([2, 9, 384], opts)).collect();
//! let teacher: Vec<Tensor> = (0..=6).map(|_| Tensor::randn([2, 9, 768], opts)).collect();
//! let mask = Tensor::ones([2, 9], (Kind::Bool, Device::Cpu));
//! let proj = Projection::new(384, 768, Device::Cpu)?;
//! let map = LayerMap::uniform_with_embeddings(3, 6)?; // (0,0) (1,2) (2,4) (3,6)
//! let mut loss = Tensor::zeros([], opts);
//! for (s, t) in map.select(&student, &teacher)? {
//!     loss += hidden_mse(s, t, Some(&mask), Some(&proj))?;
//! }
//! // MiniLM: the last layers' attention maps (head counts must match).
//! let (a_s, a_t) = (Tensor::rand([2, 12, 9, 9], opts), Tensor::rand([2, 12, 9, 9], opts));
//! loss += attention_kl(&a_s.softmax(-1, Kind::Float), &a_t.softmax(-1, Kind::Float), Some(&mask))?;
//! # Ok(()) }
//! ```

use reuse_core::{Error, Linear, Params, Result};
use tch::{Device, Kind, Tensor};

use crate::losses::{
    batchmean, check_floating, invalid, leading, masked_rows, row_mask, same_device, upcast,
};

/// Probabilities below this are read as this before a log (attention maps hold exact
/// zeros at padding and may underflow elsewhere).
const PROB_FLOOR: f64 = 1e-30;
/// Fill for excluded logits before a softmax: finite, so no `inf - inf` reaches a gradient.
const NEG_FILL: f64 = -1e30;

/// A learned linear map from the student's hidden size to the teacher's (TinyBERT's
/// `W_h`), applied to student features before [`hidden_mse`] or [`cosine_loss`].
///
/// It is a reuse-core [`Linear`] (`weight` `[teacher_dim, student_dim]`, `bias`
/// `[teacher_dim]`, `torch.nn.Linear` initialisation, trainable), so LoRA-style deltas,
/// [`Params`] selection and checkpoints work on it as on any model layer. It belongs to
/// no model: whoever trains it must hand its parameters to the optimizer, e.g. by
/// listing [`Projection::named_parameters`] among the student's parameters under a
/// prefix ([`Projection::params`]), and save them with the run.
#[derive(Debug)]
pub struct Projection {
    linear: Linear,
}

impl Projection {
    /// A new trainable projection `student_dim -> teacher_dim` with a bias.
    ///
    /// # Errors
    /// A dimension that is not positive.
    pub fn new(student_dim: i64, teacher_dim: i64, device: Device) -> Result<Self> {
        if student_dim < 1 || teacher_dim < 1 {
            return Err(invalid(
                "projection",
                format!("dimensions must be positive, found {student_dim} -> {teacher_dim}"),
            ));
        }
        Ok(Self {
            linear: Linear::new(student_dim, teacher_dim, true, device),
        })
    }

    /// Wraps an existing layer (`weight` `[teacher_dim, student_dim]`), e.g. one loaded
    /// from a checkpoint.
    pub fn from_linear(linear: Linear) -> Self {
        Self { linear }
    }

    /// The student's hidden size (`in_features`).
    pub fn student_dim(&self) -> i64 {
        self.linear.in_features()
    }

    /// The teacher's hidden size (`out_features`).
    pub fn teacher_dim(&self) -> i64 {
        self.linear.out_features()
    }

    /// `x W^T + b` for `x` `[.., student_dim]`.
    ///
    /// # Errors
    /// An input whose last dimension is not `student_dim`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear.forward(x, true)
    }

    /// The layer.
    pub fn linear(&self) -> &Linear {
        &self.linear
    }

    /// The layer, mutably (to attach a delta, freeze it, load weights).
    pub fn linear_mut(&mut self) -> &mut Linear {
        &mut self.linear
    }

    /// Its parameters by local name: `weight`, `bias` (and any delta's).
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.linear.named_parameters()
    }

    /// Its parameters as [`Params`] named `<prefix>.weight`, `<prefix>.bias`, ready to
    /// join a model's parameters for an optimizer or a checkpoint.
    pub fn params(&self, prefix: &str) -> Params {
        Params::new(
            self.named_parameters()
                .into_iter()
                .map(|(n, t)| (format!("{prefix}.{n}"), t))
                .collect(),
        )
    }
}

/// Pairs of (student layer, teacher layer) indices for feature losses.
///
/// Indices address whatever list the caller indexes with them: encoder layers (for
/// attentions, `StepOutputs::attentions`, one per layer) or hidden states (reuse's BERT
/// returns the embedding output first, then one per layer, so index 0 is the embeddings
/// and index `i + 1` is layer `i`'s output). [`LayerMap::uniform`] builds the first
/// kind, [`LayerMap::uniform_with_embeddings`] the second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMap {
    pairs: Vec<(usize, usize)>,
}

impl LayerMap {
    /// TinyBERT's uniform strategy over encoder layers (0-based): student layer `i`
    /// learns from teacher layer `(i + 1) * teacher_layers / student_layers - 1`, so the
    /// last layers meet and the others are spread evenly (6 -> 12: 1, 3, 5, 7, 9, 11).
    /// For indexing attentions, one per layer.
    ///
    /// # Errors
    /// No student layers, or a student deeper than the teacher.
    pub fn uniform(student_layers: usize, teacher_layers: usize) -> Result<Self> {
        check_depths(student_layers, teacher_layers)?;
        Ok(Self {
            pairs: (0..student_layers)
                .map(|i| (i, (i + 1) * teacher_layers / student_layers - 1))
                .collect(),
        })
    }

    /// The same map over hidden states with the embedding output at index 0 (as
    /// `StepOutputs::hidden_states` holds them): `(0, 0)` for the embeddings, then
    /// `(i, i * teacher_layers / student_layers)` for `i` in `1..=student_layers`, which
    /// is TinyBERT's `g(m) = m * N / M`. `student_layers` and `teacher_layers` count
    /// encoder layers; the lists indexed have one more entry each.
    ///
    /// # Errors
    /// As [`LayerMap::uniform`].
    pub fn uniform_with_embeddings(student_layers: usize, teacher_layers: usize) -> Result<Self> {
        check_depths(student_layers, teacher_layers)?;
        Ok(Self {
            pairs: (0..=student_layers)
                .map(|i| (i, i * teacher_layers / student_layers))
                .collect(),
        })
    }

    /// An explicit map, e.g. DistilBERT-style `[(0, 0), (1, 2), ...]`. A student index may
    /// appear once only.
    ///
    /// # Errors
    /// An empty list, or a student index that appears twice.
    pub fn pairs(pairs: Vec<(usize, usize)>) -> Result<Self> {
        if pairs.is_empty() {
            return Err(invalid("layer map", "no (student, teacher) pairs given"));
        }
        let mut seen: Vec<usize> = pairs.iter().map(|p| p.0).collect();
        seen.sort_unstable();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(
                "layer map",
                format!("student layer {} is mapped twice in {pairs:?}", w[0]),
            ));
        }
        Ok(Self { pairs })
    }

    /// The (student, teacher) pairs, in order.
    pub fn as_pairs(&self) -> &[(usize, usize)] {
        &self.pairs
    }

    /// Checks every pair against the lengths of the lists it will index (layer counts,
    /// or hidden-state counts including the embeddings).
    ///
    /// # Errors
    /// An index past either depth; the message names the pair, the index and both
    /// depths.
    pub fn check(&self, student_depth: usize, teacher_depth: usize) -> Result<()> {
        for &(s, t) in &self.pairs {
            let side = if s >= student_depth {
                Some(("student", s, student_depth))
            } else if t >= teacher_depth {
                Some(("teacher", t, teacher_depth))
            } else {
                None
            };
            if let Some((who, i, d)) = side {
                return Err(invalid(
                    "layer map",
                    format!(
                        "pair (student {s}, teacher {t}): {who} index {i} is past the {who}'s \
                         depth {d} (valid 0..={}); student depth {student_depth}, teacher depth {teacher_depth}",
                        d.saturating_sub(1)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The paired tensors, after [`LayerMap::check`] against the two lists' lengths.
    ///
    /// # Errors
    /// As [`LayerMap::check`].
    pub fn select<'a>(
        &self,
        student: &'a [Tensor],
        teacher: &'a [Tensor],
    ) -> Result<Vec<(&'a Tensor, &'a Tensor)>> {
        self.check(student.len(), teacher.len())?;
        Ok(self
            .pairs
            .iter()
            .map(|&(s, t)| (&student[s], &teacher[t]))
            .collect())
    }
}

fn check_depths(student_layers: usize, teacher_layers: usize) -> Result<()> {
    if student_layers == 0 || student_layers > teacher_layers {
        return Err(invalid(
            "layer map",
            format!(
                "a uniform map needs 1 <= student layers <= teacher layers, found {student_layers} student and {teacher_layers} teacher layers"
            ),
        ));
    }
    Ok(())
}

/// MSE between student and teacher hidden states `[.., hidden]`, mean over the positions
/// `mask` keeps and the hidden units. With a `projection` the student's states are
/// mapped to the teacher's size first (TinyBERT's `MSE(H_s W_h, H_t)`).
///
/// # Errors
/// Different leading shapes; hidden sizes that differ after the projection (or a
/// projection whose input size is not the student's); a mask of the wrong shape.
pub fn hidden_mse(
    student: &Tensor,
    teacher: &Tensor,
    mask: Option<&Tensor>,
    projection: Option<&Projection>,
) -> Result<Tensor> {
    let (s, t, mask) = feature_pair(student, teacher, mask, projection, "hidden MSE")?;
    let d = *t.size().last().expect("checked") as f64;
    let per_row = (s - t).square().sum_dim_intlist(-1, false, None) / d;
    Ok(batchmean(&per_row, mask.as_ref()))
}

/// DistilBERT's cosine loss: `1 - cos(student, teacher)` over the hidden dimension,
/// mean over the positions `mask` keeps (`cos` as `torch.nn.functional
/// .cosine_similarity`, eps 1e-8). A `projection` maps the student first.
///
/// # Errors
/// As [`hidden_mse`].
pub fn cosine_loss(
    student: &Tensor,
    teacher: &Tensor,
    mask: Option<&Tensor>,
    projection: Option<&Projection>,
) -> Result<Tensor> {
    let (s, t, mask) = feature_pair(student, teacher, mask, projection, "cosine loss")?;
    let cos = Tensor::cosine_similarity(&s, &t, -1, 1e-8);
    Ok(batchmean(&(cos.ones_like() - cos), mask.as_ref()))
}

/// Checks a feature pair, masks and projects the student; returns f32 (f64) tensors
/// of one shape and the bool mask.
fn feature_pair(
    student: &Tensor,
    teacher: &Tensor,
    mask: Option<&Tensor>,
    projection: Option<&Projection>,
    what: &str,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    check_floating(student, "student hidden states")?;
    check_floating(teacher, "teacher hidden states")?;
    same_device(&[
        (student, "student hidden states"),
        (teacher, "teacher hidden states"),
    ])?;
    let (ss, ts) = (student.size(), teacher.size());
    if ss.is_empty() || leading(student) != leading(teacher) {
        return Err(invalid(
            what,
            format!(
                "student hidden states have shape {ss:?} and teacher's {ts:?}; \
                 expected the same leading shape and [.., hidden] features"
            ),
        ));
    }
    let lead = leading(student);
    let mask = row_mask(mask, &lead, &format!("{what} mask"), student)?;
    let mut s = masked_rows(&upcast(student), mask.as_ref());
    let t = masked_rows(&upcast(&teacher.detach()), mask.as_ref());
    if let Some(p) = projection {
        if p.student_dim() != ss[ss.len() - 1] {
            return Err(invalid(
                what,
                format!(
                    "the projection maps {} -> {}, but the student hidden states have shape {ss:?}",
                    p.student_dim(),
                    p.teacher_dim()
                ),
            ));
        }
        // The projection computes in its own dtype (f32 unless the caller changed it).
        let pk = match p.linear().storage() {
            None => p.linear().weight.kind(),
            Some(_) => s.kind(),
        };
        s = p.forward(&s.to_kind(pk))?.to_kind(t.kind());
    }
    let (sd, td) = (*s.size().last().expect("non-empty"), ts[ts.len() - 1]);
    if sd != td {
        let hint = if projection.is_none() {
            format!("; pass a Projection ({sd} -> {td})")
        } else {
            String::new()
        };
        return Err(invalid(
            what,
            format!(
                "student hidden size {sd} (shape {ss:?}) differs from the teacher's {td} (shape {ts:?}){hint}"
            ),
        ));
    }
    Ok((s, t, mask))
}

/// TinyBERT's attention loss on probabilities: MSE between student and teacher
/// attention maps `[b, heads, l, l]`, head by head, mean over heads and the (query,
/// key) pairs whose positions `mask` (`[b, l]`) both keeps.
///
/// # Errors
/// Maps that are not 4-D, differ in shape (a head-count mismatch says so), or a mask
/// that is not `[b, l]`.
pub fn attention_mse(student: &Tensor, teacher: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (s, t, valid, _) = attention_pair(student, teacher, mask, "attention MSE", "attention")?;
    let heads = s.size()[1] as f64;
    // Both maps are zero outside the kept pairs, so the sum is over kept pairs only.
    let sum = (s - t).square().sum(None);
    Ok(&sum / (valid.sum(sum.kind()) * heads).clamp_min(1.0))
}

/// MiniLM's self-attention distribution transfer: `KL(teacher || student)` between
/// attention probabilities `[b, heads, l, l]` (normally the last layer of each) over
/// the kept keys of every query row, mean over heads and kept queries. Head counts must
/// match; hidden sizes may differ.
///
/// # Errors
/// As [`attention_mse`].
pub fn attention_kl(student: &Tensor, teacher: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (s, t, valid, rows) = attention_pair(student, teacher, mask, "attention KL", "attention")?;
    let log = |p: &Tensor| p.where_scalarother(&valid, 1.0).clamp_min(PROB_FLOOR).log();
    Ok(relation_kl(&log(&s), &log(&t), &valid, &rows))
}

/// MiniLM's value-relation transfer: with `VR = softmax(V V^T / sqrt(head_dim))` over
/// the kept keys, `KL(VR_teacher || VR_student)` per query row, mean over heads and kept
/// queries. Values are `[b, heads, l, head_dim]` (the last layer's value projection,
/// split by [`split_heads`]); head counts must match, head dims may differ.
///
/// # Errors
/// Values that are not 4-D, differ in batch, heads or length (a head-count mismatch says
/// so), or a mask that is not `[b, l]`.
pub fn value_relation_kl(
    student_values: &Tensor,
    teacher_values: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (s, t, valid, rows) = attention_pair(
        student_values,
        teacher_values,
        mask,
        "value relation KL",
        "value",
    )?;
    let relation = |v: &Tensor| {
        let dh = *v.size().last().expect("4-D") as f64;
        let v = v.where_scalarother(&rows.unsqueeze(-1), 0.0);
        (v.matmul(&v.transpose(-1, -2)) / dh.sqrt())
            .where_scalarother(&valid, NEG_FILL)
            .log_softmax(-1, None)
    };
    Ok(relation_kl(&relation(&s), &relation(&t), &valid, &rows))
}

/// `KL(t || s)` per query row over the `valid` keys, mean over heads and kept `rows`.
fn relation_kl(s_logp: &Tensor, t_logp: &Tensor, valid: &Tensor, rows: &Tensor) -> Tensor {
    let per_row = (t_logp.exp() * (t_logp - s_logp))
        .where_scalarother(valid, 0.0)
        .sum_dim_intlist(-1, false, None);
    let heads = per_row.size()[1] as f64;
    per_row.where_scalarother(rows, 0.0).sum(None)
        / (rows.sum(per_row.kind()) * heads).clamp_min(1.0)
}

/// Checks a pair of `[b, heads, l, x]` tensors (`x = l` for attention maps) and a
/// `[b, l]` mask; returns them upcast (teacher detached), the kept (query, key) pairs
/// `[b, 1, l, l]` and the kept query rows `[b, 1, l]`.
fn attention_pair(
    student: &Tensor,
    teacher: &Tensor,
    mask: Option<&Tensor>,
    what: &str,
    kind: &str,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    check_floating(student, &format!("student {kind}s"))?;
    check_floating(teacher, &format!("teacher {kind}s"))?;
    same_device(&[(student, "student"), (teacher, "teacher")])?;
    let (ss, ts) = (student.size(), teacher.size());
    let layout = if kind == "attention" {
        "[batch, heads, len, len]"
    } else {
        "[batch, heads, len, head_dim]"
    };
    for (x, who) in [(&ss, "student"), (&ts, "teacher")] {
        if x.len() != 4 || (kind == "attention" && x[2] != x[3]) {
            return Err(invalid(
                what,
                format!("{who} {kind}s have shape {x:?}, expected {layout}"),
            ));
        }
    }
    if ss[1] != ts[1] {
        return Err(invalid(
            what,
            format!(
                "student has {} heads (shape {ss:?}) and teacher {} (shape {ts:?}); \
                 heads are compared one to one, so their counts must match",
                ss[1], ts[1]
            ),
        ));
    }
    let same = if kind == "attention" {
        ss == ts
    } else {
        ss[..3] == ts[..3]
    };
    if !same {
        return Err(invalid(
            what,
            format!("student {kind}s have shape {ss:?} and teacher's {ts:?}; expected {layout} with one batch and length"),
        ));
    }
    let (b, l) = (ss[0], ss[2]);
    let m = match row_mask(mask, &[b, l], &format!("{what} mask"), student)? {
        Some(m) => m,
        None => Tensor::ones([b, l], (Kind::Bool, student.device())),
    };
    let rows = m.unsqueeze(1); // [b, 1, l]
    let valid = rows.unsqueeze(-1).logical_and(&rows.unsqueeze(2)); // [b, 1, l, l]
    let (s, t) = (upcast(student), upcast(&teacher.detach()));
    let (s, t) = if kind == "attention" {
        (
            s.where_scalarother(&valid, 0.0),
            t.where_scalarother(&valid, 0.0),
        )
    } else {
        (s, t)
    };
    Ok((s, t, valid, rows))
}

/// `[b, l, hidden]` -> `[b, heads, l, hidden / heads]`, the per-head layout of
/// [`value_relation_kl`] (as BERT splits its query, key and value projections).
///
/// # Errors
/// An input that is not 3-D, or a hidden size that `heads` does not divide.
pub fn split_heads(x: &Tensor, heads: i64) -> Result<Tensor> {
    let s = x.size();
    if s.len() != 3 || heads < 1 || s[2] % heads != 0 {
        return Err(Error::Invalid {
            what: "split_heads".into(),
            reason: format!(
                "expected [batch, len, hidden] with hidden divisible by {heads} heads, found shape {s:?}"
            ),
        });
    }
    Ok(x.view([s[0], s[1], heads, s[2] / heads]).transpose(1, 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_maps() {
        let m = LayerMap::uniform(6, 12).unwrap();
        assert_eq!(
            m.as_pairs(),
            &[(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]
        );
        let m = LayerMap::uniform(4, 6).unwrap();
        assert_eq!(m.as_pairs(), &[(0, 0), (1, 2), (2, 3), (3, 5)]);
        let m = LayerMap::uniform_with_embeddings(3, 6).unwrap();
        assert_eq!(m.as_pairs(), &[(0, 0), (1, 2), (2, 4), (3, 6)]);
        m.check(4, 7).unwrap();
        assert!(LayerMap::uniform(0, 6).is_err());
        assert!(LayerMap::uniform(7, 6).is_err());
    }

    #[test]
    fn layer_map_errors_name_both_sides() {
        let m = LayerMap::pairs(vec![(0, 0), (1, 12)]).unwrap();
        let e = m.check(6, 12).unwrap_err().to_string();
        assert!(e.contains("teacher index 12"), "{e}");
        assert!(e.contains("(student 1, teacher 12)"), "{e}");
        assert!(
            e.contains("teacher depth 12") && e.contains("student depth 6"),
            "{e}"
        );
        let e = LayerMap::pairs(vec![(0, 0), (0, 1)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("student layer 0 is mapped twice"), "{e}");
        assert!(LayerMap::pairs(vec![]).is_err());
    }
}

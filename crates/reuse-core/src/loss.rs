//! Losses: one cross-entropy for every model of the crate (classes per example or
//! tokens per position), the next-token shift of causal LMs, and the chunked head +
//! loss that keeps a large vocabulary's logits from existing whole.

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Cross-entropy between logits `[b, c]` and labels `[b]`, or token logits `[b, t, c]`
/// and labels `[b, t]` (i64 in `0..c`, or -100 for a target without a label, which is
/// left out as PyTorch's `ignore_index` leaves it out), computed in f32: the mean over
/// labelled targets, 0 when there is none. Shapes are checked: 0-d or mismatched labels
/// are an error, not a panic. Causal LMs predict the next token: see
/// [`next_token_cross_entropy`].
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let ls = logits.size();
    let label_dims =
        crate::data::check_labels("cross-entropy labels", labels).map(|_| labels.dim())?;
    if ls.len() != label_dims + 1 || ls[..label_dims] != labels.size()[..] {
        return Err(Error::invalid(
            "cross-entropy",
            format!(
                "logits {ls:?} and labels {:?} do not pair up: expected logits [batch, classes] with labels [batch], or [batch, tokens, vocab] with [batch, tokens]",
                labels.size()
            ),
        ));
    }
    let c = ls[ls.len() - 1];
    let logits = logits.reshape([-1, c]);
    let labels = labels.reshape([-1]);
    // Mean over the labelled targets (label -100 = unlabelled, as PyTorch's
    // ignore_index), computed as sum / max(count, 1) so that a batch with no labelled
    // target (all of it teacher-labelled text, say) gives 0, not NaN, without reading
    // the count back.
    let sum = logits
        .to_kind(Kind::Float)
        .log_softmax(-1, Kind::Float)
        .f_nll_loss::<Tensor>(&labels, None, tch::Reduction::Sum, -100)?;
    let count = labels.ne(-100).sum(Kind::Float).clamp_min(1.0);
    Ok(sum / count)
}

/// Next-token cross-entropy of a causal LM, as transformers computes it from `labels`
/// aligned with the inputs: position `i`'s logits `[b, t, v]` predict label `i + 1`
/// `[b, t]`; the mean over labelled targets.
pub fn next_token_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (logits, labels) = shift(logits, labels)?;
    cross_entropy(&logits, &labels)
}

/// Whether autograd records operations here (not inside `no_grad`).
fn grad_mode() -> bool {
    let probe = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    (&probe * 1.0).requires_grad()
}

/// `logits[:, :-1]` and `labels[:, 1:]`, checked.
fn shift(x: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (xs, ls) = (x.size(), labels.size());
    if xs.len() != 3 || ls.len() != 2 || xs[..2] != ls[..] {
        return Err(Error::invalid(
            "next-token cross-entropy",
            format!(
                "expected [batch, tokens, d] with labels [batch, tokens], found {xs:?} and {ls:?}"
            ),
        ));
    }
    let t = ls[1];
    if t == 0 {
        return Ok((x.shallow_clone(), labels.shallow_clone()));
    }
    Ok((x.narrow(1, 0, t - 1), labels.narrow(1, 1, t - 1)))
}

/// [`next_token_cross_entropy`] of `hidden` `[b, t, h]` through an output head `weight`
/// `[v, h]` (no bias), computed `chunk` labelled tokens at a time so that the
/// `[tokens, vocab]` logits and their gradient never exist whole (Liger's fused linear
/// cross-entropy and Cut-Cross-Entropy do the same). Only labelled positions are
/// computed at all. The gradients with respect to `hidden` and `weight` (when they
/// require grad) are computed here, chunk by chunk, and the returned loss carries them:
/// its value and its gradients equal the plain path's. A loss scaled or summed with
/// others afterwards backpropagates correctly (the carried gradients are linear in the
/// upstream gradient). Under `no_grad`, or when neither requires grad, only the value is
/// computed.
pub fn chunked_next_token_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    chunk: i64,
) -> Result<Tensor> {
    let (h, y) = shift(hidden, labels)?;
    let d = h.size()[2];
    let ws = weight.size();
    if ws.len() != 2 || ws[1] != d {
        return Err(Error::invalid(
            "output head",
            format!("expected a weight [vocab, {d}], found {ws:?}"),
        ));
    }
    let y = y.reshape([-1]);
    let keep = y.ne(-100).nonzero().squeeze_dim(1);
    let h = h.reshape([-1, d]).index_select(0, &keep);
    let y = y.index_select(0, &keep);
    let n = y.size()[0];
    let count = (n.max(1)) as f64;
    let want_h = h.requires_grad();
    let want_w = weight.requires_grad();
    let grads = (want_h || want_w) && grad_mode();
    let chunk = chunk.max(1);
    let (mut total, mut gh_parts, mut gw) = (0f64, Vec::new(), None::<Tensor>);
    let hd = h.detach();
    let wd = weight.detach();
    tch::no_grad(|| -> Result<()> {
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let hc = hd.narrow(0, start, len);
            let yc = y.narrow(0, start, len);
            let logits = hc.matmul(&wd.tr()).to_kind(Kind::Float);
            let logp = logits.log_softmax(-1, Kind::Float);
            let nll = logp.f_nll_loss::<Tensor>(&yc, None, tch::Reduction::Sum, -100)?;
            total += nll.double_value(&[]);
            if grads {
                // d(sum nll)/d logits = softmax - onehot, divided by the count (mean).
                let mut g = logp.exp();
                let _ = g.index_put_(
                    &[
                        Some(Tensor::arange(len, (Kind::Int64, g.device()))),
                        Some(yc.shallow_clone()),
                    ],
                    &Tensor::from(-1.0f32).to_device(g.device()),
                    true,
                );
                let g = (g / count).to_kind(hd.kind());
                if want_h {
                    gh_parts.push(g.matmul(&wd));
                }
                if want_w {
                    let part = g.tr().matmul(&hc);
                    gw = Some(match gw.take() {
                        Some(acc) => acc + part,
                        None => part,
                    });
                }
            }
            start += len;
        }
        Ok(())
    })?;
    let value = total / count;
    let device = hidden.device();
    let mut loss = Tensor::from(value as f32).to_device(device);
    if grads {
        // value + <h, gh> - <h, gh>.detach(): the value is unchanged and d loss / d h
        // is gh (likewise for the weight).
        if want_h && n > 0 {
            let gh = Tensor::cat(&gh_parts, 0);
            let s = (&h * &gh).sum(Kind::Float);
            loss = loss + &s - s.detach();
        }
        if let (true, Some(gw)) = (want_w, gw) {
            let s = (weight * &gw).sum(Kind::Float);
            loss = loss + &s - s.detach();
        }
    }
    Ok(loss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_leaves_out_unlabelled_rows_and_is_zero_without_any() {
        let logits = Tensor::from_slice(&[2.0f32, 0.0, 0.0, 1.0, 3.0, -1.0]).view([3, 2]);
        let labels = Tensor::from_slice(&[0i64, -100, 1]);
        let got = cross_entropy(&logits, &labels).unwrap().double_value(&[]);
        // By hand: -log softmax(2, 0)[0] and -log softmax(3, -1)[1], averaged over 2 rows.
        let l0 = (1.0 + (-2.0f64).exp()).ln();
        let l2 = 4.0 + (1.0 + (-4.0f64).exp()).ln();
        assert!((got - (l0 + l2) / 2.0).abs() < 1e-6, "{got}");
        let none = Tensor::from_slice(&[-100i64, -100, -100]);
        let z = cross_entropy(&logits.set_requires_grad(true), &none).unwrap();
        assert_eq!(z.double_value(&[]), 0.0);
        z.backward();
    }

    #[test]
    fn cross_entropy_refuses_0d_or_mismatched_labels() {
        let logits = Tensor::zeros([4, 5], (Kind::Float, tch::Device::Cpu));
        assert!(cross_entropy(&logits, &Tensor::from(1i64)).is_err());
        assert!(cross_entropy(&logits, &Tensor::from_slice(&[1i64, 2])).is_err());
        assert!(cross_entropy(
            &logits,
            &Tensor::zeros([4, 5], (Kind::Int64, tch::Device::Cpu))
        )
        .is_err());
        let ok = cross_entropy(&logits, &Tensor::from_slice(&[0i64, 1, 2, 3])).unwrap();
        assert!((ok.double_value(&[]) - 5f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn token_labels_shift_and_the_chunked_head_equals_the_plain_path() {
        tch::manual_seed(0);
        let opts = (Kind::Float, tch::Device::Cpu);
        let (b, t, d, v) = (3, 6, 8, 11);
        let hidden = Tensor::randn([b, t, d], opts).set_requires_grad(true);
        let weight = Tensor::randn([v, d], opts).set_requires_grad(true);
        let labels = Tensor::randint(v, [b, t], (Kind::Int64, tch::Device::Cpu));
        let _ = labels.get(1).narrow(0, 3, 3).fill_(-100);
        let _ = labels.get(2).narrow(0, 0, 4).fill_(-100);
        // The shift by hand: logits[:, i] against labels[:, i + 1].
        let logits = hidden.matmul(&weight.tr());
        let plain = next_token_cross_entropy(&logits, &labels).unwrap();
        let by_hand =
            cross_entropy(&logits.narrow(1, 0, t - 1), &labels.narrow(1, 1, t - 1)).unwrap();
        assert!((plain.double_value(&[]) - by_hand.double_value(&[])).abs() < 1e-7);
        let gp = Tensor::run_backward(&[&plain], &[&hidden, &weight], false, false);
        for chunk in [1, 4, 100] {
            let c = chunked_next_token_cross_entropy(&hidden, &weight, &labels, chunk).unwrap();
            let dv = (c.double_value(&[]) - plain.double_value(&[])).abs();
            assert!(dv < 1e-5, "chunk {chunk}: loss differs by {dv}");
            // Scaled afterwards: gradients scale too.
            let gc = Tensor::run_backward(&[&(&c * 3.0)], &[&hidden, &weight], false, false);
            for (a, p) in gc.iter().zip(&gp) {
                let dg = (a - p * 3.0).abs().max().double_value(&[]);
                assert!(dg < 1e-5, "chunk {chunk}: gradients differ by {dg}");
            }
        }
        // No labelled target: 0 and zero gradients, as the plain path.
        let none = labels.full_like(-100);
        let z = chunked_next_token_cross_entropy(&hidden, &weight, &none, 4).unwrap();
        assert_eq!(z.double_value(&[]), 0.0);
        assert!(
            chunked_next_token_cross_entropy(&hidden, &weight.narrow(1, 0, 4), &labels, 4).is_err()
        );
    }
}

//! Losses: one cross-entropy for every model of the crate.

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Cross-entropy between logits `[b, c]` and labels `[b]` (i64 in `0..c`, or -100 for a
/// row without a label, which is left out as PyTorch's `ignore_index` leaves it out),
/// computed in f32: the mean over labelled rows, 0 when no row has a label. Shapes are
/// checked: 0-d or mismatched labels are an error, not a panic.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let ls = logits.size();
    if ls.len() != 2 {
        return Err(Error::invalid(
            "cross-entropy logits",
            format!("expected [batch, classes], found shape {ls:?}"),
        ));
    }
    crate::data::check_labels("cross-entropy labels", labels)?;
    if labels.size()[0] != ls[0] {
        return Err(Error::invalid(
            "cross-entropy labels",
            format!("{} labels for {} rows of logits", labels.size()[0], ls[0]),
        ));
    }
    // Mean over the labelled rows (label -100 = unlabelled, as PyTorch's ignore_index),
    // computed as sum / max(count, 1) so that a batch with no labelled row (all of it
    // teacher-labelled text, say) gives 0, not NaN, without reading the count back.
    let sum = logits
        .to_kind(Kind::Float)
        .log_softmax(-1, Kind::Float)
        .f_nll_loss::<Tensor>(labels, None, tch::Reduction::Sum, -100)?;
    let count = labels.ne(-100).sum(Kind::Float).clamp_min(1.0);
    Ok(sum / count)
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
        let ok = cross_entropy(&logits, &Tensor::from_slice(&[0i64, 1, 2, 3])).unwrap();
        assert!((ok.double_value(&[]) - 5f64.ln()).abs() < 1e-6);
    }
}

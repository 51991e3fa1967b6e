//! Checking a growth: the grown model against the original on the same inputs.
//!
//! A hidden-size growth repeats the hidden states `k` times, so the grown output
//! `[b, t, k·H]` is compared copy by copy with the original `[b, t, H]`; everything else
//! is compared as is. Padded positions are left out.

use reuse_core::models::bert::{mean_pool, Bert};
use reuse_core::ForwardOptions;
use reuse_core::{Error, Mlp, Result};
use tch::{Kind, Tensor};

/// How far a grown model's outputs are from the original's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Drift {
    /// Largest |grown - original| over the compared values.
    pub max_abs_diff: f64,
    /// Mean |grown - original|.
    pub mean_abs_diff: f64,
    /// Mean cosine between the original's mean-pooled embeddings (repeated `k` times)
    /// and the grown model's; 1 for an exact growth. For an MLP, over output rows.
    pub cosine_mean: f64,
    /// Smallest such cosine.
    pub cosine_min: f64,
}

fn drift(small: &Tensor, grown: &Tensor, mask: Option<&Tensor>, pooled: (Tensor, Tensor)) -> Drift {
    let diff = (grown - small).abs();
    let diff = match mask {
        Some(m) => diff.masked_select(&m.ne(0).unsqueeze(-1).unsqueeze(-1).expand_as(&diff)),
        None => diff.flatten(0, -1),
    };
    let (a, b) = pooled;
    let cos = Tensor::cosine_similarity(&a, &b, -1, 1e-8);
    Drift {
        max_abs_diff: diff.max().double_value(&[]),
        mean_abs_diff: diff.mean(Kind::Double).double_value(&[]),
        cosine_mean: cos.mean(Kind::Double).double_value(&[]),
        cosine_min: cos.min().double_value(&[]),
    }
}

/// Runs `small` and `grown` (eval mode, no dropout) on `ids` `[b, t]` with optional
/// `mask` and compares their last hidden states and mean-pooled embeddings.
///
/// # Errors
/// A grown hidden size that is not a multiple of the original's; a forward error.
pub fn compare_bert(
    small: &Bert,
    grown: &Bert,
    ids: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Drift> {
    let (h, h2) = (small.config.hidden_size, grown.config.hidden_size);
    if h2 % h != 0 {
        return Err(Error::invalid(
            "compare",
            format!("grown hidden size {h2} is not a multiple of the original's {h}"),
        ));
    }
    let k = h2 / h;
    tch::no_grad(|| {
        let last_hidden = |m: &Bert| -> Result<Tensor> {
            let d = m.device();
            Ok(m.forward(
                &ids.to_device(d),
                mask.map(|m| m.to_device(d)).as_ref(),
                None,
                false,
                ForwardOptions::default(),
            )?
            .last_hidden_state
            .to_kind(Kind::Float)
            .to_device(tch::Device::Cpu))
        };
        let (a, b) = (last_hidden(small)?, last_hidden(grown)?);
        let s = a.size();
        let folded = b.view([s[0], s[1], k, h]);
        let mask = mask.map(|m| m.to_device(tch::Device::Cpu));
        let pa = mean_pool(&a, mask.as_ref()).repeat([1, k]);
        let pb = mean_pool(&b, mask.as_ref());
        Ok(drift(&a.unsqueeze(2), &folded, mask.as_ref(), (pa, pb)))
    })
}

/// What [`verify_growth`] found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verification {
    /// On seeded random token ids.
    pub random: Drift,
    /// On the caller's real inputs, when given.
    pub real: Option<Drift>,
}

/// Compares `small` and `grown` on seeded random token ids (`batch` sequences of
/// `len` tokens, no padding) and, when given, on real inputs (`ids`, optional `mask`).
///
/// # Errors
/// As [`compare_bert`].
pub fn verify_growth(
    small: &Bert,
    grown: &Bert,
    real: Option<(&Tensor, Option<&Tensor>)>,
    seed: u64,
) -> Result<Verification> {
    tch::manual_seed(seed as i64);
    let len = small.config.max_position_embeddings.min(24);
    let ids = Tensor::randint(
        small.config.vocab_size,
        [4, len],
        (Kind::Int64, tch::Device::Cpu),
    );
    let random = compare_bert(small, grown, &ids, None)?;
    let real = real
        .map(|(ids, mask)| compare_bert(small, grown, ids, mask))
        .transpose()?;
    Ok(Verification { random, real })
}

/// Compares two MLPs' outputs on `x` (eval mode).
///
/// # Errors
/// A forward error (a wrong input width).
pub fn compare_mlp(small: &Mlp, grown: &Mlp, x: &Tensor) -> Result<Drift> {
    tch::no_grad(|| {
        let a = small.forward(x, false)?;
        let b = grown.forward(x, false)?;
        Ok(drift(
            &a.unsqueeze(1).unsqueeze(1),
            &b.unsqueeze(1).unsqueeze(1),
            None,
            (a, b),
        ))
    })
}

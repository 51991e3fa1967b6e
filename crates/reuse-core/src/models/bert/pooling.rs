//! Sentence-level pooling over BERT's token outputs, as sentence-transformers does.

use tch::{Kind, Tensor};

/// Mean of `hidden` `[b, t, h]` over positions where `mask` `[b, t]` is 1, in f32, as
/// sentence-transformers' mean pooling does (padding excluded, `[CLS]`/`[SEP]` included).
/// With no mask (no padding) the plain mean over positions.
pub fn mean_pool(hidden: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let Some(mask) = mask else {
        return hidden.to_kind(Kind::Float).mean_dim(1, false, Kind::Float);
    };
    let m = mask.to_kind(Kind::Float).unsqueeze(-1);
    let summed = (hidden.to_kind(Kind::Float) * &m).sum_dim_intlist(1, false, Kind::Float);
    let counts = m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1e-9);
    summed / counts
}

/// Rows divided by their L2 norm (at least 1e-12), as `torch.nn.functional.normalize`.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let n = x
        .square()
        .sum_dim_intlist(-1, true, Kind::Float)
        .sqrt()
        .clamp_min(1e-12);
    x / n
}

//! GPTQ (Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training
//! Quantization for Generative Pre-trained Transformers", ICLR 2023): quantize a weight's
//! columns one at a time and push each column's rounding error onto the columns not yet
//! quantized, weighted by the inverse Hessian of the layer's output error on
//! calibration inputs, `H = 2/n X^T X`. Round-to-nearest minimises each weight's own
//! error; GPTQ minimises the error of the layer's *output* on those inputs,
//! `tr((W - Q) H (W - Q)^T)`.
//!
//! The algorithm as the paper's reference implementation runs it (see REFERENCE.md):
//! dampen `H += damp * mean(diag H) * I`, give dead inputs (`diag H = 0`) a unit diagonal
//! and a zero weight column, take `U` = the upper Cholesky factor of `H^-1`, and walk
//! the columns in blocks: for column `i`, `q = quant(w_i)`, `e = (w_i - q) / U[i,i]`,
//! `w_j -= e U[i,j]` for the block's later columns; after each block one matmul carries
//! the block's errors to all later columns. A group's scale and zero point are fixed
//! when its first column is reached, from the weights as updated so far (the groups lie
//! inside blocks here, so that is the group's current values); with `act_order`, the
//! columns go by descending `diag H` and the groups' grids are fixed up front from the
//! original weight (GPTQ's "static groups"), so the file layout stays contiguous.

use reuse_core::{Error, Result};
use tch::{Kind, Tensor};

use crate::spec::{Grid, QuantSpec};
use crate::weight::QuantizedWeight;

/// The running `X^T X` of a linear layer's inputs over calibration batches.
#[derive(Debug)]
pub struct Hessian {
    sum: Tensor,
    rows: i64,
}

impl Hessian {
    /// An empty accumulator for `in_features` inputs on `device`.
    pub fn new(in_features: i64, device: tch::Device) -> Self {
        Self {
            sum: Tensor::zeros([in_features, in_features], (Kind::Float, device)),
            rows: 0,
        }
    }

    /// Adds inputs `x` (`[..., in]`; every row is one input vector: a token).
    pub fn add(&mut self, x: &Tensor) -> Result<()> {
        let inp = self.sum.size()[0];
        if x.size().last() != Some(&inp) {
            return Err(Error::invalid(
                "calibration input",
                format!("expected [..., {inp}], found shape {:?}", x.size()),
            ));
        }
        let x = x
            .detach()
            .reshape([-1, inp])
            .to_kind(Kind::Float)
            .to_device(self.sum.device());
        self.rows += x.size()[0];
        self.sum += x.tr().mm(&x);
        Ok(())
    }

    /// How many input vectors went in.
    pub fn rows(&self) -> i64 {
        self.rows
    }

    /// `H = 2/n X^T X` (`[in, in]`, f32).
    pub fn matrix(&self) -> Tensor {
        &self.sum * (2.0 / self.rows.max(1) as f64)
    }
}

/// GPTQ's settings.
#[derive(Clone, Copy, Debug)]
pub struct GptqOptions {
    /// Columns per lazy-update block (the paper's 128). Rounded up to a multiple of the
    /// group size when groups are larger.
    pub block_size: i64,
    /// Dampening as a fraction of the mean diagonal of `H` (the paper's 0.01).
    pub damp: f64,
    /// Quantize columns by descending `diag H` (activation order), with static groups.
    pub act_order: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        Self {
            block_size: 128,
            damp: 0.01,
            act_order: false,
        }
    }
}

/// The layer-output error `tr((W - Q) H (W - Q)^T)` of replacing `w` by `q` (both
/// `[out, in]`) under the Hessian `h`: what GPTQ minimises.
pub fn output_error(w: &Tensor, q: &Tensor, h: &Tensor) -> f64 {
    let d = (w.to_kind(Kind::Double) - q.to_kind(Kind::Double)).detach();
    (d.mm(&h.to_kind(Kind::Double)) * &d)
        .sum(Kind::Double)
        .double_value(&[])
}

/// Quantizes `weight` (`[out, in]`) with GPTQ under the Hessian `h` of its inputs
/// (`[in, in]`, e.g. [`Hessian::matrix`]). `what` names the weight in errors.
pub fn quantize(
    what: &str,
    weight: &Tensor,
    h: &Tensor,
    spec: QuantSpec,
    opts: &GptqOptions,
) -> Result<QuantizedWeight> {
    let s = weight.size();
    if s.len() != 2 {
        return Err(Error::invalid(
            what.to_string(),
            format!("expected a 2-D [out, in] weight, found shape {s:?}"),
        ));
    }
    let (out, inp) = (s[0], s[1]);
    spec.check(what, inp)?;
    if h.size() != [inp, inp] {
        return Err(Error::ShapeMismatch {
            path: None,
            tensor: format!("{what} Hessian"),
            expected: vec![inp, inp],
            found: h.size(),
        });
    }
    let g = spec.group(inp);
    let groups = inp / g;
    let device = weight.device();
    let mut w = weight.detach().to_kind(Kind::Float).copy();
    let mut h = h.detach().to_kind(Kind::Double).to_device(device).copy();
    // Dead inputs: never active on the calibration data, so any weight is as good as
    // any other for the output there; zero them (their codes stand for 0).
    let diag = h.diagonal(0, 0, 1);
    let dead = diag.eq(0.0);
    if dead.any().int64_value(&[]) != 0 {
        let _ = h.diagonal(0, 0, 1).masked_fill_(&dead, 1.0);
        let _ = w.masked_fill_(&dead.unsqueeze(0).to_device(device), 0.0);
    }
    // Static grids (act order, or one group spanning blocks): from the weight as it is.
    let static_grids = opts.act_order || g > opts.block_size;
    let mut grids: Vec<Option<Grid>> = (0..groups).map(|_| None).collect();
    if static_grids {
        for (k, slot) in grids.iter_mut().enumerate() {
            *slot = Some(Grid::find(&spec, &w.narrow(1, k as i64 * g, g)));
        }
    }
    let perm = opts.act_order.then(|| h.diagonal(0, 0, 1).argsort(0, true));
    if let Some(p) = &perm {
        w = w.index_select(1, p);
        h = h.index_select(0, p).index_select(1, p);
    }
    let damp = opts.damp * h.diagonal(0, 0, 1).mean(Kind::Double).double_value(&[]);
    let _ = h.diagonal(0, 0, 1).g_add_scalar_(damp);
    let u = invert_upper(&h, what)?.to_kind(Kind::Float);
    let order: Vec<i64> = match &perm {
        Some(p) => Vec::<i64>::try_from(p.to_device(tch::Device::Cpu))
            .map_err(|e| Error::invalid(what.to_string(), format!("column order: {e}")))?,
        None => (0..inp).collect(),
    };
    let block = if static_grids {
        opts.block_size.max(1)
    } else {
        // Groups inside blocks: a block is a whole number of groups.
        (opts.block_size.max(g) + g - 1) / g * g
    };
    let codes = Tensor::zeros([out, inp], (Kind::Float, device));
    let mut i1 = 0;
    while i1 < inp {
        let count = block.min(inp - i1);
        let w1 = w.narrow(1, i1, count).copy();
        let errs = Tensor::zeros([out, count], (Kind::Float, device));
        let u1 = u.narrow(0, i1, count).narrow(1, i1, count);
        for i in 0..count {
            let col = order[(i1 + i) as usize];
            let group = (col / g) as usize;
            if grids[group].is_none() {
                // First column of a contiguous group: its grid from the current values.
                grids[group] = Some(Grid::find(&spec, &w1.narrow(1, i, g)));
            }
            let grid = grids[group].as_ref().expect("set above");
            let wi = w1.narrow(1, i, 1);
            let c = grid.codes(&spec, &wi);
            let q = grid.values(&c);
            codes.narrow(1, i1 + i, 1).copy_(&c);
            let e = (&wi - q) / u1.double_value(&[i, i]);
            errs.narrow(1, i, 1).copy_(&e);
            if i + 1 < count {
                let rest = count - i - 1;
                let _ = w1
                    .narrow(1, i + 1, rest)
                    .g_sub_(&e.mm(&u1.narrow(0, i, 1).narrow(1, i + 1, rest)));
            }
        }
        let i2 = i1 + count;
        if i2 < inp {
            let _ = w
                .narrow(1, i2, inp - i2)
                .g_sub_(&errs.mm(&u.narrow(0, i1, count).narrow(1, i2, inp - i2)));
        }
        i1 = i2;
    }
    let codes = match &perm {
        Some(p) => codes.index_select(1, &p.argsort(0, false)),
        None => codes,
    };
    let grids: Vec<Grid> = grids
        .into_iter()
        .map(|g| g.expect("every group reached"))
        .collect();
    let scale = Tensor::stack(&grids.iter().map(|g| &g.scale).collect::<Vec<_>>(), 1);
    let zero = Tensor::stack(&grids.iter().map(|g| &g.zero).collect::<Vec<_>>(), 1);
    Ok(QuantizedWeight::from_codes(spec, &codes, &scale, &zero))
}

/// The upper Cholesky factor of `h^-1` (`h` symmetric positive definite, f64).
fn invert_upper(h: &Tensor, what: &str) -> Result<Tensor> {
    let fail = |e: tch::TchError| {
        Error::invalid(
            format!("{what} Hessian"),
            format!("not positive definite after dampening (raise damp): {e}"),
        )
    };
    let l = h.f_linalg_cholesky(false).map_err(fail)?;
    let inv = l.f_cholesky_inverse(false).map_err(fail)?;
    inv.f_linalg_cholesky(true).map_err(fail)
}

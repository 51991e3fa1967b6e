//! AdamW's update rule, as `torch.optim.AdamW` (decoupled weight decay, bias correction
//! with the parameter's own step count): in libtorch's fused kernel for f32 contiguous
//! tensors ([`fused_step`]), in tensor ops otherwise ([`update`]).

use tch::Tensor;

use crate::shim::{fused_adamw, AdamwTensors};
use crate::Result;

/// One parameter's AdamW update, handed to libtorch's fused kernel.
pub(crate) struct Fused {
    /// The tensor updated: the parameter, or its f32 master.
    pub w: Tensor,
    /// Its f32 gradient.
    pub g: Tensor,
    /// First moment.
    pub m: Tensor,
    /// Second moment.
    pub v: Tensor,
    /// The bias-correction count after this update (f32 scalar on `w`'s device).
    pub step: Tensor,
    /// The half-precision parameter to copy the master into afterwards.
    pub param: Option<Tensor>,
}

/// One AdamW update of `w` in tensor ops, in place (as torch's single-tensor AdamW: two
/// temporaries per parameter instead of eight, since the update is memory-bound), `t`
/// being the parameter's step count after this update.
#[allow(clippy::too_many_arguments)]
pub(crate) fn update(
    w: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    t: f64,
    lr: f64,
    (b1, b2): (f64, f64),
    wd: f64,
    eps: f64,
) -> Result<()> {
    if wd != 0.0 {
        let _ = w.f_mul_scalar_(1.0 - lr * wd)?;
    }
    let _ = m.f_mul_scalar_(b1)?.f_add_(&(g * (1.0 - b1)))?;
    let _ = v.f_mul_scalar_(b2)?.f_addcmul_(g, &(g * (1.0 - b2)))?;
    let bc1 = 1.0 - b1.powf(t);
    let bc2 = 1.0 - b2.powf(t);
    let step_size = lr / bc1;
    // w -= step * m / (sqrt(v) / sqrt(bc2) + eps), with the temporaries updated in place.
    let mut denom = v.f_sqrt()?;
    let _ = denom.f_div_scalar_(bc2.sqrt())?.f_add_scalar_(eps)?;
    let mut upd = m.f_div(&denom)?;
    let _ = w.f_sub_(&upd.f_mul_scalar_(step_size)?)?;
    Ok(())
}

/// The fused updates of `items`, one kernel call per device; half-precision parameters
/// then take their f32 master's new value.
pub(crate) fn fused_step(
    items: &[Fused],
    lr: f64,
    betas: (f64, f64),
    wd: f64,
    eps: f64,
) -> Result<()> {
    let mut devices: Vec<tch::Device> = Vec::new();
    for f in items {
        if !devices.contains(&f.w.device()) {
            devices.push(f.w.device());
        }
    }
    for d in devices {
        let on: Vec<&Fused> = items.iter().filter(|f| f.w.device() == d).collect();
        let t = AdamwTensors {
            w: on.iter().map(|f| &f.w).collect(),
            g: on.iter().map(|f| &f.g).collect(),
            m: on.iter().map(|f| &f.m).collect(),
            v: on.iter().map(|f| &f.v).collect(),
            step: on.iter().map(|f| &f.step).collect(),
        };
        fused_adamw(&t, lr, betas, wd, eps)?;
    }
    for f in items {
        if let Some(p) = &f.param {
            p.shallow_clone().f_copy_(&f.w)?;
        }
    }
    Ok(())
}

//! SGD's update rule, as `torch.optim.SGD`: L2 weight decay added to the gradient,
//! classic momentum (the buffer starts as the first gradient).

use tch::Tensor;

use crate::Result;

/// One SGD update of `w` in place; `buf` is the momentum buffer (made on the first step
/// when `momentum` is not 0).
pub(crate) fn update(
    w: &mut Tensor,
    g: Tensor,
    buf: &mut Option<Tensor>,
    lr: f64,
    momentum: f64,
    wd: f64,
) -> Result<()> {
    let g = if wd != 0.0 { &g + &*w * wd } else { g };
    let d = if momentum != 0.0 {
        match buf {
            Some(b) => {
                let _ = b.f_mul_scalar_(momentum)?.f_add_(&g)?;
                b.shallow_clone()
            }
            None => {
                let b = g.copy();
                *buf = Some(b.shallow_clone());
                b
            }
        }
    } else {
        g
    };
    let _ = w.f_sub_(&(d * lr))?;
    Ok(())
}

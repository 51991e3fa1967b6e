//! Calls into `cpp/mlp_shim.cpp`: a ReLU MLP as one autograd node.

use std::ffi::{c_char, c_int, c_void, CStr};

use tch::Tensor;

use crate::{Error, Result};

extern "C" {
    fn reuse_core_relu_mlp(
        x: *mut c_void,
        ws: *mut *mut c_void,
        bs: *mut *mut c_void,
        n: c_int,
        err: *mut c_char,
        len: usize,
    ) -> *mut c_void;
}

/// `x` through layers `(ws[i], bs[i])` with a ReLU between them (none after the last),
/// recorded as one autograd node when gradients are on. `Ok(None)` when the node does
/// not apply (autocast is on).
pub(crate) fn relu_mlp(x: &Tensor, ws: &[&Tensor], bs: &[&Tensor]) -> Result<Option<Tensor>> {
    let mut w: Vec<*mut c_void> = ws.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let mut b: Vec<*mut c_void> = bs.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let mut err = [0 as c_char; 1024];
    // SAFETY: every pointer is a live `at::Tensor*` borrowed for the call; the shim
    // catches every C++ exception, and on success returns a new heap `at::Tensor*`
    // whose ownership passes to the `Tensor` made from it.
    let out = unsafe {
        reuse_core_relu_mlp(
            x.as_ptr() as *mut c_void,
            w.as_mut_ptr(),
            b.as_mut_ptr(),
            w.len() as c_int,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if out.is_null() {
        // SAFETY: the shim writes a NUL-terminated message (empty: not applicable).
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
        if msg.is_empty() {
            return Ok(None);
        }
        return Err(Error::invalid("mlp forward", msg.into_owned()));
    }
    // SAFETY: `out` is a heap `at::Tensor*` that nothing else owns (see above).
    Ok(Some(unsafe { Tensor::from_ptr(out as *mut _) }))
}

//! The C++ shims' one home: every `extern "C"` function of `cpp/*.cpp` (compiled by
//! `build.rs` against the same libtorch) and its safe wrapper. Each shim catches every
//! C++ exception and hands its message back through an error buffer.
//!
//! - `mlp_shim.cpp`: a ReLU MLP as one autograd node ([`relu_mlp`]);
//! - `optim_shim.cpp`: libtorch's fused AdamW kernel ([`fused_adamw`]) and
//!   `set_to_none` gradients ([`clear_grads`]), which tch does not expose;
//! - `codes_shim.cpp`: `x Wᵀ` by a GGUF weight kept in its codes, whose backward rebuilds
//!   the weight instead of keeping it ([`codes_matmul`]).

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

extern "C" {
    fn reuse_core_fused_adamw(
        params: *mut *mut c_void,
        grads: *mut *mut c_void,
        exp_avgs: *mut *mut c_void,
        exp_avg_sqs: *mut *mut c_void,
        steps: *mut *mut c_void,
        n: c_int,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

extern "C" {
    fn reuse_core_clear_grads(
        ts: *mut *mut c_void,
        n: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

extern "C" {
    fn reuse_core_codes_matmul(
        x: *const c_void,
        codes: *const c_void,
        scales: *const c_void,
        mins: *const c_void,
        ggml_type: i64,
        out: i64,
        inp: i64,
        y: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

/// `x Wᵀ` for `W` `[out, inp]` held as GGUF codes (`ggml_type` 0: Q8_0 codes i8
/// `[out, inp]`; 1: Q4_0, 2: Q4_1, codes u8 `[out, inp / 2]` in the file's nibble
/// layout), f16 `scales` and, for Q4_1, f16 `mins` `[out, inp / 32]`: one autograd node
/// that saves the codes, not the dense weight, and rebuilds it in backward. The result
/// is in `x`'s dtype.
pub(crate) fn codes_matmul(
    x: &Tensor,
    codes: &Tensor,
    scales: &Tensor,
    mins: Option<&Tensor>,
    ggml_type: i64,
    [out, inp]: [i64; 2],
) -> Result<Tensor> {
    let mut y: *mut c_void = std::ptr::null_mut();
    let mut err = [0 as c_char; 1024];
    // SAFETY: every pointer is a live `at::Tensor*` borrowed for the call (or null for
    // no minimums, which the shim checks); the shim catches every C++ exception and on
    // success stores a new heap `at::Tensor*` in `y`, whose ownership passes to the
    // `Tensor` made from it.
    let rc = unsafe {
        reuse_core_codes_matmul(
            x.as_ptr() as *const c_void,
            codes.as_ptr() as *const c_void,
            scales.as_ptr() as *const c_void,
            mins.map_or(std::ptr::null(), |m| m.as_ptr() as *const c_void),
            ggml_type,
            out,
            inp,
            &mut y,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 || y.is_null() {
        // SAFETY: the shim writes a NUL-terminated message on failure.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
        return Err(Error::invalid("matmul by GGUF codes", msg.into_owned()));
    }
    // SAFETY: `y` is a heap `at::Tensor*` that nothing else owns (see above).
    Ok(unsafe { Tensor::from_ptr(y as *mut _) })
}

/// Leaves the gradient of each of `ts` undefined (PyTorch's `set_to_none=True`); false
/// if libtorch refused, with the gradients as they were.
pub(crate) fn clear_grads(ts: &[&Tensor]) -> bool {
    let mut ptrs: Vec<*mut c_void> = ts.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let mut err = [0 as c_char; 256];
    // SAFETY: every pointer is a live `at::Tensor*` borrowed from `ts` for the call; the
    // shim catches every C++ exception.
    let rc = unsafe {
        reuse_core_clear_grads(
            ptrs.as_mut_ptr(),
            ptrs.len() as c_int,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    rc == 0
}

/// Pointers to the `at::Tensor`s behind `ts`, for a shim call.
fn ptrs(ts: &[&Tensor]) -> Vec<*mut c_void> {
    ts.iter().map(|t| t.as_ptr() as *mut c_void).collect()
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

/// Tensors of one fused AdamW call, all on one device: the updated tensors `w`, their
/// f32 gradients `g`, moments `m` and `v`, and each one's bias-correction count `step`
/// (an f32 scalar on the device), index for index.
pub(crate) struct AdamwTensors<'a> {
    pub w: Vec<&'a Tensor>,
    pub g: Vec<&'a Tensor>,
    pub m: Vec<&'a Tensor>,
    pub v: Vec<&'a Tensor>,
    pub step: Vec<&'a Tensor>,
}

/// libtorch's fused AdamW (`torch.optim.AdamW(fused=True)`'s kernel: one pass over each
/// tensor's memory, the same update rule) over tensors of one device.
pub(crate) fn fused_adamw(
    t: &AdamwTensors<'_>,
    lr: f64,
    (b1, b2): (f64, f64),
    wd: f64,
    eps: f64,
) -> Result<()> {
    let (mut w, mut g, mut m, mut v, mut s) = (
        ptrs(&t.w),
        ptrs(&t.g),
        ptrs(&t.m),
        ptrs(&t.v),
        ptrs(&t.step),
    );
    let mut err = [0 as c_char; 1024];
    // SAFETY: every pointer is a live `at::Tensor*` borrowed from `t` for the call; the
    // shim catches every C++ exception and writes its message into `err`.
    let rc = unsafe {
        reuse_core_fused_adamw(
            w.as_mut_ptr(),
            g.as_mut_ptr(),
            m.as_mut_ptr(),
            v.as_mut_ptr(),
            s.as_mut_ptr(),
            w.len() as c_int,
            lr,
            b1,
            b2,
            wd,
            eps,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 {
        // SAFETY: the shim writes a NUL-terminated message into `err`.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
        return Err(Error::invalid("fused AdamW step", msg.into_owned()));
    }
    Ok(())
}

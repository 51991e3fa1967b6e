//! libtorch's CPU int4 matmul (`_weight_int4pack_mm_for_cpu`) for Q4_0 / Q4_1 weights:
//! packing the file's 4-bit codes into the kernel's layout, and reading them back.
//!
//! The kernel computes `x · Wᵀ` with `W[n, k] = (q[n, k] − 8) · s[g, n] + z[g, n]` for
//! group `g = k / 32`, where `qScaleAndZeros` is `[K / 32, N, 2]` holding `(s, z)` in the
//! activations' dtype. Q4_0 (`d · (q − 8)`) is `s = d, z = 0`; Q4_1 (`d · q + m`) is
//! `s = d, z = m + 8d`. On x86 only bf16 activations have a vectorized kernel
//! (AVX512 / AVX2); f32 and f16 take a scalar loop that is an order of magnitude slower
//! than a dense matmul, so the kernel is used for bf16 only. Its scales and zeros are
//! then bf16 too: `d` loses the three low bits of its f16 mantissa (a relative error up
//! to 2⁻⁹ per group), which is why [`CodesStorage`](super::CodesStorage) keeps the
//! file's f16 scales beside them for an exact `dequantize`.
//!
//! The packed layout depends on the CPU capability libtorch dispatches to (from
//! `aten/src/ATen/native/cpu/int4mm_kernel.cpp`, `weight_to_int4pack_kernel`), and is
//! not documented as stable, so it is never assumed: the layout is found once per
//! process by packing a probe with libtorch's own `_convert_weight_to_int4pack_for_cpu`
//! and reading it back with each candidate below, and every packed tensor is read back
//! and compared with its codes before it is used. Anything that does not match falls
//! back to the file's layout and a dequantizing matmul.
//!
//! Candidates (rows are `N`, the output features, in blocks of `B`; within a block the
//! bytes go column by column, `k` = 0, 1, ...):
//!
//! * AVX512, `B` = 64: for `d` in 0..16, byte `32k + d` holds rows `d` (low nibble) and
//!   `d + 32` (high), byte `32k + 16 + d` rows `d + 16` and `d + 48`.
//! * AVX2, `B` = 32: byte `16k + d` holds rows `d` and `d + 16`.
//! * Scalar builds, and every layout's last block when it is short: byte
//!   `k·nb/2 + j` holds rows `2j` and `2j + 1` of the block's `nb` rows.

use std::cell::RefCell;
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

/// One of the packed layouts libtorch's CPU builds use (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// AVX512: blocks of 64 rows, lanes 0|2 and 1|3 paired.
    Lanes64,
    /// AVX2: blocks of 32 rows, lanes 0|1 paired.
    Lanes32,
    /// No vector unit: blocks of 32 rows, adjacent rows paired.
    Pairs32,
}

const CANDIDATES: [Layout; 3] = [Layout::Lanes64, Layout::Lanes32, Layout::Pairs32];

impl Layout {
    fn block(self) -> usize {
        match self {
            Layout::Lanes64 => 64,
            Layout::Lanes32 | Layout::Pairs32 => 32,
        }
    }
}

/// The group size of the GGUF 4-bit types, and the kernel's `qGroupSize`.
pub(crate) const GROUP: i64 = 32;

/// Whether the kernel takes a weight of `[n, k]`: libtorch wants `N % 16 == 0`, and the
/// groups must be whole.
pub(crate) fn fits(n: i64, k: i64) -> bool {
    n > 0 && k > 0 && n % 16 == 0 && k % GROUP == 0
}

/// Writes the codes (0..=15, one a weight, `[n, k]` row-major) of `nibbles`, the file's
/// layout, into `q`: rows of `k / 2` bytes, each 32-weight group 16 bytes with weight `j`
/// in the low nibble of byte `j` and weight `j + 16` in the high nibble.
fn codes_of(nibbles: &[u8], q: &mut [i32]) {
    for (group, out) in nibbles.chunks_exact(16).zip(q.chunks_exact_mut(32)) {
        let (lo, hi) = out.split_at_mut(16);
        for ((b, l), h) in group.iter().zip(lo).zip(hi) {
            *l = i32::from(b & 0x0f);
            *h = i32::from(b >> 4);
        }
    }
}

/// The file's layout of `q` (codes 0..=15, `[n, k]` row-major); the inverse of
/// [`codes_of`].
fn nibbles_of(q: &[u8]) -> Vec<u8> {
    q.chunks_exact(32)
        .flat_map(|g| (0..16).map(move |j| g[j] | (g[j + 16] << 4)))
        .collect()
}

/// The codes (`[n, k]` row-major, one byte a weight) of `packed` (`n × k / 2` bytes in
/// `layout`).
fn codes_in(layout: Layout, packed: &[u8], n: usize, k: usize) -> Vec<u8> {
    let mut q = vec![0u8; n * k];
    let bn = layout.block();
    let mut n0 = 0;
    while n0 < n {
        let nb = bn.min(n - n0);
        let block = &packed[n0 * k / 2..(n0 + nb) * k / 2];
        let rows = &mut q[n0 * k..(n0 + nb) * k];
        let mut set = |r: usize, c: usize, v: u8| rows[r * k + c] = v;
        for c in 0..k {
            match layout {
                Layout::Lanes64 if nb == 64 => {
                    let (b0, b1) = (
                        &block[c * 32..c * 32 + 16],
                        &block[c * 32 + 16..c * 32 + 32],
                    );
                    for d in 0..16 {
                        set(d, c, b0[d] & 0x0f);
                        set(d + 32, c, b0[d] >> 4);
                        set(d + 16, c, b1[d] & 0x0f);
                        set(d + 48, c, b1[d] >> 4);
                    }
                }
                Layout::Lanes32 if nb == 32 => {
                    for (d, &b) in block[c * 16..c * 16 + 16].iter().enumerate() {
                        set(d, c, b & 0x0f);
                        set(d + 16, c, b >> 4);
                    }
                }
                _ => {
                    let half = nb / 2;
                    for (j, &b) in block[c * half..c * half + half].iter().enumerate() {
                        set(2 * j, c, b & 0x0f);
                        set(2 * j + 1, c, b >> 4);
                    }
                }
            }
        }
        n0 += nb;
    }
    q
}

/// Reads `packed` (`n × k / 2` bytes in `layout`) back into the file's layout.
pub(crate) fn unpack(layout: Layout, packed: &[u8], n: usize, k: usize) -> Vec<u8> {
    nibbles_of(&codes_in(layout, packed, n, k))
}

/// A contiguous CPU tensor's elements.
///
/// # Safety
/// `t` must be a contiguous CPU tensor of element type `T` that nothing writes to while
/// the slice lives.
unsafe fn host<T>(t: &Tensor) -> &[T] {
    let n = t.numel();
    if n == 0 {
        return &[];
    }
    // SAFETY: per the contract, `data_ptr` points at `n` initialised, aligned `T`s.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, n) }
}

thread_local! {
    /// The i32 codes handed to libtorch's packing, reused from tensor to tensor: a fresh
    /// four-bytes-a-weight buffer per tensor, freed between the packed tensors that stay,
    /// fragments the heap (measured: about 200 MB more resident after loading SmolLM2).
    static SCRATCH: RefCell<Tensor> = RefCell::new(Tensor::new());
}

/// The kernel's packing of `nibbles` (the file's layout, `[n, k / 2]` bytes) by libtorch,
/// and the codes (`[n, k]` i32, a view of this thread's scratch, valid until the next
/// call) it was made from; None when libtorch refuses them.
fn torch_pack(nibbles: &[u8], n: usize, k: usize) -> Option<(Tensor, Tensor)> {
    let q = SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if !scratch.defined() || scratch.numel() < n * k {
            *scratch = Tensor::f_empty([(n * k) as i64], (Kind::Int, Device::Cpu)).ok()?;
        }
        scratch
            .f_narrow(0, 0, (n * k) as i64)
            .and_then(|q| q.f_view([n as i64, k as i64]))
            .ok()
    })?;
    if n * k > 0 {
        // SAFETY: `q` is the start of this thread's scratch: a contiguous CPU i32 tensor
        // of at least n·k > 0 elements that nothing else reads or writes meanwhile (its
        // earlier views are dropped by `pack` and `layout` before they call again); the
        // slice ends before `q` is used.
        let out = unsafe { std::slice::from_raw_parts_mut(q.data_ptr() as *mut i32, n * k) };
        codes_of(nibbles, out);
    }
    // innerKTiles is ignored by the CPU packing; 2 is a value every build accepts.
    let packed = q.f_internal_convert_weight_to_int4pack_for_cpu(2).ok()?;
    let ok = packed.kind() == Kind::Uint8
        && packed.device() == Device::Cpu
        && packed.numel() == n * k / 2
        && packed.is_contiguous();
    ok.then_some((packed, q))
}

/// Whether `packed`, read in `layout`, holds the codes `q`.
fn reads_back(layout: Layout, packed: &Tensor, q: &Tensor, n: usize, k: usize) -> bool {
    // SAFETY: both were made by `torch_pack` (contiguous CPU u8 and i32 tensors) and are
    // not written to while read here.
    let (packed, q) = unsafe { (host::<u8>(packed), host::<i32>(q)) };
    let got = codes_in(layout, packed, n, k);
    got.len() == q.len() && got.iter().zip(q).all(|(&a, &b)| i32::from(a) == b)
}

/// The layout this process's libtorch packs in, found once (None: none of the
/// candidates, or the op is missing; the kernel is then not used).
fn layout() -> Option<Layout> {
    static LAYOUT: OnceLock<Option<Layout>> = OnceLock::new();
    *LAYOUT.get_or_init(|| {
        // 112 rows: a whole block and a short one in every candidate's blocking.
        let (n, k) = (112usize, 64usize);
        let mut state = 0x2545_f491_u32;
        let nibbles: Vec<u8> = (0..n * k / 2)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (state >> 16) as u8
            })
            .collect();
        let (packed, q) = torch_pack(&nibbles, n, k)?;
        CANDIDATES
            .into_iter()
            .find(|&l| reads_back(l, &packed, &q, n, k))
    })
}

/// `nibbles` (the file's layout, `[n, k / 2]` bytes) packed for the kernel, with the
/// layout to read it back, or None when the kernel cannot take it (shape, an unknown
/// layout, or a read-back that differs from `nibbles`).
pub(crate) fn pack(nibbles: &[u8], n: i64, k: i64) -> Option<(Tensor, Layout)> {
    if !fits(n, k) || nibbles.len() as i64 != n * k / 2 {
        return None;
    }
    let layout = layout()?;
    let (n, k) = (n as usize, k as usize);
    let (packed, q) = torch_pack(nibbles, n, k)?;
    // Checked for every tensor, not only the probe: a stored weight must be the file's.
    reads_back(layout, &packed, &q, n, k).then_some((packed, layout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nibbles(n: usize, k: usize, seed: u32) -> Vec<u8> {
        let mut s = seed;
        (0..n * k / 2)
            .map(|_| {
                s = s.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
                (s >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn libtorch_packs_in_a_known_layout_and_it_reads_back() {
        let l = layout().expect("libtorch packs in one of the known layouts");
        for (n, k) in [(16, 32), (48, 64), (64, 32), (576, 96), (80, 160)] {
            let x = nibbles(n, k, n as u32 * 31 + k as u32);
            let (packed, got) = pack(&x, n as i64, k as i64).expect("packs");
            assert_eq!(got, l);
            let bytes = Vec::<u8>::try_from(packed.view([-1])).unwrap();
            assert_eq!(unpack(l, &bytes, n, k), x, "{n}x{k}");
        }
    }

    #[test]
    fn shapes_the_kernel_refuses_are_not_packed() {
        assert!(pack(&nibbles(8, 32, 1), 8, 32).is_none());
        assert!(!fits(16, 48));
    }
}

//! Links libtorch (rpath, CUDA) and compiles the C++ shims against the same libtorch:
//! `cpp/optim_shim.cpp` (libtorch's fused AdamW kernel and set-to-none gradients, which
//! `tch` does not expose), `cpp/mlp_shim.cpp` (a ReLU MLP as one autograd node: tch
//! has no custom autograd functions) and `cpp/codes_shim.cpp` (a matmul by a GGUF weight
//! kept in its codes whose backward rebuilds the weight).
fn main() {
    reuse_build::link_libtorch();
    reuse_build::compile_cpp(
        "reuse_core_cpp",
        &[
            "cpp/optim_shim.cpp",
            "cpp/mlp_shim.cpp",
            "cpp/codes_shim.cpp",
        ],
        "cpp",
        |_| {},
    );
}

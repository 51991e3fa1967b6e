//! Links libtorch (rpath, CUDA) and compiles the optimizer shim (`cpp/optim_shim.cpp`:
//! libtorch's fused AdamW kernel, which `tch` does not expose) against the same libtorch.
fn main() {
    reuse_build::link_libtorch();
    reuse_build::compile_cpp("reuse_core_cpp", &["cpp/optim_shim.cpp"], "cpp", |_| {});
}

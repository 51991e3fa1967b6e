//! Links libtorch (rpath, CUDA) and compiles the c10d shim (`cpp/c10d_shim.cpp`) against
//! the same libtorch. The wheel ships libtorch_cpu with Gloo inside but not Gloo's
//! headers; `cpp/gloo_decls` declares the few Gloo names `ProcessGroupGloo.hpp` mentions.
fn main() {
    reuse_build::link_libtorch();
    reuse_build::compile_cpp("reuse_dist_cpp", &["cpp/c10d_shim.cpp"], "cpp", |b| {
        b.include("cpp/gloo_decls").flag("-DUSE_C10D_GLOO");
    });
}

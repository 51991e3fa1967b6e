//! Links libtorch (rpath, CUDA) and compiles the c10d shim (`cpp/c10d_shim.cpp`) against
//! the same libtorch. The wheel ships libtorch_cpu with Gloo inside but not Gloo's
//! headers; `cpp/gloo_decls` declares the few Gloo names `ProcessGroupGloo.hpp` mentions.
fn main() {
    reuse_build::link_libtorch();
    println!("cargo:rerun-if-changed=cpp");
    let Some(torch) = reuse_build::libtorch_dir() else {
        panic!("LIBTORCH is not set; run `cargo xtask setup` to install torch 2.11.0 into .venv");
    };
    cc::Build::new()
        .cpp(true)
        .file("cpp/c10d_shim.cpp")
        .include("cpp/gloo_decls")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag("-DUSE_C10D_GLOO")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("reuse_dist_cpp");
}

//! Links libtorch (rpath, CUDA) and compiles the C++ autograd function behind
//! `QuantizedWeight`'s matmul (`cpp/dequant_matmul.cpp`) against the same libtorch.
fn main() {
    reuse_build::link_libtorch();
    println!("cargo:rerun-if-changed=cpp/dequant_matmul.cpp");
    let Some(torch) = reuse_build::libtorch_dir() else {
        panic!("LIBTORCH is not set; run `cargo xtask setup` to install torch 2.11.0 into .venv");
    };
    cc::Build::new()
        .cpp(true)
        .file("cpp/dequant_matmul.cpp")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("reuse_quant_cpp");
}

//! Links libtorch (rpath, CUDA) and compiles the C++ autograd function behind
//! `QuantizedWeight`'s matmul (`cpp/dequant_matmul.cpp`) against the same libtorch.
fn main() {
    reuse_build::link_libtorch();
    reuse_build::compile_cpp(
        "reuse_quant_cpp",
        &["cpp/dequant_matmul.cpp"],
        "cpp/dequant_matmul.cpp",
        |_| {},
    );
}

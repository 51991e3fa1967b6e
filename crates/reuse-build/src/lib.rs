//! Build-script helper shared by every package that builds a test, bench or binary
//! linked against libtorch.
//!
//! Two problems are fixed here once, instead of in each `build.rs`:
//!
//! * **Finding libtorch at run time.** `torch-sys` adds `-L <libtorch>/lib` but no rpath,
//!   and cargo only puts search paths inside `target/` on `LD_LIBRARY_PATH`, so test
//!   binaries would not start. We add `-Wl,-rpath,<libtorch>/lib`.
//! * **CUDA behind `--as-needed`.** Rust code calls no symbol of `libtorch_cuda.so`, so the
//!   linker drops it and `tch::Cuda::is_available()` is false on a GPU machine. When the
//!   library exists we link it with `--no-as-needed`.
//!
//! A third, [`compile_cpp`], builds a package's C++ shim (a few `extern "C"` functions
//! over libtorch's C++ API that `tch` does not expose) against the same libtorch, with
//! the flags the torch wheel needs.
//!
//! libtorch is found through `LIBTORCH` (set for the whole workspace in
//! `.cargo/config.toml` to `.venv/libtorch`, a link that `cargo xtask setup` makes).
//!
//! ```no_run
//! // The whole body of a package's `build.rs` `main`:
//! reuse_build::link_libtorch();
//! ```
#![deny(missing_docs)]

use std::env;
use std::path::PathBuf;

/// Where libtorch lives: `$LIBTORCH`, resolved through symbolic links.
pub fn libtorch_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env::var_os("LIBTORCH")?);
    Some(dir.canonicalize().unwrap_or(dir))
}

/// Emits the link arguments described in the crate doc. Call it from `build.rs`.
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(dir) = libtorch_dir() else {
        println!(
            "cargo:warning=LIBTORCH is not set; run `cargo xtask setup` to install torch 2.11.0 into .venv"
        );
        return;
    };
    let lib = dir.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// Compiles the C++ `files` (paths relative to the package) against libtorch's headers
/// into the static library `lib` and links it, re-running when `watch` changes.
/// `extra` adds what one shim needs beyond that (include folders, defines).
///
/// # Panics
/// When `LIBTORCH` is not set (the build cannot go on without it) or the compiler fails.
pub fn compile_cpp(lib: &str, files: &[&str], watch: &str, extra: impl FnOnce(&mut cc::Build)) {
    println!("cargo:rerun-if-changed={watch}");
    let Some(torch) = libtorch_dir() else {
        panic!("LIBTORCH is not set; run `cargo xtask setup` to install torch 2.11.0 into .venv");
    };
    let mut b = cc::Build::new();
    b.cpp(true)
        .files(files)
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false);
    extra(&mut b);
    b.compile(lib);
}

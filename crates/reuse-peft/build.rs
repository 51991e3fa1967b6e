fn main() {
    reuse_build::link_libtorch();
}

//! Keeps `libtorch_cuda.so` linked into `cohort-worker` when libtorch has one.
//! Nothing in the worker calls into it directly, so the linker's default
//! `--as-needed` would drop it, and libtorch would then never register its
//! CUDA backend: `tch::Cuda::is_available()` would be false on every GPU host.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        if lib.join("libtorch_cuda.so").exists() {
            println!(
                "cargo:rustc-link-arg-bin=cohort-worker=-Wl,--no-as-needed,-L{},-ltorch_cuda,--as-needed",
                lib.display()
            );
        }
    }
}

//! Compiles `csrc/grad_hooks.cpp` (the gradient hooks of `src/hooks.rs`)
//! and `csrc/module_buffers.cpp` (a TorchScript module's buffers, for
//! `src/model/torchscript.rs`) against the libtorch headers tch builds against: `$LIBTORCH`, which
//! `make setup` writes into `.cargo/config.toml` (the venv's torch),
//! or `$LIBTORCH_INCLUDE` when set, as torch-sys reads them.

use std::path::PathBuf;

fn env(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn main() {
    println!("cargo:rerun-if-changed=csrc/grad_hooks.cpp");
    println!("cargo:rerun-if-changed=csrc/module_buffers.cpp");
    let root = match env("LIBTORCH_INCLUDE").or_else(|| env("LIBTORCH")) {
        Some(dir) => PathBuf::from(dir),
        None => fail(
            "LIBTORCH is not set, so the libtorch headers the gradient hooks \
             (trainer/csrc/grad_hooks.cpp) compile against cannot be found: \
             run `make setup`, which writes it into .cargo/config.toml",
        ),
    };
    let include = root.join("include");
    let api = include.join("torch/csrc/api/include");
    let header = include.join("torch/csrc/autograd/function_hook.h");
    if !header.is_file() {
        fail(&format!(
            "{} is missing: LIBTORCH ({}) holds no libtorch headers; run \
             `make setup` (it points LIBTORCH at the venv's torch)",
            header.display(),
            root.display()
        ));
    }
    // The ABI torch 2.11's wheel is built with; torch-sys reads the same
    // variable with the same default.
    let abi = env("LIBTORCH_CXX11_ABI").unwrap_or_else(|| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .flag("-isystem")
        .flag(
            include
                .to_str()
                .unwrap_or_else(|| fail("LIBTORCH is not UTF-8")),
        )
        .flag("-isystem")
        .flag(
            api.to_str()
                .unwrap_or_else(|| fail("LIBTORCH is not UTF-8")),
        )
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        .file("csrc/grad_hooks.cpp")
        .file("csrc/module_buffers.cpp")
        .compile("cohort_grad_hooks");
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    println!("cargo:warning={msg}");
    std::process::exit(1);
}

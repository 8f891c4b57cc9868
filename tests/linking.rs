//! `cohort` does not link libtorch, by construction: the root package does
//! not depend on tch or the trainer (worker/ does). Checked on the built
//! binaries with `ldd`, which lists every shared library a binary loads,
//! its libraries' libraries included.

mod worker_bin;

use std::path::Path;
use std::process::Command;

/// The shared libraries `ldd` says `binary` loads (their file names).
fn shared_libraries(binary: &Path) -> Vec<String> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .expect("run ldd (Debian: libc-bin)");
    assert!(
        out.status.success(),
        "ldd {} failed: {}",
        binary.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(|lib| lib.rsplit('/').next().unwrap_or(lib).to_owned())
        .collect()
}

fn is_libtorch(lib: &str) -> bool {
    lib.starts_with("libtorch") || lib.starts_with("libc10")
}

#[test]
fn cohort_has_no_libtorch_among_its_shared_libraries() {
    let libs = shared_libraries(Path::new(env!("CARGO_BIN_EXE_cohort")));
    let torch: Vec<&String> = libs.iter().filter(|l| is_libtorch(l)).collect();
    assert!(torch.is_empty(), "cohort loads {torch:?} (all: {libs:?})");
    assert!(libs.iter().any(|l| l.starts_with("libc.so")), "{libs:?}");
}

/// The check above would pass on a binary ldd can't read: the worker, built
/// the same way, must show libtorch, and libtorch_cuda where libtorch has it
/// (worker/build.rs keeps it linked, or CUDA would never be registered).
#[test]
fn the_worker_links_libtorch_and_keeps_libtorch_cuda() {
    let libs = shared_libraries(worker_bin::ensure());
    for want in ["libtorch_cpu.so", "libc10.so"] {
        assert!(libs.iter().any(|l| l == want), "no {want} in {libs:?}");
    }
    let libtorch = option_env!("LIBTORCH").map(Path::new);
    if libtorch.is_some_and(|dir| dir.join("lib/libtorch_cuda.so").exists()) {
        assert!(
            libs.iter().any(|l| l == "libtorch_cuda.so"),
            "no libtorch_cuda.so in {libs:?}"
        );
    }
}

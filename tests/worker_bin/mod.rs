//! The `cohort-worker` that the `cohort` binary under test runs from its own
//! directory, built from this checkout. It is another package (worker/), and
//! cargo builds a package's binaries only for that package's own tests: a
//! test of this package that needs the worker calls [`ensure`] first, which
//! builds it (a no-op when `cargo test --workspace` just did) next to
//! `cohort`, with the same profile.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Builds `cohort-worker` next to `CARGO_BIN_EXE_cohort` (once per test
/// process) and returns its path.
pub fn ensure() -> &'static Path {
    static WORKER: OnceLock<PathBuf> = OnceLock::new();
    WORKER.get_or_init(|| {
        let cohort = Path::new(env!("CARGO_BIN_EXE_cohort"));
        let profile_dir = cohort.parent().expect("cohort's directory");
        let target_dir = profile_dir.parent().expect("the target directory");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(name) => name,
            None => panic!("no profile in {}", cohort.display()),
        };
        let out = Command::new(env!("CARGO"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "build",
                "--quiet",
                "-p",
                "cohort-worker",
                "--profile",
                profile,
            ])
            .arg("--target-dir")
            .arg(target_dir)
            .output()
            .expect("running cargo to build cohort-worker");
        assert!(
            out.status.success(),
            "building cohort-worker failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let worker = profile_dir.join("cohort-worker");
        assert!(worker.is_file(), "{} was not built", worker.display());
        worker
    })
}

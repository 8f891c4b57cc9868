//! One module per `cohort` subcommand.

pub mod bench;
pub mod ckpt;
pub mod coordinator;
pub mod doctor;
pub mod launch;

/// The `cohort-worker` binary next to this `cohort` binary: the process
/// `launch` runs for every rank of a config job, and `doctor`'s libtorch probe.
pub fn worker_binary() -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let exe = std::env::current_exe().context("cannot locate the cohort binary")?;
    let worker = exe.with_file_name("cohort-worker");
    anyhow::ensure!(
        worker.is_file(),
        "{} not found: cohort runs cohort-worker from its own directory \
         (build both with `make build`, or `cargo build --release --bins`)",
        worker.display()
    );
    Ok(worker)
}

/// Logs go to stderr through `tracing`, filtered by `RUST_LOG` (default: info).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // No colour codes in a log file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

//! One module per `cohort` subcommand.

pub mod bench;
pub mod ckpt;
pub mod coordinator;
pub mod doctor;
pub mod launch;

/// Logs go to stderr through `tracing`, filtered by `RUST_LOG` (default: info).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

//! Errors of the launcher, the coordinator and the coordinator store.

use std::path::PathBuf;
use std::time::Duration;

/// What went wrong in the launcher, the coordinator or a coordinator client.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    /// The coordinator could not listen (port in use, address not local).
    #[error(
        "cannot listen on {addr}: {source} (is another coordinator using the port? pick another one, or port 0 for any free port)"
    )]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// No generation formed while this node waited to join one.
    #[error(
        "no generation formed within {waited:?} at the coordinator {addr} (--nnodes {nnodes}): \
         are the other nodes started with the same --coordinator, --job-id and --token? \
         (--rendezvous-timeout SECS waits longer)"
    )]
    RendezvousTimeout {
        addr: String,
        waited: Duration,
        nnodes: String,
    },
    /// A coordinator address that is not HOST:PORT.
    #[error("invalid coordinator address {addr:?}: {reason} (expected HOST:PORT)")]
    InvalidAddress { addr: String, reason: String },
    /// Nothing answered at the coordinator's address, even after retrying.
    #[error(
        "could not reach the coordinator at {addr} ({attempts} attempts over {waited:.1?}): {last_error}; \
         check that `cohort coordinator` (or the first node's `cohort launch --coordinator-bind`) runs there \
         and that the port is reachable from this host"
    )]
    Unreachable {
        addr: String,
        attempts: u32,
        waited: Duration,
        last_error: String,
    },
    /// The coordinator refused the job token.
    #[error(
        "the coordinator at {addr} refused our job token ({message}); use the token it was started with"
    )]
    Unauthenticated { addr: String, message: String },
    /// Any other failed call to the coordinator.
    #[error("coordinator {addr}: {call} failed: {code:?}: {message}")]
    Rpc {
        addr: String,
        call: &'static str,
        code: tonic::Code,
        message: String,
    },
    /// The coordinator did not answer for longer than `--coordinator-grace`.
    #[error(
        "lost the coordinator at {addr}: no answer for {waited:.1?} ({last_error}), longer than \
         --coordinator-grace {grace:?}; stopped this node's workers. A coordinator started with \
         --state-dir can be restarted on the same address to carry on the job"
    )]
    LostCoordinator {
        addr: String,
        waited: Duration,
        grace: Duration,
        last_error: String,
    },
    /// `cohort coordinator --state-dir`: a state file that can't be carried on.
    #[error("{}: {reason}", path.display())]
    StateFile { path: PathBuf, reason: String },
    /// A job token that can't be sent in a header.
    #[error("the job token must be printable ASCII without spaces")]
    InvalidToken,
    /// The worker environment lacks what a worker of a job needs.
    #[error(transparent)]
    Contract(#[from] cohort_contract::ContractError),
    /// The store directory of ranks started by hand can't be used.
    #[error("the store directory {}={}: {error}", cohort_contract::var::STORE_DIR, path.display())]
    StoreDir {
        path: PathBuf,
        error: cohort_collectives::StoreError,
    },
    /// Options that don't make sense together.
    #[error("{0}")]
    Usage(String),
    /// A file or directory of the launcher (logs, status files, config).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A worker could not be started.
    #[error("cannot start worker program {program:?}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// The async runtime could not be created.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl LauncherError {
    /// Usage and configuration errors (exit code 2) as opposed to failures of
    /// the job or its infrastructure (exit code 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::Bind { .. }
                | Self::InvalidAddress { .. }
                | Self::InvalidToken
                | Self::Unauthenticated { .. }
                | Self::Usage(_)
                | Self::StateFile { .. }
        )
    }
}

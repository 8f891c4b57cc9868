//! Errors of the communicator.
//!
//! Two classes, as in Gloo. [`CommError::InvalidArgument`] is raised before
//! any byte moves: the communicator stays usable. Every other error (a
//! timeout, a peer that closed or aborted, a desync, an I/O error, an abort
//! through the [`AbortHandle`](crate::AbortHandle)) leaves the
//! byte streams between ranks in an unknown state: the communicator tells its
//! peers, closes its connections and answers [`CommError::Broken`] from then
//! on. Rebuild it (a new `Communicator`, under a new store prefix) to go on.

use std::time::Duration;

use crate::store::StoreError;

/// An error of a collective or of building a communicator.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// Bad arguments; nothing was sent, and the communicator is still usable.
    #[error("invalid argument to {op}: {reason}")]
    InvalidArgument { op: &'static str, reason: String },

    /// The ranks called different collectives (kind, dtype, count, op,
    /// algorithm, root) at the same sequence number.
    #[error(
        "desync on rank {rank}: this rank called {ours}, but rank {peer} called {theirs}; \
         every rank must call the same collectives in the same order with the same \
         dtype, count, reduce op, root and algorithm. The communicator is broken: rebuild it"
    )]
    Desync {
        rank: usize,
        peer: usize,
        ours: String,
        theirs: String,
    },

    /// An operation did not finish in time.
    #[error(
        "{op} on rank {rank} timed out after {waited:?} waiting on rank {peer} ({what}); \
         that rank may be stuck, stopped, slow or in a different collective (see its log). \
         The communicator is broken: rebuild it"
    )]
    Timeout {
        rank: usize,
        peer: usize,
        op: String,
        what: &'static str,
        waited: Duration,
    },

    /// A peer's connection ended in the middle of an operation.
    #[error(
        "{op} on rank {rank}: connection to rank {peer} ended ({detail}); that rank probably \
         exited or failed (see its log). The communicator is broken: rebuild it"
    )]
    PeerClosed {
        rank: usize,
        peer: usize,
        op: String,
        detail: String,
    },

    /// A peer failed an operation and told this rank why before closing.
    #[error("{op} on rank {rank}: rank {peer} aborted the operation: {reason}")]
    PeerAborted {
        rank: usize,
        peer: usize,
        op: String,
        reason: String,
    },

    /// The op was aborted through the communicator's
    /// [`AbortHandle`](crate::AbortHandle) (a peer is known to be gone).
    #[error("{op} on rank {rank} was aborted: {reason}. The communicator is broken: rebuild it")]
    Aborted {
        rank: usize,
        op: String,
        reason: String,
    },

    /// A peer did not prove the job token, or refused ours.
    #[error(
        "authentication with {peer} failed: {reason} (is COHORT_TOKEN the same for every \
         rank of the job?)"
    )]
    Auth { peer: String, reason: String },

    /// A socket or system call failed outside of a collective.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// Bootstrap through the store failed.
    #[error("bootstrap store: {0}")]
    Store(#[from] StoreError),

    /// Settings that can't work (a bad address, an unusable device).
    #[error("configuration: {0}")]
    Config(String),

    /// The NCCL backend can't run here (no CUDA driver or device, or NCCL
    /// does not load); nothing was started.
    #[error("the nccl backend is not usable: {0}")]
    Unavailable(String),

    /// NCCL or the CUDA driver failed an operation, or it did not finish in
    /// time (the watchdog aborted it).
    #[error(
        "{op} on rank {rank} (NCCL): {detail}. The communicator is broken: rebuild it \
         (NCCL_DEBUG=WARN in the environment makes NCCL print its own account)"
    )]
    Nccl {
        rank: usize,
        op: String,
        detail: String,
    },

    /// An earlier error broke this communicator.
    #[error(
        "communicator of rank {rank} is broken by an earlier error ({cause}); rebuild it \
         (create a new Communicator) to continue"
    )]
    Broken { rank: usize, cause: String },
}

impl CommError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CommError::Io {
            context: context.into(),
            source,
        }
    }
}

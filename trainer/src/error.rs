//! The trainer's errors: each says what failed, where, and what to do.

use std::path::PathBuf;

use cohort_collectives::CommError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A collective failed; the communicator is broken and the job must
    /// restart (the launcher does this from the last checkpoint).
    #[error("rank {rank}: {op} failed")]
    Comm {
        op: &'static str,
        rank: usize,
        #[source]
        source: CommError,
    },
    /// libtorch raised an error.
    #[error("libtorch error during {context}")]
    Torch {
        context: String,
        #[source]
        source: tch::TchError,
    },
    /// A data file could not be read.
    #[error(
        "cannot read data file {path}: {source} (check data.path; relative paths are relative to the directory the job runs in)"
    )]
    DataRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A data file is not usable.
    #[error("data file {path}: {reason}")]
    DataInvalid { path: PathBuf, reason: String },
    /// A config value or API argument that cannot work.
    #[error("{0}")]
    Config(String),
    /// The worker environment lacks what this use of it needs, or a status
    /// file can't be written.
    #[error(transparent)]
    Contract(#[from] cohort_contract::ContractError),
    /// Saving or loading a checkpoint.
    #[error(transparent)]
    Checkpoint(#[from] cohort_checkpoint::CkptError),
    /// A failed peer could not be replaced in place; the job restarts from
    /// the newest checkpoint on disk (the worker exits with
    /// `cohort_contract::exit::RECOVERY_FAILED`).
    #[error("in-place recovery failed: {0}; the job restarts from the newest checkpoint on disk")]
    RecoveryFailed(String),
    /// Writing metrics or status files.
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl TrainError {
    /// Whether a restart would fail the same way: the job's configuration
    /// or input is wrong (a config value or API argument that can't work, a
    /// data file that can't be read or used, a checkpoint of another model
    /// or not a checkpoint at all, a checkpoint directory that can't be
    /// written), or a disk is full. The worker exits with
    /// `cohort_contract::exit::PERMANENT_FAILURE` for these, and the
    /// launcher does not restart the job.
    pub fn is_permanent(&self) -> bool {
        use cohort_checkpoint::CkptError;
        match self {
            TrainError::Config(_) | TrainError::DataInvalid { .. } => true,
            TrainError::DataRead { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut
            ),
            TrainError::Checkpoint(
                CkptError::Incompatible { .. }
                | CkptError::NotACheckpoint { .. }
                | CkptError::NotWritable { .. },
            ) => true,
            TrainError::Checkpoint(CkptError::Io { error, .. }) => is_full(error),
            TrainError::Comm { .. }
            | TrainError::Torch { .. }
            | TrainError::Contract(_)
            | TrainError::RecoveryFailed(_) => false,
            TrainError::Checkpoint(_) | TrainError::Io { .. } => is_disk_full(self),
        }
    }

    /// The error for `rank`'s collective `op`, from the communicator's: for
    /// `map_err`.
    pub(crate) fn comm(rank: usize, op: &'static str) -> impl Fn(CommError) -> TrainError {
        move |source| TrainError::Comm { op, rank, source }
    }
}

/// Whether an I/O error in `err`'s chain says a disk (or quota) is full.
pub fn is_disk_full(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<std::io::Error>().is_some_and(is_full) {
            return true;
        }
        cur = e.source();
    }
    false
}

fn is_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

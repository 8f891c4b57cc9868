//! The one error type of the crate. Every variant names the file or directory
//! it is about, so a message alone tells the user where to look.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CkptError {
    /// An operating-system call on `path` failed.
    #[error("could not {op} {}: {error}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        // In the message, not a `#[source]`: a `{:#}` chain would print it twice.
        error: io::Error,
    },

    /// `Saver::new` could not create or write a probe file in the root.
    #[error(
        "checkpoint directory {} is not writable ({error}); point the checkpoint directory at a writable path on storage every rank can see",
        root.display()
    )]
    NotWritable {
        root: PathBuf,
        // In the message, not a `#[source]`: a `{:#}` chain would print it twice.
        error: io::Error,
    },

    /// The path given is neither a step directory nor a checkpoint root.
    #[error(
        "{} is not a checkpoint: {detail}; pass a step directory (step-NNNNNNNN/ with manifest.json) or a checkpoint root (holding `latest`)",
        path.display()
    )]
    NotACheckpoint { path: PathBuf, detail: String },

    /// The checkpoint root's lease is held by another writer (fencing).
    #[error(
        "checkpoint root {} is leased by {holder}: {detail} (see {}/lease.json)",
        root.display(),
        root.display()
    )]
    Fenced {
        root: PathBuf,
        holder: String,
        detail: String,
    },

    /// Checkpoints exist under a root, but none of them verifies.
    #[error(
        "no checkpoint in {} verifies, so there is nothing to resume from:\n  {}\nrepair or remove them, resume from a copy (--resume PATH), or start over on purpose with --resume never",
        root.display(),
        failures.join("\n  ")
    )]
    NoneVerifies {
        root: PathBuf,
        failures: Vec<String>,
    },

    /// `manifest.json` is missing, truncated, not JSON, or inconsistent.
    #[error("bad manifest {}: {detail}", path.display())]
    Manifest { path: PathBuf, detail: String },

    /// A shard file listed in the manifest does not exist.
    #[error("missing shard file {} (listed in the manifest); this checkpoint cannot be loaded, use an older one", file.display())]
    MissingFile { file: PathBuf },

    /// A shard file has a different size than the manifest records.
    #[error("{} has {actual} bytes, the manifest records {expected}: the file is truncated or was replaced", file.display())]
    SizeMismatch {
        file: PathBuf,
        expected: u64,
        actual: u64,
    },

    /// A file's crc32c differs from the one recorded when it was written.
    #[error(
        "checksum mismatch in {}: expected crc32c {expected:#010x}, actual {actual:#010x}; the file is corrupt, use an older checkpoint",
        file.display()
    )]
    Checksum {
        file: PathBuf,
        expected: u32,
        actual: u32,
    },

    /// A shard file's safetensors header is unreadable or does not hold the
    /// tensors the manifest promises.
    #[error("bad shard file {}: {detail}", file.display())]
    BadShardFile { file: PathBuf, detail: String },

    /// The checkpoint's parameter layout differs from the model's.
    #[error("checkpoint does not fit this model: {detail}")]
    Incompatible { detail: String },

    /// The caller asked for something inconsistent (wrong shard size, rank
    /// out of range, ...). A bug in the caller, reported instead of panicking.
    #[error("invalid checkpoint request: {0}")]
    Invalid(String),

    /// Rank 0 waited `timeout` for the other ranks' shards of a step.
    #[error(
        "timed out after {timeout:?} waiting for ranks {missing:?} to finish their shards in {}; the step was not committed and the previous checkpoint stays in use (is the checkpoint directory on storage every rank sees?)",
        dir.display()
    )]
    CommitTimeout {
        dir: PathBuf,
        missing: Vec<usize>,
        timeout: Duration,
    },

    /// The background writer thread panicked.
    #[error("the background checkpoint writer thread died; the save in flight did not complete")]
    WriterDied,
}

impl CkptError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |error| CkptError::Io { op, path, error }
    }
}

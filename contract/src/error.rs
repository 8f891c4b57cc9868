//! What can be wrong with the worker environment and the files of the contract.

use std::path::PathBuf;

/// A variable of the worker environment that is missing or malformed, a bad
/// fault-injection spec, or a status file that can't be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    /// A variable that this use of the environment needs is not set.
    #[error("{name} is not set: {hint}")]
    Missing {
        name: &'static str,
        /// What to do about it.
        hint: &'static str,
    },
    /// A variable with a value that can't be used.
    #[error("environment variable {name}={value:?}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
    /// `COHORT_INJECT_FAULT` could not be parsed.
    #[error(
        "bad COHORT_INJECT_FAULT {spec:?}: {detail}; expected \"rank=R,step=S\" or \"rank=R,step=S,at=commit\""
    )]
    FaultSpec { spec: String, detail: String },
    /// Reading or writing a status file (the message includes the OS
    /// error, so it is not repeated as a source).
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

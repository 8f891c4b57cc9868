//! cohort's worker contract: what the launcher and the processes it starts
//! agree on, in one place, with nothing heavier than serde below it.
//!
//! - [`var`]: the name of every environment variable of the contract;
//! - [`WorkerEnv`]: the worker environment as one typed value, written by
//!   the node agent ([`WorkerEnv::vars`]) and read by the worker
//!   ([`WorkerEnv::from_env`]), with errors that name the variable and its
//!   bad value; [`CommEnv`] is its collectives' part;
//! - [`WorkerProgress`]: the status file a worker replaces with its progress
//!   and its agent reads to detect hangs;
//! - [`FaultSpec`]: `COHORT_INJECT_FAULT`, the recovery drills;
//! - [`exit`]: the status of a failure that a restart can't fix;
//! - [`recovery`]: the store keys and records of an in-place recovery;
//! - [`shard_range`]: which elements of a flat buffer each rank owns.
//!
//! Only the processes read their environment: the worker binary (and a
//! user's own program) through [`WorkerEnv::from_env`], `cohort` for its own
//! flags; the libraries below them take the values they need.
//!
//! ```
//! use cohort_contract::{WorkerEnv, var};
//!
//! // What a node agent gives rank 1 of a job of two...
//! let written = WorkerEnv { rank: 1, local_rank: 1, world: 2, local_world: 2, ..WorkerEnv::default() };
//! let vars = written.vars();
//! // ...is what that worker reads back.
//! let get = |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
//! let read = WorkerEnv::from_lookup(get)?;
//! assert_eq!(read, written);
//! assert!(vars.iter().any(|(k, v)| *k == var::WORLD_SIZE && v == "2"));
//! # Ok::<(), cohort_contract::ContractError>(())
//! ```

mod env;
mod error;
pub mod exit;
mod fault;
pub mod recovery;
mod shard;
mod status;
pub mod var;

pub use env::{
    CommEnv, CoordinatorJob, DEFAULT_COLLECTIVE_TIMEOUT, Resume, Role, UserSet, WorkerEnv,
    omp_num_threads_for,
};
pub use error::ContractError;
pub use fault::{FaultPoint, FaultSpec};
pub use shard::shard_range;
pub use status::{Resumed, WorkerProgress};

/// `e` and its sources on one line, each once: a message that already
/// quotes its source (`cannot read X: No such file`) does not repeat it
/// ("transport error: connection refused").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

//! cohort launcher: the gRPC coordinator (rendezvous, key-value store,
//! heartbeats, restarts), the node agent that runs workers, and the pieces of
//! `cohort launch` and `cohort coordinator`.
//!
//! - [`decision`]: the coordinator's and agent's decisions as pure functions.
//! - [`coordinator`]: the job state machine, its tonic service and server.
//! - [`agent`] and [`worker`]: a node's workers, heartbeats, hang detection.
//! - [`store`]: the coordinator's key-value store as a collectives `Store`
//!   for workers, and [`worker_store`]: the store a worker's ranks bootstrap
//!   through, from its [`cohort_contract::WorkerEnv`].
//! - [`errorfile`]: torch.distributed.elastic's error files and the root
//!   cause they name; [`netif`]: the interface carrying an address.
//! - [`launch`]: `cohort launch` / `cohort coordinator` as library calls.
//! - [`reaper`]: no process of a job outlives its launcher.
//! - [`recovery`]: the agent's side of in-place recovery (a new epoch, its
//!   notice, the replacement's `Done`).
//! - [`sched`]: a node's place in a Slurm or Kubernetes job, from their env.

pub mod agent;
pub mod auth;
pub mod client;
pub mod console;
pub mod coordinator;
pub mod decision;
mod error;
pub mod errorfile;
pub mod fatal;
mod kv;
pub mod launch;
pub mod netif;
pub mod reaper;
pub mod recovery;
pub mod sched;
pub mod store;
pub mod worker;

pub use agent::{RecoveryPolicy, WorkerCommand};
pub use decision::NodeRange;
pub use error::LauncherError;
pub use launch::{CoordinatorMode, CoordinatorOptions, LaunchOptions, Timing, launch, serve};
pub use store::{CoordinatorStore, worker_store};

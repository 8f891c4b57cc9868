//! The name of every variable of the worker environment, written once.
//!
//! The first group is torchrun's (with the meanings torch.distributed.elastic
//! gives them), so a PyTorch script using `init_method="env://"`, `@record`
//! or `TORCHELASTIC_RESTART_COUNT` runs unchanged under `cohort launch`; the
//! `COHORT_*` ones are cohort's own. [`crate::WorkerEnv`] reads and writes
//! them; see its fields for what each holds.

/// This worker's rank in the job, `0..WORLD_SIZE`.
pub const RANK: &str = "RANK";
/// This worker's rank on its node, `0..LOCAL_WORLD_SIZE`.
pub const LOCAL_RANK: &str = "LOCAL_RANK";
/// The number of workers in the job.
pub const WORLD_SIZE: &str = "WORLD_SIZE";
/// The number of workers on this node.
pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
/// This node's rank in the job.
pub const GROUP_RANK: &str = "GROUP_RANK";
/// The address of node 0 (for PyTorch's `env://` rendezvous).
pub const MASTER_ADDR: &str = "MASTER_ADDR";
/// A free port on node 0 (for PyTorch's `env://` rendezvous).
pub const MASTER_PORT: &str = "MASTER_PORT";
/// The number of nodes in the job.
pub const GROUP_WORLD_SIZE: &str = "GROUP_WORLD_SIZE";
/// The workers' role (`--role`, `default` unless given).
pub const ROLE_NAME: &str = "ROLE_NAME";
/// This worker's rank among the workers of its role.
pub const ROLE_RANK: &str = "ROLE_RANK";
/// The number of workers of this worker's role.
pub const ROLE_WORLD_SIZE: &str = "ROLE_WORLD_SIZE";
/// How many times the job has restarted (torchrun's name of
/// [`RESTART_COUNT`]).
pub const TORCHELASTIC_RESTART_COUNT: &str = "TORCHELASTIC_RESTART_COUNT";
/// `--max-restarts`.
pub const TORCHELASTIC_MAX_RESTARTS: &str = "TORCHELASTIC_MAX_RESTARTS";
/// The job's id (torchrun's name of [`JOB_ID`]).
pub const TORCHELASTIC_RUN_ID: &str = "TORCHELASTIC_RUN_ID";
/// Always `False`: the workers host their own store at
/// `MASTER_ADDR:MASTER_PORT` (`env://`), none is shared with the launcher.
pub const TORCHELASTIC_USE_AGENT_STORE: &str = "TORCHELASTIC_USE_AGENT_STORE";
/// The file `@record` (torch.distributed.elastic) writes a worker's
/// uncaught exception to; one per worker under the attempt's log directory.
pub const TORCHELASTIC_ERROR_FILE: &str = "TORCHELASTIC_ERROR_FILE";
/// `1` unless the launcher's environment sets it: NCCL errors abort the
/// process group instead of hanging it.
pub const TORCH_NCCL_ASYNC_ERROR_HANDLING: &str = "TORCH_NCCL_ASYNC_ERROR_HANDLING";
/// The interface carrying this node's address, unless the launcher's
/// environment sets it (Gloo's host name lookup can give a loopback address).
pub const GLOO_SOCKET_IFNAME: &str = "GLOO_SOCKET_IFNAME";
/// As [`GLOO_SOCKET_IFNAME`], for NCCL's sockets.
pub const NCCL_SOCKET_IFNAME: &str = "NCCL_SOCKET_IFNAME";
/// OpenMP's thread count; 1 when several workers share a host and the
/// launcher's own environment leaves it unset (see
/// [`crate::omp_num_threads_for`]).
pub const OMP_NUM_THREADS: &str = "OMP_NUM_THREADS";

/// The coordinator's `HOST:PORT`.
pub const COORDINATOR: &str = "COHORT_COORDINATOR";
/// The job's id.
pub const JOB_ID: &str = "COHORT_JOB_ID";
/// The generation (rendezvous round) this worker belongs to.
pub const GENERATION: &str = "COHORT_GENERATION";
/// How many times the job has restarted (0 in its first attempt).
pub const RESTART_COUNT: &str = "COHORT_RESTART_COUNT";
/// The communicator epoch a worker joins (0 unless it replaces a failed
/// rank in place; see `cohort_contract::recovery`).
pub const EPOCH: &str = "COHORT_EPOCH";
/// The job secret every rank proves to its peers and to the coordinator.
pub const TOKEN: &str = "COHORT_TOKEN";
/// The job's log directory, `<log-dir>/<job-id>`.
pub const LOG_DIR: &str = "COHORT_LOG_DIR";
/// The address other nodes reach this node at.
pub const HOST: &str = "COHORT_HOST";
/// The file a worker replaces with its progress ([`crate::WorkerProgress`]).
pub const STATUS_FILE: &str = "COHORT_STATUS_FILE";
/// A directory shared by every rank to bootstrap through, for ranks started
/// by hand (without `cohort launch`).
pub const STORE_DIR: &str = "COHORT_STORE_DIR";
/// Where the built-in trainer resumes from: `auto`, `never` or a path
/// ([`crate::Resume`]).
pub const RESUME: &str = "COHORT_RESUME";
/// A fault to inject in the job's first attempt ([`crate::FaultSpec`]).
pub const INJECT_FAULT: &str = "COHORT_INJECT_FAULT";
/// The collectives' default op timeout (and bootstrap timeout), in seconds.
pub const COLLECTIVE_TIMEOUT_S: &str = "COHORT_COLLECTIVE_TIMEOUT_S";

/// Every name above.
pub const ALL: &[&str] = &[
    RANK,
    LOCAL_RANK,
    WORLD_SIZE,
    LOCAL_WORLD_SIZE,
    GROUP_RANK,
    GROUP_WORLD_SIZE,
    ROLE_NAME,
    ROLE_RANK,
    ROLE_WORLD_SIZE,
    TORCHELASTIC_RESTART_COUNT,
    TORCHELASTIC_MAX_RESTARTS,
    TORCHELASTIC_RUN_ID,
    TORCHELASTIC_USE_AGENT_STORE,
    TORCHELASTIC_ERROR_FILE,
    TORCH_NCCL_ASYNC_ERROR_HANDLING,
    GLOO_SOCKET_IFNAME,
    NCCL_SOCKET_IFNAME,
    MASTER_ADDR,
    MASTER_PORT,
    OMP_NUM_THREADS,
    COORDINATOR,
    JOB_ID,
    GENERATION,
    RESTART_COUNT,
    EPOCH,
    TOKEN,
    LOG_DIR,
    HOST,
    STATUS_FILE,
    STORE_DIR,
    RESUME,
    INJECT_FAULT,
    COLLECTIVE_TIMEOUT_S,
];

//! The worker environment: what `cohort launch`'s node agent gives every
//! worker ([`WorkerEnv::vars`]) and what a worker reads back
//! ([`WorkerEnv::from_env`]), one typed value for both sides. Without any of
//! it a program runs as a single process (world 1), so the same binary
//! trains alone or in a job. An empty variable counts as unset.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::{ContractError, FaultPoint, FaultSpec, var};

/// The collectives' op timeout (and bootstrap timeout) when
/// `COHORT_COLLECTIVE_TIMEOUT_S` is unset.
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// What `cohort launch` says when a worker of a job misses part of the
/// launcher's environment.
const UNDER_LAUNCH: &str = "this program must be started by `cohort launch`";

/// Where the built-in trainer resumes from (`COHORT_RESUME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest checkpoint in `checkpoint.dir` that verifies, if any.
    Auto,
    /// Start fresh.
    Never,
    /// This step directory or checkpoint root.
    Path(PathBuf),
}

impl Resume {
    /// `auto` (also empty), `never`, or a path.
    pub fn parse(value: impl AsRef<OsStr>) -> Self {
        let value = value.as_ref();
        match value.to_str().map(str::trim) {
            Some("" | "auto") => Resume::Auto,
            Some("never") => Resume::Never,
            Some(path) => Resume::Path(PathBuf::from(path)),
            None => Resume::Path(PathBuf::from(value)),
        }
    }

    /// The value of `COHORT_RESUME` that [`Resume::parse`] reads back.
    pub fn to_env_value(&self) -> OsString {
        match self {
            Resume::Auto => "auto".into(),
            Resume::Never => "never".into(),
            Resume::Path(path) => path.clone().into_os_string(),
        }
    }
}

/// What a rank's collectives take from the environment: the job secret,
/// the address to advertise, the default op timeout.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CommEnv {
    /// `COHORT_TOKEN`: the job secret every rank proves on connect.
    pub token: Option<String>,
    /// `COHORT_HOST`: the address other nodes reach this one at; unset, the
    /// ranks talk over 127.0.0.1 (one host).
    pub host: Option<String>,
    /// `COHORT_COLLECTIVE_TIMEOUT_S`: the default op timeout (and bootstrap
    /// timeout) of every backend; see [`CommEnv::op_timeout`].
    pub timeout: Option<Duration>,
}

impl std::fmt::Debug for CommEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommEnv")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("host", &self.host)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl CommEnv {
    /// Reads `COHORT_TOKEN`, `COHORT_HOST` and `COHORT_COLLECTIVE_TIMEOUT_S`
    /// from this process's environment.
    pub fn from_env() -> Result<Self, ContractError> {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// As [`CommEnv::from_env`], reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<OsString>) -> Result<Self, ContractError> {
        Vars(get).comm()
    }

    /// The job secret; an error saying how to give one if it is unset.
    pub fn token(&self) -> Result<&str, ContractError> {
        self.token.as_deref().ok_or(ContractError::Missing {
            name: var::TOKEN,
            hint: "every rank needs the job secret (cohort launch sets it; set it yourself when starting ranks by hand)",
        })
    }

    /// The default op timeout: `COHORT_COLLECTIVE_TIMEOUT_S`, else
    /// [`DEFAULT_COLLECTIVE_TIMEOUT`].
    pub fn op_timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_COLLECTIVE_TIMEOUT)
    }
}

/// Where a worker sits in its job and what its launcher told it. The node
/// agent builds one per worker and writes it with [`WorkerEnv::vars`]; the
/// worker reads it with [`WorkerEnv::from_env`]. [`WorkerEnv::default`] is a
/// single process: rank 0 of a world of one, nothing else set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerEnv {
    /// `RANK` (default 0).
    pub rank: usize,
    /// `LOCAL_RANK` (default: `RANK`).
    pub local_rank: usize,
    /// `WORLD_SIZE` (default 1).
    pub world: usize,
    /// `LOCAL_WORLD_SIZE`: workers on this node (default 1).
    pub local_world: usize,
    /// `GROUP_RANK`: this node's rank (default 0).
    pub node_rank: usize,
    /// `GROUP_WORLD_SIZE`: the nodes in the job (default 1).
    pub group_world: usize,
    /// `ROLE_NAME`, `ROLE_RANK`, `ROLE_WORLD_SIZE`.
    pub role: Role,
    /// `TORCHELASTIC_MAX_RESTARTS` (default 0).
    pub max_restarts: u32,
    /// `TORCHELASTIC_ERROR_FILE`: where `@record` writes this worker's
    /// uncaught exception.
    pub error_file: Option<PathBuf>,
    /// `TORCH_NCCL_ASYNC_ERROR_HANDLING`, as given.
    pub nccl_async_error_handling: Option<String>,
    /// `GLOO_SOCKET_IFNAME`, as given.
    pub gloo_socket_ifname: Option<String>,
    /// `NCCL_SOCKET_IFNAME`, as given.
    pub nccl_socket_ifname: Option<String>,
    /// `MASTER_ADDR`: node 0's address, for PyTorch's `env://`.
    pub master_addr: Option<String>,
    /// `MASTER_PORT`: a free port on node 0, for PyTorch's `env://`.
    pub master_port: Option<u16>,
    /// `COHORT_COORDINATOR`: the coordinator's `HOST:PORT`.
    pub coordinator: Option<String>,
    /// `COHORT_JOB_ID` (read from `TORCHELASTIC_RUN_ID` when unset, and
    /// written to both).
    pub job_id: Option<String>,
    /// `COHORT_GENERATION`: the rendezvous round this worker belongs to.
    pub generation: Option<u64>,
    /// `COHORT_RESTART_COUNT`: how many times the job has restarted (0 on
    /// the first run); read from `TORCHELASTIC_RESTART_COUNT` when unset,
    /// and written to both.
    pub restart_count: u64,
    /// `COHORT_EPOCH`: the communicator epoch this worker joins: 0 for the
    /// workers a generation starts with, N for the worker that replaces a
    /// failed rank in place after the job's N-th in-place recovery (see
    /// [`crate::recovery`]).
    pub epoch: u64,
    /// The collectives' part: token, host, op timeout.
    pub comm: CommEnv,
    /// `COHORT_LOG_DIR`: the job's log directory (the trainer's rank 0
    /// writes `metrics.jsonl` there).
    pub log_dir: Option<PathBuf>,
    /// `COHORT_STATUS_FILE`: the file the worker replaces with its progress
    /// ([`crate::WorkerProgress`]).
    pub status_file: Option<PathBuf>,
    /// `COHORT_STORE_DIR`: a directory shared by every rank to bootstrap
    /// through instead of the coordinator (ranks started by hand).
    pub store_dir: Option<PathBuf>,
    /// `COHORT_RESUME`: where the built-in trainer resumes from; unset
    /// means [`Resume::Auto`].
    pub resume: Option<Resume>,
    /// `COHORT_INJECT_FAULT`, as given; [`WorkerEnv::fault`] is the one that
    /// fires in this attempt.
    pub inject_fault: Option<FaultSpec>,
    /// `OMP_NUM_THREADS`, as given (OpenMP reads it; cohort only sets it,
    /// see [`omp_num_threads_for`]).
    pub omp_num_threads: Option<String>,
}

impl Default for WorkerEnv {
    fn default() -> Self {
        WorkerEnv {
            rank: 0,
            local_rank: 0,
            world: 1,
            local_world: 1,
            node_rank: 0,
            group_world: 1,
            role: Role::default(),
            max_restarts: 0,
            error_file: None,
            nccl_async_error_handling: None,
            gloo_socket_ifname: None,
            nccl_socket_ifname: None,
            master_addr: None,
            master_port: None,
            coordinator: None,
            job_id: None,
            generation: None,
            restart_count: 0,
            epoch: 0,
            comm: CommEnv::default(),
            log_dir: None,
            status_file: None,
            store_dir: None,
            resume: None,
            inject_fault: None,
            omp_num_threads: None,
        }
    }
}

/// The workers' role, torch.distributed.elastic's way: a name (`--role`)
/// and this worker's place among the workers of every node of that role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    /// `ROLE_NAME` (default `default`, torchrun's).
    pub name: String,
    /// `ROLE_RANK` (default: `RANK`).
    pub rank: usize,
    /// `ROLE_WORLD_SIZE` (default: `WORLD_SIZE`).
    pub world: usize,
}

impl Default for Role {
    fn default() -> Self {
        Role {
            name: "default".to_owned(),
            rank: 0,
            world: 1,
        }
    }
}

/// Which of the variables cohort sets for a worker only where the user did
/// not the launcher's own environment sets (the workers inherit those).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserSet {
    pub omp_num_threads: bool,
    pub nccl_async_error_handling: bool,
    pub gloo_socket_ifname: bool,
    pub nccl_socket_ifname: bool,
}

impl UserSet {
    /// From this process's environment (an empty variable counts as unset).
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// As [`UserSet::from_env`], reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<OsString>) -> Self {
        let set = |name| get(name).is_some_and(|v| !v.is_empty());
        UserSet {
            omp_num_threads: set(var::OMP_NUM_THREADS),
            nccl_async_error_handling: set(var::TORCH_NCCL_ASYNC_ERROR_HANDLING),
            gloo_socket_ifname: set(var::GLOO_SOCKET_IFNAME),
            nccl_socket_ifname: set(var::NCCL_SOCKET_IFNAME),
        }
    }

    /// Fills in what torchrun (and cohort) set where the user did not:
    /// `OMP_NUM_THREADS` (see [`omp_num_threads_for`]),
    /// `TORCH_NCCL_ASYNC_ERROR_HANDLING=1`, and `GLOO_SOCKET_IFNAME` and
    /// `NCCL_SOCKET_IFNAME` naming `ifname`, the interface that carries the
    /// node's address.
    pub fn apply(&self, env: &mut WorkerEnv, ifname: Option<&str>) {
        env.omp_num_threads = omp_num_threads_for(env.local_world, self.omp_num_threads);
        let unless = |user: bool, value: Option<&str>| value.filter(|_| !user).map(str::to_owned);
        env.nccl_async_error_handling = unless(self.nccl_async_error_handling, Some("1"));
        env.gloo_socket_ifname = unless(self.gloo_socket_ifname, ifname);
        env.nccl_socket_ifname = unless(self.nccl_socket_ifname, ifname);
    }
}

/// The job a worker started by `cohort launch` belongs to, as the
/// coordinator knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoordinatorJob<'a> {
    pub addr: &'a str,
    pub token: &'a str,
    pub job_id: &'a str,
    pub generation: u64,
}

impl WorkerEnv {
    /// Reads this process's worker environment: a single process when
    /// `WORLD_SIZE` is unset. Errors name the variable and its bad value.
    pub fn from_env() -> Result<Self, ContractError> {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// As [`WorkerEnv::from_env`], reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<OsString>) -> Result<Self, ContractError> {
        let v = Vars(get);
        let world = v.num(var::WORLD_SIZE)?.unwrap_or(1);
        let rank = v.num(var::RANK)?.unwrap_or(0);
        if world == 0 || rank >= world {
            return Err(ContractError::Invalid {
                name: var::RANK,
                value: rank.to_string(),
                reason: format!(
                    "must be below {}={world} (and {} at least 1)",
                    var::WORLD_SIZE,
                    var::WORLD_SIZE
                ),
            });
        }
        let job_id = match v.string(var::JOB_ID)? {
            Some(id) => Some(id),
            None => v.string(var::TORCHELASTIC_RUN_ID)?,
        };
        let restart_count = match v.num(var::RESTART_COUNT)? {
            Some(n) => n,
            None => v.num(var::TORCHELASTIC_RESTART_COUNT)?.unwrap_or(0),
        };
        Ok(WorkerEnv {
            rank,
            local_rank: v.num(var::LOCAL_RANK)?.unwrap_or(rank),
            world,
            local_world: v.num(var::LOCAL_WORLD_SIZE)?.unwrap_or(1).max(1),
            node_rank: v.num(var::GROUP_RANK)?.unwrap_or(0),
            group_world: v.num(var::GROUP_WORLD_SIZE)?.unwrap_or(1).max(1),
            role: Role {
                name: v
                    .string(var::ROLE_NAME)?
                    .unwrap_or_else(|| Role::default().name),
                rank: v.num(var::ROLE_RANK)?.unwrap_or(rank),
                world: v.num(var::ROLE_WORLD_SIZE)?.unwrap_or(world),
            },
            max_restarts: v.num(var::TORCHELASTIC_MAX_RESTARTS)?.unwrap_or(0),
            error_file: v.path(var::TORCHELASTIC_ERROR_FILE),
            nccl_async_error_handling: v.string(var::TORCH_NCCL_ASYNC_ERROR_HANDLING)?,
            gloo_socket_ifname: v.string(var::GLOO_SOCKET_IFNAME)?,
            nccl_socket_ifname: v.string(var::NCCL_SOCKET_IFNAME)?,
            master_addr: v.string(var::MASTER_ADDR)?,
            master_port: v.num(var::MASTER_PORT)?,
            coordinator: v.string(var::COORDINATOR)?,
            job_id,
            generation: v.num(var::GENERATION)?,
            restart_count,
            epoch: v.num(var::EPOCH)?.unwrap_or(0),
            comm: v.comm()?,
            log_dir: v.path(var::LOG_DIR),
            status_file: v.path(var::STATUS_FILE),
            store_dir: v.path(var::STORE_DIR),
            resume: v.get(var::RESUME).map(Resume::parse),
            inject_fault: v
                .string(var::INJECT_FAULT)?
                .map(|spec| FaultSpec::parse(&spec))
                .transpose()?,
            omp_num_threads: v.string(var::OMP_NUM_THREADS)?,
        })
    }

    /// The variables to start this worker with: every field that is set
    /// (the ranks, sizes, role, restart counts and
    /// `TORCHELASTIC_USE_AGENT_STORE=False` always), read back by
    /// [`WorkerEnv::from_lookup`] as this value.
    pub fn vars(&self) -> Vec<(&'static str, OsString)> {
        let n = |n: usize| OsString::from(n.to_string());
        let mut vars: Vec<(&'static str, OsString)> = vec![
            (var::RANK, n(self.rank)),
            (var::LOCAL_RANK, n(self.local_rank)),
            (var::WORLD_SIZE, n(self.world)),
            (var::LOCAL_WORLD_SIZE, n(self.local_world)),
            (var::GROUP_RANK, n(self.node_rank)),
            (var::GROUP_WORLD_SIZE, n(self.group_world)),
            (var::ROLE_NAME, self.role.name.clone().into()),
            (var::ROLE_RANK, n(self.role.rank)),
            (var::ROLE_WORLD_SIZE, n(self.role.world)),
            (var::RESTART_COUNT, self.restart_count.to_string().into()),
            (
                var::TORCHELASTIC_RESTART_COUNT,
                self.restart_count.to_string().into(),
            ),
            (
                var::TORCHELASTIC_MAX_RESTARTS,
                self.max_restarts.to_string().into(),
            ),
            (var::TORCHELASTIC_USE_AGENT_STORE, "False".into()),
        ];
        let mut set = |name: &'static str, value: Option<OsString>| {
            if let Some(value) = value {
                vars.push((name, value));
            }
        };
        let string = |s: &Option<String>| s.clone().map(OsString::from);
        let path = |p: &Option<PathBuf>| p.clone().map(PathBuf::into_os_string);
        set(var::MASTER_ADDR, string(&self.master_addr));
        set(
            var::MASTER_PORT,
            self.master_port.map(|p| p.to_string().into()),
        );
        set(var::COORDINATOR, string(&self.coordinator));
        set(var::JOB_ID, string(&self.job_id));
        set(var::TORCHELASTIC_RUN_ID, string(&self.job_id));
        set(var::TORCHELASTIC_ERROR_FILE, path(&self.error_file));
        set(
            var::TORCH_NCCL_ASYNC_ERROR_HANDLING,
            string(&self.nccl_async_error_handling),
        );
        set(var::GLOO_SOCKET_IFNAME, string(&self.gloo_socket_ifname));
        set(var::NCCL_SOCKET_IFNAME, string(&self.nccl_socket_ifname));
        set(
            var::GENERATION,
            self.generation.map(|g| g.to_string().into()),
        );
        set(
            var::EPOCH,
            (self.epoch > 0).then(|| self.epoch.to_string().into()),
        );
        set(var::TOKEN, string(&self.comm.token));
        set(var::HOST, string(&self.comm.host));
        set(
            var::COLLECTIVE_TIMEOUT_S,
            self.comm
                .timeout
                .map(|t| t.as_secs_f64().to_string().into()),
        );
        set(var::LOG_DIR, path(&self.log_dir));
        set(var::STATUS_FILE, path(&self.status_file));
        set(var::STORE_DIR, path(&self.store_dir));
        set(var::RESUME, self.resume.as_ref().map(Resume::to_env_value));
        set(
            var::INJECT_FAULT,
            self.inject_fault.map(|f| f.to_string().into()),
        );
        set(var::OMP_NUM_THREADS, string(&self.omp_num_threads));
        vars
    }

    /// The fault to inject in this attempt: `COHORT_INJECT_FAULT`, in the
    /// job's first attempt only (`COHORT_RESTART_COUNT` 0) and never in a
    /// worker that replaces a failed rank in place (`COHORT_EPOCH` > 0), so
    /// the restarted job, or the replacement, gets past it.
    pub fn fault(&self) -> Option<FaultSpec> {
        self.inject_fault
            .filter(|_| self.restart_count == 0 && self.epoch == 0)
    }

    /// The step at which this worker must abort at `at`, in this attempt.
    pub fn fault_step(&self, at: FaultPoint) -> Option<u64> {
        self.fault()?.step_for(self.rank, at)
    }

    /// The coordinator and the job this worker belongs to; an error naming
    /// the first variable missing when it was not started by `cohort launch`.
    pub fn coordinator_job(&self) -> Result<CoordinatorJob<'_>, ContractError> {
        let missing = |name| ContractError::Missing {
            name,
            hint: UNDER_LAUNCH,
        };
        Ok(CoordinatorJob {
            addr: self
                .coordinator
                .as_deref()
                .ok_or_else(|| missing(var::COORDINATOR))?,
            token: self
                .comm
                .token
                .as_deref()
                .ok_or_else(|| missing(var::TOKEN))?,
            job_id: self.job_id.as_deref().ok_or_else(|| missing(var::JOB_ID))?,
            generation: self.generation.ok_or_else(|| missing(var::GENERATION))?,
        })
    }

    /// Names this attempt of the job (job id, generation, restart count), the
    /// same on every rank of it.
    pub fn attempt(&self) -> String {
        format!(
            "{}/{}/{}",
            self.job_id.as_deref().unwrap_or(""),
            self.generation.map(|g| g.to_string()).unwrap_or_default(),
            self.restart_count
        )
    }
}

/// `OMP_NUM_THREADS` for the `local_world` workers of one node, as torchrun
/// sets it: 1 when several workers share the node and the launcher's own
/// environment does not set it (`launcher_sets`), so their OpenMP pools do
/// not oversubscribe the cores; otherwise nothing (they inherit the
/// launcher's value, or OpenMP's default).
pub fn omp_num_threads_for(local_world: usize, launcher_sets: bool) -> Option<String> {
    (local_world > 1 && !launcher_sets).then(|| "1".to_owned())
}

/// Reads variables through a lookup; empty ones count as unset.
struct Vars<F>(F);

impl<F: Fn(&str) -> Option<OsString>> Vars<F> {
    fn get(&self, name: &str) -> Option<OsString> {
        (self.0)(name).filter(|v| !v.is_empty())
    }

    fn string(&self, name: &'static str) -> Result<Option<String>, ContractError> {
        self.get(name)
            .map(|v| {
                v.into_string().map_err(|v| ContractError::Invalid {
                    name,
                    value: v.to_string_lossy().into_owned(),
                    reason: "not valid UTF-8".into(),
                })
            })
            .transpose()
    }

    fn path(&self, name: &str) -> Option<PathBuf> {
        self.get(name).map(PathBuf::from)
    }

    fn num<T>(&self, name: &'static str) -> Result<Option<T>, ContractError>
    where
        T: FromStr<Err = std::num::ParseIntError>,
    {
        self.string(name)?
            .map(|v| {
                v.trim().parse().map_err(|e| ContractError::Invalid {
                    name,
                    value: v.clone(),
                    reason: format!("{e}: expected a non-negative integer"),
                })
            })
            .transpose()
    }

    fn comm(&self) -> Result<CommEnv, ContractError> {
        let name = var::COLLECTIVE_TIMEOUT_S;
        let timeout = self
            .string(name)?
            .map(|v| {
                v.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|s| *s > 0.0)
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
                    .ok_or_else(|| ContractError::Invalid {
                        name,
                        value: v.clone(),
                        reason: "not a positive number of seconds".into(),
                    })
            })
            .transpose()?;
        Ok(CommEnv {
            token: self.string(var::TOKEN)?,
            host: self.string(var::HOST)?,
            timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.into())
    }

    #[test]
    fn no_env_is_a_single_process() {
        let env = WorkerEnv::from_lookup(|_| None).unwrap();
        assert_eq!((env.rank, env.world, env.restart_count), (0, 1, 0));
        assert!(env.log_dir.is_none());
        assert_eq!(env, WorkerEnv::default());
        assert!(env.fault().is_none());
        assert_eq!(env.comm.op_timeout(), DEFAULT_COLLECTIVE_TIMEOUT);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = WorkerEnv::from_lookup(|n| (n == "WORLD_SIZE").then(|| "two".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("WORLD_SIZE=\"two\""), "{err}");
        let err = WorkerEnv::from_lookup(|n| match n {
            "WORLD_SIZE" => Some("2".into()),
            "RANK" => Some("2".into()),
            _ => None,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("below WORLD_SIZE=2"), "{err}");
        for (name, value, want) in [
            (var::MASTER_PORT, "70000", "MASTER_PORT=\"70000\""),
            (var::GENERATION, "-1", "COHORT_GENERATION=\"-1\""),
            (var::COLLECTIVE_TIMEOUT_S, "0", "positive number of seconds"),
            (
                var::COLLECTIVE_TIMEOUT_S,
                "1e300",
                "positive number of seconds",
            ),
            (var::INJECT_FAULT, "rank=1", "step is missing"),
        ] {
            let err = WorkerEnv::from_lookup(lookup(&[(name, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{name}={value}: {err}");
        }
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let names = [
            var::WORLD_SIZE,
            var::RANK,
            var::TOKEN,
            var::RESUME,
            var::INJECT_FAULT,
        ];
        let env = WorkerEnv::from_lookup(|n| names.contains(&n).then(OsString::new)).unwrap();
        assert_eq!(env, WorkerEnv::default());
    }

    #[test]
    fn what_the_agent_writes_the_worker_reads_back() {
        let env = WorkerEnv {
            rank: 5,
            local_rank: 1,
            world: 8,
            local_world: 4,
            node_rank: 1,
            group_world: 2,
            role: Role {
                name: "trainer".into(),
                rank: 1,
                world: 4,
            },
            max_restarts: 3,
            error_file: Some("/logs/job-1/attempt_3/rank_5.error.json".into()),
            nccl_async_error_handling: Some("1".into()),
            gloo_socket_ifname: Some("eth0".into()),
            nccl_socket_ifname: Some("eth0".into()),
            master_addr: Some("198.18.0.1".into()),
            master_port: Some(29500),
            coordinator: Some("198.18.0.1:29400".into()),
            job_id: Some("job-1".into()),
            generation: Some(3),
            restart_count: 2,
            epoch: 4,
            comm: CommEnv {
                token: Some("sekrit".into()),
                host: Some("198.18.0.2".into()),
                timeout: Some(Duration::from_millis(1500)),
            },
            log_dir: Some("/logs/job-1".into()),
            status_file: Some("/logs/job-1/attempt_3/rank_5.status".into()),
            store_dir: Some("/shared/store".into()),
            resume: Some(Resume::Path("/ckpt/step-00000020".into())),
            inject_fault: Some(FaultSpec::parse("rank=5,step=7,at=commit").unwrap()),
            omp_num_threads: Some("1".into()),
        };
        let vars = env.vars();
        let get = |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(WorkerEnv::from_lookup(get).unwrap(), env);
        let mut names: Vec<&str> = vars.iter().map(|(k, _)| *k).collect();
        names.sort_unstable();
        let mut all = var::ALL.to_vec();
        all.sort_unstable();
        assert_eq!(names, all, "every variable of the contract, each once");

        let alone = WorkerEnv::default();
        let names: Vec<_> = alone.vars().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            names,
            [
                var::RANK,
                var::LOCAL_RANK,
                var::WORLD_SIZE,
                var::LOCAL_WORLD_SIZE,
                var::GROUP_RANK,
                var::GROUP_WORLD_SIZE,
                var::ROLE_NAME,
                var::ROLE_RANK,
                var::ROLE_WORLD_SIZE,
                var::RESTART_COUNT,
                var::TORCHELASTIC_RESTART_COUNT,
                var::TORCHELASTIC_MAX_RESTARTS,
                var::TORCHELASTIC_USE_AGENT_STORE,
            ]
        );
    }

    #[test]
    fn torchruns_names_are_read_where_cohorts_are_unset() {
        let env = WorkerEnv::from_lookup(lookup(&[
            (var::WORLD_SIZE, "4"),
            (var::RANK, "3"),
            (var::TORCHELASTIC_RUN_ID, "run-7"),
            (var::TORCHELASTIC_RESTART_COUNT, "2"),
        ]))
        .unwrap();
        assert_eq!(env.job_id.as_deref(), Some("run-7"));
        assert_eq!(env.restart_count, 2);
        assert_eq!((env.role.rank, env.role.world), (3, 4));
        assert_eq!(env.role.name, "default");
        let vars = env.vars();
        let get = |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get(var::TORCHELASTIC_USE_AGENT_STORE).unwrap(), "False");
        assert_eq!(get(var::RESTART_COUNT).unwrap(), "2");
    }

    #[test]
    fn what_the_user_set_is_left_to_them() {
        let mut env = WorkerEnv {
            local_world: 2,
            ..WorkerEnv::default()
        };
        UserSet::default().apply(&mut env, Some("eth0"));
        assert_eq!(env.omp_num_threads.as_deref(), Some("1"));
        assert_eq!(env.nccl_async_error_handling.as_deref(), Some("1"));
        assert_eq!(env.gloo_socket_ifname.as_deref(), Some("eth0"));
        assert_eq!(env.nccl_socket_ifname.as_deref(), Some("eth0"));
        let user = UserSet::from_lookup(lookup(&[
            (var::GLOO_SOCKET_IFNAME, "ib0"),
            (var::TORCH_NCCL_ASYNC_ERROR_HANDLING, "0"),
            (var::NCCL_SOCKET_IFNAME, ""),
        ]));
        user.apply(&mut env, Some("eth0"));
        assert_eq!(env.gloo_socket_ifname, None, "inherited from the user");
        assert_eq!(env.nccl_async_error_handling, None);
        assert_eq!(env.nccl_socket_ifname.as_deref(), Some("eth0"));
    }

    #[test]
    fn a_fault_fires_in_the_first_attempt_only() {
        let env = WorkerEnv::from_lookup(lookup(&[
            (var::WORLD_SIZE, "2"),
            (var::RANK, "1"),
            (var::INJECT_FAULT, "rank=1,step=25"),
        ]))
        .unwrap();
        assert_eq!(env.fault_step(FaultPoint::Step), Some(25));
        assert_eq!(env.fault_step(FaultPoint::Commit), None);
        let restarted = WorkerEnv {
            restart_count: 1,
            ..env.clone()
        };
        assert_eq!(restarted.fault(), None);
        let other_rank = WorkerEnv { rank: 0, ..env };
        assert_eq!(other_rank.fault_step(FaultPoint::Step), None);
    }

    #[test]
    fn the_coordinator_job_names_the_first_missing_variable() {
        let err = WorkerEnv::default()
            .coordinator_job()
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "COHORT_COORDINATOR is not set: this program must be started by `cohort launch`"
        );
        let env = WorkerEnv::from_lookup(lookup(&[
            (var::COORDINATOR, "127.0.0.1:1"),
            (var::TOKEN, "t"),
            (var::JOB_ID, "j"),
        ]))
        .unwrap();
        let err = env.coordinator_job().unwrap_err().to_string();
        assert!(err.starts_with("COHORT_GENERATION is not set"), "{err}");
        let env = WorkerEnv {
            generation: Some(4),
            ..env
        };
        assert_eq!(
            env.coordinator_job().unwrap(),
            CoordinatorJob {
                addr: "127.0.0.1:1",
                token: "t",
                job_id: "j",
                generation: 4
            }
        );
        assert_eq!(env.attempt(), "j/4/0");
    }

    #[test]
    fn the_token_is_required_and_never_printed() {
        let comm = CommEnv::from_lookup(|_| None).unwrap();
        let err = comm.token().unwrap_err().to_string();
        assert!(err.contains("COHORT_TOKEN is not set"), "{err}");
        let comm = CommEnv::from_lookup(lookup(&[(var::TOKEN, "sekrit")])).unwrap();
        assert_eq!(comm.token().unwrap(), "sekrit");
        assert!(!format!("{comm:?}").contains("sekrit"));
    }

    #[test]
    fn resume_values() {
        for (text, want) in [
            ("", Resume::Auto),
            ("auto", Resume::Auto),
            ("never", Resume::Never),
            ("runs/ckpt", Resume::Path("runs/ckpt".into())),
        ] {
            assert_eq!(Resume::parse(text), want, "{text:?}");
            assert_eq!(Resume::parse(want.to_env_value()), want);
        }
    }

    #[test]
    fn omp_is_one_only_for_several_workers_and_an_unset_launcher() {
        assert_eq!(omp_num_threads_for(2, false).as_deref(), Some("1"));
        assert_eq!(omp_num_threads_for(2, true), None);
        assert_eq!(omp_num_threads_for(1, false), None);
    }
}

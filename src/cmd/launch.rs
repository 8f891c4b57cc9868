//! `cohort launch`: run a job's workers on this node, torchrun style.
//!
//! `cohort launch CONFIG.toml [--set section.key=value ...]` trains with the
//! `cohort-worker` next to this binary; `cohort launch -- PROGRAM ARGS` runs
//! any program (a PyTorch script using `init_method="env://"` included) with
//! the worker env contract. Flags win over the config's `[launch]` section,
//! which wins over the defaults.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cohort_contract::var;
use cohort_launcher::{
    CoordinatorMode, LaunchOptions, LauncherError, NodeRange, RecoveryPolicy, Timing, WorkerCommand,
};

/// Hidden knobs of the launcher's clock (tests shorten them).
#[derive(clap::Args, Clone, Copy)]
pub struct TimingArgs {
    #[arg(long, hide = true, default_value_t = 1000)]
    heartbeat_interval_ms: u64,
    #[arg(long, hide = true, default_value_t = 15_000)]
    heartbeat_timeout_ms: u64,
    #[arg(long, hide = true, default_value_t = 5000)]
    grace_period_ms: u64,
    #[arg(long, hide = true, default_value_t = 30_000)]
    connect_retry_ms: u64,
    #[arg(long, hide = true, default_value_t = 10_000)]
    last_call_ms: u64,
    /// With fewer nodes left than --nnodes needs after a node is lost: how
    /// long the job waits for new nodes to replace it (0: it fails at once).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 300,
        env = "COHORT_REPLACEMENT_TIMEOUT"
    )]
    replacement_timeout: u64,
}

impl From<TimingArgs> for Timing {
    fn from(t: TimingArgs) -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(t.heartbeat_interval_ms.max(1)),
            heartbeat_timeout: Duration::from_millis(t.heartbeat_timeout_ms),
            grace_period: Duration::from_millis(t.grace_period_ms),
            connect_retry: Duration::from_millis(t.connect_retry_ms),
            last_call: Duration::from_millis(t.last_call_ms),
            replacement_timeout: Duration::from_secs(t.replacement_timeout),
            ..Timing::default()
        }
    }
}

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    cohort launch configs/quickstart.toml --set train.max_steps=100\n  \
    cohort launch --nproc-per-node 4 -- python train.py\n  \
    cohort launch --nnodes 2 --coordinator-bind 0.0.0.0:29400 CONFIG.toml   # first node\n  \
    cohort launch --nnodes 2 --coordinator node0:29400 --token T CONFIG.toml  # other nodes\n  \
    srun --ntasks-per-node=1 cohort launch CONFIG.toml   # Slurm: nodes, rank, coordinator from its env")]
pub struct LaunchArgs {
    /// Nodes in the job: N, or MIN:MAX to go on with fewer nodes after a loss [default: 1].
    #[arg(long, value_name = "N|MIN:MAX", env = "COHORT_NNODES")]
    nnodes: Option<NodeRange>,
    /// Workers on this node: N, `cpu` (one per core), `gpu` (one per GPU), or
    /// `auto` (gpu if there are GPUs, else cpu) [default: 1].
    #[arg(
        long,
        alias = "nproc_per_node",
        value_name = "N|auto|cpu|gpu",
        env = "COHORT_NPROC_PER_NODE"
    )]
    nproc_per_node: Option<Nproc>,
    /// This node's rank, fixed (torchrun's static ranks) [default: the
    /// coordinator's choice, kept by a node that rejoins].
    #[arg(long, alias = "node_rank", value_name = "N", env = "COHORT_NODE_RANK")]
    node_rank: Option<u32>,
    /// With --node-rank: node 0's address; node 0 hosts the coordinator on
    /// --master-port, the others join it there [default: 127.0.0.1].
    #[arg(
        long,
        alias = "master_addr",
        value_name = "HOST",
        env = "COHORT_MASTER_ADDR"
    )]
    master_addr: Option<String>,
    /// With --node-rank: the coordinator's port on node 0 [default: 29500].
    #[arg(
        long,
        alias = "master_port",
        value_name = "PORT",
        env = "COHORT_MASTER_PORT"
    )]
    master_port: Option<u16>,
    /// The workers' role (ROLE_NAME; ROLE_RANK counts the workers of the same role).
    #[arg(
        long,
        value_name = "NAME",
        default_value = "default",
        env = "COHORT_ROLE"
    )]
    role: String,
    /// Join the coordinator at HOST:PORT (multi-node: every node but the first).
    #[arg(
        long,
        visible_alias = "rdzv-endpoint",
        alias = "rdzv_endpoint",
        value_name = "HOST:PORT",
        conflicts_with = "coordinator_bind",
        env = "COHORT_COORDINATOR"
    )]
    coordinator: Option<String>,
    /// Run the coordinator in this launcher, on HOST:PORT (multi-node: the first node).
    #[arg(long, value_name = "HOST:PORT", env = "COHORT_COORDINATOR_BIND")]
    coordinator_bind: Option<String>,
    /// One node, with its own coordinator on 127.0.0.1 (the default; torchrun's flag).
    #[arg(long, conflicts_with_all = ["coordinator", "coordinator_bind", "master_addr"], env = "COHORT_STANDALONE")]
    standalone: bool,
    /// Restarts after a failure before the job fails [default: 3].
    #[arg(
        long,
        alias = "max_restarts",
        value_name = "N",
        env = "COHORT_MAX_RESTARTS"
    )]
    max_restarts: Option<u32>,
    /// A worker that reports steps and makes no progress for this long is hung [default: 300].
    #[arg(long, value_name = "SECS", env = "COHORT_HANG_TIMEOUT")]
    hang_timeout: Option<u64>,
    /// Logs go to DIR/<job-id>/attempt_<g>/rank_<r>.log [default: cohort-logs].
    #[arg(long, alias = "log_dir", value_name = "DIR", env = "COHORT_LOG_DIR")]
    log_dir: Option<PathBuf>,
    /// Show only these local ranks' output on the terminal (e.g. `0` or
    /// `0,2`); every rank's still goes to its log.
    #[arg(
        long,
        alias = "local_ranks_filter",
        value_name = "R[,R...]",
        env = "COHORT_LOCAL_RANKS_FILTER"
    )]
    local_ranks_filter: Option<String>,
    /// The job's id [default: generated by the coordinator].
    #[arg(
        long,
        visible_alias = "rdzv-id",
        alias = "rdzv_id",
        value_name = "ID",
        env = "COHORT_JOB_ID"
    )]
    job_id: Option<String>,
    /// The job token every node presents to the coordinator [default: generated
    /// when this launcher runs the coordinator].
    #[arg(long, value_name = "T", env = var::TOKEN, hide_env_values = true)]
    token: Option<String>,
    /// Checkpoint to start from: `auto` (the newest good one in checkpoint.dir),
    /// `never`, or a checkpoint directory. Restarts after a failure always use `auto`.
    #[arg(long, value_name = "auto|never|PATH", env = "COHORT_RESUME")]
    resume: Option<String>,
    /// Give up when no generation forms within this long (all nodes of
    /// --nnodes joined, or MIN and the last call).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 900,
        env = "COHORT_RENDEZVOUS_TIMEOUT"
    )]
    rendezvous_timeout: u64,
    /// While the coordinator does not answer (a `cohort coordinator
    /// --state-dir` being restarted), the workers keep running and the
    /// node's calls are retried for this long.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 60,
        env = "COHORT_COORDINATOR_GRACE"
    )]
    coordinator_grace: u64,
    /// PROGRAM is a Python module: run `python -u -m PROGRAM ARGS` (python:
    /// $PYTHON_EXEC, else python3).
    #[arg(short = 'm', long, conflicts_with = "no_python", env = "COHORT_MODULE")]
    module: bool,
    /// Run PROGRAM as it is, even a `.py` file (which is otherwise run with `python -u`).
    #[arg(long, alias = "no_python", env = "COHORT_NO_PYTHON")]
    no_python: bool,
    /// Override a config value (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    #[command(flatten)]
    timing: TimingArgs,
    /// The job config (TOML).
    #[arg(value_name = "CONFIG.toml")]
    config: Option<PathBuf>,
    /// Instead of a config: the program every worker runs, after `--`.
    #[arg(last = true, value_name = "PROGRAM [ARGS]...")]
    program: Vec<OsString>,
}

/// `--nproc-per-node`: a count, or torchrun's names for one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nproc {
    Count(u32),
    Auto,
    Cpu,
    Gpu,
}

impl std::str::FromStr for Nproc {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Nproc::Auto),
            "cpu" => Ok(Nproc::Cpu),
            "gpu" => Ok(Nproc::Gpu),
            n => n
                .parse()
                .map(Nproc::Count)
                .map_err(|_| format!("{n:?} is not a number, auto, cpu or gpu")),
        }
    }
}

impl Nproc {
    /// The number of workers: `cpu` is one per core, `gpu` one per visible
    /// CUDA device (an error saying why there is none), `auto` gpu if there
    /// are GPUs, else cpu.
    fn resolve(self) -> Result<u32, String> {
        let cpus = || {
            std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
        };
        let gpus = || {
            cohort_collectives::nccl::probe::cuda_driver()
                .map(|d| u32::try_from(d.devices).unwrap_or(u32::MAX))
        };
        match self {
            Nproc::Count(n) => Ok(n),
            Nproc::Cpu => Ok(cpus()),
            Nproc::Gpu => gpus().map_err(|why| {
                format!("--nproc-per-node gpu, but this host has no usable GPU: {why}; give a number or cpu")
            }),
            Nproc::Auto => Ok(gpus().unwrap_or_else(|_| cpus())),
        }
    }
}

/// `--local-ranks-filter 0,2`.
fn parse_ranks(list: &str) -> Result<Vec<u32>, String> {
    list.split(',')
        .map(|r| {
            r.trim().parse().map_err(|_| {
                format!(
                    "--local-ranks-filter {list:?}: {r:?} is not a local rank (give e.g. 0 or 0,2)"
                )
            })
        })
        .collect()
}

/// What the workers run for `-- PROGRAM ARGS`, as torchrun runs its
/// training script: `-m` runs `python -u -m PROGRAM ARGS`; a `.py` program
/// is run with `python -u` unless `--no-python`; anything else as it is.
/// `-u`, as torchrun passes it: a worker's stdout is a pipe to the
/// launcher, where Python would otherwise hold its lines back until its
/// buffer fills or it exits.
fn program_command(
    program: &OsString,
    rest: &[OsString],
    module: bool,
    no_python: bool,
) -> WorkerCommand {
    let python = || {
        std::env::var_os("PYTHON_EXEC")
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "python3".into())
    };
    let is_script = std::path::Path::new(program)
        .extension()
        .is_some_and(|e| e == "py");
    let (program, args) = if module {
        (
            python(),
            [
                vec!["-u".into(), "-m".into(), program.clone()],
                rest.to_vec(),
            ]
            .concat(),
        )
    } else if is_script && !no_python {
        (
            python(),
            [vec!["-u".into(), program.clone()], rest.to_vec()].concat(),
        )
    } else {
        (program.clone(), rest.to_vec())
    };
    WorkerCommand::Program { program, args }
}

/// `cohort launch`'s arguments with torchrun's (and Kubeflow's) `PET_*`
/// variables under each flag whose `COHORT_*` variable is unset: `PET_`
/// and the flag's name or one of its aliases (`PET_NNODES`,
/// `PET_NPROC_PER_NODE`, `PET_RDZV_ENDPOINT`, ...). A flag wins over
/// `COHORT_*`, which wins over `PET_*`.
pub fn with_pet_env(mut launch: clap::Command) -> clap::Command {
    let ids: Vec<(String, String, Vec<String>)> = launch
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_str()?.to_owned();
            let mut names = vec![arg.get_long()?.to_owned()];
            names.extend(
                arg.get_all_aliases()
                    .unwrap_or_default()
                    .iter()
                    .map(|a| (*a).to_owned()),
            );
            Some((arg.get_id().to_string(), env, names))
        })
        .collect();
    for (id, env, names) in ids {
        if std::env::var_os(&env).is_some_and(|v| !v.is_empty()) {
            continue;
        }
        let pet = names
            .iter()
            .map(|n| format!("PET_{}", n.to_uppercase().replace('-', "_")))
            .find(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
        if let Some(pet) = pet {
            // Once per flag and process: clap keeps the name for good.
            let pet: &'static str = Box::leak(pet.into_boxed_str());
            launch = launch.mut_arg(id, |arg| arg.env(pet));
        }
    }
    launch
}

fn usage(message: impl std::fmt::Display) -> anyhow::Result<ExitCode> {
    eprintln!("error: {message}");
    Ok(ExitCode::from(2))
}

pub fn run(args: LaunchArgs) -> anyhow::Result<ExitCode> {
    let (command, launch_config) = match (&args.config, args.program.split_first()) {
        (Some(_), Some(_)) => {
            return usage("give either CONFIG.toml or `-- PROGRAM [ARGS]`, not both");
        }
        (None, None) => {
            return usage(
                "nothing to launch: give CONFIG.toml or `-- PROGRAM [ARGS]` (see cohort launch --help)",
            );
        }
        (None, Some((program, rest))) => {
            if !args.set.is_empty() {
                return usage("--set overrides a config file's values: it needs CONFIG.toml");
            }
            if args.resume.is_some() {
                return usage("--resume applies to cohort's trainer: it needs CONFIG.toml");
            }
            let command = program_command(program, rest, args.module, args.no_python);
            (command, cohort_configs::LaunchConfig::default())
        }
        (Some(_), None) if args.module || args.no_python => {
            return usage(
                "-m and --no-python say how to run `-- PROGRAM`: a CONFIG.toml job runs cohort's trainer",
            );
        }
        (Some(path), None) => {
            let job = match cohort_configs::JobConfig::load(path, &args.set) {
                Ok(job) => job,
                Err(e) => return usage(e),
            };
            if let Err(message) = check_resume(args.resume.as_deref()) {
                return usage(message);
            }
            if let Err(message) = check_checkpoint_dir(&job.checkpoint) {
                return usage(message);
            }
            if let Err(message) = check_data(&job.data) {
                return usage(format!("{}: {message}", path.display()));
            }
            if let Err(message) = check_gpu(&job) {
                return usage(message);
            }
            let command = WorkerCommand::Train {
                worker: super::worker_binary()?,
                config_toml: job.to_toml_string(),
                resume: args.resume.clone(),
                source: if args.set.is_empty() {
                    path.display().to_string()
                } else {
                    format!("{} (with --set overrides)", path.display())
                },
                recovery: RecoveryPolicy::of(&job.recovery),
            };
            (command, job.launch)
        }
    };
    let config_nnodes = launch_config.nnodes;
    let rendezvous_timeout = args.rendezvous_timeout;
    let token = args.token.filter(|t| !t.is_empty());
    // Under Slurm or Kubernetes, the scheduler's env gives this node's place
    // in the job: flags win over it, it wins over the config.
    let asked = cohort_launcher::sched::Asked {
        nnodes: args.nnodes,
        config_nnodes,
        token_given: token.is_some()
            || args.coordinator.is_some()
            || args.coordinator_bind.is_some()
            || args.master_addr.is_some(),
    };
    let placement = match cohort_launcher::sched::detect(
        &|name| std::env::var(name).ok().filter(|v| !v.is_empty()),
        &|| std::fs::read_to_string("/etc/hosts").ok(),
        &asked,
    ) {
        Ok(placement) => placement,
        Err(e) => return usage(e),
    };
    if let Some(p) = &placement {
        eprintln!("[cohort] {}", p.summary);
    }
    let nnodes = placement
        .as_ref()
        .map(|p| p.nnodes)
        .or(args.nnodes)
        .or(config_nnodes)
        .unwrap_or(NodeRange::exactly(1));
    let nproc_per_node = match args.nproc_per_node.map(Nproc::resolve) {
        Some(Ok(n)) => n,
        Some(Err(why)) => return usage(why),
        None => match launch_config.nproc_per_node.map(u32::try_from) {
            Some(Ok(n)) => n,
            Some(Err(_)) => return usage("launch.nproc_per_node in the config is too large"),
            None => 1,
        },
    };
    let scheduled_node_rank = placement.as_ref().map(|p| p.node_rank);
    let scheduler = placement.as_ref().map(|p| p.scheduler);
    let (scheduled_coordinator, scheduled_job_id) = placement
        .map(|p| (Some(p.coordinator), Some(p.job_id)))
        .unwrap_or_default();
    if args.standalone && nnodes.max > 1 {
        return usage(format!(
            "--standalone runs one node, but --nnodes is {nnodes}: leave one of them out"
        ));
    }
    let node_rank = args.node_rank.or(scheduled_node_rank);
    // torchrun's static ranks: node 0 hosts the coordinator at
    // MASTER_ADDR:MASTER_PORT, the others join it there.
    let static_coordinator = if args.master_addr.is_some() || args.master_port.is_some() {
        if args.coordinator.is_some() || args.coordinator_bind.is_some() {
            return usage(
                "--master-addr/--master-port name the coordinator: leave out --coordinator and --coordinator-bind",
            );
        }
        let addr = args.master_addr.as_deref().unwrap_or("127.0.0.1");
        let port = args.master_port.unwrap_or(29500);
        match node_rank {
            Some(0) if nnodes.max > 1 => Some(CoordinatorMode::Bind(format!("0.0.0.0:{port}"))),
            Some(0) => Some(CoordinatorMode::Bind(format!("{addr}:{port}"))),
            Some(_) => Some(CoordinatorMode::Remote(format!("{addr}:{port}"))),
            None if nnodes.max == 1 => Some(CoordinatorMode::Bind(format!("{addr}:{port}"))),
            None => {
                return usage(
                    "--master-addr/--master-port need --node-rank on every node (0 on the node at --master-addr)",
                );
            }
        }
    } else {
        None
    };
    let local_ranks_filter = match args.local_ranks_filter.as_deref().map(parse_ranks) {
        Some(Err(why)) => return usage(why),
        Some(Ok(ranks)) => Some(ranks),
        None => None,
    };
    let coordinator = match (
        args.coordinator,
        args.coordinator_bind,
        static_coordinator.or(scheduled_coordinator),
    ) {
        (Some(addr), _, _) => CoordinatorMode::Remote(addr),
        (None, Some(bind), _) => CoordinatorMode::Bind(bind),
        (None, None, Some(derived)) => derived,
        (None, None, None) => CoordinatorMode::Embedded,
    };
    let options = LaunchOptions {
        nnodes,
        nproc_per_node,
        node_rank,
        local_ranks_filter,
        role: args.role,
        coordinator,
        max_restarts: args
            .max_restarts
            .or(launch_config.max_restarts)
            .unwrap_or(3),
        hang_timeout: Duration::from_secs(
            args.hang_timeout
                .or(launch_config.hang_timeout_s)
                .unwrap_or(300),
        ),
        log_dir: args
            .log_dir
            .or(launch_config.log_dir)
            .unwrap_or_else(|| PathBuf::from("cohort-logs")),
        job_id: args.job_id.or(scheduled_job_id),
        token,
        command,
        timing: kubernetes_timing(
            Timing {
                rendezvous_timeout: Duration::from_secs(rendezvous_timeout),
                coordinator_grace: Duration::from_secs(args.coordinator_grace),
                ..args.timing.into()
            },
            scheduler,
        ),
        host: std::env::var(var::HOST).ok().filter(|h| !h.is_empty()),
        user_set: cohort_contract::UserSet::from_env(),
    };
    let result = cohort_launcher::launch(options);
    let unreachable_pod_0 = match (&result, scheduler) {
        (
            Err(LauncherError::Unreachable { addr, .. }),
            Some(cohort_launcher::sched::Scheduler::Kubernetes),
        ) => Some(addr.clone()),
        _ => None,
    };
    let code = finish(result);
    if let Some(addr) = unreachable_pod_0 {
        eprintln!(
            "[cohort] {addr} is pod 0's coordinator: its name resolves once pod 0 runs and the pod \
             template's subdomain names a headless Service selecting the Job's pods, with \
             publishNotReadyAddresses: true (see examples/kubernetes/); check pod 0 and the Service \
             with `kubectl get pods,services`, or give pod 0 longer to start with --rendezvous-timeout \
             (here {}s)",
            rendezvous_timeout
        );
    }
    code
}

/// A Kubernetes pod keeps trying to reach pod 0 for the whole rendezvous
/// timeout: a headless Service's names resolve only once its pods are up,
/// and pod 0 may start well after the others.
fn kubernetes_timing(
    timing: Timing,
    scheduler: Option<cohort_launcher::sched::Scheduler>,
) -> Timing {
    match scheduler {
        Some(cohort_launcher::sched::Scheduler::Kubernetes) => Timing {
            connect_retry: timing.rendezvous_timeout,
            ..timing
        },
        _ => timing,
    }
}

/// `--resume` is `auto`, `never`, or a path that exists.
fn check_resume(resume: Option<&str>) -> Result<(), String> {
    match resume {
        None | Some("auto" | "never") => Ok(()),
        Some(path) if std::path::Path::new(path).exists() => Ok(()),
        Some(path) => Err(format!(
            "--resume {path}: no such checkpoint (give auto, never, a step directory or a checkpoint root)"
        )),
    }
}

/// A job that saves checkpoints must be able to write them: find out before
/// any worker starts, not at the first save.
/// A job that asks for a GPU (`train.device = "cuda"`) or for NCCL
/// (`parallel.backend = "nccl"`) on a host that can't give it fails here,
/// before any worker starts, with what is missing (the workers would fail
/// the same way, once per rank and restart).
fn check_gpu(job: &cohort_configs::JobConfig) -> Result<(), String> {
    use cohort_collectives::nccl::probe;
    use cohort_configs::{BackendChoice, DeviceChoice};
    if job.train.device == DeviceChoice::Cuda
        && let Err(why) = probe::cuda_driver()
    {
        return Err(format!(
            "train.device = \"cuda\", but this host can't run CUDA: {why}; \
             use train.device = \"auto\" or \"cpu\" (see `cohort doctor`)"
        ));
    }
    if job.parallel.backend == BackendChoice::Nccl
        && let Err(why) = probe::probe()
    {
        return Err(format!(
            "parallel.backend = \"nccl\", but NCCL can't run here: {why}; \
             use backend \"auto\" to fall back to TCP (see `cohort doctor`)"
        ));
    }
    Ok(())
}

/// The data file the job reads must be there: find out before any worker
/// starts (each would fail the same way).
fn check_data(data: &cohort_configs::DataConfig) -> Result<(), String> {
    let Some(path) = &data.path else {
        return Ok(());
    };
    std::fs::File::open(path).map(drop).map_err(|e| {
        let cwd = std::env::current_dir().map_or_else(|_| ".".into(), |d| d.display().to_string());
        format!(
            "data.path: cannot read {}: {e} (a relative path is relative to the directory cohort launch runs in, here {cwd})",
            path.display()
        )
    })
}

fn check_checkpoint_dir(ckpt: &cohort_configs::CheckpointConfig) -> Result<(), String> {
    let Some(dir) = ckpt.dir.as_deref().filter(|_| ckpt.every > 0) else {
        return Ok(());
    };
    let probe = dir.join(format!(".cohort-write-test-{}", std::process::id()));
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&probe, b""))
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| {
            format!(
                "checkpoint.dir {} is not writable ({e}); choose another with --set checkpoint.dir=DIR",
                dir.display()
            )
        })
}

/// The exit code of a launcher call: 2 for usage errors, 1 for the others.
pub fn finish(result: Result<i32, LauncherError>) -> anyhow::Result<ExitCode> {
    match result {
        Ok(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(1))),
        Err(e) if e.is_usage() => usage(e),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

//! The node agent: joins each generation, starts this node's workers with the
//! worker env contract, heartbeats, detects hung workers, reports exits, and
//! follows the coordinator's directives (go on, restart, finish).

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_contract::recovery::unix_ms;
use cohort_contract::{CommEnv, Resume, Role, UserSet, WorkerEnv, exit};
use cohort_proto::v1::{
    Action, Assignment, Directive, FailureInfo, HeartbeatRequest, JobOptions, JobOutcome,
    JoinRequest, LeaveRequest, RecordedError, ReportDoneRequest, ReportFailureRequest,
    join_response,
};
use tokio::signal::unix::{SignalKind, signal};

use crate::LauncherError;
use crate::client::{Client, connect, error_chain, rpc_error};
use crate::console::Console;
use crate::decision::{
    FailedWorker, NodeRange, WorkerFailure, decide_worker_failure, find_hang_culprit,
    find_hung_worker,
};
use crate::errorfile;
use crate::recovery::{Recoveries, Scope};
use crate::worker::{Worker, WorkerGroup, WorkerSpec, attempt_dir, describe_exit};

/// What each worker runs.
#[derive(Clone, Debug)]
pub enum WorkerCommand {
    /// `cohort launch -- PROGRAM ARGS`.
    Program {
        program: OsString,
        args: Vec<OsString>,
    },
    /// `cohort launch CONFIG.toml`: `WORKER train --config <job-dir>/config.toml`,
    /// with the resolved config written there first.
    Train {
        worker: PathBuf,
        config_toml: String,
        /// `COHORT_RESUME` for the first attempt (`auto`, `never` or a
        /// checkpoint path); `None` leaves the worker's default (`auto`).
        /// Restarts always resume from the newest good checkpoint (`auto`):
        /// going back to a given path would throw away the steps saved since.
        resume: Option<String>,
        /// The config file the user gave, as its errors should name it
        /// (`configs/quickstart.toml`, not the job's resolved copy):
        /// passed as `--source`.
        source: String,
        /// The config's `[recovery]`: what a failed worker costs the job.
        recovery: RecoveryPolicy,
    },
}

/// How a job of the built-in trainer recovers from a failed worker (its
/// config's `recovery.mode`). Programs run with `cohort launch -- PROGRAM`
/// always restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryPolicy {
    /// Every worker stops and the job restarts from the newest checkpoint.
    Restart,
    /// In place: only the failed rank starts again (`COHORT_EPOCH` set)
    /// and takes its state from a survivor; the others keep running.
    Peer {
        /// `recovery.rejoin_timeout_s`: how long the workers wait for the
        /// replacement before they give up (exit 75).
        rejoin_timeout: Duration,
    },
}

impl RecoveryPolicy {
    /// The policy of a job config's `[recovery]` section.
    pub fn of(config: &cohort_configs::RecoveryConfig) -> Self {
        match config.mode {
            cohort_configs::RecoveryMode::Restart => Self::Restart,
            cohort_configs::RecoveryMode::Peer => Self::Peer {
                rejoin_timeout: Duration::from_secs(config.rejoin_timeout_s),
            },
        }
    }
}

/// Everything a node agent needs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The coordinator's HOST:PORT.
    pub coordinator: String,
    pub token: String,
    /// Empty: the coordinator's job.
    pub job_id: String,
    /// Stable for this agent's life.
    pub node_id: String,
    /// The address other nodes reach this node at (`COHORT_HOST`, `MASTER_ADDR` of node 0).
    pub host: String,
    pub nproc: u32,
    pub nnodes: NodeRange,
    /// `--node-rank`: the node rank this node must have (static ranks).
    pub node_rank: Option<u32>,
    /// `--role`: its workers' ROLE_NAME.
    pub role: String,
    /// `--local-ranks-filter`: the local ranks whose output is shown (all: `None`).
    pub local_ranks_filter: Option<Vec<u32>>,
    pub max_restarts: u32,
    pub hang_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// How long one heartbeat may take.
    pub coordinator_timeout: Duration,
    /// `--coordinator-grace`: while the coordinator does not answer, the
    /// workers keep running and every call is retried, for this long.
    pub coordinator_grace: Duration,
    /// Between the stop signal and SIGKILL.
    pub grace_period: Duration,
    /// How long to retry reaching the coordinator at start.
    pub connect_retry: Duration,
    /// How long one Join may wait for its generation to form.
    pub rendezvous_timeout: Duration,
    pub log_dir: PathBuf,
    pub command: WorkerCommand,
    /// What the launcher's own environment sets of the variables cohort
    /// sets only where the user did not (`OMP_NUM_THREADS`,
    /// `GLOO_SOCKET_IFNAME`, ...): the workers inherit those.
    pub user_set: UserSet,
}

/// How the agent ended.
#[derive(Clone, Debug)]
pub enum AgentOutcome {
    /// The job is over (as the coordinator says).
    Finished(JobOutcome),
    /// The user interrupted this node with `signal`.
    Interrupted { signal: i32 },
}

/// What ends one generation for this node.
enum Next {
    Restart(String),
    Finished(JobOutcome),
    Interrupted(i32),
}

struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, LauncherError> {
        let install = |kind| signal(kind).map_err(LauncherError::Runtime);
        Ok(Self {
            int: install(SignalKind::interrupt())?,
            term: install(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
        }
    }
}

/// A free TCP port on this host (MASTER_PORT if this node becomes node 0).
fn free_port(host: &str) -> u32 {
    std::net::TcpListener::bind((host, 0))
        .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", 0)))
        .and_then(|l| l.local_addr())
        .map_or(0, |a| u32::from(a.port()))
}

/// Between two tries of a call the coordinator did not answer.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// How often a node that waits says so.
const WAITING_LINE_EVERY: Duration = Duration::from_secs(5);

/// Prints `[cohort] WHAT: Ns so far` every [`WAITING_LINE_EVERY`], forever
/// (raced against what is waited for).
async fn announce(console: &Console, what: &str) {
    let start = Instant::now();
    loop {
        tokio::time::sleep(WAITING_LINE_EVERY).await;
        console.err(&format!(
            "[cohort] {what}: {}s so far",
            start.elapsed().as_secs()
        ));
    }
}

struct Agent {
    config: AgentConfig,
    client: Client,
    console: Arc<Console>,
    /// Since when the coordinator has not answered (none: it answers).
    silent_since: std::sync::Mutex<Option<Instant>>,
}

/// A failed call that may work once the coordinator is back (it restarts,
/// the network heals), as opposed to one it refused.
fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
    )
}

/// Runs the node agent until the job is over or the user interrupts it.
pub async fn run_agent(
    config: AgentConfig,
    console: Arc<Console>,
) -> Result<AgentOutcome, LauncherError> {
    let mut signals = Signals::new()?;
    let connecting = format!(
        "still connecting to the coordinator at {} (giving up after {:?})",
        config.coordinator, config.connect_retry
    );
    let client = tokio::select! {
        c = connect(&config.coordinator, &config.token, config.connect_retry) => c?,
        sig = signals.recv() => return Ok(AgentOutcome::Interrupted { signal: sig }),
        () = announce(&console, &connecting) => unreachable!("announce never returns"),
    };
    let mut agent = Agent {
        config,
        client,
        console,
        silent_since: std::sync::Mutex::new(None),
    };
    let outcome = agent.run(&mut signals).await;
    // Say goodbye, so a coordinator hosted by another launcher can exit
    // without waiting for this node.
    if outcome.is_ok() && !agent.config.job_id.is_empty() {
        let request = LeaveRequest {
            job_id: agent.config.job_id.clone(),
            node_id: agent.config.node_id.clone(),
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), agent.client.leave(request)).await;
    }
    outcome
}

impl Agent {
    /// The coordinator did not answer a call (`status`): says so the first
    /// time; an error once it has been silent for the grace.
    fn note_silence(&self, call: &str, status: &tonic::Status) -> Result<(), LauncherError> {
        let mut silent = self.silent_since.lock().unwrap_or_else(|e| e.into_inner());
        let since = *silent.get_or_insert_with(|| {
            self.console.err(&format!(
                "[cohort] the coordinator at {} does not answer ({call}: {}); this node's workers \
                 keep running, retrying for up to {:?} (--coordinator-grace)",
                self.config.coordinator,
                error_chain(status),
                self.config.coordinator_grace
            ));
            Instant::now()
        });
        let waited = since.elapsed();
        if waited >= self.config.coordinator_grace {
            return Err(LauncherError::LostCoordinator {
                addr: self.config.coordinator.clone(),
                waited,
                grace: self.config.coordinator_grace,
                last_error: error_chain(status),
            });
        }
        Ok(())
    }

    /// The coordinator answered: says so if it had been silent.
    fn note_answer(&self) {
        let mut silent = self.silent_since.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(since) = silent.take() {
            self.console.err(&format!(
                "[cohort] the coordinator at {} answers again, after {:.1}s",
                self.config.coordinator,
                since.elapsed().as_secs_f64()
            ));
        }
    }

    /// Makes the call `call` until the coordinator answers it, retrying
    /// for up to the grace while it does not.
    async fn call<T, F, Fut>(&self, name: &'static str, mut call: F) -> Result<T, LauncherError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        loop {
            match call(self.client.clone()).await {
                Ok(response) => {
                    self.note_answer();
                    return Ok(response.into_inner());
                }
                Err(status) if retryable(&status) => {
                    self.note_silence(name, &status)?;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(status) => return Err(rpc_error(&self.config.coordinator, name, status)),
            }
        }
    }

    async fn run(&mut self, signals: &mut Signals) -> Result<AgentOutcome, LauncherError> {
        let mut joined = false;
        loop {
            let request = JoinRequest {
                job_id: self.config.job_id.clone(),
                node_id: self.config.node_id.clone(),
                host: self.config.host.clone(),
                nproc: self.config.nproc,
                master_port: free_port(&self.config.host),
                options: Some(JobOptions {
                    min_nodes: self.config.nnodes.min,
                    max_nodes: self.config.nnodes.max,
                    max_restarts: self.config.max_restarts,
                    peer_recovery: matches!(self.recovery(), RecoveryPolicy::Peer { .. }),
                }),
                node_rank: self.config.node_rank,
                role: self.config.role.clone(),
            };
            let waiting = format!(
                "waiting for the nodes of --nnodes {} to join the coordinator at {} (giving up after {:?})",
                self.config.nnodes, self.config.coordinator, self.config.rendezvous_timeout
            );
            let console = self.console.clone();
            // A node that rejoins after a failure hears why it waits from
            // the coordinator (a lost node, a replacement to wait for).
            let rejoin = joined;
            joined = true;
            let announce_waiting = async {
                if rejoin {
                    std::future::pending::<()>().await;
                }
                announce(&console, &waiting).await;
            };
            let response = tokio::select! {
                r = self.call("Join", |mut c| {
                    let request = request.clone();
                    async move { c.join(request).await }
                }) => r?,
                () = announce_waiting => unreachable!("announce never returns"),
                sig = signals.recv() => return Ok(AgentOutcome::Interrupted { signal: sig }),
                () = tokio::time::sleep(self.config.rendezvous_timeout) => {
                    return Err(LauncherError::RendezvousTimeout {
                        addr: self.config.coordinator.clone(),
                        waited: self.config.rendezvous_timeout,
                        nnodes: self.config.nnodes.to_string(),
                    });
                }
            };
            let assignment = match response.outcome {
                Some(join_response::Outcome::Assignment(a)) => a,
                Some(join_response::Outcome::Finished(outcome)) => {
                    return Ok(AgentOutcome::Finished(outcome));
                }
                None => {
                    return Err(LauncherError::Rpc {
                        addr: self.config.coordinator.clone(),
                        call: "Join",
                        code: tonic::Code::Internal,
                        message: "empty answer".to_owned(),
                    });
                }
            };
            self.config.job_id.clone_from(&assignment.job_id);
            match self.run_generation(&assignment, signals).await? {
                Next::Restart(reason) => {
                    tracing::debug!("generation {} ended: {reason}", assignment.generation);
                }
                Next::Finished(outcome) => return Ok(AgentOutcome::Finished(outcome)),
                Next::Interrupted(signal) => return Ok(AgentOutcome::Interrupted { signal }),
            }
        }
    }

    fn job_dir(&self) -> PathBuf {
        self.config.log_dir.join(&self.config.job_id)
    }

    /// Where a `Train` job's resolved config is written for its workers.
    fn config_path(&self) -> PathBuf {
        self.job_dir().join("config.toml")
    }

    /// What every worker runs: (program, args).
    fn program(&self) -> (OsString, Vec<OsString>) {
        match &self.config.command {
            WorkerCommand::Program { program, args } => (program.clone(), args.clone()),
            WorkerCommand::Train { worker, source, .. } => (
                worker.clone().into_os_string(),
                vec![
                    "train".into(),
                    "--config".into(),
                    self.config_path().into_os_string(),
                    "--source".into(),
                    source.into(),
                ],
            ),
        }
    }

    /// How this node recovers a failed worker (peer recovery needs the
    /// built-in trainer).
    fn recovery(&self) -> RecoveryPolicy {
        match &self.config.command {
            WorkerCommand::Train { recovery, .. } => *recovery,
            WorkerCommand::Program { .. } => RecoveryPolicy::Restart,
        }
    }

    /// How to start every worker of generation `a`. Error files an earlier
    /// job of the same id left are removed.
    fn specs(&self, a: &Assignment) -> Result<Vec<WorkerSpec>, LauncherError> {
        let attempt = attempt_dir(&self.job_dir(), a.generation)?;
        if let WorkerCommand::Train { config_toml, .. } = &self.config.command {
            let path = self.config_path();
            std::fs::write(&path, config_toml)
                .map_err(|source| LauncherError::Io { path, source })?;
        }
        let (program, args) = self.program();
        let mut specs = Vec::new();
        for local_rank in 0..self.config.nproc {
            let error_file = errorfile::error_file(&attempt, a.rank_offset + local_rank);
            if let Err(source) = std::fs::remove_file(&error_file)
                && source.kind() != std::io::ErrorKind::NotFound
            {
                return Err(LauncherError::Io {
                    path: error_file,
                    source,
                });
            }
            specs.push(self.spec(a, local_rank, 0, &program, &args)?);
        }
        Ok(specs)
    }

    /// How to start the worker of local rank `local_rank` of generation
    /// `a` in communicator epoch `epoch` (0: the generation's first start;
    /// more: it replaces a failed one in place).
    fn spec(
        &self,
        a: &Assignment,
        local_rank: u32,
        epoch: u64,
        program: &OsString,
        args: &[OsString],
    ) -> Result<WorkerSpec, LauncherError> {
        let job_dir = self.job_dir();
        let attempt = attempt_dir(&job_dir, a.generation)?;
        let nproc = self.config.nproc;
        let resume = match &self.config.command {
            WorkerCommand::Train {
                resume: Some(_), ..
            } if a.restart_count > 0 => Some(Resume::Auto),
            WorkerCommand::Train {
                resume: Some(resume),
                ..
            } => Some(Resume::parse(resume)),
            _ => None,
        };
        let master_port = u16::try_from(a.master_port).map_err(|_| LauncherError::Spawn {
            program: program.to_string_lossy().into_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the coordinator assigned MASTER_PORT {}, which is not a TCP port",
                    a.master_port
                ),
            ),
        })?;
        // The interface carrying this node's address, for Gloo's and NCCL's
        // sockets (their host name lookup may give a loopback address).
        let ifname = crate::netif::interface_of(&self.config.host);
        let rank = a.rank_offset + local_rank;
        let status_path = attempt.join(format!("rank_{rank}.status"));
        let mut env = WorkerEnv {
            rank: rank as usize,
            local_rank: local_rank as usize,
            world: a.world_size as usize,
            local_world: nproc as usize,
            node_rank: a.node_rank as usize,
            group_world: a.nnodes as usize,
            role: Role {
                name: self.config.role.clone(),
                rank: (a.role_rank_offset + local_rank) as usize,
                world: a.role_world_size as usize,
            },
            max_restarts: self.config.max_restarts,
            error_file: Some(errorfile::error_file(&attempt, rank)),
            master_addr: Some(a.master_addr.clone()),
            master_port: Some(master_port),
            coordinator: Some(self.config.coordinator.clone()),
            job_id: Some(a.job_id.clone()),
            generation: Some(a.generation),
            restart_count: u64::from(a.restart_count),
            epoch,
            comm: CommEnv {
                token: Some(self.config.token.clone()),
                host: Some(self.config.host.clone()),
                timeout: None,
            },
            log_dir: Some(job_dir),
            status_file: Some(status_path.clone()),
            resume,
            ..WorkerEnv::default()
        };
        self.config.user_set.apply(&mut env, ifname.as_deref());
        Ok(WorkerSpec {
            rank,
            local_rank,
            program: program.clone(),
            args: args.to_vec(),
            env: env
                .vars()
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value))
                .collect(),
            log_path: attempt.join(format!("rank_{rank}.log")),
            status_path,
            echo: self
                .config
                .local_ranks_filter
                .as_ref()
                .is_none_or(|shown| shown.contains(&local_rank)),
        })
    }

    async fn run_generation(
        &mut self,
        a: &Assignment,
        signals: &mut Signals,
    ) -> Result<Next, LauncherError> {
        let specs = self.specs(a)?;
        let grace = self.config.grace_period;
        let mut group = WorkerGroup::spawn(specs, &self.console, grace).await?;
        let next = self.supervise(a, &mut group, signals).await;
        let stop_signal = match &next {
            Ok(Next::Interrupted(sig)) => *sig,
            _ => libc::SIGTERM,
        };
        group.stop(stop_signal, grace).await;
        if let Ok(Next::Interrupted(sig)) = &next {
            // Tell the coordinator, so the other nodes stop too.
            let failure = FailureInfo {
                reason: format!(
                    "was interrupted ({})",
                    if *sig == libc::SIGINT {
                        "SIGINT"
                    } else {
                        "SIGTERM"
                    }
                ),
                ..FailureInfo::default()
            };
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                self.report_failure(a.generation, failure, true, &group),
            )
            .await;
        }
        next
    }

    async fn report_failure(
        &self,
        generation: u64,
        failure: FailureInfo,
        fatal: bool,
        group: &WorkerGroup,
    ) -> Result<Directive, LauncherError> {
        let request = ReportFailureRequest {
            job_id: self.config.job_id.clone(),
            node_id: self.config.node_id.clone(),
            generation,
            failure: Some(failure),
            fatal,
            recorded: Self::recorded(group),
        };
        self.call("ReportFailure", |mut c| {
            let request = request.clone();
            async move { c.report_failure(request).await }
        })
        .await
        .map(|r| r.directive.unwrap_or_default())
    }

    fn follow(directive: Directive) -> Option<Next> {
        match Action::try_from(directive.action) {
            Ok(Action::Restart) => Some(Next::Restart(directive.reason)),
            Ok(Action::Finished) => Some(Next::Finished(directive.outcome.unwrap_or(JobOutcome {
                success: false,
                summary: directive.reason,
                root_cause: None,
            }))),
            _ => None,
        }
    }

    fn failure_of(group: &WorkerGroup, rank: u32, reason: String) -> FailureInfo {
        let worker = group.by_rank(rank);
        FailureInfo {
            rank: Some(rank),
            reason,
            log_tail: worker.map(|w| w.tail()).unwrap_or_default(),
            log_path: worker.map_or_else(String::new, |w| w.log_path.display().to_string()),
            error: worker.and_then(Self::recorded_error),
            ..FailureInfo::default()
        }
    }

    /// What `worker` wrote to its TORCHELASTIC_ERROR_FILE (next to its log).
    fn recorded_error(worker: &Worker) -> Option<Box<RecordedError>> {
        errorfile::read(&errorfile::error_file(
            worker.log_path.parent()?,
            worker.rank,
        ))
    }

    /// The errors this node's workers recorded so far, exited or running.
    fn recorded(group: &WorkerGroup) -> Vec<FailureInfo> {
        group
            .workers
            .iter()
            .filter_map(|w| {
                let error = Self::recorded_error(w)?;
                Some(FailureInfo {
                    rank: Some(w.rank),
                    reason: errorfile::describe(&error),
                    log_tail: w.tail(),
                    log_path: w.log_path.display().to_string(),
                    error: Some(error),
                    ..FailureInfo::default()
                })
            })
            .collect()
    }

    /// The namespace of generation `a` in the coordinator's store.
    fn scope(&self, a: &Assignment) -> Scope {
        Scope {
            client: self.client.clone(),
            addr: self.config.coordinator.clone(),
            job_id: self.config.job_id.clone(),
            generation: a.generation,
        }
    }

    async fn supervise(
        &mut self,
        a: &Assignment,
        group: &mut WorkerGroup,
        signals: &mut Signals,
    ) -> Result<Next, LauncherError> {
        let mut ticker = tokio::time::interval(self.config.heartbeat_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Once this node reported a failure or success, it only waits for
        // the coordinator's directive.
        let mut reported = false;
        // In-place recovery: every recovery of the generation, this node's
        // and the others'.
        let mut recoveries =
            match self.recovery() {
                RecoveryPolicy::Peer { rejoin_timeout } if a.world_size > 1 => Some(
                    Recoveries::start(self.scope(a), self.console.clone(), rejoin_timeout),
                ),
                _ => None,
            };
        // Hang culprits killed to be replaced in place once their exit comes.
        let mut killed: HashMap<usize, KilledCulprit> = HashMap::new();
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let now = Instant::now();
                    group.refresh_progress(now, &self.console);
                    let recovering = !killed.is_empty()
                        || recoveries.as_ref().is_some_and(|r| r.in_flight().is_some());
                    if recovering {
                        // No rank makes progress while one is replaced:
                        // the hang clocks start once it is back.
                        group.restart_hang_clocks(now);
                    } else if !reported {
                        match self.find_hang(a, group, recoveries.is_some(), now) {
                            Hang::None => {}
                            Hang::Replace(index, culprit) => {
                                group.kill(index);
                                killed.insert(index, culprit);
                            }
                            Hang::Report(rank, reason) => {
                                reported = true;
                                let failure = Self::failure_of(group, rank, reason);
                                if let Some(next) = Self::follow(self.report_failure(a.generation, failure, false, group).await?) {
                                    return Ok(next);
                                }
                            }
                        }
                    }
                    let request = HeartbeatRequest {
                        job_id: self.config.job_id.clone(),
                        node_id: self.config.node_id.clone(),
                        generation: a.generation,
                        workers: group.statuses(),
                        recorded: Self::recorded(group),
                    };
                    let mut call = tonic::Request::new(request);
                    call.set_timeout(self.config.coordinator_timeout);
                    let mut client = self.client.clone();
                    match client.heartbeat(call).await {
                        Ok(response) => {
                            self.note_answer();
                            if let Some(next) = Self::follow(response.into_inner().directive.unwrap_or_default()) {
                                return Ok(next);
                            }
                        }
                        Err(status) if status.code() == tonic::Code::Unauthenticated => {
                            return Err(rpc_error(&self.config.coordinator, "Heartbeat", status));
                        }
                        Err(status) => self.note_silence("Heartbeat", &status)?,
                    }
                }
                Some((index, status)) = group.next_exit() => {
                    if reported {
                        continue;
                    }
                    if !status.success() {
                        let culprit = killed.remove(&index);
                        let Some(failure) = self
                            .on_failure(a, group, recoveries.as_mut(), index, status, culprit)
                            .await
                        else {
                            continue;
                        };
                        reported = true;
                        if let Some(next) = Self::follow(self.report_failure(a.generation, failure, false, group).await?) {
                            return Ok(next);
                        }
                    } else if group.all_succeeded() {
                        reported = true;
                        let request = ReportDoneRequest {
                            job_id: self.config.job_id.clone(),
                            node_id: self.config.node_id.clone(),
                            generation: a.generation,
                        };
                        let directive = self
                            .call("ReportDone", |mut c| {
                                let request = request.clone();
                                async move { c.report_done(request).await }
                            })
                            .await?
                            .directive
                            .unwrap_or_default();
                        if let Some(next) = Self::follow(directive) {
                            return Ok(next);
                        }
                    }
                }
                event = next_recovery_event(&mut recoveries) => {
                    if let Some(r) = recoveries.as_mut() {
                        r.apply(event);
                    }
                }
                sig = signals.recv() => {
                    self.console.err(&format!(
                        "[cohort] {} received: stopping workers (SIGKILL after {:?})",
                        if sig == libc::SIGINT { "SIGINT" } else { "SIGTERM" },
                        self.config.grace_period
                    ));
                    return Ok(Next::Interrupted(sig));
                }
            }
        }
    }

    /// A hung worker, if one is: replaced in place when it is one of this
    /// node's and the job recovers in place (`peer`), else reported.
    fn find_hang(&self, a: &Assignment, group: &WorkerGroup, peer: bool, now: Instant) -> Hang {
        let marks = group.step_marks();
        let timeout = self.config.hang_timeout;
        let Some((first, stalled)) = find_hung_worker(now, &marks, timeout) else {
            return Hang::None;
        };
        // The first rank seen stalled is rarely the cause.
        let Some((culprit, why)) = find_hang_culprit(&group.hang_evidence()) else {
            // The culprit may be on another node, whose agent replaces it
            // in place once it sees the same stall: give it the time to.
            let grace = self.config.heartbeat_interval * 2 + PEER_HANG_GRACE;
            if peer && a.nnodes > 1 && find_hung_worker(now, &marks, timeout + grace).is_none() {
                return Hang::None;
            }
            return Hang::Report(
                first,
                format!(
                    "{stalled}; every rank stalled at the same step and none is stopped, so this is the first one seen (evidence: step marks)"
                ),
            );
        };
        let reason = format!("{why}; rank {first} was the first seen stalled: {stalled}");
        let facts = FailedWorker {
            peer,
            world_size: a.world_size,
            ..FailedWorker::default()
        };
        match group.workers.iter().position(|w| w.rank == culprit) {
            Some(index) if decide_worker_failure(&facts) == WorkerFailure::InPlace => {
                // When it last made progress: the failure, as well as known.
                let stalled_ms = marks.iter().find(|m| m.rank == culprit).map_or(0, |m| {
                    now.saturating_duration_since(m.since).as_millis() as u64
                });
                Hang::Replace(
                    index,
                    KilledCulprit {
                        notice_reason: why,
                        report_reason: reason,
                        last_progress_unix_ms: unix_ms().saturating_sub(stalled_ms),
                    },
                )
            }
            _ => Hang::Report(culprit, reason),
        }
    }

    /// The worker at `index` exited with `status` (killed as the hang
    /// `culprit` if it was): replaced in place when it can be ([`None`]),
    /// else the failure to report.
    async fn on_failure(
        &self,
        a: &Assignment,
        group: &mut WorkerGroup,
        recoveries: Option<&mut Recoveries>,
        index: usize,
        status: std::process::ExitStatus,
        culprit: Option<KilledCulprit>,
    ) -> Option<FailureInfo> {
        let worker = &group.workers[index];
        let rank = worker.rank;
        let exited = describe_exit(status);
        let (notice_reason, report_reason, failed_unix_ms) = match culprit {
            Some(c) => (c.notice_reason, c.report_reason, c.last_progress_unix_ms),
            None => (
                // "it was killed by ...", "it exited with code 1".
                if exited.starts_with("killed") {
                    format!("was {exited}")
                } else {
                    exited.clone()
                },
                exited,
                worker.exited_unix_ms.unwrap_or_else(unix_ms),
            ),
        };
        let facts = FailedWorker {
            peer: recoveries.is_some(),
            world_size: a.world_size,
            code: status.code(),
            replacing: recoveries.as_ref().and_then(|r| r.replacing(index)),
            in_flight: recoveries.as_ref().and_then(|r| r.in_flight()),
        };
        let why = match (decide_worker_failure(&facts), recoveries) {
            (WorkerFailure::InPlace, Some(recoveries)) => {
                match self
                    .replace(a, group, recoveries, index, &notice_reason, failed_unix_ms)
                    .await
                {
                    Ok(()) => return None,
                    Err(e) => Some(format!(
                        "in-place recovery could not start: {e}; falling back to a restart from \
                         the newest checkpoint"
                    )),
                }
            }
            (WorkerFailure::Report(why), _) => why,
            (WorkerFailure::InPlace, None) => None,
        };
        let reason = match why {
            Some(why) => format!("{report_reason} ({why})"),
            None => report_reason,
        };
        let mut failure = Self::failure_of(group, rank, reason);
        failure.permanent = status.code() == Some(exit::PERMANENT_FAILURE);
        Some(failure)
    }

    /// Replaces the failed worker at `index` in place: a new epoch and its
    /// notice, then the same rank started again with `COHORT_EPOCH` set,
    /// its output appended to its log; its `Done` is awaited in the
    /// background.
    async fn replace(
        &self,
        a: &Assignment,
        group: &mut WorkerGroup,
        recoveries: &mut Recoveries,
        index: usize,
        reason: &str,
        failed_unix_ms: u64,
    ) -> Result<(), LauncherError> {
        let (rank, local_rank) = (group.workers[index].rank, group.workers[index].local_rank);
        let notice = recoveries
            .begin(index, rank, reason, failed_unix_ms)
            .await?;
        let epoch = notice.epoch;
        let (program, args) = self.program();
        let spec = self.spec(a, local_rank, epoch, &program, &args)?;
        // What the failed worker recorded is this failure's, not the
        // replacement's: kept aside, out of the job's root cause.
        if let Some(dir) = spec.log_path.parent() {
            let error_file = errorfile::error_file(dir, rank);
            let aside = dir.join(format!("rank_{rank}.error.before_epoch_{epoch}.json"));
            if let Err(source) = std::fs::rename(&error_file, &aside)
                && source.kind() != std::io::ErrorKind::NotFound
            {
                return Err(LauncherError::Io {
                    path: error_file,
                    source,
                });
            }
        }
        let separator = format!(
            "[cohort] ---- rank {rank} {reason}; started again in place (epoch {epoch}) ----"
        );
        group.respawn(index, spec, &separator, &self.console)?;
        recoveries.await_done(notice);
        Ok(())
    }
}

/// The next event of the generation's recoveries (never without them).
async fn next_recovery_event(recoveries: &mut Option<Recoveries>) -> crate::recovery::Event {
    match recoveries {
        Some(r) => r.next_event().await,
        None => std::future::pending().await,
    }
}

/// How much longer than `--hang-timeout` a node that sees no culprit of its
/// own waits before it reports a hang, when the job recovers in place
/// (besides two heartbeat intervals): the culprit's own node may be about
/// to replace it.
const PEER_HANG_GRACE: Duration = Duration::from_secs(2);

/// A hang culprit killed to be replaced in place.
struct KilledCulprit {
    /// What its notice says ("hung: ...").
    notice_reason: String,
    /// What the failure says if it is reported after all.
    report_reason: String,
    last_progress_unix_ms: u64,
}

/// What [`Agent::find_hang`] found.
enum Hang {
    None,
    /// Kill the worker at this index and replace it in place.
    Replace(usize, KilledCulprit),
    /// Report this rank as hung, for this reason.
    Report(u32, String),
}

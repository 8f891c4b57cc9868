//! The coordinator: the job's state machine behind a thin tonic service.
//!
//! A coordinator runs one job. Its state moves Forming -> Running -> (Forming
//! of the next generation | Finished). Every transition is decided by a pure
//! function of [`crate::decision`]; this module keeps the state, feeds those
//! functions with the clock, tells waiting `Join` calls when a generation
//! forms, and answers heartbeats with what the agent must do next.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cohort_proto::v1::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use cohort_proto::v1::{
    Action, Assignment, BarrierRequest, BarrierResponse, Directive, EventKind, FailureInfo,
    HeartbeatRequest, HeartbeatResponse, JobEvent, JobOutcome, JoinRequest, JoinResponse,
    KvCompareAndSetRequest, KvCompareAndSetResponse, KvGetRequest, KvGetResponse, KvSetRequest,
    KvSetResponse, KvWaitRequest, KvWaitResponse, LeaveRequest, LeaveResponse, Progress,
    ReportDoneRequest, ReportDoneResponse, ReportFailureRequest, ReportFailureResponse,
    WatchEventsRequest, WorkerState, WorkerStatus, join_response,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::LauncherError;
use crate::auth::TokenCheck;
use crate::decision::{
    Formation, MemberLiveness, NodeRange, Recovery, decide_formation, decide_recovery,
    find_lost_nodes,
};

/// How a coordinator behaves; the job's shape comes from here or, where
/// `None`, from the first node that joins.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// The job id; `None`: the first node's, or a generated one.
    pub job_id: Option<String>,
    /// `--nnodes`; `None`: the first node's.
    pub nnodes: Option<NodeRange>,
    /// `--max-restarts`; `None`: the first node's.
    pub max_restarts: Option<u32>,
    /// The job token every RPC must carry.
    pub token: String,
    /// A member silent for this long is lost.
    pub heartbeat_timeout: Duration,
    /// With `--nnodes MIN:MAX`: how long to wait for more nodes after MIN joined.
    pub last_call: Duration,
    /// How often the clock-driven decisions (last call, lost nodes) run.
    pub tick: Duration,
}

impl CoordinatorConfig {
    /// Defaults for a job with token `token`.
    pub fn new(token: String) -> Self {
        Self {
            job_id: None,
            nnodes: None,
            max_restarts: None,
            token,
            heartbeat_timeout: Duration::from_secs(15),
            last_call: Duration::from_secs(10),
            tick: Duration::from_millis(100),
        }
    }
}

/// A new job id: time of day plus random bits, e.g. `job-20261122-031633-9f2c`.
pub fn generate_job_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "job-{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{:04x}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        rand::random::<u16>()
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

struct Pending {
    node_id: String,
    host: String,
    nproc: u32,
    master_port: u32,
    joined_at: Instant,
}

struct Member {
    node_rank: u32,
    host: String,
    last_heartbeat: Instant,
    done: bool,
    workers: Vec<WorkerStatus>,
}

enum Phase {
    Forming,
    Running,
    Finished(JobOutcome),
}

struct JobState {
    job_id: Option<String>,
    range: Option<NodeRange>,
    max_restarts: Option<u32>,
    generation: u64,
    restart_count: u32,
    phase: Phase,
    pending: Vec<Pending>,
    /// The ids in `pending` (a rejoin replaces the node's earlier entry).
    pending_ids: HashSet<String>,
    /// The place of every member of the running generation.
    assignments: HashMap<String, Assignment>,
    members: HashMap<String, Member>,
    /// Why the last generation ended, for agents that ask late.
    last_restart_reason: String,
    /// Nodes that said goodbye after the job finished.
    left: HashSet<String>,
    last_progress: Option<Progress>,
    last_progress_at: Instant,
}

fn directive(action: Action, reason: impl Into<String>) -> Directive {
    Directive {
        action: action as i32,
        reason: reason.into(),
        outcome: None,
    }
}

/// The state and its notifications, shared by the service and the clock task.
pub struct Coordinator {
    config: CoordinatorConfig,
    state: Mutex<JobState>,
    kv: crate::kv::KvStore,
    /// Bumped when a generation forms or the job finishes (wakes `Join`s).
    changed: watch::Sender<u64>,
    events: broadcast::Sender<JobEvent>,
}

impl Coordinator {
    /// A coordinator with no nodes yet.
    pub fn new(config: CoordinatorConfig) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Self {
            state: Mutex::new(JobState {
                job_id: config.job_id.clone(),
                range: config.nnodes,
                max_restarts: config.max_restarts,
                generation: 0,
                restart_count: 0,
                phase: Phase::Forming,
                pending: Vec::new(),
                pending_ids: HashSet::new(),
                assignments: HashMap::new(),
                members: HashMap::new(),
                last_restart_reason: String::new(),
                left: HashSet::new(),
                last_progress: None,
                last_progress_at: now,
            }),
            config,
            kv: crate::kv::KvStore::default(),
            changed: watch::Sender::new(0),
            events: broadcast::Sender::new(4096),
        })
    }

    fn lock(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, st: &JobState, kind: EventKind, message: String) {
        if kind != EventKind::Progress {
            tracing::debug!(generation = st.generation, "{message}");
        }
        let outcome = match &st.phase {
            Phase::Finished(o) => Some(o.clone()),
            _ => None,
        };
        let _ = self.events.send(JobEvent {
            time: unix_now(),
            generation: st.generation,
            kind: kind as i32,
            message,
            progress: st.last_progress,
            outcome,
        });
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Job events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    /// The job's outcome once it is over.
    pub fn outcome(&self) -> Option<JobOutcome> {
        match &self.lock().phase {
            Phase::Finished(o) => Some(o.clone()),
            _ => None,
        }
    }

    /// Waits until the job is over and every node of its last generation
    /// left (or `linger` passed after the end), and returns the outcome.
    pub async fn wait_finished(&self, linger: Duration) -> JobOutcome {
        let mut rx = self.changed.subscribe();
        let mut finished_at = None;
        loop {
            {
                let st = self.lock();
                if let Phase::Finished(outcome) = &st.phase {
                    let all_left = st.assignments.keys().all(|n| st.left.contains(n));
                    let started = *finished_at.get_or_insert_with(tokio::time::Instant::now);
                    if all_left || started.elapsed() >= linger {
                        return outcome.clone();
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
        }
    }

    fn check_job(&self, st: &mut JobState, job_id: &str) -> Result<String, Status> {
        match &st.job_id {
            Some(id) if job_id.is_empty() || job_id == id => Ok(id.clone()),
            Some(id) => Err(Status::failed_precondition(format!(
                "this coordinator runs job {id:?}, not {job_id:?}: pass --job-id {id} or no --job-id"
            ))),
            None => {
                let id = if job_id.is_empty() {
                    generate_job_id()
                } else {
                    job_id.to_owned()
                };
                st.job_id = Some(id.clone());
                Ok(id)
            }
        }
    }

    fn register(&self, now: Instant, req: &JoinRequest) -> Result<(), Status> {
        if req.node_id.is_empty() || req.nproc == 0 {
            return Err(Status::invalid_argument(
                "join needs a node id and at least one worker",
            ));
        }
        let mut st = self.lock();
        self.check_job(&mut st, &req.job_id)?;
        if let Some(opts) = &req.options {
            if st.range.is_none() && opts.min_nodes >= 1 && opts.min_nodes <= opts.max_nodes {
                st.range = Some(NodeRange {
                    min: opts.min_nodes,
                    max: opts.max_nodes,
                });
            }
            if st.max_restarts.is_none() {
                st.max_restarts = Some(opts.max_restarts);
            }
        }
        if matches!(st.phase, Phase::Finished(_)) {
            return Ok(());
        }
        if !st.pending_ids.insert(req.node_id.clone()) {
            st.pending.retain(|p| p.node_id != req.node_id);
        }
        st.pending.push(Pending {
            node_id: req.node_id.clone(),
            host: req.host.clone(),
            nproc: req.nproc,
            master_port: req.master_port,
            joined_at: now,
        });
        let message = format!(
            "node {} ({}, {} workers) joined generation {}",
            req.node_id, req.host, req.nproc, st.generation
        );
        self.emit(&st, EventKind::NodeJoined, message);
        self.try_form(now, &mut st);
        Ok(())
    }

    fn unregister_pending(&self, node_id: &str) {
        let mut st = self.lock();
        if st.pending_ids.remove(node_id) {
            st.pending.retain(|p| p.node_id != node_id);
            tracing::info!("node {node_id} left the rendezvous before its generation formed");
        }
    }

    fn poll_join(&self, node_id: &str) -> Option<JoinResponse> {
        let st = self.lock();
        let outcome = match &st.phase {
            Phase::Finished(o) => join_response::Outcome::Finished(o.clone()),
            Phase::Running => {
                join_response::Outcome::Assignment(st.assignments.get(node_id)?.clone())
            }
            Phase::Forming => return None,
        };
        Some(JoinResponse {
            outcome: Some(outcome),
        })
    }

    fn try_form(&self, now: Instant, st: &mut JobState) {
        if !matches!(st.phase, Phase::Forming) {
            return;
        }
        let Some(range) = st.range else { return };
        let min_joined_at = st.pending.get(range.min as usize - 1).map(|p| p.joined_at);
        let (decision, reason) = decide_formation(
            now,
            st.pending.len(),
            min_joined_at,
            range,
            self.config.last_call,
        );
        let Formation::Form { nodes } = decision else {
            return;
        };
        let chosen: Vec<Pending> = st.pending.drain(..nodes).collect();
        for p in &chosen {
            st.pending_ids.remove(&p.node_id);
        }
        let world_size: u32 = chosen.iter().map(|p| p.nproc).sum();
        let (master_addr, master_port) = (chosen[0].host.clone(), chosen[0].master_port);
        let job_id = st.job_id.clone().unwrap_or_default();
        st.assignments.clear();
        st.members.clear();
        st.left.clear();
        let mut offset = 0;
        for (node_rank, p) in chosen.into_iter().enumerate() {
            st.assignments.insert(
                p.node_id.clone(),
                Assignment {
                    job_id: job_id.clone(),
                    generation: st.generation,
                    restart_count: st.restart_count,
                    node_rank: node_rank as u32,
                    nnodes: nodes as u32,
                    world_size,
                    rank_offset: offset,
                    master_addr: master_addr.clone(),
                    master_port,
                },
            );
            st.members.insert(
                p.node_id,
                Member {
                    node_rank: node_rank as u32,
                    host: p.host,
                    last_heartbeat: now,
                    done: false,
                    workers: Vec::new(),
                },
            );
            offset += p.nproc;
        }
        st.phase = Phase::Running;
        st.last_progress = Some(Progress {
            world_size,
            ..Progress::default()
        });
        self.kv.retain_from(st.generation);
        let message = format!(
            "generation {} formed: {nodes} node(s), {world_size} ranks ({reason})",
            st.generation
        );
        self.emit(st, EventKind::GenerationFormed, message);
        self.bump();
    }

    /// Ends the running generation with `failure`: restart or give up.
    fn end_generation(
        &self,
        st: &mut JobState,
        failure: FailureInfo,
        fatal: bool,
        lost: &[String],
    ) {
        if !matches!(st.phase, Phase::Running) || failure.generation != st.generation {
            return;
        }
        let node = format!("node {} ({})", failure.node_id, failure.host);
        let what = match failure.rank {
            Some(rank) => format!("rank {rank} on {node} {}", failure.reason),
            None => format!("{node} {}", failure.reason),
        };
        self.emit(st, EventKind::Failure, what.clone());
        let live = st.members.len() - lost.len();
        let range = st.range.unwrap_or(NodeRange::exactly(1));
        let (decision, reason) = decide_recovery(
            st.restart_count,
            st.max_restarts.unwrap_or(0),
            live,
            range,
            fatal,
        );
        match decision {
            Recovery::Restart => {
                st.generation += 1;
                st.restart_count += 1;
                st.phase = Phase::Forming;
                st.members.clear();
                st.assignments.clear();
                st.last_restart_reason = format!("{what}; {reason}");
                let message = format!("generation {} ended: {what}; {reason}", st.generation - 1);
                self.emit(st, EventKind::Restarting, message);
            }
            Recovery::GiveUp => {
                let outcome = JobOutcome {
                    success: false,
                    summary: format!("job failed: {what}; {reason}"),
                    root_cause: Some(failure),
                };
                let message = outcome.summary.clone();
                st.phase = Phase::Finished(outcome);
                self.emit(st, EventKind::Finished, message);
            }
        }
        self.bump();
    }

    /// The directive for a node that reports on `generation`.
    fn directive_for(&self, st: &JobState, node_id: &str, generation: u64) -> Directive {
        match &st.phase {
            Phase::Finished(outcome) => Directive {
                action: Action::Finished as i32,
                reason: outcome.summary.clone(),
                outcome: Some(outcome.clone()),
            },
            Phase::Running if generation == st.generation && st.members.contains_key(node_id) => {
                directive(Action::Continue, "")
            }
            _ if generation < st.generation => {
                directive(Action::Restart, st.last_restart_reason.clone())
            }
            _ => directive(
                Action::Restart,
                format!(
                    "node {node_id} is not a member of generation {}",
                    st.generation
                ),
            ),
        }
    }

    fn heartbeat(&self, now: Instant, req: HeartbeatRequest) -> Directive {
        let mut st = self.lock();
        if matches!(st.phase, Phase::Running) && req.generation == st.generation {
            if let Some(m) = st.members.get_mut(&req.node_id) {
                m.last_heartbeat = now;
                m.workers = req.workers;
            }
        }
        self.directive_for(&st, &req.node_id, req.generation)
    }

    fn report_failure(&self, req: ReportFailureRequest) -> Directive {
        let mut st = self.lock();
        if let Some(mut failure) = req.failure {
            failure.generation = req.generation;
            failure.node_id.clone_from(&req.node_id);
            if let Some(m) = st.members.get(&req.node_id) {
                failure.node_rank = m.node_rank;
                failure.host.clone_from(&m.host);
            }
            self.end_generation(&mut st, failure, req.fatal, &[]);
        }
        self.directive_for(&st, &req.node_id, req.generation)
    }

    fn report_done(&self, req: ReportDoneRequest) -> Directive {
        let mut st = self.lock();
        if matches!(st.phase, Phase::Running) && req.generation == st.generation {
            if let Some(m) = st.members.get_mut(&req.node_id) {
                m.done = true;
            }
            if st.members.values().all(|m| m.done) {
                let world: u32 = st
                    .assignments
                    .values()
                    .map(|a| a.world_size)
                    .max()
                    .unwrap_or(0);
                let outcome = JobOutcome {
                    success: true,
                    summary: format!(
                        "job succeeded: all {world} ranks of generation {} exited 0 ({} restart(s))",
                        st.generation, st.restart_count
                    ),
                    root_cause: None,
                };
                let message = outcome.summary.clone();
                st.phase = Phase::Finished(outcome);
                self.emit(&st, EventKind::Finished, message);
                self.bump();
            }
        }
        self.directive_for(&st, &req.node_id, req.generation)
    }

    fn leave(&self, node_id: &str) {
        let mut st = self.lock();
        st.left.insert(node_id.to_owned());
        self.bump();
    }

    /// The clock-driven decisions: last calls and lost nodes; and the
    /// progress summary for watchers.
    fn tick(&self, now: Instant) {
        let mut st = self.lock();
        match st.phase {
            Phase::Forming => self.try_form(now, &mut st),
            Phase::Running => {
                let members: Vec<MemberLiveness<'_>> = st
                    .members
                    .iter()
                    .map(|(id, m)| MemberLiveness {
                        node_id: id,
                        last_heartbeat: m.last_heartbeat,
                    })
                    .collect();
                let lost = find_lost_nodes(now, &members, self.config.heartbeat_timeout);
                if let Some((node_id, reason)) = lost.first() {
                    let m = &st.members[node_id];
                    let failure = FailureInfo {
                        node_id: node_id.clone(),
                        host: m.host.clone(),
                        node_rank: m.node_rank,
                        reason: reason.clone(),
                        generation: st.generation,
                        ..FailureInfo::default()
                    };
                    let lost: Vec<String> = lost.into_iter().map(|(id, _)| id).collect();
                    self.end_generation(&mut st, failure, false, &lost);
                } else if self.events.receiver_count() > 0
                    && now.duration_since(st.last_progress_at) >= Duration::from_millis(500)
                {
                    st.last_progress_at = now;
                    let progress = summarize(st.members.values().flat_map(|m| &m.workers));
                    if st.last_progress != Some(progress) {
                        st.last_progress = Some(progress);
                        self.emit(&st, EventKind::Progress, String::new());
                    }
                }
            }
            Phase::Finished(_) => {}
        }
    }

    /// An event describing the job as it is now (the first event a watcher gets).
    fn snapshot(&self) -> JobEvent {
        let st = self.lock();
        let (kind, message, outcome) = match &st.phase {
            // The joins that follow say it all.
            Phase::Forming => (EventKind::NodeJoined, String::new(), None),
            Phase::Running => (
                EventKind::GenerationFormed,
                format!(
                    "generation {} running on {} node(s)",
                    st.generation,
                    st.members.len()
                ),
                None,
            ),
            Phase::Finished(o) => (EventKind::Finished, o.summary.clone(), Some(o.clone())),
        };
        JobEvent {
            time: unix_now(),
            generation: st.generation,
            kind: kind as i32,
            message,
            progress: st.last_progress,
            outcome,
        }
    }
}

/// The progress line of the job from its workers' last heartbeats.
fn summarize<'a>(workers: impl Iterator<Item = &'a WorkerStatus>) -> Progress {
    let mut p = Progress::default();
    let mut min_step: Option<u64> = None;
    for w in workers {
        p.world_size += 1;
        if w.state == WorkerState::Running as i32 {
            p.ranks_up += 1;
        }
        if !w.reports_progress {
            continue;
        }
        min_step = Some(min_step.map_or(w.step, |s| s.min(w.step)));
        p.max_steps = p.max_steps.max(w.max_steps);
        if w.rank == 0 {
            p.loss = w.loss;
            p.tokens_per_s = w.tokens_per_s;
        }
    }
    p.step = min_step.unwrap_or(0);
    p
}

/// Removes a node from the rendezvous if its `Join` is dropped (the node
/// went away) before the generation formed.
struct PendingGuard {
    coordinator: Arc<Coordinator>,
    node_id: Option<String>,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if let Some(node_id) = self.node_id.take() {
            self.coordinator.unregister_pending(&node_id);
        }
    }
}

/// The tonic service: checks arguments, converts, delegates.
#[derive(Clone)]
struct Service(Arc<Coordinator>);

fn check_key(key: &str) -> Result<(), Status> {
    cohort_collectives::store::validate_key(key)
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

impl Service {
    fn job(&self, job_id: &str) -> Result<(), Status> {
        let mut st = self.0.lock();
        self.0.check_job(&mut st, job_id).map(drop)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl CoordinatorRpc for Service {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let req = request.into_inner();
        let mut changed = self.0.changed.subscribe();
        self.0.register(Instant::now(), &req)?;
        let mut guard = PendingGuard {
            coordinator: self.0.clone(),
            node_id: Some(req.node_id.clone()),
        };
        loop {
            if let Some(response) = self.0.poll_join(&req.node_id) {
                guard.node_id = None;
                return Ok(Response::new(response));
            }
            if changed.changed().await.is_err() {
                return Err(Status::unavailable("the coordinator is shutting down"));
            }
        }
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        let directive = self.0.heartbeat(Instant::now(), req);
        Ok(Response::new(HeartbeatResponse {
            directive: Some(directive),
        }))
    }

    async fn report_failure(
        &self,
        request: Request<ReportFailureRequest>,
    ) -> Result<Response<ReportFailureResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        Ok(Response::new(ReportFailureResponse {
            directive: Some(self.0.report_failure(req)),
        }))
    }

    async fn report_done(
        &self,
        request: Request<ReportDoneRequest>,
    ) -> Result<Response<ReportDoneResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        Ok(Response::new(ReportDoneResponse {
            directive: Some(self.0.report_done(req)),
        }))
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        self.0.leave(&req.node_id);
        Ok(Response::new(LeaveResponse {}))
    }

    async fn kv_set(
        &self,
        request: Request<KvSetRequest>,
    ) -> Result<Response<KvSetResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        check_key(&req.key)?;
        self.0.kv.set(req.generation, &req.key, req.value);
        Ok(Response::new(KvSetResponse {}))
    }

    async fn kv_get(
        &self,
        request: Request<KvGetRequest>,
    ) -> Result<Response<KvGetResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        check_key(&req.key)?;
        Ok(Response::new(KvGetResponse {
            value: self.0.kv.get(req.generation, &req.key),
        }))
    }

    async fn kv_wait(
        &self,
        request: Request<KvWaitRequest>,
    ) -> Result<Response<KvWaitResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        for key in &req.keys {
            check_key(key)?;
        }
        let timeout = Duration::from_millis(req.timeout_ms);
        let response = match self.0.kv.wait(req.generation, &req.keys, timeout).await {
            Ok(values) => KvWaitResponse {
                complete: true,
                values,
                missing: Vec::new(),
            },
            Err(missing) => KvWaitResponse {
                complete: false,
                values: Vec::new(),
                missing,
            },
        };
        Ok(Response::new(response))
    }

    async fn kv_compare_and_set(
        &self,
        request: Request<KvCompareAndSetRequest>,
    ) -> Result<Response<KvCompareAndSetResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        check_key(&req.key)?;
        let (swapped, current) = self.0.kv.compare_and_set(
            req.generation,
            &req.key,
            req.expected.as_deref(),
            req.desired,
        );
        Ok(Response::new(KvCompareAndSetResponse { swapped, current }))
    }

    async fn barrier(
        &self,
        request: Request<BarrierRequest>,
    ) -> Result<Response<BarrierResponse>, Status> {
        let req = request.into_inner();
        self.job(&req.job_id)?;
        check_key(&req.name)?;
        let outcome = self
            .0
            .kv
            .barrier(
                req.generation,
                &req.name,
                &req.participant,
                req.count,
                Duration::from_millis(req.timeout_ms),
            )
            .await;
        Ok(Response::new(BarrierResponse {
            complete: outcome.complete,
            arrived: outcome.arrived,
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.job(&request.into_inner().job_id)?;
        let mut events = self.0.events.subscribe();
        let first = self.0.snapshot();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let done = first.kind == EventKind::Finished as i32;
            if tx.send(Ok(first)).await.is_err() || done {
                return;
            }
            loop {
                match events.recv().await {
                    Ok(event) => {
                        let done = event.kind == EventKind::Finished as i32;
                        if tx.send(Ok(event)).await.is_err() || done {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A coordinator serving on a socket, with its clock task.
pub struct RunningCoordinator {
    addr: SocketAddr,
    coordinator: Arc<Coordinator>,
    shutdown: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
    clock: tokio::task::JoinHandle<()>,
}

impl RunningCoordinator {
    /// Binds `bind` (port 0: any free port) and serves. Must run inside a
    /// tokio runtime.
    pub async fn start(bind: &str, config: CoordinatorConfig) -> Result<Self, LauncherError> {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .map_err(|source| LauncherError::Bind {
                addr: bind.to_owned(),
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| LauncherError::Bind {
                addr: bind.to_owned(),
                source,
            })?;
        let tick = config.tick;
        let token = TokenCheck::new(&config.token);
        let coordinator = Coordinator::new(config);
        let service =
            CoordinatorServer::with_interceptor(Service(coordinator.clone()), move |req| {
                token.check(req)
            });
        let (shutdown, signal) = oneshot::channel::<()>();
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let server = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .max_concurrent_streams(Some(1 << 20))
                .http2_keepalive_interval(Some(Duration::from_secs(10)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = signal.await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!("coordinator server on {addr} stopped: {e}");
            }
        });
        let clock = {
            let coordinator = coordinator.clone();
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(tick);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    coordinator.tick(Instant::now());
                }
            })
        };
        Ok(Self {
            addr,
            coordinator,
            shutdown: Some(shutdown),
            server,
            clock,
        })
    }

    /// The address it listens on (the real port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The job state.
    pub fn coordinator(&self) -> &Arc<Coordinator> {
        &self.coordinator
    }

    /// Stops serving.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.clock.abort();
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.server).await;
        self.server.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_proto::v1::JobOptions;

    fn coordinator(range: NodeRange, max_restarts: u32) -> Arc<Coordinator> {
        let mut config = CoordinatorConfig::new("t".into());
        config.job_id = Some("job".into());
        config.nnodes = Some(range);
        config.max_restarts = Some(max_restarts);
        config.heartbeat_timeout = Duration::from_secs(5);
        Coordinator::new(config)
    }

    fn join(c: &Coordinator, now: Instant, node: &str) {
        c.register(
            now,
            &JoinRequest {
                job_id: "job".into(),
                node_id: node.into(),
                host: format!("host-{node}"),
                nproc: 2,
                master_port: 1000,
                options: Some(JobOptions::default()),
            },
        )
        .unwrap();
    }

    fn assignment(c: &Coordinator, node: &str) -> Assignment {
        match c.poll_join(node).and_then(|r| r.outcome) {
            Some(join_response::Outcome::Assignment(a)) => a,
            other => panic!("no assignment for {node}: {other:?}"),
        }
    }

    fn failure(rank: u32, generation: u64) -> ReportFailureRequest {
        ReportFailureRequest {
            job_id: "job".into(),
            node_id: "a".into(),
            generation,
            failure: Some(FailureInfo {
                rank: Some(rank),
                reason: "exited with code 3".into(),
                ..FailureInfo::default()
            }),
            fatal: false,
        }
    }

    #[test]
    fn ranks_are_laid_out_in_join_order() {
        let c = coordinator(NodeRange::exactly(2), 0);
        let t0 = Instant::now();
        join(&c, t0, "a");
        assert!(c.poll_join("a").is_none());
        join(&c, t0, "b");
        let (a, b) = (assignment(&c, "a"), assignment(&c, "b"));
        assert_eq!((a.node_rank, a.rank_offset, a.world_size), (0, 0, 4));
        assert_eq!((b.node_rank, b.rank_offset, b.world_size), (1, 2, 4));
        assert_eq!((b.master_addr.as_str(), b.master_port), ("host-a", 1000));
    }

    #[test]
    fn failure_restarts_then_gives_up_with_root_cause() {
        let c = coordinator(NodeRange::exactly(1), 1);
        let t0 = Instant::now();
        join(&c, t0, "a");
        let d = c.report_failure(failure(1, 0));
        assert_eq!(d.action, Action::Restart as i32);
        assert_eq!(
            d.reason,
            "rank 1 on node a (host-a) exited with code 3; restart 1 of --max-restarts 1 with 1 node(s)"
        );
        join(&c, t0, "a");
        assert_eq!(assignment(&c, "a").generation, 1);
        // A stale report of generation 0 changes nothing.
        assert_eq!(
            c.report_failure(failure(0, 0)).action,
            Action::Restart as i32
        );
        let d = c.report_failure(failure(0, 1));
        assert_eq!(d.action, Action::Finished as i32);
        let outcome = d.outcome.unwrap();
        assert!(!outcome.success);
        assert_eq!(
            outcome.summary,
            "job failed: rank 0 on node a (host-a) exited with code 3; no restarts left (1 of --max-restarts 1 used)"
        );
        assert_eq!(outcome.root_cause.unwrap().rank, Some(0));
    }

    #[test]
    fn silent_node_is_lost_and_elastic_job_goes_on() {
        let c = coordinator(NodeRange { min: 1, max: 2 }, 3);
        let t0 = Instant::now();
        join(&c, t0, "a");
        join(&c, t0, "b");
        let later = t0 + Duration::from_secs(4);
        c.heartbeat(
            later,
            HeartbeatRequest {
                job_id: "job".into(),
                node_id: "a".into(),
                generation: 0,
                workers: Vec::new(),
            },
        );
        c.tick(t0 + Duration::from_secs(6));
        let d = c.heartbeat(
            t0 + Duration::from_secs(6),
            HeartbeatRequest {
                job_id: "job".into(),
                node_id: "a".into(),
                generation: 0,
                workers: Vec::new(),
            },
        );
        assert_eq!(d.action, Action::Restart as i32);
        assert_eq!(
            d.reason,
            "node b (host-b) sent no heartbeat for 6.0s (limit 5s); \
             restart 1 of --max-restarts 3 with 1 node(s)"
        );
    }

    #[test]
    fn all_nodes_done_is_success() {
        let c = coordinator(NodeRange::exactly(2), 0);
        let t0 = Instant::now();
        join(&c, t0, "a");
        join(&c, t0, "b");
        let done = |node: &str| ReportDoneRequest {
            job_id: "job".into(),
            node_id: node.into(),
            generation: 0,
        };
        assert_eq!(c.report_done(done("a")).action, Action::Continue as i32);
        let d = c.report_done(done("b"));
        assert_eq!(d.action, Action::Finished as i32);
        assert_eq!(
            d.reason,
            "job succeeded: all 4 ranks of generation 0 exited 0 (0 restart(s))"
        );
    }

    #[test]
    fn progress_is_the_slowest_step_with_rank_0_metrics() {
        let w = |rank: u32, step: u64, state: WorkerState| WorkerStatus {
            rank,
            state: state as i32,
            reports_progress: true,
            step,
            max_steps: 10,
            loss: Some(f64::from(rank)),
            tokens_per_s: Some(100.0 + f64::from(rank)),
            ..WorkerStatus::default()
        };
        let silent = WorkerStatus {
            rank: 3,
            state: WorkerState::Running as i32,
            ..WorkerStatus::default()
        };
        let workers = [
            w(1, 3, WorkerState::Running),
            w(0, 5, WorkerState::Running),
            w(2, 9, WorkerState::Succeeded),
            silent,
        ];
        assert_eq!(
            summarize(workers.iter()),
            Progress {
                ranks_up: 3,
                world_size: 4,
                step: 3,
                max_steps: 10,
                loss: Some(0.0),
                tokens_per_s: Some(100.0),
            }
        );
    }

    #[test]
    fn job_id_mismatch_is_refused() {
        let c = coordinator(NodeRange::exactly(1), 0);
        let err = c
            .register(
                Instant::now(),
                &JoinRequest {
                    job_id: "other".into(),
                    node_id: "a".into(),
                    nproc: 1,
                    ..JoinRequest::default()
                },
            )
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.message().contains("runs job \"job\""));
    }
}

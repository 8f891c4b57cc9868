//! The job's state machine, without sockets or locks: every input (a join, a
//! heartbeat, a report, a clock tick) is a method taking the time, every
//! decision is one of [`crate::decision`]'s pure functions, and what the
//! outside must do afterwards (publish an event, wake waiting `Join`s, drop
//! the store of old generations) is collected in [`Effects`] for the caller.
//!
//! The state moves Forming -> Running -> (Forming of the next generation |
//! Finished).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use cohort_proto::v1::{
    Action, Assignment, CoordinatorState, Directive, DurableMember, EventKind, FailureInfo,
    HeartbeatRequest, JobEvent, JobOutcome, JoinRequest, JoinResponse, Progress, ReportDoneRequest,
    ReportFailureRequest, WorkerState, WorkerStatus, join_response,
};

use super::{CoordinatorConfig, generate_job_id};
use crate::decision::{
    Formation, MemberLiveness, NodeRange, Recovery, decide_formation, decide_recovery,
    find_lost_nodes,
};
use crate::errorfile;

/// A request the state machine refuses, before any state changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is for another job.
    #[error(
        "this coordinator runs job {runs:?}, not {asked:?}: pass --job-id {runs} or no --job-id"
    )]
    WrongJob { runs: String, asked: String },
}

/// What the caller must do after a transition.
#[derive(Debug, Default)]
pub struct Effects {
    /// Events for watchers, in order (their `time` still to be stamped).
    pub events: Vec<JobEvent>,
    /// A generation formed or the job finished: wake the waiting `Join`s.
    pub changed: bool,
    /// A generation formed: the store of every earlier generation can go.
    pub formed: Option<u64>,
}

struct Pending {
    node_id: String,
    host: String,
    nproc: u32,
    master_port: u32,
    /// `--node-rank`.
    node_rank: Option<u32>,
    role: String,
    joined_at: Instant,
}

struct Member {
    node_rank: u32,
    host: String,
    last_heartbeat: Instant,
    done: bool,
    workers: Vec<WorkerStatus>,
}

/// The generation that ended with too few nodes for `--nnodes`, waiting for
/// new nodes to replace the lost ones (see [`Recovery::Replace`]).
struct Awaiting {
    /// What ended it, the root cause if no replacement comes.
    failure: FailureInfo,
    /// The failure as said ("node b (198.18.0.3) lost: ...").
    what: String,
    deadline: Instant,
    /// When to say again that the job waits.
    next_line: Instant,
}

/// How often a job waiting for a replacement node says so.
const AWAITING_LINE_EVERY: Duration = Duration::from_secs(30);

/// A worker failure the coordinator holds before it ends the generation:
/// when a node dies, the collectives of the nodes left break at once, well
/// before the node misses its heartbeats, and the rank that reports first is
/// a survivor. The failure is held until every other member has shown it is
/// alive (a heartbeat or a report after it), or one is found lost, which is
/// then the root cause; at most the heartbeat timeout.
struct HeldFailure {
    failure: FailureInfo,
    since: Instant,
}

enum Phase {
    Forming,
    Running,
    Finished(JobOutcome),
}

/// One job's state: its shape, the generation being formed or running, and
/// its members.
pub struct JobState {
    heartbeat_timeout: Duration,
    last_call: Duration,
    replacement_timeout: Duration,
    job_id: Option<String>,
    range: Option<NodeRange>,
    max_restarts: Option<u32>,
    /// The job recovers a failed worker in place (its nodes said so).
    peer_recovery: bool,
    generation: u64,
    restart_count: u32,
    phase: Phase,
    pending: Vec<Pending>,
    /// The ids in `pending` (a rejoin replaces the node's earlier entry).
    pending_ids: HashSet<String>,
    /// The place of every member of the running generation.
    assignments: HashMap<String, Assignment>,
    members: HashMap<String, Member>,
    /// The node rank each node had in the last generation it was part of:
    /// a node that rejoins keeps it (files a rank saved locally stay with it).
    node_ranks: HashMap<String, u32>,
    /// The errors workers of the running generation recorded in their
    /// TORCHELASTIC_ERROR_FILE, as their nodes reported them.
    recorded: Vec<FailureInfo>,
    /// Why the last generation ended, for agents that ask late.
    last_restart_reason: String,
    /// Nodes that said goodbye after the job finished.
    left: HashSet<String>,
    last_progress: Option<Progress>,
    last_progress_at: Instant,
    /// A worker failure held until the other members are known alive.
    held: Option<HeldFailure>,
    /// Too few nodes left: the next generation waits for replacements.
    awaiting: Option<Awaiting>,
    effects: Effects,
}

fn directive(action: Action, reason: impl Into<String>) -> Directive {
    Directive {
        action: action as i32,
        reason: reason.into(),
        outcome: None,
    }
}

impl JobState {
    /// A job with no nodes yet, shaped by `config` where it says.
    pub fn new(config: &CoordinatorConfig, now: Instant) -> Self {
        Self {
            heartbeat_timeout: config.heartbeat_timeout,
            last_call: config.last_call,
            replacement_timeout: config.replacement_timeout,
            job_id: config.job_id.clone(),
            range: config.nnodes,
            max_restarts: config.max_restarts,
            peer_recovery: false,
            generation: 0,
            restart_count: 0,
            phase: Phase::Forming,
            pending: Vec::new(),
            pending_ids: HashSet::new(),
            assignments: HashMap::new(),
            members: HashMap::new(),
            node_ranks: HashMap::new(),
            recorded: Vec::new(),
            last_restart_reason: String::new(),
            left: HashSet::new(),
            last_progress: None,
            last_progress_at: now,
            held: None,
            awaiting: None,
            effects: Effects::default(),
        }
    }

    /// The state a restarted coordinator needs to carry on the job (see
    /// `CoordinatorState` in the proto), with the running generation's
    /// store `kv`.
    pub fn durable(&self, token: &str, kv: HashMap<String, Vec<u8>>) -> CoordinatorState {
        let mut members: Vec<DurableMember> = self
            .members
            .iter()
            .map(|(id, m)| DurableMember {
                node_id: id.clone(),
                host: m.host.clone(),
                done: m.done,
                assignment: self.assignments.get(id).cloned(),
            })
            .collect();
        members.sort_by(|x, y| x.node_id.cmp(&y.node_id));
        CoordinatorState {
            token: token.to_owned(),
            job_id: self.job_id.clone(),
            min_nodes: self.range.map(|r| r.min),
            max_nodes: self.range.map(|r| r.max),
            max_restarts: self.max_restarts,
            generation: self.generation,
            restart_count: self.restart_count,
            outcome: self.outcome().cloned(),
            members,
            node_ranks: self.node_ranks.clone(),
            last_restart_reason: self.last_restart_reason.clone(),
            recorded: self.recorded.clone(),
            kv,
            awaiting: self.awaiting.as_ref().map(|a| a.failure.clone()),
            awaiting_what: self
                .awaiting
                .as_ref()
                .map_or_else(String::new, |a| a.what.clone()),
            peer_recovery: self.peer_recovery,
        }
    }

    /// The state of a job a coordinator saved before it stopped, taken up
    /// at `now`: every member counts as just heard from, a wait for a
    /// replacement starts over. `config`'s job id and `--nnodes`, where
    /// given, must be the saved job's.
    pub fn restore(
        config: &CoordinatorConfig,
        saved: &CoordinatorState,
        now: Instant,
    ) -> Result<Self, String> {
        let mut st = Self::new(config, now);
        if let (Some(asked), Some(saved_id)) = (&config.job_id, &saved.job_id)
            && asked != saved_id
        {
            return Err(format!(
                "it is the state of job {saved_id:?}, not of --job-id {asked:?}"
            ));
        }
        let range = match (saved.min_nodes, saved.max_nodes) {
            (Some(min), Some(max)) if min >= 1 && min <= max => Some(NodeRange { min, max }),
            (None, None) => None,
            _ => return Err("its --nnodes is not MIN:MAX with 1 <= MIN <= MAX".to_owned()),
        };
        if let (Some(asked), Some(saved_range)) = (config.nnodes, range)
            && asked != saved_range
        {
            return Err(format!(
                "it is the state of a job of --nnodes {saved_range}, not of --nnodes {asked}"
            ));
        }
        st.job_id = saved.job_id.clone().or(st.job_id);
        st.range = range.or(st.range);
        st.max_restarts = saved.max_restarts.or(st.max_restarts);
        st.peer_recovery = saved.peer_recovery;
        st.generation = saved.generation;
        st.restart_count = saved.restart_count;
        st.node_ranks = saved.node_ranks.clone();
        st.last_restart_reason = saved.last_restart_reason.clone();
        st.recorded = saved.recorded.clone();
        for m in &saved.members {
            let Some(a) = &m.assignment else {
                return Err(format!("member {:?} has no assignment", m.node_id));
            };
            st.assignments.insert(m.node_id.clone(), a.clone());
            st.members.insert(
                m.node_id.clone(),
                Member {
                    node_rank: a.node_rank,
                    host: m.host.clone(),
                    last_heartbeat: now,
                    done: m.done,
                    workers: Vec::new(),
                },
            );
        }
        st.phase = match (&saved.outcome, st.members.is_empty()) {
            (Some(outcome), _) => Phase::Finished(outcome.clone()),
            (None, false) => Phase::Running,
            (None, true) => Phase::Forming,
        };
        if let Some(world_size) = st.assignments.values().map(|a| a.world_size).max() {
            st.last_progress = Some(Progress {
                world_size,
                ..Progress::default()
            });
        }
        if let (Some(failure), Phase::Forming) = (&saved.awaiting, &st.phase) {
            st.awaiting = Some(Awaiting {
                failure: failure.clone(),
                what: saved.awaiting_what.clone(),
                deadline: now + st.replacement_timeout,
                next_line: now + AWAITING_LINE_EVERY,
            });
        }
        Ok(st)
    }

    /// The generation being formed or running.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// What the transitions since the last call asked the caller to do.
    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.effects)
    }

    fn emit(&mut self, kind: EventKind, message: String) {
        let outcome = match &self.phase {
            Phase::Finished(o) => Some(o.clone()),
            _ => None,
        };
        self.effects.events.push(JobEvent {
            time: 0.0,
            generation: self.generation,
            kind: kind as i32,
            message,
            progress: self.last_progress,
            outcome,
        });
    }

    /// The job's outcome once it is over.
    pub fn outcome(&self) -> Option<&JobOutcome> {
        match &self.phase {
            Phase::Finished(o) => Some(o),
            _ => None,
        }
    }

    /// Every node of the last generation said goodbye.
    pub fn all_left(&self) -> bool {
        self.assignments.keys().all(|n| self.left.contains(n))
    }

    /// The job's id once known. A request naming no job is for this one; the
    /// first request names the job if the coordinator was not told its id.
    pub fn check_job(&mut self, job_id: &str) -> Result<String, Refusal> {
        match &self.job_id {
            Some(id) if job_id.is_empty() || job_id == id => Ok(id.clone()),
            Some(id) => Err(Refusal::WrongJob {
                runs: id.clone(),
                asked: job_id.to_owned(),
            }),
            None => {
                let id = if job_id.is_empty() {
                    generate_job_id()
                } else {
                    job_id.to_owned()
                };
                self.job_id = Some(id.clone());
                Ok(id)
            }
        }
    }

    /// A node asks to join the generation being formed.
    pub fn register(&mut self, now: Instant, req: &JoinRequest) -> Result<(), Refusal> {
        if req.node_id.is_empty() || req.nproc == 0 {
            return Err(Refusal::InvalidArgument(
                "join needs a node id and at least one worker".to_owned(),
            ));
        }
        self.check_job(&req.job_id)?;
        if let Some(opts) = &req.options {
            if self.range.is_none() && opts.min_nodes >= 1 && opts.min_nodes <= opts.max_nodes {
                self.range = Some(NodeRange {
                    min: opts.min_nodes,
                    max: opts.max_nodes,
                });
            }
            if self.max_restarts.is_none() {
                self.max_restarts = Some(opts.max_restarts);
            }
            self.peer_recovery |= opts.peer_recovery;
        }
        if matches!(self.phase, Phase::Finished(_)) {
            return Ok(());
        }
        if let Some(rank) = req.node_rank {
            self.check_static_rank(&req.node_id, rank)?;
        }
        if !self.pending_ids.insert(req.node_id.clone()) {
            self.pending.retain(|p| p.node_id != req.node_id);
        }
        self.pending.push(Pending {
            node_id: req.node_id.clone(),
            host: req.host.clone(),
            nproc: req.nproc,
            master_port: req.master_port,
            node_rank: req.node_rank,
            role: if req.role.is_empty() {
                DEFAULT_ROLE.to_owned()
            } else {
                req.role.clone()
            },
            joined_at: now,
        });
        let message = format!(
            "node {} ({}, {} workers) joined generation {}",
            req.node_id, req.host, req.nproc, self.generation
        );
        self.emit(EventKind::NodeJoined, message);
        self.try_form(now);
        Ok(())
    }

    /// `--node-rank rank` of `node_id`: below the job's node count and not
    /// asked for by another waiting node.
    fn check_static_rank(&self, node_id: &str, rank: u32) -> Result<(), Refusal> {
        if let Some(range) = self.range.filter(|r| rank >= r.max) {
            return Err(Refusal::InvalidArgument(format!(
                "--node-rank {rank} is not below --nnodes {range}: give the nodes ranks 0 to {}",
                range.max - 1
            )));
        }
        match self
            .pending
            .iter()
            .find(|p| p.node_rank == Some(rank) && p.node_id != node_id)
        {
            Some(other) => Err(Refusal::InvalidArgument(format!(
                "--node-rank {rank} is already taken by node {} ({}): give each node its own --node-rank",
                other.node_id, other.host
            ))),
            None => Ok(()),
        }
    }

    /// A node's `Join` went away before its generation formed.
    pub fn unregister_pending(&mut self, node_id: &str) {
        if self.pending_ids.remove(node_id) {
            self.pending.retain(|p| p.node_id != node_id);
            tracing::info!("node {node_id} left the rendezvous before its generation formed");
        }
    }

    /// The answer to a waiting `Join` of `node_id`, once there is one.
    pub fn poll_join(&self, node_id: &str) -> Option<JoinResponse> {
        let outcome = match &self.phase {
            Phase::Finished(o) => join_response::Outcome::Finished(o.clone()),
            Phase::Running => {
                join_response::Outcome::Assignment(self.assignments.get(node_id)?.clone())
            }
            Phase::Forming => return None,
        };
        Some(JoinResponse {
            outcome: Some(outcome),
        })
    }

    fn try_form(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Forming) {
            return;
        }
        let Some(range) = self.range else { return };
        let min_joined_at = self
            .pending
            .get(range.min as usize - 1)
            .map(|p| p.joined_at);
        let (decision, reason) = decide_formation(
            now,
            self.pending.len(),
            min_joined_at,
            range,
            self.last_call,
        );
        let Formation::Form { nodes } = decision else {
            return;
        };
        let mut chosen: Vec<Pending> = self.pending.drain(..nodes).collect();
        for p in &chosen {
            self.pending_ids.remove(&p.node_id);
        }
        let asked: Vec<Option<u32>> = chosen.iter().map(|p| p.node_rank).collect();
        let held: Vec<Option<u32>> = chosen
            .iter()
            .map(|p| self.node_ranks.get(&p.node_id).copied())
            .collect();
        let ranks = node_ranks(&asked, &held);
        let mut ranked: Vec<(u32, Pending)> = ranks.into_iter().zip(chosen.drain(..)).collect();
        ranked.sort_by_key(|(rank, _)| *rank);
        let world_size: u32 = ranked.iter().map(|(_, p)| p.nproc).sum();
        let (master_addr, master_port) = (ranked[0].1.host.clone(), ranked[0].1.master_port);
        let job_id = self.job_id.clone().unwrap_or_default();
        self.assignments.clear();
        self.members.clear();
        self.left.clear();
        self.recorded.clear();
        let mut offset = 0;
        let mut role_offsets: HashMap<String, u32> = HashMap::new();
        let mut role_worlds: HashMap<String, u32> = HashMap::new();
        for (_, p) in &ranked {
            *role_worlds.entry(p.role.clone()).or_default() += p.nproc;
        }
        for (node_rank, p) in ranked {
            let role_offset = role_offsets.entry(p.role.clone()).or_default();
            self.node_ranks.insert(p.node_id.clone(), node_rank);
            self.assignments.insert(
                p.node_id.clone(),
                Assignment {
                    job_id: job_id.clone(),
                    generation: self.generation,
                    restart_count: self.restart_count,
                    node_rank,
                    nnodes: nodes as u32,
                    world_size,
                    rank_offset: offset,
                    master_addr: master_addr.clone(),
                    master_port,
                    role_rank_offset: *role_offset,
                    role_world_size: role_worlds[&p.role],
                },
            );
            *role_offset += p.nproc;
            self.members.insert(
                p.node_id,
                Member {
                    node_rank,
                    host: p.host,
                    last_heartbeat: now,
                    done: false,
                    workers: Vec::new(),
                },
            );
            offset += p.nproc;
        }
        self.phase = Phase::Running;
        self.awaiting = None;
        self.last_progress = Some(Progress {
            world_size,
            ..Progress::default()
        });
        self.effects.formed = Some(self.generation);
        let message = format!(
            "generation {} formed: {nodes} node(s), {world_size} ranks ({reason})",
            self.generation
        );
        self.emit(EventKind::GenerationFormed, message);
        self.effects.changed = true;
    }

    /// Ends the running generation with `failure`: restart, wait for
    /// replacement nodes, or give up.
    fn end_generation(&mut self, now: Instant, failure: FailureInfo, fatal: bool, lost: &[String]) {
        if !matches!(self.phase, Phase::Running) || failure.generation != self.generation {
            return;
        }
        self.held = None;
        let node = format!("node {} ({})", failure.node_id, failure.host);
        let what = match failure.rank {
            Some(rank) => format!("rank {rank} on {node} {}", failure.reason),
            None => format!("{node} {}", failure.reason),
        };
        self.emit(EventKind::Failure, what.clone());
        let live = self.members.len() - lost.len();
        let range = self.range.unwrap_or(NodeRange::exactly(1));
        let (decision, mut reason) = decide_recovery(
            self.restart_count,
            self.max_restarts.unwrap_or(0),
            live,
            range,
            fatal,
            failure.permanent,
            self.replacement_timeout,
        );
        // A worker's agent names its own fallbacks; a lost node is named here.
        if self.peer_recovery && !lost.is_empty() && decision != Recovery::GiveUp {
            reason = format!(
                "in-place recovery covers a failed worker on a live node, so the job restarts \
                 from the newest checkpoint: {reason}"
            );
        }
        match decision {
            Recovery::Restart | Recovery::Replace => {
                self.generation += 1;
                self.restart_count += 1;
                self.phase = Phase::Forming;
                self.members.clear();
                self.assignments.clear();
                self.last_restart_reason = format!("{what}; {reason}");
                let message = format!("generation {} ended: {what}; {reason}", self.generation - 1);
                self.emit(EventKind::Restarting, message);
                if decision == Recovery::Replace {
                    self.awaiting = Some(Awaiting {
                        failure,
                        what,
                        deadline: now + self.replacement_timeout,
                        next_line: now + AWAITING_LINE_EVERY,
                    });
                }
            }
            Recovery::GiveUp => self.give_up(&failure, &what, &reason, lost),
        }
        self.effects.changed = true;
    }

    /// The job is over and failed with `failure` (said as `what`), for `reason`.
    fn give_up(&mut self, failure: &FailureInfo, what: &str, reason: &str, lost: &[String]) {
        // A lost node is the cause of what its peers recorded after it went
        // silent; only what it recorded itself can come first.
        let recorded = self
            .recorded
            .iter()
            .filter(|r| lost.is_empty() || lost.contains(&r.node_id));
        let root_cause = errorfile::root_cause(failure, recorded).clone();
        let outcome = JobOutcome {
            success: false,
            summary: format!("job failed: {what}; {reason}"),
            root_cause: Some(root_cause),
        };
        let message = outcome.summary.clone();
        self.phase = Phase::Finished(outcome);
        self.emit(EventKind::Finished, message);
        self.effects.changed = true;
    }

    /// Waiting for replacement nodes: says so every
    /// [`AWAITING_LINE_EVERY`], gives up at the deadline.
    fn tick_awaiting(&mut self, now: Instant) {
        let Some(aw) = &mut self.awaiting else { return };
        let range = self.range.unwrap_or(NodeRange::exactly(1));
        let joined = self.pending.len();
        if now >= aw.deadline {
            let (failure, what) = (aw.failure.clone(), aw.what.clone());
            self.awaiting = None;
            let reason = format!(
                "no node joined to replace it within --replacement-timeout {:?} \
                 ({joined} of the {} nodes --nnodes {range} needs joined)",
                self.replacement_timeout, range.min
            );
            self.give_up(
                &failure,
                &what,
                &reason,
                std::slice::from_ref(&failure.node_id),
            );
        } else if now >= aw.next_line {
            aw.next_line = now + AWAITING_LINE_EVERY;
            let message = format!(
                "waiting for {} new node(s) to replace {}: {joined} of {} joined, {}s left of \
                 --replacement-timeout {:?}",
                (range.min as usize).saturating_sub(joined),
                describe_node(&aw.failure),
                range.min,
                aw.deadline.saturating_duration_since(now).as_secs(),
                self.replacement_timeout
            );
            self.emit(EventKind::Restarting, message);
        }
    }

    /// The directive for a node that reports on `generation`.
    fn directive_for(&self, node_id: &str, generation: u64) -> Directive {
        match &self.phase {
            Phase::Finished(outcome) => Directive {
                action: Action::Finished as i32,
                reason: outcome.summary.clone(),
                outcome: Some(outcome.clone()),
            },
            Phase::Running
                if generation == self.generation && self.members.contains_key(node_id) =>
            {
                directive(Action::Continue, "")
            }
            _ if generation < self.generation => {
                directive(Action::Restart, self.last_restart_reason.clone())
            }
            _ => directive(
                Action::Restart,
                format!(
                    "node {node_id} is not a member of generation {}",
                    self.generation
                ),
            ),
        }
    }

    /// A node is alive, with its workers' state.
    pub fn heartbeat(&mut self, now: Instant, req: HeartbeatRequest) -> Directive {
        if matches!(self.phase, Phase::Running) && req.generation == self.generation {
            if let Some(m) = self.members.get_mut(&req.node_id) {
                m.last_heartbeat = now;
                m.workers = req.workers;
            }
            self.record(&req.node_id, req.generation, req.recorded);
            self.release_held(now);
        }
        self.directive_for(&req.node_id, req.generation)
    }

    /// Keeps the errors `node_id`'s workers of `generation` recorded, with
    /// where they ran: its latest report, which holds every error file of
    /// the node (a rank replaced in place sets its failed worker's aside:
    /// that error is no cause of what comes later).
    fn record(&mut self, node_id: &str, generation: u64, recorded: Vec<FailureInfo>) {
        let Some(m) = self.members.get(node_id) else {
            return;
        };
        if generation != self.generation {
            return;
        }
        self.recorded.retain(|r| r.node_id != node_id);
        for mut f in recorded.into_iter().filter(|f| f.error.is_some()) {
            f.node_id = node_id.to_owned();
            f.node_rank = m.node_rank;
            f.host.clone_from(&m.host);
            f.generation = generation;
            self.recorded.push(f);
        }
    }

    /// A worker of a node failed, or the node is stopping. A worker failure
    /// of a generation of several nodes is held (see [`HeldFailure`]); a
    /// node that stops, or a permanent failure, ends it at once.
    pub fn report_failure(&mut self, now: Instant, req: ReportFailureRequest) -> Directive {
        let current = matches!(self.phase, Phase::Running) && req.generation == self.generation;
        if current {
            self.record(&req.node_id, req.generation, req.recorded);
            if let Some(m) = self.members.get_mut(&req.node_id) {
                m.last_heartbeat = now;
            }
        }
        if let Some(mut failure) = req.failure {
            failure.generation = req.generation;
            failure.node_id.clone_from(&req.node_id);
            if let Some(m) = self.members.get(&req.node_id) {
                failure.node_rank = m.node_rank;
                failure.host.clone_from(&m.host);
            }
            let hold = current
                && !req.fatal
                && !failure.permanent
                && self.members.len() > 1
                && self.members.contains_key(&req.node_id);
            if !hold {
                self.end_generation(now, failure, req.fatal, &[]);
            } else if self.held.is_none() {
                tracing::info!(
                    "holding the failure of node {} until the other nodes are known alive",
                    req.node_id
                );
                self.held = Some(HeldFailure {
                    failure,
                    since: now,
                });
            }
            self.release_held(now);
        }
        self.directive_for(&req.node_id, req.generation)
    }

    /// Ends the generation with the held failure once every member has
    /// been heard from since it came, or the heartbeat timeout passed (by
    /// then a silent member was found lost, see [`JobState::tick`]).
    fn release_held(&mut self, now: Instant) {
        let Some(held) = &self.held else { return };
        let all_heard = self
            .members
            .values()
            .all(|m| m.last_heartbeat >= held.since);
        if all_heard || now.saturating_duration_since(held.since) > self.heartbeat_timeout {
            let failure = held.failure.clone();
            self.end_generation(now, failure, false, &[]);
        }
    }

    /// Every worker of a node exited 0.
    pub fn report_done(&mut self, req: ReportDoneRequest) -> Directive {
        if matches!(self.phase, Phase::Running) && req.generation == self.generation {
            if let Some(m) = self.members.get_mut(&req.node_id) {
                m.done = true;
            }
            if self.members.values().all(|m| m.done) {
                self.succeed(None);
            }
        }
        self.directive_for(&req.node_id, req.generation)
    }

    /// Every member not in `lost` (at least one) reported that all its
    /// workers exited 0: the job's work is done, so a node lost at the end
    /// costs no restart (a restart would only find the work done).
    fn others_done(&self, lost: &[String]) -> bool {
        let mut left = self
            .members
            .iter()
            .filter(|(id, _)| !lost.contains(id))
            .peekable();
        left.peek().is_some() && left.all(|(_, m)| m.done)
    }

    /// The job succeeded: every worker of the generation exited 0, or
    /// every one of the nodes left after `lost` was lost at the end.
    fn succeed(&mut self, lost: Option<&FailureInfo>) {
        let summary = match lost {
            None => {
                let world: u32 = self
                    .assignments
                    .values()
                    .map(|a| a.world_size)
                    .max()
                    .unwrap_or(0);
                format!(
                    "job succeeded: all {world} ranks of generation {} exited 0 ({} restart(s))",
                    self.generation, self.restart_count
                )
            }
            Some(f) => {
                format!(
                    "job succeeded: every rank of the node(s) still up exited 0 in generation {} ({} restart(s)); \
                     {} {}, after the other nodes' workers had all exited 0",
                    self.generation,
                    self.restart_count,
                    describe_node(f),
                    f.reason
                )
            }
        };
        let outcome = JobOutcome {
            success: true,
            summary,
            root_cause: None,
        };
        let message = outcome.summary.clone();
        self.phase = Phase::Finished(outcome);
        self.emit(EventKind::Finished, message);
        self.effects.changed = true;
    }

    /// A node agent is exiting after the job is over.
    pub fn leave(&mut self, node_id: &str) {
        self.left.insert(node_id.to_owned());
        self.effects.changed = true;
    }

    /// The clock-driven decisions: last calls and lost nodes; and, when
    /// `watched`, the progress summary for watchers.
    pub fn tick(&mut self, now: Instant, watched: bool) {
        match self.phase {
            Phase::Forming => {
                self.try_form(now);
                self.tick_awaiting(now);
            }
            Phase::Running => {
                let members: Vec<MemberLiveness<'_>> = self
                    .members
                    .iter()
                    .map(|(id, m)| MemberLiveness {
                        node_id: id,
                        last_heartbeat: m.last_heartbeat,
                    })
                    .collect();
                let lost = find_lost_nodes(
                    now,
                    std::time::SystemTime::now(),
                    &members,
                    self.heartbeat_timeout,
                );
                if let Some((node_id, reason)) = lost.first() {
                    let m = &self.members[node_id];
                    // What broke on the other nodes since is a consequence.
                    let after = match &self.held {
                        Some(HeldFailure { failure: f, .. }) => format!(
                            " (then {}on node {} ({}) {})",
                            f.rank.map_or_else(String::new, |r| format!("rank {r} ")),
                            f.node_id,
                            f.host,
                            f.reason
                        ),
                        None => String::new(),
                    };
                    let failure = FailureInfo {
                        node_id: node_id.clone(),
                        host: m.host.clone(),
                        node_rank: m.node_rank,
                        reason: format!("{reason}{after}"),
                        generation: self.generation,
                        ..FailureInfo::default()
                    };
                    let lost: Vec<String> = lost.into_iter().map(|(id, _)| id).collect();
                    if self.others_done(&lost) {
                        self.succeed(Some(&failure));
                    } else {
                        self.end_generation(now, failure, false, &lost);
                    }
                } else if self.held.is_some() {
                    self.release_held(now);
                } else if watched
                    && now.duration_since(self.last_progress_at) >= Duration::from_millis(500)
                {
                    self.last_progress_at = now;
                    let progress = summarize(self.members.values().flat_map(|m| &m.workers));
                    if self.last_progress != Some(progress) {
                        self.last_progress = Some(progress);
                        self.emit(EventKind::Progress, String::new());
                    }
                }
            }
            Phase::Finished(_) => {}
        }
    }

    /// An event describing the job as it is now (the first event a watcher
    /// gets; its `time` still to be stamped).
    pub fn snapshot(&self) -> JobEvent {
        let (kind, message, outcome) = match &self.phase {
            // The joins that follow say it all.
            Phase::Forming => (EventKind::NodeJoined, String::new(), None),
            Phase::Running => (
                EventKind::GenerationFormed,
                format!(
                    "generation {} running on {} node(s)",
                    self.generation,
                    self.members.len()
                ),
                None,
            ),
            Phase::Finished(o) => (EventKind::Finished, o.summary.clone(), Some(o.clone())),
        };
        JobEvent {
            time: 0.0,
            generation: self.generation,
            kind: kind as i32,
            message,
            progress: self.last_progress,
            outcome,
        }
    }
}

/// "node b (198.18.0.3)".
fn describe_node(f: &FailureInfo) -> String {
    format!("node {} ({})", f.node_id, f.host)
}

/// torchrun's role when `--role` is not given.
pub const DEFAULT_ROLE: &str = "default";

/// The node ranks `0..n` of the `n` nodes of a new generation, in their
/// order: the rank a node `asked` for (`--node-rank`) if below `n`, else the
/// one it `held` in the last generation it was part of if still free, else
/// the lowest free one (in join order).
fn node_ranks(asked: &[Option<u32>], held: &[Option<u32>]) -> Vec<u32> {
    let n = asked.len() as u32;
    let mut ranks: Vec<Option<u32>> = vec![None; asked.len()];
    let mut taken = vec![false; asked.len()];
    for wants in [asked, held] {
        for (i, rank) in wants.iter().enumerate() {
            if let Some(r) = rank.filter(|r| *r < n && !taken[*r as usize])
                && ranks[i].is_none()
            {
                ranks[i] = Some(r);
                taken[r as usize] = true;
            }
        }
    }
    let mut free = (0..n).filter(|r| !taken[*r as usize]);
    ranks
        .into_iter()
        .map(|r| r.or_else(|| free.next()).expect("as many ranks as nodes"))
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_proto::v1::JobOptions;

    fn job(range: NodeRange, max_restarts: u32) -> JobState {
        let mut config = CoordinatorConfig::new("t".into());
        config.job_id = Some("job".into());
        config.nnodes = Some(range);
        config.max_restarts = Some(max_restarts);
        config.heartbeat_timeout = Duration::from_secs(5);
        JobState::new(&config, Instant::now())
    }

    fn join(j: &mut JobState, now: Instant, node: &str) {
        join_as(j, now, node, None, "");
    }

    fn assignment(j: &JobState, node: &str) -> Assignment {
        match j.poll_join(node).and_then(|r| r.outcome) {
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
            recorded: Vec::new(),
        }
    }

    fn heartbeat(node: &str) -> HeartbeatRequest {
        HeartbeatRequest {
            job_id: "job".into(),
            node_id: node.into(),
            generation: 0,
            workers: Vec::new(),
            recorded: Vec::new(),
        }
    }

    #[test]
    fn ranks_are_laid_out_in_join_order() {
        let mut j = job(NodeRange::exactly(2), 0);
        let t0 = Instant::now();
        join(&mut j, t0, "a");
        assert!(j.poll_join("a").is_none());
        join(&mut j, t0, "b");
        let (a, b) = (assignment(&j, "a"), assignment(&j, "b"));
        assert_eq!((a.node_rank, a.rank_offset, a.world_size), (0, 0, 4));
        assert_eq!((b.node_rank, b.rank_offset, b.world_size), (1, 2, 4));
        assert_eq!((b.master_addr.as_str(), b.master_port), ("host-a", 1000));
        let effects = j.take_effects();
        assert!(effects.changed);
        assert_eq!(effects.formed, Some(0));
        let kinds: Vec<i32> = effects.events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                EventKind::NodeJoined as i32,
                EventKind::NodeJoined as i32,
                EventKind::GenerationFormed as i32
            ]
        );
    }

    fn join_as(j: &mut JobState, now: Instant, node: &str, node_rank: Option<u32>, role: &str) {
        join_with(j, now, node, node_rank, role, JobOptions::default());
    }

    fn join_with(
        j: &mut JobState,
        now: Instant,
        node: &str,
        node_rank: Option<u32>,
        role: &str,
        options: JobOptions,
    ) {
        j.register(
            now,
            &JoinRequest {
                job_id: "job".into(),
                node_id: node.into(),
                host: format!("host-{node}"),
                nproc: 2,
                master_port: 1000,
                options: Some(options),
                node_rank,
                role: role.into(),
            },
        )
        .unwrap();
    }

    #[test]
    fn a_node_that_rejoins_keeps_its_node_rank() {
        let mut j = job(NodeRange::exactly(2), 3);
        let t0 = Instant::now();
        join(&mut j, t0, "a");
        join(&mut j, t0, "b");
        assert_eq!(assignment(&j, "a").node_rank, 0);
        j.report_failure(t0, failure(1, 0));
        // b is back first, but node 0 is still a, on a's host.
        join(&mut j, t0, "b");
        join(&mut j, t0, "a");
        let (a, b) = (assignment(&j, "a"), assignment(&j, "b"));
        assert_eq!(a.generation, 1);
        assert_eq!((a.node_rank, a.rank_offset), (0, 0));
        assert_eq!((b.node_rank, b.rank_offset), (1, 2));
        assert_eq!(b.master_addr, "host-a");
        // A new node takes the rank a lost node left free.
        j.report_failure(t0, failure(1, 1));
        join(&mut j, t0, "c");
        join(&mut j, t0, "b");
        assert_eq!(assignment(&j, "c").node_rank, 0);
        assert_eq!(assignment(&j, "b").node_rank, 1);
        assert_eq!(assignment(&j, "b").master_addr, "host-c");
    }

    #[test]
    fn node_ranks_asked_for_held_and_free() {
        assert_eq!(node_ranks(&[None, None, None], &[None; 3]), [0, 1, 2]);
        assert_eq!(node_ranks(&[None, None], &[Some(1), Some(0)]), [1, 0]);
        // Asked beats held; out of range counts as nothing.
        assert_eq!(
            node_ranks(&[None, Some(0), Some(7)], &[Some(0), Some(2), None]),
            [1, 0, 2]
        );
        assert_eq!(node_ranks(&[None, None], &[Some(1), Some(1)]), [1, 0]);
    }

    #[test]
    fn static_node_ranks_and_roles() {
        let mut j = job(NodeRange::exactly(3), 0);
        join_as(&mut j, Instant::now(), "a", Some(2), "trainer");
        join_as(&mut j, Instant::now(), "b", Some(0), "trainer");
        let taken = j
            .register(
                Instant::now(),
                &JoinRequest {
                    job_id: "job".into(),
                    node_id: "x".into(),
                    nproc: 1,
                    node_rank: Some(2),
                    ..JoinRequest::default()
                },
            )
            .unwrap_err();
        assert_eq!(
            taken.to_string(),
            "--node-rank 2 is already taken by node a (host-a): give each node its own --node-rank"
        );
        let too_big = j
            .register(
                Instant::now(),
                &JoinRequest {
                    job_id: "job".into(),
                    node_id: "x".into(),
                    nproc: 1,
                    node_rank: Some(3),
                    ..JoinRequest::default()
                },
            )
            .unwrap_err();
        assert!(too_big.to_string().contains("give the nodes ranks 0 to 2"));
        join_as(&mut j, Instant::now(), "c", None, "");
        let (a, b, c) = (
            assignment(&j, "a"),
            assignment(&j, "b"),
            assignment(&j, "c"),
        );
        assert_eq!((b.node_rank, c.node_rank, a.node_rank), (0, 1, 2));
        assert_eq!((b.rank_offset, c.rank_offset, a.rank_offset), (0, 2, 4));
        // Role ranks count the workers of the same role, in node-rank order.
        assert_eq!((b.role_rank_offset, b.role_world_size), (0, 4));
        assert_eq!((c.role_rank_offset, c.role_world_size), (0, 2));
        assert_eq!((a.role_rank_offset, a.role_world_size), (2, 4));
    }

    #[test]
    fn failure_restarts_then_gives_up_with_root_cause() {
        let mut j = job(NodeRange::exactly(1), 1);
        let t0 = Instant::now();
        join(&mut j, t0, "a");
        let d = j.report_failure(t0, failure(1, 0));
        assert_eq!(d.action, Action::Restart as i32);
        assert_eq!(
            d.reason,
            "rank 1 on node a (host-a) exited with code 3; restart 1 of --max-restarts 1 with 1 node(s)"
        );
        join(&mut j, t0, "a");
        assert_eq!(assignment(&j, "a").generation, 1);
        // A stale report of generation 0 changes nothing.
        assert_eq!(
            j.report_failure(t0, failure(0, 0)).action,
            Action::Restart as i32
        );
        let d = j.report_failure(t0, failure(0, 1));
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
    fn the_earliest_recorded_error_is_the_root_cause() {
        use cohort_proto::v1::RecordedError;
        let mut j = job(NodeRange::exactly(2), 0);
        let t0 = Instant::now();
        join(&mut j, t0, "a");
        join(&mut j, t0, "b");
        let recorded = |rank, timestamp| FailureInfo {
            rank: Some(rank),
            reason: format!("raised ValueError: {rank}"),
            error: Some(Box::new(RecordedError {
                timestamp,
                message: format!("ValueError: {rank}"),
                ..RecordedError::default()
            })),
            ..FailureInfo::default()
        };
        // b's rank 2 recorded an error at 100 and is still running.
        j.heartbeat(
            t0,
            HeartbeatRequest {
                recorded: vec![recorded(2, 100)],
                ..heartbeat("b")
            },
        );
        // a's rank 0 exits later, with its own error of 104.
        let mut report = failure(0, 0);
        report.failure.as_mut().unwrap().error = recorded(0, 104).error;
        let d = j.report_failure(t0, report);
        let outcome = d.outcome.unwrap();
        assert!(
            outcome.summary.starts_with("job failed: rank 0 on node a"),
            "{}",
            outcome.summary
        );
        let cause = outcome.root_cause.unwrap();
        assert_eq!((cause.rank, cause.node_id.as_str()), (Some(2), "b"));
        assert_eq!((cause.host.as_str(), cause.node_rank), ("host-b", 1));
        assert_eq!(cause.reason, "raised ValueError: 2");
    }

    #[test]
    fn silent_node_is_lost_and_elastic_job_goes_on() {
        let mut j = job(NodeRange { min: 1, max: 2 }, 3);
        let t0 = Instant::now();
        join(&mut j, t0, "a");
        join(&mut j, t0, "b");
        j.heartbeat(t0 + Duration::from_secs(4), heartbeat("a"));
        j.tick(t0 + Duration::from_secs(6), false);
        let d = j.heartbeat(t0 + Duration::from_secs(6), heartbeat("a"));
        assert_eq!(d.action, Action::Restart as i32);
        assert!(
            d.reason.starts_with(
                "node b (host-b) lost: no heartbeat for 6.0s (limit 5s), the last at "
            ),
            "{}",
            d.reason
        );
        assert!(
            d.reason
                .ends_with(" UTC; restart 1 of --max-restarts 3 with 1 node(s)"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn a_lost_node_of_a_job_that_recovers_in_place_says_why_it_restarts() {
        let mut j = job(NodeRange { min: 1, max: 2 }, 3);
        let t0 = Instant::now();
        let peer = JobOptions {
            peer_recovery: true,
            ..JobOptions::default()
        };
        for node in ["a", "b"] {
            join_with(&mut j, t0, node, None, "", peer);
        }
        j.heartbeat(t0 + Duration::from_secs(4), heartbeat("a"));
        j.tick(t0 + Duration::from_secs(6), false);
        let d = j.heartbeat(t0 + Duration::from_secs(6), heartbeat("a"));
        assert_eq!(d.action, Action::Restart as i32);
        assert!(
            d.reason.starts_with("node b (host-b) lost: "),
            "{}",
            d.reason
        );
        assert!(
            d.reason.ends_with(
                " UTC; in-place recovery covers a failed worker on a live node, so the job \
                 restarts from the newest checkpoint: restart 1 of --max-restarts 3 with 1 node(s)"
            ),
            "{}",
            d.reason
        );
        // A saved state keeps it.
        let saved = j.durable("t", HashMap::new());
        assert!(saved.peer_recovery);
    }

    #[test]
    fn an_error_its_node_no_longer_reports_is_no_root_cause() {
        use cohort_proto::v1::RecordedError;
        let mut j = job(NodeRange::exactly(1), 0);
        let t0 = Instant::now();
        join(&mut j, t0, "a");
        let recorded = FailureInfo {
            rank: Some(1),
            reason: "raised ValueError: 1".into(),
            error: Some(Box::new(RecordedError {
                timestamp: 100,
                message: "ValueError: 1".into(),
                ..RecordedError::default()
            })),
            ..FailureInfo::default()
        };
        j.heartbeat(
            t0,
            HeartbeatRequest {
                recorded: vec![recorded],
                ..heartbeat("a")
            },
        );
        // Rank 1 was replaced in place: its failed worker's error file is
        // set aside, and the next report holds none.
        j.heartbeat(t0, heartbeat("a"));
        let d = j.report_failure(t0, failure(0, 0));
        let cause = d.outcome.unwrap().root_cause.unwrap();
        assert_eq!(cause.rank, Some(0));
        assert_eq!(cause.reason, "exited with code 3");
    }

    #[test]
    fn a_survivor_failure_is_held_and_the_lost_node_named() {
        use cohort_proto::v1::RecordedError;
        let mut j = job(NodeRange::exactly(2), 0);
        let t0 = Instant::now();
        join(&mut j, t0, "a");
        join(&mut j, t0, "b");
        j.heartbeat(t0 + Duration::from_secs(1), heartbeat("b"));
        // b dies; a's collective breaks at once and its rank 0 exits, with
        // the error it recorded.
        let mut report = failure(0, 0);
        report.failure.as_mut().unwrap().error = Some(Box::new(RecordedError {
            timestamp: 2,
            message: "RuntimeError: connection reset".into(),
            ..RecordedError::default()
        }));
        let d = j.report_failure(t0 + Duration::from_secs(2), report);
        assert_eq!(d.action, Action::Continue as i32, "{}", d.reason);
        j.heartbeat(t0 + Duration::from_secs(3), heartbeat("a"));
        j.tick(t0 + Duration::from_secs(5), false);
        assert!(j.outcome().is_none(), "held within the heartbeat timeout");
        j.tick(t0 + Duration::from_millis(6100), false);
        let outcome = j.outcome().expect("finished once b is lost").clone();
        assert!(
            outcome.summary.starts_with(
                "job failed: node b (host-b) lost: no heartbeat for 5.1s (limit 5s), the last at "
            ),
            "{}",
            outcome.summary
        );
        assert!(
            outcome
                .summary
                .contains(" UTC (then rank 0 on node a (host-a) exited with code 3); "),
            "{}",
            outcome.summary
        );
        let cause = outcome.root_cause.unwrap();
        assert_eq!((cause.node_id.as_str(), cause.rank), ("b", None));
    }

    #[test]
    fn a_held_failure_ends_the_generation_once_the_others_are_heard() {
        let mut j = job(NodeRange::exactly(2), 1);
        let t0 = Instant::now();
        join(&mut j, t0, "a");
        join(&mut j, t0, "b");
        let d = j.report_failure(t0 + Duration::from_secs(1), failure(1, 0));
        assert_eq!(d.action, Action::Continue as i32);
        let d = j.heartbeat(t0 + Duration::from_millis(1500), heartbeat("b"));
        assert_eq!(d.action, Action::Restart as i32);
        assert_eq!(
            d.reason,
            "rank 1 on node a (host-a) exited with code 3; restart 1 of --max-restarts 1 with 2 node(s)"
        );
        // A permanent failure is not held.
        join(&mut j, t0, "a");
        join(&mut j, t0, "b");
        let mut report = failure(1, 1);
        report.failure.as_mut().unwrap().permanent = true;
        let d = j.report_failure(t0 + Duration::from_secs(2), report);
        assert_eq!(d.action, Action::Finished as i32);
    }

    #[test]
    fn a_lost_node_of_a_fixed_job_waits_for_a_replacement_then_gives_up() {
        let mut j = job(NodeRange::exactly(2), 3);
        let t0 = Instant::now();
        join(&mut j, t0, "a");
        join(&mut j, t0, "b");
        j.heartbeat(t0 + Duration::from_secs(5), heartbeat("a"));
        j.tick(t0 + Duration::from_secs(6), false);
        let d = j.heartbeat(t0 + Duration::from_secs(6), heartbeat("a"));
        assert_eq!(d.action, Action::Restart as i32);
        assert!(
            d.reason
                .contains("restart 1 of --max-restarts 3 once 1 new node(s) join"),
            "{}",
            d.reason
        );
        j.take_effects();
        // a rejoins and waits; a line every 30 s.
        join(&mut j, t0 + Duration::from_secs(6), "a");
        j.tick(t0 + Duration::from_secs(37), false);
        let said: Vec<String> = j
            .take_effects()
            .events
            .into_iter()
            .map(|e| e.message)
            .collect();
        assert!(
            said.iter().any(|m| m
                == "waiting for 1 new node(s) to replace node b (host-b): 1 of 2 joined, 269s left of --replacement-timeout 300s"),
            "{said:?}"
        );
        j.tick(t0 + Duration::from_secs(306), false);
        let outcome = j.outcome().expect("gave up at the deadline").clone();
        assert!(
            outcome
                .summary
                .starts_with("job failed: node b (host-b) lost: no heartbeat for"),
            "{}",
            outcome.summary
        );
        assert!(
            outcome.summary.ends_with(
                "; no node joined to replace it within --replacement-timeout 300s (1 of the 2 nodes --nnodes 2 needs joined)"
            ),
            "{}",
            outcome.summary
        );
        assert_eq!(outcome.root_cause.unwrap().node_id, "b");
        assert!(matches!(
            j.poll_join("a").and_then(|r| r.outcome),
            Some(join_response::Outcome::Finished(_))
        ));
    }

    #[test]
    fn a_replacement_node_forms_the_next_generation() {
        let mut j = job(NodeRange::exactly(2), 3);
        let t0 = Instant::now();
        join(&mut j, t0, "a");
        join(&mut j, t0, "b");
        j.heartbeat(t0 + Duration::from_secs(5), heartbeat("a"));
        j.tick(t0 + Duration::from_secs(6), false);
        join(&mut j, t0 + Duration::from_secs(7), "a");
        join(&mut j, t0 + Duration::from_secs(8), "c");
        let (a, c) = (assignment(&j, "a"), assignment(&j, "c"));
        assert_eq!((a.generation, a.node_rank, c.node_rank), (1, 0, 1));
        j.tick(t0 + Duration::from_secs(400), false);
        assert!(j.outcome().is_none(), "no deadline once formed");
    }

    #[test]
    fn a_node_lost_after_the_others_finished_ends_the_job_at_once() {
        let mut j = job(NodeRange { min: 1, max: 2 }, 3);
        let t0 = Instant::now();
        join(&mut j, t0, "a");
        join(&mut j, t0, "b");
        j.report_done(ReportDoneRequest {
            job_id: "job".into(),
            node_id: "a".into(),
            generation: 0,
        });
        j.heartbeat(t0 + Duration::from_secs(5), heartbeat("a"));
        j.tick(t0 + Duration::from_secs(6), false);
        let outcome = j.outcome().expect("over without a restart").clone();
        assert!(outcome.success, "{}", outcome.summary);
        assert!(
            outcome.summary.starts_with(
                "job succeeded: every rank of the node(s) still up exited 0 in generation 0 (0 restart(s)); node b (host-b) lost: no heartbeat for"
            ),
            "{}",
            outcome.summary
        );
    }

    #[test]
    fn a_saved_state_restores_the_running_generation() {
        let mut j = job(NodeRange::exactly(2), 3);
        let t0 = Instant::now();
        join(&mut j, t0, "a");
        join(&mut j, t0, "b");
        j.report_failure(t0, failure(1, 0));
        j.heartbeat(t0, heartbeat("b"));
        join(&mut j, t0, "b");
        join(&mut j, t0, "a");
        j.report_done(ReportDoneRequest {
            job_id: "job".into(),
            node_id: "b".into(),
            generation: 1,
        });
        let kv = HashMap::from([("k".to_owned(), b"v".to_vec())]);
        let saved = j.durable("t", kv.clone());
        assert_eq!(saved.kv, kv);
        let mut config = CoordinatorConfig::new("t".into());
        config.heartbeat_timeout = Duration::from_secs(5);
        let t1 = t0 + Duration::from_secs(100);
        let mut r = JobState::restore(&config, &saved, t1).unwrap();
        assert_eq!(r.durable("t", kv), saved, "restores what it saved");
        assert_eq!(assignment(&r, "a"), assignment(&j, "a"));
        // The members count as heard from at the restore: not lost.
        r.tick(t1 + Duration::from_secs(1), false);
        let hb = HeartbeatRequest {
            generation: 1,
            ..heartbeat("a")
        };
        assert_eq!(r.heartbeat(t1, hb).action, Action::Continue as i32);
        // b was done before the restart; a's report finishes the job.
        let d = r.report_done(ReportDoneRequest {
            job_id: "job".into(),
            node_id: "a".into(),
            generation: 1,
        });
        assert_eq!(d.action, Action::Finished as i32, "{}", d.reason);
        assert_eq!(
            d.reason,
            "job succeeded: all 4 ranks of generation 1 exited 0 (1 restart(s))"
        );
        // Another job's id or shape is refused.
        config.job_id = Some("other".into());
        let err = JobState::restore(&config, &saved, t1).err().unwrap();
        assert_eq!(
            err,
            "it is the state of job \"job\", not of --job-id \"other\""
        );
        config.job_id = None;
        config.nnodes = Some(NodeRange::exactly(3));
        let err = JobState::restore(&config, &saved, t1).err().unwrap();
        assert_eq!(
            err,
            "it is the state of a job of --nnodes 2, not of --nnodes 3"
        );
    }

    #[test]
    fn all_nodes_done_is_success() {
        let mut j = job(NodeRange::exactly(2), 0);
        let t0 = Instant::now();
        join(&mut j, t0, "a");
        join(&mut j, t0, "b");
        let done = |node: &str| ReportDoneRequest {
            job_id: "job".into(),
            node_id: node.into(),
            generation: 0,
        };
        assert_eq!(j.report_done(done("a")).action, Action::Continue as i32);
        let d = j.report_done(done("b"));
        assert_eq!(d.action, Action::Finished as i32);
        assert_eq!(
            d.reason,
            "job succeeded: all 4 ranks of generation 0 exited 0 (0 restart(s))"
        );
        assert!(!j.all_left());
        j.leave("a");
        j.leave("b");
        assert!(j.all_left());
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
        let mut j = job(NodeRange::exactly(1), 0);
        let err = j
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
        assert_eq!(
            err,
            Refusal::WrongJob {
                runs: "job".into(),
                asked: "other".into()
            }
        );
        assert!(err.to_string().contains("runs job \"job\""));
    }
}

//! The coordinator's and the agent's decisions, as pure functions of
//! (clock, state, options) that return the decision and a reason a person can
//! read. The reason is logged, sent to every launcher, and asserted in tests;
//! the gRPC layer ([`crate::coordinator`]) only feeds these functions and acts
//! on their answers.
//!
//! - [`decide_formation`]: does the generation being formed start now?
//! - [`find_lost_nodes`]: which members stopped heartbeating?
//! - [`decide_recovery`]: after a failure, restart or give up?
//! - [`find_hung_worker`]: which worker made no step progress for too long?
//! - [`find_hang_culprit`]: of the ranks that stalled, which one caused it?
//! - [`decide_worker_failure`]: a worker of this node failed: replace it in
//!   place, or have the job restart?

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use cohort_configs::NodeRange;

/// What [`decide_formation`] says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Formation {
    /// Not yet; look again at `until` (when a last call ends) or when a node joins.
    Wait { until: Option<Instant> },
    /// Start the generation with the first `nodes` pending nodes.
    Form { nodes: usize },
}

/// Does the generation being formed start now?
///
/// With `--nnodes N` it starts as soon as N nodes joined. With `MIN:MAX` it
/// starts at once with MAX nodes, or `last_call` after the MIN-th node joined
/// with however many joined by then (torchrun's last call): late nodes of a
/// large job still make it into the generation, and a job never waits forever
/// for nodes that are not coming.
///
/// `joined` counts the nodes waiting; `min_joined_at` is when the MIN-th of
/// them joined (`None` while fewer than MIN joined).
pub fn decide_formation(
    now: Instant,
    joined: usize,
    min_joined_at: Option<Instant>,
    range: NodeRange,
    last_call: Duration,
) -> (Formation, String) {
    let n = joined;
    let (min, max) = (range.min as usize, range.max as usize);
    if n >= max {
        let reason = if range.is_elastic() {
            format!("{max} nodes joined, the maximum of --nnodes {range}")
        } else {
            format!("all {max} nodes of --nnodes {range} joined")
        };
        return (Formation::Form { nodes: max }, reason);
    }
    let Some(min_joined_at) = min_joined_at.filter(|_| n >= min) else {
        return (
            Formation::Wait { until: None },
            format!("{n} of {min} nodes joined (--nnodes {range})"),
        );
    };
    let deadline = min_joined_at + last_call;
    if now >= deadline {
        (
            Formation::Form { nodes: n },
            format!("last call of {last_call:?} ended with {n} nodes (--nnodes {range})",),
        )
    } else {
        (
            Formation::Wait {
                until: Some(deadline),
            },
            format!(
                "{n} nodes joined (--nnodes {range}): waiting {:?} more for late nodes",
                deadline - now
            ),
        )
    }
}

/// A member of the running generation, as the coordinator last heard of it.
#[derive(Clone, Debug)]
pub struct MemberLiveness<'a> {
    pub node_id: &'a str,
    pub last_heartbeat: Instant,
}

/// `HH:MM:SS UTC` of a wall-clock time.
fn utc_time_of_day(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Members whose last heartbeat is older than `timeout`, each with the
/// reason, which says when (`wall_now` is the wall clock at `now`) the last
/// heartbeat came.
pub fn find_lost_nodes(
    now: Instant,
    wall_now: SystemTime,
    members: &[MemberLiveness<'_>],
    timeout: Duration,
) -> Vec<(String, String)> {
    members
        .iter()
        .filter_map(|m| {
            let silent = now.saturating_duration_since(m.last_heartbeat);
            (silent > timeout).then(|| {
                let last = wall_now.checked_sub(silent).unwrap_or(UNIX_EPOCH);
                (
                    m.node_id.to_owned(),
                    format!(
                        "lost: no heartbeat for {:.1}s (limit {:?}), the last at {}",
                        silent.as_secs_f64(),
                        timeout,
                        utc_time_of_day(last)
                    ),
                )
            })
        })
        .collect()
}

/// What [`decide_recovery`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Start generation + 1 with the nodes that are still there.
    Restart,
    /// Start generation + 1 once enough nodes joined to replace the lost
    /// ones, waiting at most the replacement timeout.
    Replace,
    /// The job is over and failed.
    GiveUp,
}

/// After a generation ended with a failure: restart, wait for replacement
/// nodes, or give up?
///
/// `restarts_done` counts restarts before this failure; `live_nodes` the
/// nodes still heartbeating; `fatal` failures (the user interrupted a node)
/// and `permanent` ones (a worker's configuration or input is wrong, see
/// `cohort_contract::exit`) never restart. With fewer than MIN nodes left,
/// the next generation waits up to `replacement_timeout` for new nodes
/// (none: gives up at once).
pub fn decide_recovery(
    restarts_done: u32,
    max_restarts: u32,
    live_nodes: usize,
    range: NodeRange,
    fatal: bool,
    permanent: bool,
    replacement_timeout: Duration,
) -> (Recovery, String) {
    if fatal {
        return (Recovery::GiveUp, "the job was interrupted".to_owned());
    }
    if permanent {
        return (
            Recovery::GiveUp,
            "not restarted: the worker failed on the job's configuration or input (or a full disk), \
             which a restart would hit again"
                .to_owned(),
        );
    }
    let short = (range.min as usize).saturating_sub(live_nodes);
    if short > 0 && replacement_timeout.is_zero() {
        return (
            Recovery::GiveUp,
            format!(
                "only {live_nodes} node(s) left, --nnodes {range} needs at least {}",
                range.min
            ),
        );
    }
    if restarts_done >= max_restarts {
        return (
            Recovery::GiveUp,
            format!("no restarts left ({restarts_done} of --max-restarts {max_restarts} used)"),
        );
    }
    if short > 0 {
        return (
            Recovery::Replace,
            format!(
                "restart {} of --max-restarts {max_restarts} once {short} new node(s) join: \
                 {live_nodes} node(s) left, --nnodes {range} needs {}; waiting up to {replacement_timeout:?} \
                 (--replacement-timeout) for a `cohort launch` with the same --coordinator, --job-id and --token",
                restarts_done + 1,
                range.min
            ),
        );
    }
    (
        Recovery::Restart,
        format!(
            "restart {} of --max-restarts {max_restarts} with {live_nodes} node(s)",
            restarts_done + 1
        ),
    )
}

/// What a node agent knows of one of its workers that failed, for
/// [`decide_worker_failure`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FailedWorker<'a> {
    /// The job recovers in place (`recovery.mode = "peer"`, a job of the
    /// built-in trainer).
    pub peer: bool,
    pub world_size: u32,
    /// Its exit code (`None`: a signal killed it).
    pub code: Option<i32>,
    /// The epoch in which it replaced a failed rank, while that recovery
    /// is not over (it has not written its `Done`).
    pub replacing: Option<u64>,
    /// A recovery in flight in the job, as this agent knows it: its epoch
    /// and what failed ("rank 1 was killed by ...").
    pub in_flight: Option<(u64, &'a str)>,
}

/// What [`decide_worker_failure`] says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerFailure {
    /// Only this rank starts again, under a new epoch; the others keep
    /// running.
    InPlace,
    /// Report it to the coordinator (which restarts the job or gives up),
    /// with why in-place recovery does not apply, where there is a reason
    /// to say.
    Report(Option<String>),
}

/// What falling back means.
const FALLBACK: &str = "falling back to a restart from the newest checkpoint";

/// A worker of this node failed: recover it in place, or report it?
///
/// In place needs `peer` mode, a surviving rank (a world of two or more),
/// and no recovery already in flight: a failure during a recovery (of the
/// replacement itself or of any rank) falls back to a restart, as does a
/// worker that says its in-place recovery failed
/// (`cohort_contract::exit::RECOVERY_FAILED`). A permanent failure
/// (`cohort_contract::exit::PERMANENT_FAILURE`) is never recovered: the
/// replacement would fail the same way.
pub fn decide_worker_failure(w: &FailedWorker<'_>) -> WorkerFailure {
    use cohort_contract::exit::{PERMANENT_FAILURE, RECOVERY_FAILED};
    match w.code {
        Some(PERMANENT_FAILURE) => return WorkerFailure::Report(None),
        Some(RECOVERY_FAILED) => {
            return WorkerFailure::Report(Some(format!(
                "its in-place recovery failed, as its output says; {FALLBACK}"
            )));
        }
        _ => {}
    }
    if !w.peer {
        return WorkerFailure::Report(None);
    }
    if w.world_size < 2 {
        return WorkerFailure::Report(Some(format!(
            "in-place recovery takes the state from a surviving rank and this job has one rank; \
             {FALLBACK}"
        )));
    }
    if let Some(epoch) = w.replacing {
        return WorkerFailure::Report(Some(format!(
            "it was the replacement of the in-place recovery of epoch {epoch} and failed before \
             it rejoined; a failure during a recovery means {FALLBACK}"
        )));
    }
    if let Some((epoch, what)) = w.in_flight {
        return WorkerFailure::Report(Some(format!(
            "during the in-place recovery of epoch {epoch}, after {what}; a failure during a \
             recovery means {FALLBACK}"
        )));
    }
    WorkerFailure::InPlace
}

/// A worker's last step change, as its agent saw it in the status file.
#[derive(Clone, Copy, Debug)]
pub struct StepMark {
    pub rank: u32,
    pub step: u64,
    /// When the agent first saw `step`.
    pub since: Instant,
}

/// The first worker whose step has not changed for longer than
/// `hang_timeout`, with the reason. Workers that never wrote a status file
/// have no mark and are never hung.
pub fn find_hung_worker(
    now: Instant,
    marks: &[StepMark],
    hang_timeout: Duration,
) -> Option<(u32, String)> {
    marks.iter().find_map(|m| {
        let stuck = now.saturating_duration_since(m.since);
        (stuck > hang_timeout).then(|| {
            (
                m.rank,
                format!(
                    "hung: no step progress for {:.1}s at step {} (--hang-timeout {}s)",
                    stuck.as_secs_f64(),
                    m.step,
                    hang_timeout.as_secs_f64()
                ),
            )
        })
    })
}

/// What the agent sees of one running rank when a hang is detected.
#[derive(Clone, Copy, Debug)]
pub struct RankEvidence {
    pub rank: u32,
    /// The last step it reported (`None`: it reports no steps).
    pub step: Option<u64>,
    /// Its process is stopped (state `T` or `t` in `/proc/PID/stat`: a
    /// SIGSTOP, a terminal stop, a debugger).
    pub stopped: bool,
}

fn ranks_list(ranks: impl Iterator<Item = u32>) -> String {
    ranks.map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
}

/// The root cause of a hang: in a collective every rank waits for every
/// other, so when one rank stops, all of them stall, and the first stalled
/// one is rarely the cause. The culprit is the rank that is *not* inside the
/// collective its peers wait in:
///
/// 1. a rank whose process is stopped (it can't be in any collective);
/// 2. else a rank behind its peers' step (it never reached the collective
///    of the step they are in).
///
/// Returns the rank and the reason, naming the evidence used; `None` when
/// no rank stands out (every rank stalled at the same step, none stopped).
pub fn find_hang_culprit(evidence: &[RankEvidence]) -> Option<(u32, String)> {
    let peers_of = |rank: u32| ranks_list(evidence.iter().map(|e| e.rank).filter(|&r| r != rank));
    if let Some(stopped) = evidence.iter().find(|e| e.stopped) {
        let peers = peers_of(stopped.rank);
        let at = stopped
            .step
            .map_or_else(String::new, |s| format!(" at step {s}"));
        return Some((
            stopped.rank,
            format!(
                "hung: its process is stopped{at} (state T: SIGSTOP, a terminal stop or a debugger), so it is not in the collective its peers (rank(s) {peers}) wait in (evidence: process states, step marks)"
            ),
        ));
    }
    let steps: Vec<(u32, u64)> = evidence
        .iter()
        .filter_map(|e| Some((e.rank, e.step?)))
        .collect();
    let max = steps.iter().map(|&(_, s)| s).max()?;
    let &(rank, step) = steps.iter().min_by_key(|&&(r, s)| (s, r))?;
    if step == max {
        return None;
    }
    let ahead = ranks_list(steps.iter().filter(|&&(_, s)| s > step).map(|&(r, _)| r));
    Some((
        rank,
        format!(
            "hung: at step {step} while rank(s) {ahead} reached step {max}: it never entered the collective they wait in (evidence: step marks)"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_worker_is_replaced_in_place_only_when_it_can_be() {
        let peer = FailedWorker {
            peer: true,
            world_size: 2,
            code: None,
            ..FailedWorker::default()
        };
        assert_eq!(decide_worker_failure(&peer), WorkerFailure::InPlace);
        assert_eq!(
            decide_worker_failure(&FailedWorker {
                code: Some(1),
                ..peer
            }),
            WorkerFailure::InPlace
        );
        let why = |w: FailedWorker| match decide_worker_failure(&w) {
            WorkerFailure::Report(why) => why,
            WorkerFailure::InPlace => panic!("{w:?} was recovered in place"),
        };
        // restart mode, and a permanent failure: today's report, no reason.
        assert_eq!(
            why(FailedWorker {
                peer: false,
                ..peer
            }),
            None
        );
        assert_eq!(
            why(FailedWorker {
                code: Some(78),
                ..peer
            }),
            None
        );
        let reason = why(FailedWorker {
            code: Some(75),
            ..peer
        })
        .unwrap();
        assert!(
            reason.starts_with("its in-place recovery failed"),
            "{reason}"
        );
        assert!(reason.ends_with("falling back to a restart from the newest checkpoint"));
        let reason = why(FailedWorker {
            world_size: 1,
            ..peer
        })
        .unwrap();
        assert!(reason.contains("this job has one rank"), "{reason}");
        let reason = why(FailedWorker {
            replacing: Some(2),
            in_flight: Some((2, "rank 1 exited with code 1")),
            ..peer
        })
        .unwrap();
        assert!(
            reason.starts_with("it was the replacement of the in-place recovery of epoch 2"),
            "{reason}"
        );
        let reason = why(FailedWorker {
            in_flight: Some((3, "rank 1 was killed by signal 9 (SIGKILL)")),
            ..peer
        })
        .unwrap();
        assert!(
            reason.starts_with(
                "during the in-place recovery of epoch 3, after rank 1 was killed by signal 9 \
                 (SIGKILL); a failure"
            ),
            "{reason}"
        );
    }

    #[test]
    fn the_hang_culprit_is_the_rank_outside_the_collective() {
        let ev = |rank, step, stopped| RankEvidence {
            rank,
            step: Some(step),
            stopped,
        };
        // Rank 1 stopped: both stalled at step 7, rank 0 first; rank 1 is named.
        let (rank, reason) =
            find_hang_culprit(&[ev(0, 7, false), ev(1, 7, true), ev(2, 7, false)]).unwrap();
        assert_eq!(rank, 1);
        assert!(reason.contains("process is stopped at step 7"), "{reason}");
        assert!(reason.contains("(rank(s) 0, 2) wait in"), "{reason}");
        assert!(reason.contains("evidence: process states"), "{reason}");
        // Rank 2 is behind.
        let (rank, reason) =
            find_hang_culprit(&[ev(0, 8, false), ev(1, 8, false), ev(2, 7, false)]).unwrap();
        assert_eq!(rank, 2);
        assert!(reason.contains("rank(s) 0, 1 reached step 8"), "{reason}");
        assert!(reason.contains("evidence: step marks"), "{reason}");
        // Nobody stands out.
        assert_eq!(find_hang_culprit(&[ev(0, 8, false), ev(1, 8, false)]), None);
        assert_eq!(find_hang_culprit(&[]), None);
    }

    #[test]
    fn fixed_size_forms_when_all_joined() {
        let t0 = Instant::now();
        let range = NodeRange::exactly(3);
        let last_call = Duration::from_secs(1);
        let (d, reason) = decide_formation(t0, 2, None, range, last_call);
        assert_eq!(d, Formation::Wait { until: None });
        assert_eq!(reason, "2 of 3 nodes joined (--nnodes 3)");
        let (d, reason) = decide_formation(t0, 3, Some(t0), range, last_call);
        assert_eq!(d, Formation::Form { nodes: 3 });
        assert_eq!(reason, "all 3 nodes of --nnodes 3 joined");
    }

    #[test]
    fn elastic_waits_for_last_call_then_forms() {
        let t0 = Instant::now();
        let range = NodeRange { min: 2, max: 4 };
        let last_call = Duration::from_secs(10);
        // The last call started when the 2nd (MIN-th) node joined, at 1 s.
        let min_joined_at = Some(t0 + Duration::from_secs(1));
        let (d, reason) = decide_formation(
            t0 + Duration::from_secs(3),
            3,
            min_joined_at,
            range,
            last_call,
        );
        assert_eq!(
            d,
            Formation::Wait {
                until: Some(t0 + Duration::from_secs(11))
            }
        );
        assert_eq!(
            reason,
            "3 nodes joined (--nnodes 2:4): waiting 8s more for late nodes"
        );
        let (d, reason) = decide_formation(
            t0 + Duration::from_secs(11),
            3,
            min_joined_at,
            range,
            last_call,
        );
        assert_eq!(d, Formation::Form { nodes: 3 });
        assert_eq!(reason, "last call of 10s ended with 3 nodes (--nnodes 2:4)");
    }

    #[test]
    fn elastic_forms_at_once_with_max_and_leaves_extras() {
        let t0 = Instant::now();
        let range = NodeRange { min: 1, max: 2 };
        let (d, reason) = decide_formation(t0, 3, Some(t0), range, Duration::from_secs(30));
        assert_eq!(d, Formation::Form { nodes: 2 });
        assert_eq!(reason, "2 nodes joined, the maximum of --nnodes 1:2");
    }

    #[test]
    fn lost_nodes_are_the_silent_ones() {
        let t0 = Instant::now();
        let members = [
            MemberLiveness {
                node_id: "a",
                last_heartbeat: t0,
            },
            MemberLiveness {
                node_id: "b",
                last_heartbeat: t0 + Duration::from_secs(4),
            },
        ];
        // The wall clock at t0 + 5 s: 05:17:08 UTC on some day.
        let wall = UNIX_EPOCH + Duration::from_secs(86_400 * 20_000 + 5 * 3600 + 17 * 60 + 8);
        let lost = find_lost_nodes(
            t0 + Duration::from_secs(5),
            wall,
            &members,
            Duration::from_secs(3),
        );
        assert_eq!(
            lost,
            vec![(
                "a".to_owned(),
                "lost: no heartbeat for 5.0s (limit 3s), the last at 05:17:03 UTC".to_owned()
            )]
        );
        assert!(
            find_lost_nodes(
                t0 + Duration::from_secs(2),
                wall,
                &members,
                Duration::from_secs(3)
            )
            .is_empty()
        );
    }

    #[test]
    fn recovery_restarts_within_budget_and_gives_up_after() {
        let fixed = NodeRange::exactly(2);
        assert_eq!(
            decide_recovery(0, 3, 2, fixed, false, false, WAIT),
            (
                Recovery::Restart,
                "restart 1 of --max-restarts 3 with 2 node(s)".to_owned()
            )
        );
        assert_eq!(
            decide_recovery(3, 3, 2, fixed, false, false, WAIT),
            (
                Recovery::GiveUp,
                "no restarts left (3 of --max-restarts 3 used)".to_owned()
            )
        );
        assert_eq!(
            decide_recovery(0, 3, 2, fixed, true, false, WAIT),
            (Recovery::GiveUp, "the job was interrupted".to_owned())
        );
    }

    const WAIT: Duration = Duration::from_secs(300);

    #[test]
    fn recovery_with_too_few_nodes_waits_for_replacements() {
        let fixed = NodeRange::exactly(2);
        assert_eq!(
            decide_recovery(0, 3, 1, fixed, false, false, WAIT),
            (
                Recovery::Replace,
                "restart 1 of --max-restarts 3 once 1 new node(s) join: 1 node(s) left, --nnodes 2 \
                 needs 2; waiting up to 300s (--replacement-timeout) for a `cohort launch` with the \
                 same --coordinator, --job-id and --token"
                    .to_owned()
            )
        );
        assert_eq!(
            decide_recovery(0, 3, 1, fixed, false, false, Duration::ZERO),
            (
                Recovery::GiveUp,
                "only 1 node(s) left, --nnodes 2 needs at least 2".to_owned()
            )
        );
        // No restart left: nothing to wait for.
        assert_eq!(
            decide_recovery(3, 3, 1, fixed, false, false, WAIT).0,
            Recovery::GiveUp
        );
        assert_eq!(
            decide_recovery(0, 3, 1, NodeRange { min: 1, max: 2 }, false, false, WAIT).0,
            Recovery::Restart
        );
    }

    #[test]
    fn hung_worker_is_the_one_without_progress() {
        let t0 = Instant::now();
        let marks = [
            StepMark {
                rank: 0,
                step: 7,
                since: t0 + Duration::from_secs(4),
            },
            StepMark {
                rank: 1,
                step: 3,
                since: t0,
            },
        ];
        let now = t0 + Duration::from_secs(5);
        assert_eq!(
            find_hung_worker(now, &marks, Duration::from_secs(2)),
            Some((
                1,
                "hung: no step progress for 5.0s at step 3 (--hang-timeout 2s)".to_owned()
            ))
        );
        assert_eq!(find_hung_worker(now, &marks, Duration::from_secs(6)), None);
        assert_eq!(find_hung_worker(now, &[], Duration::ZERO), None);
    }
}

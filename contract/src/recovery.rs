//! In-place recovery: the store keys and records through which a node agent
//! and the workers of the built-in trainer agree on replacing a failed rank
//! while the other ranks keep their processes and memory.
//!
//! Everything lives in the generation's namespace of the coordinator's
//! store (what `cohort_launcher::worker_store` and the agent address):
//!
//! 1. The agent that sees its worker fail (an exit, or the culprit of a
//!    hang, killed) claims the next epoch: a compare-and-set of
//!    [`EPOCH_KEY`] from `E` (absent = 0) to `E + 1`, decimal ASCII.
//! 2. It writes a [`Notice`] under [`notice_key`]`(E + 1)` and starts the
//!    failed rank again with `COHORT_EPOCH=E+1`.
//! 3. Every surviving worker watches [`notice_key`] of the epoch after its
//!    own; on the notice it aborts the collective in flight and leaves the
//!    step, then every rank (survivors and the replacement) connects a new
//!    communicator under [`epoch_prefix`]`(E + 1)`.
//! 4. The ranks agree on a source (the lowest rank holding the newest
//!    state), which streams the state to the others over the transport; the
//!    step in flight is redone.
//! 5. After its first step the replacement writes a [`Done`] under
//!    [`done_key`]`(E + 1)`; the agent prints the recovery's one line from
//!    it.
//!
//! A worker that cannot recover in place exits with
//! [`crate::exit::RECOVERY_FAILED`] and the job restarts from disk.

use serde::{Deserialize, Serialize};

/// The current epoch, decimal ASCII; absent means 0.
pub const EPOCH_KEY: &str = "recovery/epoch";

/// Where the [`Notice`] of epoch `epoch` is written.
pub fn notice_key(epoch: u64) -> String {
    format!("recovery/notice/{epoch}")
}

/// Where the replacement of epoch `epoch` writes its [`Done`].
pub fn done_key(epoch: u64) -> String {
    format!("recovery/done/{epoch}")
}

/// The store prefix the communicator of epoch `epoch` bootstraps under
/// (its keys are `epoch-E/...`; epoch 0 uses none).
pub fn epoch_prefix(epoch: u64) -> String {
    format!("epoch-{epoch}")
}

/// Why the job moved to a new epoch: written by the failed rank's agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    pub epoch: u64,
    /// The failed rank (it keeps its rank number).
    pub rank: usize,
    /// What happened to it, as the agent saw it ("was killed by SIGKILL",
    /// "hung: ...").
    pub reason: String,
    /// When the failure happened, as well as the agent knows (the exit it
    /// saw, or the last progress of a hung rank): Unix time in ms.
    pub failed_unix_ms: u64,
    /// When the agent wrote this notice: Unix time in ms.
    pub noticed_unix_ms: u64,
}

impl Notice {
    /// What failed: "rank 1 was killed by signal 9 (SIGKILL)".
    pub fn what(&self) -> String {
        format!("rank {} {}", self.rank, self.reason)
    }
}

/// How a recovery went: written by the replacement after its first step.
/// Times are Unix ms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    pub epoch: u64,
    pub rank: usize,
    /// The rank the state came from.
    pub source_rank: usize,
    /// The first step redone: the one in flight at the failure, or under
    /// ZeRO the one after the mirrors' step, when a rank died while they
    /// were being refreshed (1-based: the step that completes `step`
    /// steps).
    pub step: u64,
    /// The step in flight when the failure came.
    pub in_flight: u64,
    /// Bytes of state received.
    pub bytes: u64,
    /// When the last survivor had left the failed step.
    pub survivors_left_unix_ms: u64,
    /// When the replacement started connecting (its process is up).
    pub connecting_unix_ms: u64,
    /// When the epoch's communicator was up on the replacement.
    pub connected_unix_ms: u64,
    /// When the state was in.
    pub synced_unix_ms: u64,
    /// When the redone step finished.
    pub redone_unix_ms: u64,
}

/// Unix time now, in ms.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Done {
    /// The recovery's phases, in seconds, given the [`Notice`]: detect
    /// (failure → notice), abort (notice → the survivors out of the step),
    /// respawn (notice → the replacement connecting), rejoin (the epoch's
    /// communicator up), transfer (the state in), redo (the step in
    /// flight done again).
    pub fn phases(&self, notice: &Notice) -> [(&'static str, f64); 6] {
        let s = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1000.0;
        [
            ("detect", s(notice.failed_unix_ms, notice.noticed_unix_ms)),
            (
                "abort",
                s(notice.noticed_unix_ms, self.survivors_left_unix_ms),
            ),
            (
                "respawn",
                s(notice.noticed_unix_ms, self.connecting_unix_ms),
            ),
            ("rejoin", s(self.connecting_unix_ms, self.connected_unix_ms)),
            ("transfer", s(self.connected_unix_ms, self.synced_unix_ms)),
            ("redo", s(self.synced_unix_ms, self.redone_unix_ms)),
        ]
    }

    /// The launcher's one line for this recovery.
    pub fn describe(&self, notice: &Notice) -> String {
        let phases = self
            .phases(notice)
            .iter()
            .map(|(name, s)| format!("{name} {s:.3} s"))
            .collect::<Vec<_>>()
            .join(", ");
        let total = notice
            .failed_unix_ms
            .min(notice.noticed_unix_ms)
            .abs_diff(self.redone_unix_ms) as f64
            / 1000.0;
        let redone = if self.step >= self.in_flight {
            format!("step {} redone", self.in_flight)
        } else {
            format!("steps {} to {} redone", self.step, self.in_flight)
        };
        format!(
            "rank {} recovered in place (epoch {}): it {} during step {}; its state came from rank {} over the transport ({:.1} MB); {redone}; {total:.3} s in all: {phases}",
            self.rank,
            self.epoch,
            notice.reason,
            self.in_flight,
            self.source_rank,
            self.bytes as f64 / 1e6,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_the_rank_the_source_and_every_phase() {
        let notice = Notice {
            epoch: 1,
            rank: 1,
            reason: "was killed by SIGKILL".into(),
            failed_unix_ms: 1_000,
            noticed_unix_ms: 1_010,
        };
        let done = Done {
            epoch: 1,
            rank: 1,
            source_rank: 0,
            step: 37,
            in_flight: 37,
            bytes: 3_400_000,
            survivors_left_unix_ms: 1_012,
            connecting_unix_ms: 1_900,
            connected_unix_ms: 1_950,
            synced_unix_ms: 1_962,
            redone_unix_ms: 2_042,
        };
        let line = done.describe(&notice);
        assert!(
            line.starts_with("rank 1 recovered in place (epoch 1): it was killed by SIGKILL during step 37; its state came from rank 0"),
            "{line}"
        );
        for phase in [
            "detect 0.010 s",
            "abort 0.002 s",
            "respawn 0.890 s",
            "rejoin 0.050 s",
            "transfer 0.012 s",
            "redo 0.080 s",
            "1.042 s in all",
        ] {
            assert!(line.contains(phase), "{phase}: {line}");
        }
        let back: Done = serde_json::from_str(&serde_json::to_string(&done).unwrap()).unwrap();
        assert_eq!(back, done);
    }
}

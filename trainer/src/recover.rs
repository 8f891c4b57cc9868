//! In-place recovery, the worker's side (`recovery.mode = "peer"`; the
//! protocol is `cohort_contract::recovery`'s).
//!
//! A surviving rank keeps its process and memory: a watcher thread waits
//! on the store for the notice of the next epoch (the failed rank's agent
//! writes it when it sees the failure) and aborts the collective in flight,
//! so a step blocked on a dead or stopped peer fails at once. The step
//! is left ([`Recovery::recover`]): its gradients and buckets are dropped,
//! parameters and optimizer state kept; every rank connects the epoch's
//! communicator, and the state is made whole again
//! ([`DataParallel::rejoin`]): under DDP the lowest rank holding the newest
//! state broadcasts it to the others; under ZeRO every rank goes back to
//! the step of the shard mirrors (`mirror.rs`) and the replacement takes
//! its shard from the rank mirroring it. The step in flight is redone:
//! data order and dropout are functions of the step, so the run's result
//! is that of an uninterrupted one.
//!
//! The replacement (a new process with `COHORT_EPOCH` > 0) builds its model
//! without reading a checkpoint, connects under its epoch and receives the
//! state ([`Recovery::join`]); after its first step it writes the
//! recovery's record, from which its agent prints the recovery's line.
//!
//! Whatever can't be recovered this way (no replacement within
//! `recovery.rejoin_timeout_s`, a failure while the state is being sent, a
//! path that can't recover in place) is a [`TrainError::RecoveryFailed`]:
//! the worker exits with `exit::RECOVERY_FAILED` and the job restarts from
//! the newest checkpoint on disk.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cohort_collectives::{AbortHandle, Communicator, Store, StoreError};
use cohort_configs::{RecoveryConfig, TransportChoice};
use cohort_contract::WorkerEnv;
use cohort_contract::recovery::{Done, Notice, done_key, notice_key, unix_ms};

use crate::parallel::{Held, PeerState, Synced};
use crate::{DataParallel, TrainError, connect::connect_in_epoch};

/// How long one wait of the watcher on the store lasts before it asks again.
const WATCH_WAIT: Duration = Duration::from_secs(20);

/// What the watcher and the trainer share.
#[derive(Default)]
struct WatchState {
    /// The epoch whose notice the watcher waits for.
    want: u64,
    /// That notice, once it came.
    notice: Option<Notice>,
    /// Aborts the current communicator's op in flight.
    abort: Option<AbortHandle>,
}

#[derive(Default)]
struct Watch {
    state: Mutex<WatchState>,
    changed: Condvar,
}

impl Watch {
    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A replacement's progress, until its record is written.
struct Joining {
    connecting_unix_ms: u64,
    connected_unix_ms: u64,
    synced: Option<(Synced, u64)>,
}

/// A worker's side of in-place recovery.
pub struct Recovery {
    store: Arc<dyn Store>,
    env: WorkerEnv,
    transport: TransportChoice,
    rejoin_timeout: Duration,
    /// The epoch this worker's communicator belongs to.
    epoch: u64,
    watch: Arc<Watch>,
    joining: Option<Joining>,
}

impl Recovery {
    /// The recovery of the worker `env` describes, through `store` (the
    /// coordinator's, for this generation); starts watching for the next
    /// epoch's notice. A replacement (`env.epoch` > 0) creates it before it
    /// connects.
    pub fn new(
        store: Arc<dyn Store>,
        env: &WorkerEnv,
        transport: TransportChoice,
        cfg: &RecoveryConfig,
    ) -> Recovery {
        let watch = Arc::new(Watch::default());
        watch.lock().want = env.epoch + 1;
        {
            let (store, watch) = (store.clone(), watch.clone());
            std::thread::Builder::new()
                .name("cohort-recovery-watch".into())
                .spawn(move || watch_notices(&*store, &watch))
                .expect("spawning the recovery watcher");
        }
        Recovery {
            store,
            env: env.clone(),
            transport,
            rejoin_timeout: Duration::from_secs(cfg.rejoin_timeout_s),
            epoch: env.epoch,
            watch,
            joining: (env.epoch > 0).then(|| Joining {
                connecting_unix_ms: unix_ms(),
                connected_unix_ms: 0,
                synced: None,
            }),
        }
    }

    /// Whether this worker replaces a failed rank.
    pub fn is_replacement(&self) -> bool {
        self.joining.is_some()
    }

    /// The replacement's communicator, under its epoch.
    pub fn connect(&mut self) -> Result<Communicator, TrainError> {
        let comm = connect_in_epoch(
            &self.env,
            &self.store,
            self.epoch,
            self.transport,
            self.rejoin_timeout,
        )?;
        if let Some(j) = &mut self.joining {
            j.connected_unix_ms = unix_ms();
        }
        Ok(comm)
    }

    /// Lets the watcher abort `comm`'s op in flight when the next notice
    /// comes (at once if it came already): a step blocked on a stopped or
    /// unreachable peer fails then, not at its timeout.
    pub fn watch(&self, comm: &Communicator) {
        let handle = comm.abort_handle();
        let mut st = self.watch.lock();
        if let Some(notice) = &st.notice {
            handle.abort(&notice_reason(notice));
        }
        st.abort = Some(handle);
    }

    /// The replacement takes the job's state from the survivors.
    pub fn join(&mut self, dp: &mut DataParallel) -> Result<Synced, TrainError> {
        let synced = dp.rejoin(None, PeerState::default())?;
        if let Some(j) = &mut self.joining {
            j.synced = Some((synced, unix_ms()));
        }
        Ok(synced)
    }

    /// Whether `e` is a failure in-place recovery is for: a collective
    /// that failed (a peer died, hung or aborted).
    pub fn covers(e: &TrainError) -> bool {
        matches!(e, TrainError::Comm { .. })
    }

    /// A survivor: `failure` (see [`Recovery::covers`]) ended the step in
    /// flight; waits for the notice of the next epoch, connects its
    /// communicator, and makes this rank's state the newest one a rank
    /// holds (`held` is this rank's). Skips to a later epoch when another
    /// failure comes before this one has formed.
    pub fn recover(
        &mut self,
        dp: &mut DataParallel,
        failure: TrainError,
        held: Held,
    ) -> Result<Synced, TrainError> {
        let rank = self.env.rank;
        let deadline = Instant::now() + self.rejoin_timeout;
        let gave_up = |why: String| {
            TrainError::RecoveryFailed(format!(
                "rank {rank} left step {} ({}): {why}",
                held.step + 1,
                crate::describe_error(&failure)
            ))
        };
        dp.recovers_in_place().map_err(gave_up)?;
        loop {
            let Some(notice) = self.wait_notice(deadline) else {
                return Err(gave_up(format!(
                    "no failed rank was replaced within {} s (recovery.rejoin_timeout_s)",
                    self.rejoin_timeout.as_secs()
                )));
            };
            // A later failure may have been noticed already: go to the newest.
            let mut epoch = notice.epoch;
            while let Ok(Some(_)) = self.store.get(&notice_key(epoch + 1)) {
                epoch += 1;
            }
            tracing::info!(
                "rank {rank}: rank {} {}: moving to epoch {epoch}",
                notice.rank,
                notice.reason
            );
            self.epoch = epoch;
            {
                let mut st = self.watch.lock();
                st.want = epoch + 1;
                st.notice = None;
                st.abort = None;
                self.watch.changed.notify_all();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let comm = match connect_in_epoch(&self.env, &self.store, epoch, self.transport, left) {
                Ok(comm) => comm,
                Err(e) if self.newer_notice() => {
                    tracing::info!(
                        "rank {rank}: epoch {epoch} did not form ({e}); a later one did"
                    );
                    continue;
                }
                Err(e) => return Err(gave_up(crate::describe_error(&e))),
            };
            self.watch(&comm);
            match dp.rejoin(Some(comm), PeerState { have: Some(held) }) {
                Ok(synced) => return Ok(synced),
                // Before the state was sent: this rank still holds it.
                Err(e @ TrainError::Comm { .. }) => {
                    tracing::info!("rank {rank}: epoch {epoch} failed as it formed: {e}");
                    continue;
                }
                Err(TrainError::RecoveryFailed(why)) => return Err(gave_up(why)),
                Err(e) => return Err(gave_up(crate::describe_error(&e))),
            }
        }
    }

    /// A replacement, after a step: the first one writes the recovery's
    /// record (its agent prints the recovery's line from it).
    pub fn after_step(&mut self) {
        let Some(Joining {
            connecting_unix_ms,
            connected_unix_ms,
            synced: Some((synced, synced_unix_ms)),
        }) = self.joining.take()
        else {
            return;
        };
        let done = Done {
            epoch: self.epoch,
            rank: self.env.rank,
            source_rank: synced.source,
            step: synced.step + 1,
            in_flight: synced.in_flight,
            bytes: synced.bytes,
            survivors_left_unix_ms: synced.survivors_left_unix_ms,
            connecting_unix_ms,
            connected_unix_ms,
            synced_unix_ms,
            redone_unix_ms: unix_ms(),
        };
        let value = serde_json::to_vec(&done).expect("a recovery record serializes");
        if let Err(e) = self.store.set(&done_key(self.epoch), &value) {
            tracing::warn!("writing the record of recovery epoch {}: {e}", self.epoch);
        }
    }

    /// The notice of the epoch after this one, waiting until `deadline`.
    fn wait_notice(&self, deadline: Instant) -> Option<Notice> {
        let mut st = self.watch.lock();
        loop {
            if let Some(n) = &st.notice {
                return Some(n.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            st = self
                .watch
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn newer_notice(&self) -> bool {
        matches!(self.store.get(&notice_key(self.epoch + 1)), Ok(Some(_)))
    }
}

fn notice_reason(n: &Notice) -> String {
    format!("{} (epoch {})", n.what(), n.epoch)
}

/// The watcher: waits for the notice of the epoch `want`, hands it over
/// and aborts the communicator's op in flight, then waits until the
/// trainer moves on to the next epoch.
fn watch_notices(store: &dyn Store, watch: &Watch) {
    loop {
        let want = watch.lock().want;
        match store.wait(&[notice_key(want)], WATCH_WAIT) {
            Ok(values) => {
                let notice =
                    serde_json::from_slice::<Notice>(&values[0]).unwrap_or_else(|e| Notice {
                        epoch: want,
                        rank: usize::MAX,
                        reason: format!("failed (its notice does not parse: {e})"),
                        failed_unix_ms: unix_ms(),
                        noticed_unix_ms: unix_ms(),
                    });
                let mut st = watch.lock();
                if st.want != want {
                    continue;
                }
                if let Some(handle) = &st.abort {
                    handle.abort(&notice_reason(&notice));
                }
                st.notice = Some(notice);
                watch.changed.notify_all();
                while st.want == want {
                    st = watch.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            }
            Err(StoreError::Timeout { .. }) => {}
            // The coordinator is away (an outage, or the job is ending):
            // ask again a little later.
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

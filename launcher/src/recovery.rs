//! The node agent's side of in-place recovery (the protocol is
//! [`cohort_contract::recovery`]): claiming the next epoch, writing its
//! [`Notice`], waiting for the replacement's [`Done`] and printing the
//! recovery's line, and watching the notices of every node, so that no
//! agent takes the stall of a recovery for a hang.
//!
//! The workers do the rest: the survivors abort the step in flight and
//! rejoin under the new epoch, the state streams from a survivor to the
//! replacement, and the replacement writes the [`Done`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use cohort_contract::recovery::{Done, EPOCH_KEY, Notice, done_key, notice_key};
use cohort_proto::v1::{KvCompareAndSetRequest, KvSetRequest, KvWaitRequest};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::LauncherError;
use crate::client::{Client, rpc_error};
use crate::console::Console;

/// How long the agent waits for a [`Done`] beyond the workers' own
/// `recovery.rejoin_timeout_s` (they give up first, exit 75 and the job
/// restarts from disk).
const DONE_SLACK: Duration = Duration::from_secs(60);

/// How long one watch of the store waits before it asks again.
const WATCH_WAIT: Duration = Duration::from_secs(600);

/// Between two tries of a store call the coordinator did not answer.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The generation's namespace of the coordinator's store, where the
/// records of a recovery live.
#[derive(Clone)]
pub struct Scope {
    pub client: Client,
    /// The coordinator's HOST:PORT (for errors).
    pub addr: String,
    pub job_id: String,
    pub generation: u64,
}

impl Scope {
    /// Claims the next epoch: a compare-and-set of [`EPOCH_KEY`] from its
    /// value `E` (absent: 0) to `E + 1`, again from the value another agent
    /// set when two claim at once. Returns `E + 1`.
    pub async fn claim_epoch(&self) -> Result<u64, LauncherError> {
        let mut current: Option<Vec<u8>> = None;
        loop {
            let epoch = match &current {
                None => 0,
                Some(bytes) => parse_epoch(bytes).ok_or_else(|| LauncherError::Rpc {
                    addr: self.addr.clone(),
                    call: "KvCompareAndSet",
                    code: tonic::Code::FailedPrecondition,
                    message: format!(
                        "the store's {EPOCH_KEY} holds {:?}, not an epoch number",
                        String::from_utf8_lossy(bytes)
                    ),
                })?,
            };
            let next = epoch + 1;
            let request = KvCompareAndSetRequest {
                job_id: self.job_id.clone(),
                generation: self.generation,
                key: EPOCH_KEY.to_owned(),
                expected: current.clone(),
                desired: next.to_string().into_bytes(),
            };
            let response = self
                .client
                .clone()
                .kv_compare_and_set(request)
                .await
                .map_err(|s| rpc_error(&self.addr, "KvCompareAndSet", s))?
                .into_inner();
            if response.swapped {
                return Ok(next);
            }
            current = response.current;
        }
    }

    /// Writes `notice` under [`notice_key`] of its epoch.
    pub async fn write_notice(&self, notice: &Notice) -> Result<(), LauncherError> {
        let value = serde_json::to_vec(notice).map_err(|e| LauncherError::Rpc {
            addr: self.addr.clone(),
            call: "KvSet",
            code: tonic::Code::Internal,
            message: format!("the recovery notice could not be encoded: {e}"),
        })?;
        let request = KvSetRequest {
            job_id: self.job_id.clone(),
            generation: self.generation,
            key: notice_key(notice.epoch),
            value,
        };
        self.client
            .clone()
            .kv_set(request)
            .await
            .map_err(|s| rpc_error(&self.addr, "KvSet", s))?;
        Ok(())
    }

    /// The value of `key` once it is set, or `None` when `timeout` passed
    /// first. A coordinator that does not answer is asked again until then.
    pub async fn wait(&self, key: &str, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let wait = left.min(WATCH_WAIT);
            let mut request = tonic::Request::new(KvWaitRequest {
                job_id: self.job_id.clone(),
                generation: self.generation,
                keys: vec![key.to_owned()],
                timeout_ms: wait.as_millis().min(u128::from(u64::MAX)) as u64,
            });
            // The server answers at `wait`; the deadline only guards
            // against a coordinator that stopped answering.
            request.set_timeout(wait + Duration::from_secs(30));
            match self.client.clone().kv_wait(request).await {
                Ok(response) => {
                    let response = response.into_inner();
                    if response.complete {
                        return response.values.into_iter().next();
                    }
                }
                Err(status) => {
                    tracing::debug!("waiting for {key} in the store: {status}");
                    tokio::time::sleep(RETRY_PAUSE.min(left)).await;
                }
            }
        }
    }
}

/// An epoch as the store holds it: decimal ASCII.
fn parse_epoch(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

/// What the recovery tasks of a generation tell the agent's loop.
pub enum Event {
    /// Some agent (this one or another) wrote the notice of `epoch`, which
    /// says `what` failed ("rank 1 was killed by ...").
    Noticed { epoch: u64, what: String },
    /// The recovery of `epoch` is over: its replacement wrote its
    /// [`Done`], or the agent stopped waiting for it.
    Over { epoch: u64 },
}

/// The recoveries of one generation as this node's agent sees them.
/// Dropping it stops its tasks.
pub struct Recoveries {
    scope: Scope,
    console: Arc<Console>,
    rejoin_timeout: Duration,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    tasks: JoinSet<()>,
    /// Epochs noticed whose recovery is not over, with what failed.
    in_flight: BTreeMap<u64, String>,
    /// Epochs this node claimed, with the index of the worker replacing
    /// the failed one, until its recovery is over.
    replacing: HashMap<u64, usize>,
}

impl Recoveries {
    /// Starts watching the notices of `scope`'s generation from epoch 1.
    /// `rejoin_timeout` is `recovery.rejoin_timeout_s`.
    pub fn start(scope: Scope, console: Arc<Console>, rejoin_timeout: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        tasks.spawn(watch_notices(scope.clone(), tx.clone()));
        Self {
            scope,
            console,
            rejoin_timeout,
            tx,
            rx,
            tasks,
            in_flight: BTreeMap::new(),
            replacing: HashMap::new(),
        }
    }

    /// The oldest recovery in flight, if one is: its epoch, and what
    /// failed ("rank 1 was killed by ...").
    pub fn in_flight(&self) -> Option<(u64, &str)> {
        self.in_flight
            .first_key_value()
            .map(|(epoch, what)| (*epoch, what.as_str()))
    }

    /// The epoch the worker at `index` replaces a failed rank in, while
    /// that recovery is not over.
    pub fn replacing(&self, index: usize) -> Option<u64> {
        self.replacing
            .iter()
            .find_map(|(epoch, i)| (*i == index).then_some(*epoch))
    }

    /// Claims the next epoch for the failed worker at `index` (global rank
    /// `rank`), writes its notice and says so on the console. The caller
    /// then starts the worker again with `COHORT_EPOCH` set to the notice's
    /// epoch and calls [`Self::await_done`].
    pub async fn begin(
        &mut self,
        index: usize,
        rank: u32,
        reason: &str,
        failed_unix_ms: u64,
    ) -> Result<Notice, LauncherError> {
        let epoch = self.scope.claim_epoch().await?;
        let notice = Notice {
            epoch,
            rank: rank as usize,
            reason: reason.to_owned(),
            failed_unix_ms,
            noticed_unix_ms: cohort_contract::recovery::unix_ms(),
        };
        self.scope.write_notice(&notice).await?;
        self.in_flight.insert(epoch, notice.what());
        self.replacing.insert(epoch, index);
        self.console.err(&format!(
            "[cohort] rank {rank} {reason}: recovering in place (epoch {epoch}): the other ranks \
             keep running, rank {rank} starts again"
        ));
        Ok(notice)
    }

    /// Waits, in the background, for the [`Done`] of `notice`'s recovery
    /// and prints its line.
    pub fn await_done(&mut self, notice: Notice) {
        let (scope, console, tx) = (self.scope.clone(), self.console.clone(), self.tx.clone());
        let timeout = self.rejoin_timeout + DONE_SLACK;
        self.tasks.spawn(async move {
            let epoch = notice.epoch;
            match scope.wait(&done_key(epoch), timeout).await {
                Some(bytes) => match serde_json::from_slice::<Done>(&bytes) {
                    Ok(done) => console.err(&format!("[cohort] {}", done.describe(&notice))),
                    Err(e) => console.err(&format!(
                        "[cohort] warning: rank {} rejoined in place (epoch {epoch}), but its \
                         record {} is not valid ({e}): no phase times for this recovery",
                        notice.rank,
                        done_key(epoch)
                    )),
                },
                None => tracing::info!(
                    "no {} within {timeout:?}: the workers fall back to a restart",
                    done_key(epoch)
                ),
            }
            let _ = tx.send(Event::Over { epoch });
        });
    }

    /// The next event of the recovery tasks (never, while there is none).
    pub async fn next_event(&mut self) -> Event {
        match self.rx.recv().await {
            Some(event) => event,
            // Self holds a sender: the channel never closes.
            None => std::future::pending().await,
        }
    }

    /// Takes `event` into account.
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Noticed { epoch, what } => {
                // Another node's recovery: wait for its end silently.
                if let std::collections::btree_map::Entry::Vacant(entry) =
                    self.in_flight.entry(epoch)
                {
                    entry.insert(what);
                    let (scope, tx) = (self.scope.clone(), self.tx.clone());
                    let timeout = self.rejoin_timeout + DONE_SLACK;
                    self.tasks.spawn(async move {
                        scope.wait(&done_key(epoch), timeout).await;
                        let _ = tx.send(Event::Over { epoch });
                    });
                }
            }
            Event::Over { epoch } => {
                self.in_flight.remove(&epoch);
                self.replacing.remove(&epoch);
            }
        }
    }
}

/// Sends [`Event::Noticed`] for every notice written in `scope`'s
/// generation, epoch after epoch.
async fn watch_notices(scope: Scope, tx: mpsc::UnboundedSender<Event>) {
    let mut epoch = 1;
    loop {
        if let Some(bytes) = scope.wait(&notice_key(epoch), WATCH_WAIT).await {
            let what = serde_json::from_slice::<Notice>(&bytes).map_or_else(
                |_| {
                    format!(
                        "a rank failed ({} is not a valid notice)",
                        notice_key(epoch)
                    )
                },
                |notice| notice.what(),
            );
            if tx.send(Event::Noticed { epoch, what }).is_err() {
                return;
            }
            epoch += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::connect;
    use crate::coordinator::{CoordinatorConfig, RunningCoordinator};
    use crate::decision::NodeRange;

    async fn coordinator() -> (RunningCoordinator, Scope) {
        let mut config = CoordinatorConfig::new("tok".into());
        config.job_id = Some("job".into());
        config.nnodes = Some(NodeRange::exactly(1));
        let running = RunningCoordinator::start("127.0.0.1:0", config)
            .await
            .unwrap();
        let addr = running.addr().to_string();
        let client = connect(&addr, "tok", Duration::from_secs(10))
            .await
            .unwrap();
        let scope = Scope {
            client,
            addr,
            job_id: "job".into(),
            generation: 3,
        };
        (running, scope)
    }

    #[tokio::test]
    async fn two_agents_claiming_at_once_get_two_epochs() {
        let (running, scope) = coordinator().await;
        let claims: Vec<_> = (0..2)
            .map(|_| {
                let scope = scope.clone();
                tokio::spawn(async move { scope.claim_epoch().await.unwrap() })
            })
            .collect();
        let mut epochs = Vec::new();
        for claim in claims {
            epochs.push(claim.await.unwrap());
        }
        epochs.sort_unstable();
        assert_eq!(epochs, [1, 2]);
        assert_eq!(scope.claim_epoch().await.unwrap(), 3);
        // Another generation counts from 0.
        let other = Scope {
            generation: 4,
            ..scope.clone()
        };
        assert_eq!(other.claim_epoch().await.unwrap(), 1);
        running.shutdown().await;
    }

    #[tokio::test]
    async fn a_garbled_epoch_is_an_error_naming_the_key() {
        let (running, scope) = coordinator().await;
        let request = KvSetRequest {
            job_id: "job".into(),
            generation: 3,
            key: EPOCH_KEY.into(),
            value: b"seven".to_vec(),
        };
        scope.client.clone().kv_set(request).await.unwrap();
        let err = scope.claim_epoch().await.unwrap_err().to_string();
        assert!(
            err.contains("recovery/epoch holds \"seven\", not an epoch number"),
            "{err}"
        );
        running.shutdown().await;
    }

    #[tokio::test]
    async fn begin_writes_the_notice_and_every_agent_sees_it() {
        let (running, scope) = coordinator().await;
        let console = Arc::new(Console::new());
        let mut owner = Recoveries::start(scope.clone(), console.clone(), Duration::from_secs(5));
        let mut other = Recoveries::start(scope.clone(), console, Duration::from_secs(5));
        let notice = owner
            .begin(1, 5, "was killed by signal 9 (SIGKILL)", 1_000)
            .await
            .unwrap();
        assert_eq!(notice.epoch, 1);
        assert_eq!(
            owner.in_flight(),
            Some((1, "rank 5 was killed by signal 9 (SIGKILL)"))
        );
        assert_eq!(owner.replacing(1), Some(1));
        let stored = scope
            .wait(&notice_key(1), Duration::from_secs(10))
            .await
            .unwrap();
        let stored: Notice = serde_json::from_slice(&stored).unwrap();
        assert_eq!(stored, notice);
        assert_eq!(stored.rank, 5);
        assert_eq!(stored.reason, "was killed by signal 9 (SIGKILL)");
        assert_eq!(stored.failed_unix_ms, 1_000);
        assert!(stored.noticed_unix_ms >= 1_000);

        // The other agent's watcher sees the notice: a recovery in flight.
        let event = other.next_event().await;
        let Event::Noticed { epoch, what } = &event else {
            panic!("expected a notice");
        };
        assert_eq!(
            (*epoch, what.as_str()),
            (1, "rank 5 was killed by signal 9 (SIGKILL)")
        );
        other.apply(event);
        assert_eq!(
            other.in_flight(),
            Some((1, "rank 5 was killed by signal 9 (SIGKILL)"))
        );
        assert_eq!(other.replacing(1), None);

        // The replacement's Done ends it for both.
        owner.await_done(notice.clone());
        let done = Done {
            epoch: 1,
            rank: 5,
            source_rank: 0,
            step: 7,
            in_flight: 7,
            bytes: 10,
            survivors_left_unix_ms: 1_001,
            connecting_unix_ms: 1_002,
            connected_unix_ms: 1_003,
            synced_unix_ms: 1_004,
            redone_unix_ms: 1_005,
        };
        let request = KvSetRequest {
            job_id: "job".into(),
            generation: 3,
            key: done_key(1),
            value: serde_json::to_vec(&done).unwrap(),
        };
        scope.client.clone().kv_set(request).await.unwrap();
        for agent in [&mut owner, &mut other] {
            loop {
                match agent.next_event().await {
                    Event::Over { epoch: 1 } => {
                        agent.apply(Event::Over { epoch: 1 });
                        break;
                    }
                    event => agent.apply(event),
                }
            }
            assert_eq!(agent.in_flight(), None);
            assert_eq!(agent.replacing(1), None);
        }
        running.shutdown().await;
    }
}

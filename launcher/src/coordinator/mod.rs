//! The coordinator of one job, in three rooms:
//!
//! - [`state`]: the job's state machine, pure (no sockets, no locks); its
//!   decisions come from [`crate::decision`] with their reasons.
//! - [`Coordinator`] (here): that state behind a lock, plus what the state
//!   machine asks for after each transition: job events for watchers, waking
//!   `Join`s, the key-value store of the current generation.
//! - `service`: the thin tonic service (check, convert, delegate), and
//!   [`RunningCoordinator`] in `server`: bind, serve, the clock, shutdown.

mod persist;
mod server;
mod service;
pub mod state;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cohort_proto::v1::{EventKind, JobEvent, JobOutcome};
use tokio::sync::{broadcast, watch};

pub use server::RunningCoordinator;
use state::JobState;

use crate::LauncherError;
use crate::decision::NodeRange;
use crate::kv::KvStore;
use persist::StateFile;

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
    /// `cohort coordinator --state-dir`: where the job's durable state is
    /// kept, so a coordinator restarted with it carries on the job.
    pub state_dir: Option<std::path::PathBuf>,
    /// A member silent for this long is lost.
    pub heartbeat_timeout: Duration,
    /// With `--nnodes MIN:MAX`: how long to wait for more nodes after MIN joined.
    pub last_call: Duration,
    /// How often the clock-driven decisions (last call, lost nodes) run.
    pub tick: Duration,
    /// With fewer nodes left than `--nnodes` needs: how long the next
    /// generation waits for new nodes before the job fails (zero: it fails
    /// at once).
    pub replacement_timeout: Duration,
}

impl CoordinatorConfig {
    /// Defaults for a job with token `token`.
    pub fn new(token: String) -> Self {
        Self {
            job_id: None,
            nnodes: None,
            max_restarts: None,
            token,
            state_dir: None,
            heartbeat_timeout: Duration::from_secs(15),
            last_call: Duration::from_secs(10),
            tick: Duration::from_millis(100),
            replacement_timeout: Duration::from_secs(300),
        }
    }
}

/// The job token of the job saved in `state_dir`, if one is.
pub fn saved_token(state_dir: &std::path::Path) -> Result<Option<String>, LauncherError> {
    Ok(StateFile::open(state_dir)?.1.map(|s| s.token))
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

/// The job state and its notifications, shared by the service and the clock.
pub struct Coordinator {
    state: Mutex<JobState>,
    kv: KvStore,
    /// Bumped when a generation forms or the job finishes (wakes `Join`s).
    changed: watch::Sender<u64>,
    events: broadcast::Sender<JobEvent>,
    /// With `--state-dir`: the state file and the token it records.
    saved: Option<(StateFile, String)>,
}

impl Coordinator {
    /// A coordinator with no nodes yet.
    pub fn new(config: &CoordinatorConfig) -> Arc<Self> {
        Self::with_state(JobState::new(config, Instant::now()), None)
    }

    fn with_state(state: JobState, saved: Option<(StateFile, String)>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(state),
            kv: KvStore::default(),
            changed: watch::Sender::new(0),
            events: broadcast::Sender::new(4096),
            saved,
        })
    }

    /// A coordinator for `config`: with a `state_dir` that holds a saved
    /// job, that job as it was saved (and a line saying so), else a new one.
    pub fn open(config: &CoordinatorConfig) -> Result<(Arc<Self>, Option<String>), LauncherError> {
        let Some(dir) = &config.state_dir else {
            return Ok((Self::new(config), None));
        };
        let (file, saved) = StateFile::open(dir)?;
        let Some(saved) = saved else {
            let state = JobState::new(config, Instant::now());
            file.save_first(&state.durable(&config.token, Default::default()))
                .map_err(|e| LauncherError::StateFile {
                    path: file.path().to_owned(),
                    reason: format!(
                        "cannot write it: {e}; give --state-dir a directory this user can write"
                    ),
                })?;
            let coordinator = Self::with_state(state, Some((file, config.token.clone())));
            return Ok((coordinator, None));
        };
        let refuse = |reason: String| LauncherError::StateFile {
            path: file.path().to_owned(),
            reason: format!("{reason}; {}", persist::CANNOT_CARRY_ON),
        };
        if saved.token != config.token {
            return Err(refuse(
                "it is the state of a job with another token".to_owned(),
            ));
        }
        let state = JobState::restore(config, &saved, Instant::now()).map_err(refuse)?;
        let line = format!(
            "carrying on job {} from {}: generation {} {}, {} restart(s) so far",
            saved.job_id.as_deref().unwrap_or("(not named yet)"),
            file.path().display(),
            saved.generation,
            match (&saved.outcome, saved.members.len()) {
                (Some(o), _) => format!("over ({})", o.summary),
                (None, 0) => "forming".to_owned(),
                (None, n) => format!("running on {n} node(s)"),
            },
            saved.restart_count
        );
        let generation = state.generation();
        let coordinator = Self::with_state(state, Some((file, config.token.clone())));
        coordinator.kv.restore(generation, saved.kv);
        Ok((coordinator, Some(line)))
    }

    /// Writes the durable state if it changed (with `--state-dir`).
    fn save(&self) {
        if self.saved.is_some() {
            let st = self.lock();
            self.save_locked(&st);
        }
    }

    fn save_locked(&self, st: &JobState) {
        if let Some((file, token)) = &self.saved {
            file.save(&st.durable(token, self.kv.values(st.generation())));
        }
    }

    fn lock(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `transition` on the state, then does what it asked for.
    fn apply<T>(&self, transition: impl FnOnce(&mut JobState) -> T) -> T {
        let mut st = self.lock();
        let result = transition(&mut st);
        let effects = st.take_effects();
        // Under the lock, so events go out in the order they happened.
        if let Some(generation) = effects.formed {
            self.kv.retain_from(generation);
        }
        for mut event in effects.events {
            if event.kind != EventKind::Progress as i32 {
                tracing::debug!(generation = event.generation, "{}", event.message);
            }
            event.time = unix_now();
            let _ = self.events.send(event);
        }
        self.save_locked(&st);
        if effects.changed {
            self.changed.send_modify(|v| *v += 1);
        }
        result
    }

    /// Job events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    /// An event describing the job as it is now.
    fn snapshot(&self) -> JobEvent {
        let mut event = self.lock().snapshot();
        event.time = unix_now();
        event
    }

    /// The clock-driven decisions.
    fn tick(&self, now: Instant) {
        let watched = self.events.receiver_count() > 0;
        self.apply(|st| st.tick(now, watched));
    }

    /// The job's outcome once it is over.
    pub fn outcome(&self) -> Option<JobOutcome> {
        self.lock().outcome().cloned()
    }

    /// Waits until the job is over and every node of its last generation
    /// left (or `linger` passed after the end), and returns the outcome.
    pub async fn wait_finished(&self, linger: Duration) -> JobOutcome {
        let mut rx = self.changed.subscribe();
        let mut finished_at = None;
        loop {
            {
                let st = self.lock();
                if let Some(outcome) = st.outcome() {
                    let started = *finished_at.get_or_insert_with(tokio::time::Instant::now);
                    if st.all_left() || started.elapsed() >= linger {
                        return outcome.clone();
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
        }
    }
}

//! Fencing: a checkpoint root belongs to one live job attempt at a time.
//!
//! Rank 0 of a job takes the lease (`ROOT/lease.json`: job id, generation,
//! owner host and pid, since when) when its [`crate::Saver`] starts, and
//! checks that it still holds it before every commit. So a second job
//! pointed at the same root, or a stale orphan of an earlier attempt, cannot
//! commit a step there, and is told whose lease it is.
//!
//! Taking the lease:
//! - none, or one released by a writer that finished: taken;
//! - the same job, an earlier or the same generation (a restart): taken over;
//! - the same job, a later generation: refused (this writer is the stale one);
//! - another job whose owner is alive (its pid runs on this host, or, on
//!   another host, it renewed the lease within [`STALE_AFTER`]): refused;
//! - another job whose owner is gone: taken over, with a warning saying whose.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::CkptError;
use crate::format;

/// The lease's file in the checkpoint root.
pub const LEASE_FILE: &str = "lease.json";

/// A lease held by a process on another host counts as abandoned once it
/// was not renewed (at a commit) for this long.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);

/// Who may commit into a checkpoint root.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub job_id: String,
    pub generation: u64,
    pub host: String,
    pub pid: u32,
    /// Unix seconds: taken, and last renewed (at a commit).
    pub since: f64,
    pub renewed: f64,
    /// The writer finished and let go.
    #[serde(default)]
    pub released: bool,
}

impl std::fmt::Display for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let job = if self.job_id.is_empty() {
            "a job run without a launcher".to_owned()
        } else {
            format!("job {}", self.job_id)
        };
        write!(
            f,
            "{job}, generation {} (pid {} on {}, renewed {:.0} s ago)",
            self.generation,
            self.pid,
            self.host,
            (unix_now() - self.renewed).max(0.0)
        )
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X')
    })
}

impl Lease {
    /// This process's lease for the attempt `attempt` (`job/generation/restarts`,
    /// the worker env's `attempt()`; empty outside a launcher).
    pub fn mine(attempt: &str) -> Self {
        let mut parts = attempt.split('/');
        let job_id = parts.next().unwrap_or_default().to_owned();
        let generation = parts.next().and_then(|g| g.parse().ok()).unwrap_or(0);
        let now = unix_now();
        Self {
            job_id,
            generation,
            host: hostname(),
            pid: std::process::id(),
            since: now,
            renewed: now,
            released: false,
        }
    }

    fn same_owner(&self, other: &Lease) -> bool {
        self.job_id == other.job_id
            && self.generation == other.generation
            && self.host == other.host
            && self.pid == other.pid
    }

    /// Why the owner of this lease is gone, if it is.
    fn gone(&self) -> Option<String> {
        if self.released {
            return Some("it finished and released it".to_owned());
        }
        if self.host == hostname() {
            return (!pid_alive(self.pid)).then(|| format!("pid {} is not running", self.pid));
        }
        let silent = unix_now() - self.renewed;
        (silent > STALE_AFTER.as_secs_f64())
            .then(|| format!("it was not renewed for {silent:.0} s"))
    }
}

fn path_of(root: &Path) -> PathBuf {
    root.join(LEASE_FILE)
}

/// The lease on `root`, if any; an unreadable one counts as none (with a
/// warning): it can't name an owner to protect.
pub fn read(root: &Path) -> Option<Lease> {
    let path = path_of(root);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(lease) => Some(lease),
        Err(e) => {
            tracing::warn!(
                "ignoring the unreadable checkpoint lease {}: {e}",
                path.display()
            );
            None
        }
    }
}

fn write(root: &Path, lease: &Lease) -> Result<(), CkptError> {
    let json = serde_json::to_vec_pretty(lease).expect("a lease always serializes");
    format::write_file_atomic(&path_of(root), &json)
}

/// Takes the lease on `root` for `mine` (see the module's rules).
pub fn acquire(root: &Path, mine: &Lease) -> Result<(), CkptError> {
    if let Some(held) = read(root) {
        let same_job = held.job_id == mine.job_id && !mine.job_id.is_empty();
        if same_job && held.generation > mine.generation && held.gone().is_none() {
            return Err(CkptError::Fenced {
                root: root.to_path_buf(),
                holder: held.to_string(),
                detail: format!(
                    "this writer is generation {} of the same job, an attempt that has been replaced",
                    mine.generation
                ),
            });
        }
        if !same_job && !held.same_owner(mine) {
            match held.gone() {
                None => {
                    return Err(CkptError::Fenced {
                        root: root.to_path_buf(),
                        holder: held.to_string(),
                        detail: "another job is writing checkpoints here: give this job another \
                                 checkpoint.dir, or stop that job (its lease is released when it ends)"
                            .to_owned(),
                    });
                }
                Some(why) if !held.released => tracing::warn!(
                    "taking over the checkpoint lease on {} from {held}: {why}",
                    root.display()
                ),
                Some(_) => {}
            }
        }
    }
    write(root, mine)
}

/// Before a commit: `mine` still holds the lease on `root`; renews it.
pub fn check_and_renew(root: &Path, mine: &Lease) -> Result<(), CkptError> {
    match read(root) {
        Some(held) if held.same_owner(mine) && !held.released => {}
        Some(held) => {
            return Err(CkptError::Fenced {
                root: root.to_path_buf(),
                holder: held.to_string(),
                detail: "this writer's lease was taken over, so it may no longer commit here"
                    .to_owned(),
            });
        }
        None => {
            return Err(CkptError::Fenced {
                root: root.to_path_buf(),
                holder: "nobody (the lease file is gone)".to_owned(),
                detail: "this writer's lease was removed, so it may no longer commit here"
                    .to_owned(),
            });
        }
    }
    let renewed = Lease {
        renewed: unix_now(),
        ..mine.clone()
    };
    write(root, &renewed)
}

/// The writer is done: lets go of the lease if it still holds it.
pub fn release(root: &Path, mine: &Lease) {
    if read(root).is_some_and(|held| held.same_owner(mine)) {
        let released = Lease {
            released: true,
            renewed: unix_now(),
            ..mine.clone()
        };
        if let Err(e) = write(root, &released) {
            tracing::warn!(
                "could not release the checkpoint lease on {}: {e}",
                root.display()
            );
        }
    }
}

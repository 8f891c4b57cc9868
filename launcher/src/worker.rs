//! The worker processes of one node and one generation.
//!
//! Each worker runs in its own process group (so a signal reaches the
//! programs it starts too, and a terminal's Ctrl-C reaches only the
//! launcher, which forwards it). Its stdout and stderr are copied line by
//! line to the launcher's terminal, prefixed `[rank N]`, and to
//! `attempt_<g>/rank_<r>.log`; the last lines are kept for the root-cause
//! summary. Stopping is: the signal (SIGTERM, or the SIGINT being forwarded)
//! to the group, a grace period, then SIGKILL to the group, then to every
//! process left with this launcher's cookie (see [`crate::reaper`]: also
//! what makes the workers die with a launcher that was killed).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cohort_proto::v1::{WorkerState, WorkerStatus};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader, Interest};
use tokio::sync::mpsc;

use crate::LauncherError;
use crate::console::Console;
use crate::decision::{RankEvidence, StepMark};
use crate::reaper;
use cohort_contract::WorkerProgress;

/// Lines of a worker's output kept for the root-cause summary.
const TAIL_LINES: usize = 20;

/// How to start one worker.
pub struct WorkerSpec {
    pub rank: u32,
    pub local_rank: u32,
    pub program: OsString,
    pub args: Vec<OsString>,
    pub env: Vec<(String, OsString)>,
    pub log_path: PathBuf,
    pub status_path: PathBuf,
    /// Its output goes to the launcher's terminal (`--local-ranks-filter`
    /// leaves some out); it always goes to its log.
    pub echo: bool,
}

/// One running (or exited) worker.
pub struct Worker {
    pub rank: u32,
    pub local_rank: u32,
    pgid: i32,
    pub exit: Option<ExitStatus>,
    tail: Arc<Mutex<VecDeque<String>>>,
    pub log_path: PathBuf,
    status_path: PathBuf,
    progress: Option<WorkerProgress>,
    mark: Option<StepMark>,
    status_error_logged: bool,
    /// When its exit was seen (Unix ms), once it exited.
    pub exited_unix_ms: Option<u64>,
}

/// A worker's exit as its watcher saw it: (index into `workers`, status,
/// when it was seen in Unix ms).
type Exit = (usize, ExitStatus, u64);

/// The workers of this node in the current generation.
pub struct WorkerGroup {
    pub workers: Vec<Worker>,
    exits: mpsc::UnboundedReceiver<Exit>,
    /// For the exit watchers of workers started again ([`Self::respawn`]).
    exits_tx: mpsc::UnboundedSender<Exit>,
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// "exited with code 3", "killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig} ({})", signal_name(sig)),
        _ => format!("ended with {status}"),
    }
}

async fn copy_lines(
    stream: impl AsyncRead + Unpin,
    rank: u32,
    to_stderr: bool,
    echo: bool,
    console: Arc<Console>,
    log: Arc<Mutex<File>>,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        {
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            let _ = log.write_all(&buf);
            if !buf.ends_with(b"\n") {
                let _ = log.write_all(b"\n");
            }
        }
        let text = String::from_utf8_lossy(&buf);
        let text = text.trim_end_matches(['\n', '\r']);
        if echo {
            console.worker_line(rank, to_stderr, text);
        }
        push_tail(&tail, format!("[rank {rank}] {text}"));
    }
}

fn push_tail(tail: &Mutex<VecDeque<String>>, line: String) {
    let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
    if tail.len() == TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(line);
}

fn create_log(path: &Path) -> Result<File, LauncherError> {
    File::create(path).map_err(|source| LauncherError::Io {
        path: path.to_owned(),
        source,
    })
}

impl WorkerGroup {
    /// Starts every worker; on a failure to start one, stops those started.
    pub async fn spawn(
        specs: Vec<WorkerSpec>,
        console: &Arc<Console>,
        grace: Duration,
    ) -> Result<Self, LauncherError> {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let mut group = Self {
            workers: Vec::new(),
            exits,
            exits_tx,
        };
        for (index, spec) in specs.into_iter().enumerate() {
            let started = create_log(&spec.log_path).and_then(|log| {
                let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
                spawn_one(index, spec, log, tail, console, group.exits_tx.clone())
            });
            match started {
                Ok(worker) => group.workers.push(worker),
                Err(e) => {
                    group.stop(libc::SIGTERM, grace).await;
                    return Err(e);
                }
            }
        }
        Ok(group)
    }

    /// Starts the worker at `index`, which exited, again from `spec` (its
    /// rank's, with the env of the new start): its output goes on in the
    /// same log after the line `separator`, with the same process group,
    /// parent-death and exit handling as a first start. Its last progress
    /// stays (the status file is the same) but its hang clock starts only
    /// with the next step it reports.
    pub fn respawn(
        &mut self,
        index: usize,
        spec: WorkerSpec,
        separator: &str,
        console: &Arc<Console>,
    ) -> Result<(), LauncherError> {
        let old = &self.workers[index];
        if old.exit.is_none() {
            return Err(LauncherError::Spawn {
                program: spec.program.to_string_lossy().into_owned(),
                source: std::io::Error::other(format!(
                    "rank {} is still running: only an exited worker starts again",
                    old.rank
                )),
            });
        }
        let io = |source| LauncherError::Io {
            path: spec.log_path.clone(),
            source,
        };
        let mut log = File::options()
            .append(true)
            .create(true)
            .open(&spec.log_path)
            .map_err(io)?;
        writeln!(log, "{separator}").map_err(io)?;
        let tail = old.tail.clone();
        push_tail(&tail, separator.to_owned());
        let progress = old.progress.clone();
        let status_error_logged = old.status_error_logged;
        let mut worker = spawn_one(index, spec, log, tail, console, self.exits_tx.clone())?;
        worker.progress = progress;
        worker.status_error_logged = status_error_logged;
        self.workers[index] = worker;
        Ok(())
    }

    /// SIGKILL to the process group of the worker at `index` if it runs
    /// (its exit comes through [`Self::next_exit`] as any other).
    pub fn kill(&self, index: usize) {
        let w = &self.workers[index];
        if w.exit.is_none() {
            // SAFETY: killpg has no memory-safety preconditions.
            unsafe {
                libc::killpg(w.pgid, libc::SIGKILL);
            }
        }
    }

    /// Starts every running worker's hang clock again at `now` (while a
    /// rank is replaced in place, no rank can make progress).
    pub fn restart_hang_clocks(&mut self, now: Instant) {
        for mark in self.workers.iter_mut().filter_map(|w| w.mark.as_mut()) {
            mark.since = now;
        }
    }

    /// The next worker exit: (index into `workers`, status).
    pub async fn next_exit(&mut self) -> Option<(usize, ExitStatus)> {
        let (index, status, seen) = self.exits.recv().await?;
        self.workers[index].exit = Some(status);
        self.workers[index].exited_unix_ms = Some(seen);
        Some((index, status))
    }

    /// Every worker exited.
    pub fn all_exited(&self) -> bool {
        self.workers.iter().all(|w| w.exit.is_some())
    }

    /// Every worker exited 0.
    pub fn all_succeeded(&self) -> bool {
        self.workers
            .iter()
            .all(|w| w.exit.is_some_and(|s| s.success()))
    }

    /// Reads the status files; a step seen for the first time restarts the
    /// worker's hang clock.
    pub fn refresh_progress(&mut self, now: Instant, console: &Console) {
        for w in self.workers.iter_mut().filter(|w| w.exit.is_none()) {
            match WorkerProgress::read(&w.status_path) {
                Ok(Some(p)) => {
                    if let Some(r) = p
                        .resumed
                        .as_ref()
                        .filter(|_| w.rank == 0 && w.progress.is_none())
                    {
                        console.err(&format!(
                            "[cohort] the job resumed from checkpoint {} (step {})",
                            r.checkpoint, r.step
                        ));
                    }
                    if w.mark.is_none_or(|m| m.step != p.step) {
                        w.mark = Some(StepMark {
                            rank: w.rank,
                            step: p.step,
                            since: now,
                        });
                    }
                    w.progress = Some(p);
                }
                Ok(None) => {}
                Err(e) => {
                    if !w.status_error_logged {
                        w.status_error_logged = true;
                        console.err(&format!(
                            "[cohort] warning: rank {}: unreadable status file ({e}); ignoring it",
                            w.rank
                        ));
                    }
                }
            }
        }
    }

    /// Step marks of the running workers that report progress.
    pub fn step_marks(&self) -> Vec<StepMark> {
        self.workers
            .iter()
            .filter(|w| w.exit.is_none())
            .filter_map(|w| w.mark)
            .collect()
    }

    /// What each running worker shows of itself, for the hang culprit.
    pub fn hang_evidence(&self) -> Vec<RankEvidence> {
        self.workers
            .iter()
            .filter(|w| w.exit.is_none())
            .map(|w| RankEvidence {
                rank: w.rank,
                step: w.progress.as_ref().map(|p| p.step),
                stopped: process_stopped(w.pgid),
            })
            .collect()
    }

    /// Each worker's state for a heartbeat.
    pub fn statuses(&self) -> Vec<WorkerStatus> {
        self.workers
            .iter()
            .map(|w| {
                let state = match w.exit {
                    None => WorkerState::Running,
                    Some(s) if s.success() => WorkerState::Succeeded,
                    Some(_) => WorkerState::Failed,
                };
                let p = w.progress.as_ref();
                WorkerStatus {
                    rank: w.rank,
                    local_rank: w.local_rank,
                    state: state as i32,
                    reports_progress: p.is_some(),
                    step: p.map_or(0, |p| p.step),
                    max_steps: p.map_or(0, |p| p.max_steps),
                    loss: p.and_then(|p| p.loss),
                    tokens_per_s: p.and_then(|p| p.tokens_per_s),
                }
            })
            .collect()
    }

    /// The worker of global rank `rank`.
    pub fn by_rank(&self, rank: u32) -> Option<&Worker> {
        self.workers.iter().find(|w| w.rank == rank)
    }

    /// Sends `signal` to the process group of every worker still running.
    pub fn signal(&self, signal: i32) {
        for w in self.workers.iter().filter(|w| w.exit.is_none()) {
            // SAFETY: killpg has no memory-safety preconditions.
            unsafe {
                libc::killpg(w.pgid, signal);
                // A stopped (SIGSTOP) worker handles the signal only once continued.
                libc::killpg(w.pgid, libc::SIGCONT);
            }
        }
    }

    /// `signal` to every running worker, up to `grace` for them to exit,
    /// then SIGKILL to the group of every worker still running (with the
    /// programs it started; those of workers that exited were killed at
    /// their exit).
    pub async fn stop(&mut self, signal: i32, grace: Duration) {
        self.signal(signal);
        let deadline = tokio::time::Instant::now() + grace;
        while !self.all_exited() {
            match tokio::time::timeout_at(deadline, self.next_exit()).await {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        self.kill_groups();
        while !self.all_exited() {
            if self.next_exit().await.is_none() {
                break;
            }
        }
        kill_escaped();
    }

    /// SIGKILL to the process group of every worker not known to have
    /// exited (a running worker holds its group id, so it can't be stale).
    fn kill_groups(&self) {
        for w in self.workers.iter().filter(|w| w.exit.is_none()) {
            // SAFETY: killpg has no memory-safety preconditions.
            unsafe {
                libc::killpg(w.pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for WorkerGroup {
    fn drop(&mut self) {
        // On every way out (errors included), no worker outlives the group.
        if !self.all_exited() {
            self.kill_groups();
        }
        kill_escaped();
    }
}

/// Kills the programs the workers started outside their process groups
/// (`setsid`, job control): every process left with this launcher's cookie.
/// Only this node's workers of the generation just stopped carry it.
fn kill_escaped() {
    let killed = reaper::kill_marked(reaper::cookie(), Duration::from_secs(2));
    if killed > 0 {
        tracing::info!("killed {killed} process(es) the workers left outside their groups");
    }
}

impl Worker {
    /// The last lines of its output.
    pub fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Waits for the process `pid` to exit without reaping it (a pidfd turns
/// readable at exit; the zombie stays until `wait`). `false` when that can't
/// be done (a kernel before 5.3): the caller then learns of the exit only
/// from `wait`.
async fn wait_unreaped(pid: i32) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: a file descriptor just returned to us, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the AsyncFd owns the fd, which nothing else closes or replaces.
    match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
        Ok(afd) => afd.readable().await.is_ok(),
        Err(_) => false,
    }
}

/// Starts `spec`'s worker as the one at `index`, its output appended to
/// `log` and kept in `tail`.
fn spawn_one(
    index: usize,
    spec: WorkerSpec,
    log: File,
    tail: Arc<Mutex<VecDeque<String>>>,
    console: &Arc<Console>,
    exits: mpsc::UnboundedSender<Exit>,
) -> Result<Worker, LauncherError> {
    let mut command = tokio::process::Command::new(&spec.program);
    command
        .args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .env(reaper::COOKIE_VAR, reaper::cookie())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let launcher = std::process::id() as i32;
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only async-signal-safe functions (prctl, getppid).
    unsafe {
        command.pre_exec(move || {
            // The parent-death signal fires when the thread that forked
            // exits: workers are spawned from the runtime's long-lived
            // threads (never from spawn_blocking, whose threads come and go).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher died before the signal was armed.
            if libc::getppid() != launcher {
                return Err(std::io::Error::other("the launcher exited"));
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| LauncherError::Spawn {
        program: spec.program.to_string_lossy().into_owned(),
        source,
    })?;
    // The worker leads its own group (process_group(0)): its pid is the group
    // id. A freshly spawned child always has one; never 0, which killpg
    // would take for the launcher's own group.
    let pgid = match child.id().and_then(|id| i32::try_from(id).ok()) {
        Some(id) if id > 0 => id,
        _ => {
            let _ = child.start_kill();
            return Err(LauncherError::Spawn {
                program: spec.program.to_string_lossy().into_owned(),
                source: std::io::Error::other("the new worker has no process id"),
            });
        }
    };
    reaper::track(pgid);
    let log = Arc::new(Mutex::new(log));
    let mut copies = Vec::new();
    if let Some(out) = child.stdout.take() {
        copies.push(tokio::spawn(copy_lines(
            out,
            spec.rank,
            false,
            spec.echo,
            console.clone(),
            log.clone(),
            tail.clone(),
        )));
    }
    if let Some(err) = child.stderr.take() {
        copies.push(tokio::spawn(copy_lines(
            err,
            spec.rank,
            true,
            spec.echo,
            console.clone(),
            log,
            tail.clone(),
        )));
    }
    tokio::spawn(async move {
        // Programs the worker left in its process group die with it. They are
        // killed while the exited worker is a zombie, before it is reaped: its
        // pid, and so its group id, cannot be reused until then, so the
        // signal reaches only that group (after the reap the number may go to
        // an unrelated process of another job; this host reuses pids quickly
        // when busy).
        let unreaped = wait_unreaped(pgid).await;
        let seen_unreaped = unreaped.then(cohort_contract::recovery::unix_ms);
        if unreaped {
            // SAFETY: killpg has no memory-safety preconditions.
            unsafe {
                libc::killpg(pgid, libc::SIGKILL);
            }
        }
        let status = match child.wait().await {
            Ok(status) => status,
            Err(_) => ExitStatus::from_raw(libc::SIGKILL),
        };
        let seen = seen_unreaped.unwrap_or_else(cohort_contract::recovery::unix_ms);
        reaper::untrack(pgid);
        // Let the output drain before the exit is reported (for the log tail),
        // but don't wait on programs the worker left holding its pipes.
        for copy in copies {
            let _ = tokio::time::timeout(Duration::from_millis(500), copy).await;
        }
        let _ = exits.send((index, status, seen));
    });
    Ok(Worker {
        rank: spec.rank,
        local_rank: spec.local_rank,
        pgid,
        exit: None,
        tail,
        log_path: spec.log_path,
        status_path: spec.status_path,
        progress: None,
        mark: None,
        status_error_logged: false,
        exited_unix_ms: None,
    })
}

/// The process `pid` is stopped (`T`: by a signal, `t`: by a tracer).
fn process_stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state == 'T' || state == 't')
    })
}

/// `<log-dir>/<job-id>/attempt_<g>`, created.
pub fn attempt_dir(job_dir: &Path, generation: u64) -> Result<PathBuf, LauncherError> {
    let dir = job_dir.join(format!("attempt_{generation}"));
    std::fs::create_dir_all(&dir).map_err(|source| LauncherError::Io {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described_by_code_or_signal() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(3 << 8)),
            "exited with code 3"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(libc::SIGKILL)),
            "killed by signal 9 (SIGKILL)"
        );
    }
}

//! Signals to one training worker of a real job: a fatal signal kills it
//! the first time (Rust's stack-overflow handler used to swallow the first
//! SIGSEGV), and a rank stopped with SIGSTOP is named as the hang's cause,
//! not its peer that stalls in the collective waiting for it.

mod launch_util;
mod worker_bin;

use std::path::Path;
use std::time::Duration;

use launch_util::{FAST, Proc, alive, cohort, eventually, worker_pid};

/// `cohort launch` of the quickstart (2 ranks) for a very long run, in
/// `dir`, that restarts from disk on a failure (`recovery.mode = "restart"`).
fn long_job(dir: &Path, job: &str, extra: &[&str]) -> Proc {
    worker_bin::ensure();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = cohort();
    cmd.current_dir(dir)
        .arg("launch")
        .args(FAST)
        .args(["--max-restarts", "0", "--job-id", job, "--log-dir", "logs"])
        .args(extra)
        .arg(repo.join("configs/quickstart.toml"))
        .args([
            "--set",
            &format!("data.path={}", repo.join("configs/data/tiny.txt").display()),
        ])
        .args([
            "--set",
            "train.max_steps=1000000",
            "--set",
            "checkpoint.every=0",
            // What happens when the job restarts; in place is tests/peer_recovery.rs.
            "--set",
            "recovery.mode=restart",
        ]);
    Proc::spawn(cmd)
}

#[test]
fn the_first_sigsegv_kills_a_worker() {
    let dir = tempfile::tempdir().unwrap();
    let job = format!("segv-{}", std::process::id());
    let mut launcher = long_job(dir.path(), &job, &[]);
    launcher.wait_line("step ", false, Duration::from_secs(60));
    let pid = worker_pid(&job, 0).expect("the worker of rank 0");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGSEGV);
    }
    assert!(
        eventually(Duration::from_secs(10), || !alive(pid)),
        "rank 0 is still running 10 s after one SIGSEGV"
    );
    let status = launcher.wait(Duration::from_secs(30));
    assert!(!status.success());
    assert!(
        launcher.err.contains("rank 0 on node")
            && launcher.err.contains("killed by signal 11 (SIGSEGV)"),
        "{}",
        launcher.err
    );
}

#[test]
fn a_stopped_rank_is_named_as_the_cause_of_the_hang() {
    let dir = tempfile::tempdir().unwrap();
    let job = format!("stop-{}", std::process::id());
    let mut launcher = long_job(dir.path(), &job, &["--hang-timeout", "3"]);
    launcher.wait_line("step ", false, Duration::from_secs(60));
    let pid = worker_pid(&job, 1).expect("the worker of rank 1");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    let status = launcher.wait(Duration::from_secs(60));
    assert!(!status.success());
    let err = &launcher.err;
    assert!(err.contains("root cause: rank 1 on node"), "{err}");
    assert!(err.contains("its process is stopped"), "{err}");
    assert!(err.contains("its peers (rank(s) 0) wait in"), "{err}");
    assert!(err.contains("evidence: process states"), "{err}");
}

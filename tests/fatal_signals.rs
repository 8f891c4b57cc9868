//! A fatal signal sent to a training worker kills it the first time: the
//! launcher reports the rank killed by SIGSEGV (Rust's stack-overflow
//! handler used to swallow the first one).

mod launch_util;
mod worker_bin;

use std::path::Path;
use std::time::Duration;

use launch_util::{FAST, Proc, alive, cohort, eventually};

/// The pid of the live process whose env has `COHORT_JOB_ID=<job>` and `RANK=<rank>`.
fn worker_pid(job: &str, rank: u32) -> Option<i32> {
    let job = format!("COHORT_JOB_ID={job}").into_bytes();
    let rank = format!("RANK={rank}").into_bytes();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
                vars.contains(&job.as_slice()) && vars.contains(&rank.as_slice()) && alive(pid)
            })
        })
}

#[test]
fn the_first_sigsegv_kills_a_worker() {
    worker_bin::ensure();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let job = format!("segv-{}", std::process::id());
    let mut cmd = cohort();
    cmd.current_dir(dir.path())
        .arg("launch")
        .args(FAST)
        .args(["--max-restarts", "0", "--job-id", &job, "--log-dir", "logs"])
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
        ]);
    let mut launcher = Proc::spawn(cmd);
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

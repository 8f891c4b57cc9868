//! No process of a job outlives its launcher: SIGKILL of `cohort launch`
//! leaves nothing of the job alive 2 s later, also programs that started
//! their own process group or session.

mod launch_util;

use std::time::Duration;

use launch_util::{FAST, Proc, cohort, eventually, processes_with_env, script};

/// The live processes of the job `job`.
fn job_processes(job: &str) -> Vec<i32> {
    processes_with_env(&[&format!("COHORT_JOB_ID={job}")])
}

/// Kills what a failed test left behind.
struct Sweep(String);

impl Drop for Sweep {
    fn drop(&mut self) {
        for pid in job_processes(&self.0) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn sigkill_leaves_nothing(job: &str, program: &[&str], expect: usize) {
    let _sweep = Sweep(job.to_owned());
    let logs = tempfile::tempdir().unwrap();
    let mut cmd = cohort();
    cmd.arg("launch")
        .args(FAST)
        .args(["--nproc-per-node", "2", "--job-id", job, "--log-dir"])
        .arg(logs.path())
        .arg("--")
        .args(program);
    let mut launcher = Proc::spawn(cmd);
    assert!(
        eventually(Duration::from_secs(20), || job_processes(job).len()
            >= expect),
        "the job's {expect} processes did not start: {:?}",
        job_processes(job)
    );
    let before = job_processes(job);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(launcher.pid(), libc::SIGKILL);
    }
    launcher.wait(Duration::from_secs(5));
    assert!(
        eventually(Duration::from_secs(2), || job_processes(job).is_empty()),
        "2 s after SIGKILL of the launcher, processes of the job are alive: {:?} (of {before:?})",
        job_processes(job)
    );
}

#[test]
fn sigkill_of_the_launcher_kills_its_workers() {
    let job = format!("orphan-sleep-{}", std::process::id());
    sigkill_leaves_nothing(&job, &["sleep", "40"], 2);
}

#[test]
fn sigkill_of_the_launcher_kills_programs_in_their_own_groups() {
    let dir = tempfile::tempdir().unwrap();
    // Each worker starts a program in a new session (its own group) and one
    // in a background job-control group, then waits.
    let worker = script(
        dir.path(),
        "escape.sh",
        "setsid sleep 40 &\nset -m\nsleep 41 &\nwait\n",
    );
    let job = format!("orphan-groups-{}", std::process::id());
    sigkill_leaves_nothing(&job, &["sh", worker.to_str().unwrap()], 6);
}

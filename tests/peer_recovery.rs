//! In-place recovery, end to end (`recovery.mode = "peer"`, the default):
//! `cohort launch` runs the quickstart model with the real trainer, a
//! worker is SIGKILLed (or SIGSTOPped) mid-run, and only that rank starts
//! again: the survivors keep their processes, the replacement takes its
//! state from a survivor (DDP) or from the rank mirroring its shard (ZeRO),
//! the step in flight is redone, and the final weights are the bytes of an
//! uninterrupted run — with no checkpoint on disk when the worker dies.
//! What in-place recovery can't cover (a second failure during a recovery,
//! a rank and its mirror lost together) falls back to a restart, named.

mod launch_util;
mod worker_bin;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use launch_util::{FAST, Proc, cohort, eventually, run, worker_pid};

const DEADLINE: Duration = Duration::from_secs(240);
const STEPS: u64 = 40;

/// Jobs in one temporary directory (logs and checkpoints live there).
struct Jobs {
    dir: tempfile::TempDir,
}

/// One `cohort launch` of the quickstart model.
struct Launch<'a> {
    name: &'a str,
    nproc: usize,
    sets: Vec<String>,
    flags: Vec<String>,
    logs: &'a str,
}

impl<'a> Launch<'a> {
    fn new(name: &'a str, nproc: usize) -> Self {
        Launch {
            name,
            nproc,
            sets: Vec::new(),
            flags: Vec::new(),
            logs: "logs",
        }
    }

    fn set(mut self, kv: &str) -> Self {
        self.sets.push(kv.to_owned());
        self
    }

    fn flags(mut self, flags: &[&str]) -> Self {
        self.flags.extend(flags.iter().map(|f| (*f).to_owned()));
        self
    }
}

impl Jobs {
    fn new() -> Self {
        worker_bin::ensure();
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// `cohort launch configs/quickstart.toml` as job `l.name` with
    /// `l.nproc` workers, `STEPS` steps, one checkpoint (the last step's)
    /// into `l.name`, logs in `l.logs`.
    fn command(&self, l: &Launch<'_>) -> Command {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut cmd: Command = cohort();
        cmd.current_dir(self.dir.path())
            .arg("launch")
            .args(FAST)
            .args([
                "--log-dir",
                l.logs,
                "--max-restarts",
                "2",
                "--job-id",
                l.name,
            ])
            .args(["--nproc-per-node", &l.nproc.to_string()])
            .args(&l.flags)
            .arg(repo.join("configs/quickstart.toml"))
            .args([
                "--set",
                &format!("data.path={}", repo.join("configs/data/tiny.txt").display()),
            ])
            .args(["--set", &format!("train.max_steps={STEPS}")])
            .args(["--set", "train.eval_every=0"])
            .args(["--set", "train.log_every=1"])
            .args(["--set", &format!("checkpoint.every={STEPS}")])
            .arg("--set")
            .arg(format!(
                "checkpoint.dir={}",
                self.dir.path().join(l.name).display()
            ));
        for set in &l.sets {
            cmd.args(["--set", set]);
        }
        cmd
    }

    /// Runs `l` to the end; its output after asserting success.
    fn launch(&self, l: &Launch<'_>) -> String {
        let (status, out, err) = run(self.command(l), DEADLINE);
        assert!(status.success(), "{} failed: {status}\n{out}{err}", l.name);
        format!("{out}{err}")
    }

    /// The consolidated weights of job `name`'s last checkpoint.
    fn export(&self, name: &str) -> Vec<u8> {
        let out = self.dir.path().join(format!("{name}.safetensors"));
        let mut cmd = cohort();
        cmd.arg("ckpt")
            .arg("export")
            .arg(self.dir.path().join(name))
            .arg("--out")
            .arg(&out);
        let (status, stdout, stderr) = run(cmd, DEADLINE);
        assert!(status.success(), "export of {name}: {stdout}{stderr}");
        std::fs::read(out).unwrap()
    }

    /// The step rank `rank` of job `name` reports in its status file.
    fn step_of(&self, logs: &str, name: &str, rank: usize) -> Option<u64> {
        let path: PathBuf = self
            .dir
            .path()
            .join(format!("{logs}/{name}/attempt_0/rank_{rank}.status"));
        let text = std::fs::read_to_string(path).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v.get("step")?.as_u64()
    }

    /// Waits until rank `rank` of `l` is past step 10.
    fn past_step_10(&self, l: &Launch<'_>, rank: usize) {
        assert!(
            eventually(DEADLINE, || self
                .step_of(l.logs, l.name, rank)
                .is_some_and(|s| s >= 10)),
            "rank {rank} of {} never reached step 10",
            l.name
        );
    }

    /// The weights of an uninterrupted run of `l` (run as `l.name`).
    fn straight(&self, l: &Launch<'_>) -> Vec<u8> {
        self.launch(l);
        self.export(l.name)
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid of this test's job.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// Runs `l`, sends `sig` to rank `victim` once it is past step 10, and
/// returns the launcher's output after it succeeded; the survivors' pids are
/// checked unchanged from before the failure to after the recovery.
fn fail_and_recover(jobs: &Jobs, l: &Launch<'_>, victim: u32, sig: i32) -> String {
    let mut p = Proc::spawn(jobs.command(l));
    jobs.past_step_10(l, victim as usize);
    let survivors: Vec<(u32, i32)> = (0..l.nproc as u32)
        .filter(|&r| r != victim)
        .map(|r| (r, worker_pid(l.name, r).expect("a survivor's pid")))
        .collect();
    signal(worker_pid(l.name, victim).expect("the victim's pid"), sig);
    p.wait_line("recovered in place", true, DEADLINE);
    for (rank, before) in &survivors {
        assert_eq!(
            worker_pid(l.name, *rank),
            Some(*before),
            "rank {rank} was restarted: {}",
            p.err
        );
    }
    let status = p.wait(DEADLINE);
    let out = format!("{}{}", p.out, p.err);
    assert!(status.success(), "{}: {status}\n{out}", l.name);
    assert!(out.contains("(0 restart(s))"), "{out}");
    assert!(!out.contains("resumed from"), "{out}");
    out
}

/// The launcher's recovery line.
fn recovery_line(out: &str) -> &str {
    out.lines()
        .find(|l| l.contains("recovered in place"))
        .unwrap_or_else(|| panic!("no recovery line:\n{out}"))
}

#[test]
fn a_killed_ddp_worker_is_replaced_in_place_with_the_weights_of_an_uninterrupted_run() {
    let jobs = Jobs::new();
    for nproc in [2usize, 3] {
        let straight = jobs.straight(&Launch::new(&format!("straight-{nproc}"), nproc));
        let name = format!("killed-{nproc}");
        let out = fail_and_recover(&jobs, &Launch::new(&name, nproc), 1, libc::SIGKILL);
        let line = recovery_line(&out);
        assert!(
            line.contains(
                "[cohort] rank 1 recovered in place (epoch 1): it was killed by signal 9 (SIGKILL)"
            ) && line.contains("its state came from rank 0")
                && ["detect", "abort", "respawn", "rejoin", "transfer", "redo"]
                    .iter()
                    .all(|phase| line.contains(phase)),
            "{line}"
        );
        assert!(
            jobs.export(&name) == straight,
            "{nproc} workers: the weights after an in-place recovery differ from an uninterrupted run"
        );
    }
}

/// Rank 0 holds the checkpoint lease and writes the metrics: replacing it
/// works the same, its state from rank 1.
#[test]
fn rank_0_is_replaced_in_place_too() {
    let jobs = Jobs::new();
    let straight = jobs.straight(&Launch::new("straight", 2));
    let out = fail_and_recover(&jobs, &Launch::new("rank0", 2), 0, libc::SIGKILL);
    assert!(
        recovery_line(&out).contains("rank 0 recovered in place (epoch 1)")
            && out.contains("its state came from rank 1"),
        "{out}"
    );
    assert!(jobs.export("rank0") == straight);
}

/// ZeRO: a rank's shard exists once; the replacement takes it from the
/// rank mirroring it (the next one), at ZeRO-1 with 3 workers and ZeRO-2
/// with 2.
#[test]
fn a_killed_zero_worker_takes_its_shard_from_its_mirror() {
    let jobs = Jobs::new();
    for (stage, nproc, victim, holder) in [(1, 3, 1, 2), (2, 2, 1, 0)] {
        let zero = format!("parallel.zero_stage={stage}");
        let straight_name = format!("straight-z{stage}");
        let straight = jobs.straight(&Launch::new(&straight_name, nproc).set(&zero));
        let name = format!("killed-z{stage}");
        let out = fail_and_recover(
            &jobs,
            &Launch::new(&name, nproc).set(&zero),
            victim,
            libc::SIGKILL,
        );
        assert!(
            out.contains("every rank keeps a mirror of another rank's ZeRO shard"),
            "{out}"
        );
        let line = recovery_line(&out);
        assert!(
            line.contains(&format!("its state came from rank {holder}")),
            "{line}"
        );
        assert!(
            jobs.export(&name) == straight,
            "ZeRO-{stage}: the weights after an in-place recovery differ from an uninterrupted run"
        );
    }
}

/// A stopped worker is the hang's culprit: its agent kills it and replaces
/// it in place; the survivors, blocked in a collective on it, are freed by
/// the notice.
#[test]
fn a_stopped_worker_is_detected_and_replaced_in_place() {
    let jobs = Jobs::new();
    let straight = jobs.straight(&Launch::new("straight", 2));
    let l = Launch::new("stopped", 2).flags(&["--hang-timeout", "3"]);
    let out = fail_and_recover(&jobs, &l, 1, libc::SIGSTOP);
    let line = recovery_line(&out);
    assert!(
        line.contains("rank 1 recovered in place (epoch 1): it hung"),
        "{line}"
    );
    assert!(jobs.export("stopped") == straight);
}

/// The replacement killed before it rejoined: the job falls back to a
/// restart (from step 0 here: there is no checkpoint yet), says why, and
/// still ends with the weights of an uninterrupted run.
#[test]
fn a_second_kill_during_a_recovery_falls_back_to_a_restart() {
    let jobs = Jobs::new();
    let straight = jobs.straight(&Launch::new("straight", 2));
    let l = Launch::new("twice", 2);
    let mut p = Proc::spawn(jobs.command(&l));
    jobs.past_step_10(&l, 1);
    let first = worker_pid("twice", 1).unwrap();
    signal(first, libc::SIGKILL);
    let mut replacement = None;
    assert!(
        eventually(DEADLINE, || {
            replacement = worker_pid("twice", 1).filter(|&p| p != first);
            replacement.is_some()
        }),
        "no replacement started"
    );
    signal(replacement.unwrap(), libc::SIGKILL);
    let status = p.wait(DEADLINE);
    let out = format!("{}{}", p.out, p.err);
    assert!(status.success(), "{out}");
    assert!(!out.contains("recovered in place (epoch 1)"), "{out}");
    assert!(
        out.contains("it was the replacement of the in-place recovery of epoch 1 and failed before it rejoined")
            && out.contains("falling back to a restart from the newest checkpoint"),
        "{out}"
    );
    assert!(out.contains("(1 restart(s))"), "{out}");
    assert!(jobs.export("twice") == straight);
}

/// ZeRO with 2 workers: each mirrors the other's shard, so both killed at
/// once leave nothing to recover from in place: the job restarts from
/// disk, saying why, with the weights of an uninterrupted run.
#[test]
fn a_rank_and_its_mirror_killed_together_restart_from_disk() {
    let jobs = Jobs::new();
    let zero = "parallel.zero_stage=1";
    let straight = jobs.straight(
        &Launch::new("straight", 2)
            .set(zero)
            .set("checkpoint.every=10"),
    );
    let l = Launch::new("both", 2).set(zero).set("checkpoint.every=10");
    let mut p = Proc::spawn(jobs.command(&l));
    jobs.past_step_10(&l, 1);
    let pids = [
        worker_pid("both", 0).unwrap(),
        worker_pid("both", 1).unwrap(),
    ];
    for pid in pids {
        signal(pid, libc::SIGKILL);
    }
    let status = p.wait(DEADLINE);
    let out = format!("{}{}", p.out, p.err);
    assert!(status.success(), "{out}");
    assert!(!out.contains("recovered in place"), "{out}");
    assert!(out.contains("(1 restart(s))"), "{out}");
    assert!(
        out.contains("during the in-place recovery of epoch 1")
            && out.contains("falling back to a restart from the newest checkpoint"),
        "{out}"
    );
    assert!(jobs.export("both") == straight);
}

/// Two nodes of two workers under a standalone coordinator: a worker of
/// node b is replaced on node b; node a's workers keep running.
#[test]
fn a_killed_worker_of_a_two_node_job_is_replaced_on_its_node() {
    let jobs = Jobs::new();
    let two_nodes = |name: &str, victim: Option<u32>| -> String {
        let (mut coord, addr) = launch_util::coordinator(
            "127.0.0.1:0",
            FAST,
            &["--nnodes", "2", "--token", "t0ken", "--job-id", name],
        );
        let flags = ["--coordinator", &addr, "--token", "t0ken", "--nnodes", "2"];
        let la = Launch {
            logs: "logs-a",
            ..Launch::new(name, 2).flags(&flags)
        };
        let lb = Launch {
            logs: "logs-b",
            ..Launch::new(name, 2).flags(&flags)
        };
        let mut a = Proc::spawn(jobs.command(&la));
        let mut b = Proc::spawn(jobs.command(&lb));
        if let Some(victim) = victim {
            assert!(
                eventually(DEADLINE, || worker_pid(name, victim).is_some()
                    && (jobs
                        .step_of("logs-a", name, victim as usize)
                        .is_some_and(|s| s >= 10)
                        || jobs
                            .step_of("logs-b", name, victim as usize)
                            .is_some_and(|s| s >= 10))),
                "rank {victim} never reached step 10"
            );
            let others: Vec<(u32, i32)> = (0..4)
                .filter(|&r| r != victim)
                .map(|r| (r, worker_pid(name, r).unwrap()))
                .collect();
            signal(worker_pid(name, victim).unwrap(), libc::SIGKILL);
            let (node, other) = if jobs.step_of("logs-b", name, victim as usize).is_some() {
                (&mut b, "a")
            } else {
                (&mut a, "b")
            };
            node.wait_line("recovered in place", true, DEADLINE);
            for (rank, pid) in others {
                assert_eq!(
                    worker_pid(name, rank),
                    Some(pid),
                    "rank {rank} restarted (node {other} or its own)"
                );
            }
        }
        launch_util::both_succeed(&mut a, &mut b, DEADLINE);
        let _ = coord.wait(Duration::from_secs(30));
        let out = format!("{}{}{}{}", a.out, a.err, b.out, b.err);
        assert!(out.contains("(0 restart(s))"), "{out}");
        out
    };
    two_nodes("straight-2x2", None);
    let out = two_nodes("killed-2x2", Some(3));
    assert!(
        recovery_line(&out).contains("rank 3 recovered in place (epoch 1)"),
        "{out}"
    );
    assert!(
        jobs.export("killed-2x2") == jobs.export("straight-2x2"),
        "2 nodes x 2: the weights after an in-place recovery differ from an uninterrupted run"
    );
}

/// `recovery.mode = "restart"` keeps the restart from disk.
#[test]
fn restart_mode_restarts_every_worker_from_disk() {
    let jobs = Jobs::new();
    let l = Launch::new("restart", 2)
        .set("recovery.mode=restart")
        .set("checkpoint.every=10");
    let mut cmd = jobs.command(&l);
    cmd.env("COHORT_INJECT_FAULT", "rank=1,step=15");
    let (status, out, err) = run(cmd, DEADLINE);
    let out = format!("{out}{err}");
    assert!(status.success(), "{out}");
    assert!(!out.contains("recovered in place"), "{out}");
    assert!(out.contains("(1 restart(s))"), "{out}");
}

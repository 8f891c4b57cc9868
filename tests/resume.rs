//! Resume from checkpoint, end to end: `cohort launch` runs the quickstart
//! model with checkpoints every 10 steps, workers are killed on purpose
//! (`COHORT_INJECT_FAULT`), checkpoints are corrupted, and the job must come
//! back exactly where a run without the accident would be.

mod launch_util;
mod worker_bin;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use launch_util::{FAST, Proc, cohort, eventually, run};

const DEADLINE: Duration = Duration::from_secs(240);

/// A job in its own temporary directory (logs and checkpoints live there).
struct Job {
    dir: tempfile::TempDir,
}

impl Job {
    fn new() -> Self {
        worker_bin::ensure();
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn ckpt(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `cohort launch configs/quickstart.toml` with `max_steps` steps,
    /// checkpoints every 10 into `ckpt`, a failure restarting the job from
    /// disk (`recovery.mode = "restart"`), and `extra` flags; returns the
    /// launcher's stdout and stderr together after asserting success.
    fn launch(&self, ckpt: &str, max_steps: u64, extra: &[&str], env: &[(&str, &str)]) -> String {
        let (ok, out) = self.try_launch(ckpt, max_steps, extra, env);
        assert!(ok, "launch failed:\n{out}");
        out
    }

    /// The `cohort launch` command of [`Job::launch`].
    fn command(&self, ckpt: &str, max_steps: u64, extra: &[&str], env: &[(&str, &str)]) -> Command {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut cmd: Command = cohort();
        cmd.current_dir(self.dir.path())
            .arg("launch")
            .args(FAST)
            .args(["--log-dir", "logs", "--max-restarts", "2"])
            .args(extra)
            .arg(repo.join("configs/quickstart.toml"))
            .args([
                "--set",
                &format!("data.path={}", repo.join("configs/data/tiny.txt").display()),
            ])
            .args(["--set", &format!("train.max_steps={max_steps}")])
            .args(["--set", "train.eval_every=0"])
            .args(["--set", "checkpoint.every=10"])
            .args(["--set", &format!("checkpoint.dir={ckpt}")])
            .args(["--set", "checkpoint.keep_last=10"])
            // A failure restarts the job from disk, not in place.
            .args(["--set", "recovery.mode=restart"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    fn try_launch(
        &self,
        ckpt: &str,
        max_steps: u64,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (bool, String) {
        let cmd = self.command(ckpt, max_steps, extra, env);
        let (status, out, err) = run(cmd, DEADLINE);
        (status.success(), format!("{status}\n{out}{err}"))
    }

    /// The consolidated weights of `ckpt`'s latest checkpoint, as the bytes
    /// of the safetensors file `cohort ckpt export` writes.
    fn export(&self, ckpt: &str) -> Vec<u8> {
        let out = self.dir.path().join(format!("{ckpt}.safetensors"));
        let mut cmd = cohort();
        cmd.arg("ckpt")
            .arg("export")
            .arg(self.ckpt(ckpt))
            .arg("--out")
            .arg(&out);
        let (status, stdout, stderr) = run(cmd, DEADLINE);
        assert!(status.success(), "export failed: {stdout}{stderr}");
        std::fs::read(out).unwrap()
    }
}

#[test]
fn a_worker_killed_at_step_25_resumes_from_step_20_and_ends_bit_identical() {
    let job = Job::new();
    job.launch("straight", 40, &[], &[]);
    let out = job.launch(
        "faulted",
        40,
        &[],
        &[("COHORT_INJECT_FAULT", "rank=1,step=25")],
    );
    assert!(out.contains("rank 1 aborting at step 25"), "{out}");
    assert!(out.contains("resumed from"), "{out}");
    assert!(out.contains("at step 20"), "{out}");
    // The launcher itself says where the job resumed.
    assert!(
        out.lines().any(
            |l| l.starts_with("[cohort] the job resumed from checkpoint ")
                && l.ends_with(" (step 20)")
        ),
        "{out}"
    );
    assert!(out.contains("(1 restart(s))"), "{out}");
    assert!(
        job.export("straight") == job.export("faulted"),
        "the weights after a crash and resume differ from a run without the crash"
    );
}

#[test]
fn a_crash_between_shard_write_and_commit_keeps_the_previous_checkpoint() {
    let job = Job::new();
    job.launch("straight", 30, &[], &[]);
    let out = job.launch(
        "crashed",
        30,
        &[],
        &[("COHORT_INJECT_FAULT", "rank=0,step=20,at=commit")],
    );
    // The step-20 save never committed, so the restart starts from step 10.
    assert!(out.contains("at step 10"), "{out}");
    assert!(job.export("straight") == job.export("crashed"));
}

#[test]
fn a_corrupt_latest_checkpoint_falls_back_to_the_newest_good_one() {
    let job = Job::new();
    job.launch("ck", 30, &[], &[]);
    let shard = job.ckpt("ck").join("step-00000030/rank-00001.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&shard, bytes).unwrap();
    let out = job.launch("ck", 40, &[], &[]);
    assert!(
        out.contains("step-00000030"),
        "the warning names the bad checkpoint: {out}"
    );
    assert!(out.contains("at step 20"), "{out}");
}

#[test]
fn a_job_resumes_on_a_different_number_of_workers() {
    let job = Job::new();
    job.launch("ck", 20, &[], &[]);
    let step20 = job.ckpt("ck").join("step-00000020");
    let step20 = step20.to_str().unwrap();
    for nproc in ["3", "1"] {
        let out = job.launch(
            &format!("more-{nproc}"),
            30,
            &["--nproc-per-node", nproc, "--resume", step20],
            &[],
        );
        assert!(out.contains("at step 20"), "{nproc} workers: {out}");
        assert!(out.contains(&format!("world {nproc}")), "{out}");
        assert!(out.contains("done: 30 steps"), "{out}");
    }
}

#[test]
fn resume_never_starts_from_scratch_even_with_checkpoints_present() {
    let job = Job::new();
    job.launch("ck", 20, &[], &[]);
    let out = job.launch("ck", 20, &["--resume", "never"], &[]);
    assert!(!out.contains("resumed from"), "{out}");
}

/// Flips a byte near the end of `file`.
fn corrupt(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn when_every_checkpoint_is_corrupt_resuming_is_refused() {
    let job = Job::new();
    job.launch("ck", 20, &[], &[]);
    for step in ["step-00000010", "step-00000020"] {
        corrupt(&job.ckpt("ck").join(step).join("rank-00000.safetensors"));
    }
    let (ok, out) = job.try_launch("ck", 30, &[], &[]);
    assert!(!ok, "{out}");
    assert!(out.contains("exit status: 1"), "{out}");
    assert!(out.contains("no checkpoint in"), "{out}");
    assert!(
        out.contains("step-00000010: ") && out.contains("step-00000020: "),
        "{out}"
    );
    assert!(!out.contains("done: 30 steps"), "{out}");
    // Starting over is a choice the user makes.
    let out = job.launch("ck", 30, &["--resume", "never"], &[]);
    assert!(out.contains("done: 30 steps"), "{out}");
}

#[test]
fn a_garbage_latest_is_ignored_by_every_ckpt_command_and_rewritten() {
    let job = Job::new();
    job.launch("ck", 20, &[], &[]);
    let root = job.ckpt("ck");
    std::fs::write(root.join("latest"), b"\xff\xfegarbage").unwrap();
    for command in ["verify", "inspect"] {
        let mut cmd = cohort();
        cmd.args(["ckpt", command]).arg(&root);
        let (status, out, err) = run(cmd, DEADLINE);
        assert!(status.success(), "ckpt {command}: {out}{err}");
        assert!(
            err.contains("ignoring") && err.contains("step-00000020"),
            "{err}"
        );
    }
    let straight = job.export("ck");
    // A resume at the final step commits nothing, and still repairs `latest`.
    let out = job.launch("ck", 20, &[], &[]);
    assert!(out.contains("at step 20"), "{out}");
    let latest = std::fs::read_to_string(root.join("latest")).unwrap();
    assert_eq!(latest.trim(), "step-00000020");
    assert!(job.export("ck") == straight);
}

#[test]
fn a_second_job_writing_into_the_same_checkpoint_root_is_fenced_off() {
    let job = Job::new();
    let first = Proc::spawn(job.command("ck", 1_000_000, &["--job-id", "first"], &[]));
    let committed = job.ckpt("ck").join("step-00000010");
    assert!(
        eventually(Duration::from_secs(120), || committed.exists()),
        "the first job committed no checkpoint"
    );
    let (ok, out) = job.try_launch("ck", 20, &["--job-id", "second"], &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("is leased by job first, generation 0"),
        "{out}"
    );
    assert!(
        out.contains("another job is writing checkpoints here"),
        "{out}"
    );
    // The first job still commits.
    let later = job.ckpt("ck").join("step-00000030");
    assert!(
        eventually(Duration::from_secs(120), || later.exists()),
        "the first job stopped committing"
    );
    drop(first);
}

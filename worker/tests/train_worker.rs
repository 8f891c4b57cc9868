//! The real `cohort-worker train` binary: alone, as two ranks over TCP
//! (bootstrapped through a shared `COHORT_STORE_DIR`), and killed by an
//! injected fault then resumed from its checkpoint.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const WORKER: &str = env!("CARGO_BIN_EXE_cohort-worker");

/// Kills the worker if the test ends before it does.
struct Worker {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Worker {
    fn start(dir: &Path, name: &str, config: &Path, env: &[(&str, String)]) -> Worker {
        let (out, err) = (
            dir.join(format!("{name}.out")),
            dir.join(format!("{name}.err")),
        );
        let mut cmd = Command::new(WORKER);
        cmd.args(["train", "--config"]).arg(config);
        for var in [
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "COHORT_LOG_DIR",
            "COHORT_STATUS_FILE",
            "COHORT_STORE_DIR",
            "COHORT_INJECT_FAULT",
            "COHORT_RESTART_COUNT",
            "COHORT_RESUME",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)))
            .env("OMP_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        Worker {
            child: cmd.spawn().expect("starting cohort-worker"),
            out,
            err,
        }
    }

    /// Waits (with a deadline) for the exit; returns it with stdout.
    fn finish(mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let out = std::fs::read_to_string(&self.out).unwrap();
                let err = std::fs::read_to_string(&self.err).unwrap();
                return (status, format!("{out}\n--- stderr ---\n{err}"));
            }
            assert!(
                Instant::now() < deadline,
                "cohort-worker did not finish in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn write_config(dir: &Path, max_steps: u64, extra: &str) -> PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[train]
max_steps = {max_steps}
batch_size = 4
log_every = 2
eval_every = 3
threads = 1
[model]
kind = "gpt"
n_layer = 1
n_head = 2
n_embd = 16
block_size = 16
[data]
kind = "synthetic"
{extra}
"#
        ),
    )
    .unwrap();
    path
}

fn metrics(log_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn trains_alone_and_reports_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), 5, "");
    let logs = tmp.path().join("logs");
    let status = tmp.path().join("status.json");
    let w = Worker::start(
        tmp.path(),
        "solo",
        &config,
        &[
            ("COHORT_LOG_DIR", logs.display().to_string()),
            ("COHORT_STATUS_FILE", status.display().to_string()),
        ],
    );
    let (exit, out) = w.finish();
    assert!(exit.success(), "{out}");
    assert!(out.contains("step 2/5 | loss"), "{out}");
    assert!(out.contains("done: 5 steps"), "{out}");
    let lines = metrics(&logs);
    assert_eq!(lines.len(), 5);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["step"], i as u64 + 1);
        for key in [
            "loss",
            "lr",
            "tokens_per_s",
            "grad_norm",
            "compute_s",
            "comm_s",
        ] {
            assert!(
                line[key].as_f64().is_some_and(f64::is_finite),
                "{key} in {line}"
            );
        }
    }
    assert!(lines[2]["eval_loss"].is_f64(), "{}", lines[2]);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&status).unwrap()).unwrap();
    assert_eq!(
        (s["step"].as_u64(), s["max_steps"].as_u64()),
        (Some(5), Some(5))
    );
}

#[test]
fn two_ranks_over_tcp_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), 4, "");
    let store = tmp.path().join("store");
    let logs = tmp.path().join("logs");
    let workers: Vec<Worker> = (0..2)
        .map(|rank| {
            Worker::start(
                tmp.path(),
                &format!("rank{rank}"),
                &config,
                &[
                    ("RANK", rank.to_string()),
                    ("LOCAL_RANK", rank.to_string()),
                    ("WORLD_SIZE", "2".into()),
                    ("COHORT_TOKEN", "test-token".into()),
                    ("COHORT_STORE_DIR", store.display().to_string()),
                    ("COHORT_LOG_DIR", logs.display().to_string()),
                ],
            )
        })
        .collect();
    for w in workers {
        let (exit, out) = w.finish();
        assert!(exit.success(), "{out}");
    }
    let lines = metrics(&logs);
    assert_eq!(lines.len(), 4, "only rank 0 writes metrics");
}

#[test]
fn an_injected_fault_kills_the_worker_and_the_restart_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    let config = write_config(
        tmp.path(),
        6,
        &format!(
            "[checkpoint]\ndir = \"{}\"\nevery = 2\nasync = false  # an async save of step 2 may not be committed before the abort at step 3\n",
            ckpt.display()
        ),
    );
    let fault = ("COHORT_INJECT_FAULT", "rank=0,step=3".to_string());
    let (exit, out) =
        Worker::start(tmp.path(), "first", &config, std::slice::from_ref(&fault)).finish();
    assert!(!exit.success(), "the fault should have killed it: {out}");
    assert!(out.contains("aborting at step 3"), "{out}");
    let (exit, out) = Worker::start(
        tmp.path(),
        "restart",
        &config,
        &[fault, ("COHORT_RESTART_COUNT", "1".into())],
    )
    .finish();
    assert!(exit.success(), "{out}");
    assert!(
        out.contains("at step 2"),
        "resumed from the step-2 checkpoint: {out}"
    );
    assert!(out.contains("done: 6 steps"), "{out}");
}

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
            "COHORT_EPOCH",
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

/// In-place recovery as the workers see it, this test playing the agent:
/// rank `victim` of `world` dies at step 8 (no checkpoint on disk); the
/// test writes the epoch's notice into the store and starts that rank again
/// with `COHORT_EPOCH=1`; the others keep their processes, the replacement
/// takes its state from them (DDP: a survivor's; ZeRO: its shard from the
/// rank mirroring it), step 9 is redone, and every step's loss is the one
/// of an uninterrupted run, to the bit. Returns the recovery's line.
fn recover_in_place(stage: u8, world: usize, victim: usize) -> String {
    use cohort_collectives::Store;
    use cohort_contract::recovery::{Done, Notice, done_key, notice_key, unix_ms};

    let extra = format!("[optim]\nlr = 3e-3\n[parallel]\nzero_stage = {stage}\n");
    let run = |dir: &Path, fault: Option<String>| -> (Vec<serde_json::Value>, String) {
        let config = write_config(dir, 16, &extra);
        let store = dir.join("store");
        let logs = dir.join("logs");
        let env = |rank: usize| {
            let mut env = vec![
                ("RANK", rank.to_string()),
                ("LOCAL_RANK", rank.to_string()),
                ("WORLD_SIZE", world.to_string()),
                ("COHORT_TOKEN", "test-token".into()),
                ("COHORT_STORE_DIR", store.display().to_string()),
                ("COHORT_LOG_DIR", logs.display().to_string()),
            ];
            if let Some(f) = &fault {
                env.push(("COHORT_INJECT_FAULT", f.clone()));
            }
            env
        };
        let mut workers: Vec<Option<Worker>> = (0..world)
            .map(|r| Some(Worker::start(dir, &format!("rank{r}"), &config, &env(r))))
            .collect();
        let mut note = String::new();
        if fault.is_some() {
            let (exit, out) = workers[victim].take().unwrap().finish();
            assert!(!exit.success(), "rank {victim} was to die: {out}");
            let store = cohort_collectives::FileStore::new(&store).unwrap();
            let notice = Notice {
                epoch: 1,
                rank: victim,
                reason: "was killed by SIGABRT".into(),
                failed_unix_ms: unix_ms(),
                noticed_unix_ms: unix_ms(),
            };
            store
                .set(&notice_key(1), &serde_json::to_vec(&notice).unwrap())
                .unwrap();
            let mut env1 = env(victim);
            env1.push(("COHORT_EPOCH", "1".into()));
            let replacement = Worker::start(dir, &format!("rank{victim}-epoch1"), &config, &env1);
            let (exit, out) = replacement.finish();
            assert!(exit.success(), "the replacement: {out}");
            let done = store
                .wait(&[done_key(1)], Duration::from_secs(10))
                .expect("the replacement's record");
            let done: Done = serde_json::from_slice(&done[0]).unwrap();
            assert_eq!((done.rank, done.in_flight), (victim, 9), "{done:?}");
            // DDP: only the step in flight; ZeRO: also the one before when
            // the victim died while the mirrors were being refreshed.
            assert!(done.step == 9 || (stage > 0 && done.step == 8), "{done:?}");
            note = done.describe(&notice);
        }
        for (rank, w) in workers.into_iter().enumerate() {
            if let Some(w) = w {
                let (exit, out) = w.finish();
                assert!(
                    exit.success(),
                    "rank {rank} kept its process and finished: {out}"
                );
            }
        }
        (metrics(&logs), note)
    };
    let straight = tempfile::tempdir().unwrap();
    let faulted = tempfile::tempdir().unwrap();
    let (want, _) = run(straight.path(), None);
    let (got, note) = run(faulted.path(), Some(format!("rank={victim},step=8")));
    assert!(
        note.starts_with(&format!("rank {victim} recovered in place (epoch 1)")),
        "{note}"
    );
    // A step redone is logged again (with the same loss): the last line
    // of each step counts.
    let losses = |m: &[serde_json::Value]| -> Vec<(u64, f64)> {
        let by_step: std::collections::BTreeMap<u64, f64> = m
            .iter()
            .filter_map(|l| Some((l.get("step")?.as_u64()?, l.get("loss")?.as_f64()?)))
            .collect();
        by_step.into_iter().collect()
    };
    assert_eq!(losses(&want).len(), 16, "a loss every step");
    assert_eq!(
        losses(&got),
        losses(&want),
        "zero stage {stage}, {world} ranks: {note}"
    );
    note
}

#[test]
fn a_dead_ddp_rank_is_replaced_in_place_and_the_losses_are_unchanged() {
    let note = recover_in_place(0, 2, 1);
    assert!(note.contains("its state came from rank 0"), "{note}");
    let note = recover_in_place(0, 3, 0);
    assert!(note.contains("its state came from rank 1"), "{note}");
}

#[test]
fn a_dead_zero_rank_takes_its_shard_from_its_mirror() {
    for (stage, world, victim, holder) in [(1, 2, 1, 0), (2, 2, 0, 1), (1, 3, 1, 2), (2, 3, 2, 0)] {
        let note = recover_in_place(stage, world, victim);
        assert!(
            note.contains(&format!("its state came from rank {holder}")),
            "zero stage {stage}: {note}"
        );
    }
}

//! `cohort launch` on one node: the env contract, restarts, the root cause,
//! hang detection, interruption without orphans, and bad input.

mod launch_util;

use std::path::Path;
use std::time::Duration;

use launch_util::{FAST, Proc, alive, cohort, eventually, run, script};

const LIMIT: Duration = Duration::from_secs(60);

/// The pids written one per file, as `files` in `dir`; `None` until all are there.
fn read_pids(dir: &Path, files: &[&str]) -> Option<Vec<i32>> {
    files
        .iter()
        .map(|f| {
            std::fs::read_to_string(dir.join(f))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

/// Fails with `what` and the survivors unless every one of `pids` is gone
/// within 5 s.
fn assert_gone(pids: &[i32], what: &str) {
    assert!(
        eventually(Duration::from_secs(5), || pids
            .iter()
            .all(|&pid| !alive(pid))),
        "{what}: {:?}",
        pids.iter().filter(|&&pid| alive(pid)).collect::<Vec<_>>()
    );
}

fn launch(log_dir: &Path, extra: &[&str], program: &[&str]) -> std::process::Command {
    let mut cmd = cohort();
    cmd.arg("launch")
        .args(FAST)
        .arg("--log-dir")
        .arg(log_dir)
        .args(extra)
        .arg("--")
        .args(program);
    cmd
}

#[test]
fn workers_get_the_env_contract() {
    let dir = tempfile::tempdir().unwrap();
    let body = r#"echo "env RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE LOCAL_WORLD_SIZE=$LOCAL_WORLD_SIZE GROUP_RANK=$GROUP_RANK MASTER_ADDR=$MASTER_ADDR OMP=$OMP_NUM_THREADS GEN=$COHORT_GENERATION RESTARTS=$COHORT_RESTART_COUNT JOB=$COHORT_JOB_ID HOST=$COHORT_HOST"
echo "paths $COHORT_LOG_DIR $COHORT_STATUS_FILE"
[ -n "$MASTER_PORT" ] && [ -n "$COHORT_TOKEN" ] && [ -n "$COHORT_COORDINATOR" ] || exit 9
"#;
    let s = script(dir.path(), "env.sh", body);
    let logs = dir.path().join("logs");
    let (status, out, err) = run(
        launch(
            &logs,
            &["--nproc-per-node", "2", "--job-id", "envjob"],
            &["sh", s.to_str().unwrap()],
        ),
        LIMIT,
    );
    assert!(status.success(), "stdout:\n{out}\nstderr:\n{err}");
    for rank in 0..2 {
        let line = format!(
            "[rank {rank}] env RANK={rank} LOCAL_RANK={rank} WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 GROUP_RANK=0 \
             MASTER_ADDR=127.0.0.1 OMP=1 GEN=0 RESTARTS=0 JOB=envjob HOST=127.0.0.1"
        );
        assert!(out.contains(&line), "missing {line:?} in:\n{out}");
        let job_dir = std::path::absolute(&logs).unwrap().join("envjob");
        let paths = format!(
            "[rank {rank}] paths {} {}",
            job_dir.display(),
            job_dir
                .join(format!("attempt_0/rank_{rank}.status"))
                .display()
        );
        assert!(out.contains(&paths), "missing {paths:?} in:\n{out}");
        let log =
            std::fs::read_to_string(job_dir.join(format!("attempt_0/rank_{rank}.log"))).unwrap();
        assert!(log.starts_with(&format!("env RANK={rank} ")), "{log}");
    }
    assert!(
        err.contains("job succeeded: all 2 ranks of generation 0 exited 0"),
        "{err}"
    );
}

#[test]
fn a_worker_failing_once_is_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let body = r#"if [ "$COHORT_RESTART_COUNT" = 0 ] && [ "$RANK" = 1 ]; then echo "failing on purpose"; exit 7; fi
echo "ok rank $RANK generation $COHORT_GENERATION restart $COHORT_RESTART_COUNT"
"#;
    let s = script(dir.path(), "flaky.sh", body);
    let logs = dir.path().join("logs");
    let (status, out, err) = run(
        launch(
            &logs,
            &["--nproc-per-node", "2", "--job-id", "flaky"],
            &["sh", s.to_str().unwrap()],
        ),
        LIMIT,
    );
    assert!(status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("[rank 0] ok rank 0 generation 1 restart 1"),
        "{out}"
    );
    assert!(
        out.contains("[rank 1] ok rank 1 generation 1 restart 1"),
        "{out}"
    );
    assert!(
        err.contains("rank 1 on node")
            && err.contains("exited with code 7; restart 1 of --max-restarts 3"),
        "{err}"
    );
    assert!(err.contains("(1 restart(s))"), "{err}");
    let first = std::fs::read_to_string(logs.join("flaky/attempt_0/rank_1.log")).unwrap();
    assert_eq!(first, "failing on purpose\n");
    assert!(!logs.join("flaky/attempt_2").exists());
}

#[test]
fn exhausted_restarts_fail_with_the_root_cause() {
    let dir = tempfile::tempdir().unwrap();
    let body = r#"if [ "$RANK" = 0 ]; then echo "loading shard"; echo "fatal: shard 3 is corrupt" >&2; exit 5; fi
sleep 30
"#;
    let s = script(dir.path(), "broken.sh", body);
    let logs = dir.path().join("logs");
    let (status, out, err) = run(
        launch(
            &logs,
            &[
                "--nproc-per-node",
                "2",
                "--max-restarts",
                "1",
                "--job-id",
                "broken",
            ],
            &["sh", s.to_str().unwrap()],
        ),
        LIMIT,
    );
    assert_eq!(status.code(), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("exited with code 5; no restarts left (1 of --max-restarts 1 used)"),
        "{err}"
    );
    assert!(err.contains("root cause: rank 0 on node"), "{err}");
    assert!(err.contains("generation 1: exited with code 5"), "{err}");
    assert!(err.contains("broken/attempt_1/rank_0.log"), "{err}");
    assert!(
        err.contains("    [rank 0] fatal: shard 3 is corrupt"),
        "{err}"
    );
}

#[test]
fn a_stopped_worker_is_detected_as_hung_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    // Writes its status file every 100 ms for 6 steps; on the first attempt
    // rank 1 stops itself (SIGSTOP) at step 2.
    let body = r#"i=0
while [ $i -lt 6 ]; do
  i=$((i+1))
  printf '{"step": %d, "max_steps": 6, "loss": 1.5, "tokens_per_s": null, "time": 0}' $i > "$COHORT_STATUS_FILE.tmp"
  mv "$COHORT_STATUS_FILE.tmp" "$COHORT_STATUS_FILE"
  if [ "$COHORT_RESTART_COUNT" = 0 ] && [ "$RANK" = 1 ] && [ $i = 2 ]; then kill -STOP $$; fi
  sleep 0.1
done
echo "rank $RANK finished attempt $COHORT_RESTART_COUNT"
"#;
    let s = script(dir.path(), "hang.sh", body);
    let logs = dir.path().join("logs");
    let (status, out, err) = run(
        launch(
            &logs,
            &[
                "--nproc-per-node",
                "2",
                "--hang-timeout",
                "1",
                "--job-id",
                "hang",
            ],
            &["sh", s.to_str().unwrap()],
        ),
        LIMIT,
    );
    assert!(status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("rank 1 on node") && err.contains("hung: no step progress for"),
        "{err}"
    );
    assert!(err.contains("at step 2 (--hang-timeout 1s)"), "{err}");
    assert!(out.contains("[rank 1] rank 1 finished attempt 1"), "{out}");
    assert!(!out.contains("rank 1 finished attempt 0"), "{out}");
}

#[test]
fn sigint_stops_every_worker_and_their_children() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    std::fs::create_dir(&pids).unwrap();
    // Each worker leaves a grandchild that ignores SIGINT (background jobs of
    // a non-interactive shell do): only the group SIGKILL ends it.
    let body = format!(
        "sleep 1000 &\necho $! > {p}/child_$RANK\necho $$ > {p}/worker_$RANK\nwait\n",
        p = pids.display()
    );
    let s = script(dir.path(), "sleepy.sh", &body);
    let logs = dir.path().join("logs");
    let mut p = Proc::spawn(launch(
        &logs,
        &["--nproc-per-node", "2"],
        &["sh", s.to_str().unwrap()],
    ));
    let files = ["child_0", "child_1", "worker_0", "worker_1"];
    assert!(
        eventually(Duration::from_secs(30), || read_pids(&pids, &files)
            .is_some()),
        "workers did not start"
    );
    let all = read_pids(&pids, &files).unwrap();
    assert!(all.iter().all(|&pid| alive(pid)));
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(p.pid(), libc::SIGINT);
    }
    let status = p.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(130), "stderr:\n{}", p.err);
    assert!(
        p.err.contains("SIGINT received: stopping workers"),
        "{}",
        p.err
    );
    assert_gone(&all, "orphans left");
}

/// A worker that exits 0 while a program it started still runs: that
/// program is killed with the worker's process group (while the exited
/// worker still holds the group id), and the job succeeds.
#[test]
fn programs_a_finished_worker_left_behind_are_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    std::fs::create_dir(&pids).unwrap();
    let body = format!(
        "sleep 1000 > /dev/null 2>&1 &\necho $! > {p}/child_$RANK.tmp\nmv {p}/child_$RANK.tmp {p}/child_$RANK\nexit 0\n",
        p = pids.display()
    );
    let s = script(dir.path(), "leaves.sh", &body);
    let logs = dir.path().join("logs");
    let (status, _, err) = run(
        launch(
            &logs,
            &["--nproc-per-node", "2"],
            &["sh", s.to_str().unwrap()],
        ),
        LIMIT,
    );
    assert!(status.success(), "{status}: {err}");
    let children = read_pids(&pids, &["child_0", "child_1"]).expect("both workers wrote a pid");
    assert_gone(&children, "left running");
}

/// The launcher ignores SIGPIPE: a gRPC write (writev) to a connection its
/// peer just closed raises one, and a launcher killed by it after its job
/// succeeded reads as a failed job. A worker sends its parent one here.
#[test]
fn a_sigpipe_does_not_kill_the_launcher() {
    let dir = tempfile::tempdir().unwrap();
    let s = script(dir.path(), "pipe.sh", "kill -PIPE $PPID\nexit 0\n");
    let logs = dir.path().join("logs");
    let (status, _, err) = run(launch(&logs, &[], &["sh", s.to_str().unwrap()]), LIMIT);
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("job succeeded"), "{err}");
}

#[test]
fn bad_input_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut nothing = cohort();
    nothing.arg("launch");
    let (status, _, err) = run(nothing, LIMIT);
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("nothing to launch"), "{err}");

    let mut bad_nnodes = cohort();
    bad_nnodes.args(["launch", "--nnodes", "3:1", "--", "true"]);
    let (status, _, err) = run(bad_nnodes, LIMIT);
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("MIN is larger than MAX"), "{err}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut in_use = cohort();
    in_use.args(["launch", "--coordinator-bind", &addr, "--", "true"]);
    let (status, _, err) = run(in_use, LIMIT);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");

    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[train]\nmax_stepz = 3\n").unwrap();
    let mut bad_config = cohort();
    bad_config.arg("launch").arg(&config);
    let (status, _, err) = run(bad_config, LIMIT);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("max_stepz"),
        "{err}"
    );

    let mut set_without_config = cohort();
    set_without_config.args(["launch", "--set", "train.max_steps=1", "--", "true"]);
    let (status, _, err) = run(set_without_config, LIMIT);
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("--set overrides a config file"), "{err}");

    // A GPU job on a host without one (CI) stops before any worker starts.
    if cohort_collectives::nccl::probe::cuda_driver().is_err() {
        let config = dir.path().join("gpu.toml");
        std::fs::write(&config, "[train]\nmax_steps = 1\n").unwrap();
        for (set, needle) in [
            (
                vec!["train.device=cuda"],
                "train.device = \"cuda\", but this host can't run CUDA",
            ),
            (
                vec!["train.device=auto", "parallel.backend=nccl"],
                "parallel.backend = \"nccl\", but NCCL can't run here",
            ),
        ] {
            let mut gpu = cohort();
            gpu.arg("launch").arg(&config);
            for s in &set {
                gpu.args(["--set", s]);
            }
            let (status, _, err) = run(gpu, LIMIT);
            assert_eq!(status.code(), Some(2), "{set:?}: {err}");
            assert!(err.contains(needle), "{set:?}: {err}");
        }
    }
}

#[test]
fn an_unreachable_coordinator_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut cmd = cohort();
    cmd.arg("launch")
        .args([
            "--coordinator",
            &addr,
            "--token",
            "t",
            "--connect-retry-ms",
            "600",
        ])
        .arg("--log-dir")
        .arg(dir.path())
        .args(["--", "true"]);
    let (status, _, err) = run(cmd, LIMIT);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("could not reach the coordinator at {addr}")),
        "{err}"
    );
}

#[test]
fn a_node_waiting_for_nodes_that_never_come_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = launch(
        dir.path(),
        &[
            "--nnodes",
            "2",
            "--coordinator-bind",
            "127.0.0.1:0",
            "--rendezvous-timeout",
            "1",
        ],
        &["true"],
    );
    let (status, _, err) = run(cmd, LIMIT);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("no generation formed within 1s"), "{err}");
    assert!(err.contains("--nnodes 2"), "{err}");
}

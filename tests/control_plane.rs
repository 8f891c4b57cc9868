//! The control plane failing under a running job, with real binaries: the
//! standalone coordinator killed and restarted with `--state-dir`, killed
//! for good, its state file damaged; a node lost from a fixed `--nnodes`
//! job (a replacement joins, or none does); a node lost after the others
//! finished.

mod launch_util;
mod worker_bin;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use launch_util::{FAST, FAST_LOSS, Proc, cohort, coordinator, eventually, run};

const LIMIT: Duration = Duration::from_secs(120);

fn kill(p: &Proc, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(p.pid(), signal);
    }
}

/// `cohort launch` of `program` as a node of the job at `addr`.
fn node(addr: &str, timing: &[&str], log_dir: &Path, extra: &[&str], program: &[&str]) -> Command {
    let mut cmd = cohort();
    cmd.arg("launch")
        .args(timing)
        .args(["--coordinator", addr, "--token", "t"])
        .arg("--log-dir")
        .arg(log_dir)
        .args(extra)
        .arg("--")
        .args(program);
    cmd
}

/// The quickstart model trained for 150 steps (checkpoints every 10 into
/// `dir/ckpt`), as a node of the job at `addr`, or alone with `extra`.
fn quickstart(dir: &Path, coordinator: Option<&str>, extra: &[&str]) -> Command {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = cohort();
    cmd.current_dir(dir).arg("launch").args(FAST);
    if let Some(addr) = coordinator {
        cmd.args(["--coordinator", addr, "--token", "t", "--nnodes", "2"]);
    }
    cmd.args(["--log-dir", "logs"])
        .args(extra)
        .arg(repo.join("configs/quickstart.toml"))
        .args([
            "--set",
            &format!("data.path={}", repo.join("configs/data/tiny.txt").display()),
        ])
        // Long enough that the coordinator dies mid-run, after step 10,
        // also on a fast machine (some 40 ms a step here).
        .args(["--set", "train.max_steps=150"])
        .args(["--set", "train.eval_every=0"])
        .args(["--set", "checkpoint.every=10"])
        .args(["--set", "checkpoint.dir=ckpt"]);
    cmd
}

/// The consolidated weights of `dir/ckpt`'s latest checkpoint.
fn export(dir: &Path) -> Vec<u8> {
    let out = dir.join("weights.safetensors");
    let mut cmd = cohort();
    cmd.arg("ckpt")
        .arg("export")
        .arg(dir.join("ckpt"))
        .arg("--out")
        .arg(&out);
    let (status, stdout, stderr) = run(cmd, LIMIT);
    assert!(status.success(), "export failed: {stdout}{stderr}");
    std::fs::read(out).unwrap()
}

#[test]
fn a_coordinator_killed_mid_run_and_restarted_with_its_state_dir_carries_on_the_job() {
    worker_bin::ensure();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state_flag = ["--state-dir", state.to_str().unwrap()];
    let (mut coord, addr) = coordinator(
        "127.0.0.1:0",
        FAST,
        &[&["--nnodes", "2", "--token", "t"][..], &state_flag].concat(),
    );
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    for d in [&a_dir, &b_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    // Both nodes write the same checkpoint root, as on a shared file system
    // (made first: a dangling link is no directory to write into).
    std::fs::create_dir_all(a_dir.join("ckpt")).unwrap();
    std::os::unix::fs::symlink(a_dir.join("ckpt"), b_dir.join("ckpt")).unwrap();
    let mut a = Proc::spawn(quickstart(&a_dir, Some(&addr), &[]));
    let mut b = Proc::spawn(quickstart(&b_dir, Some(&addr), &[]));
    // Mid-run: once the first checkpoint is committed.
    assert!(
        eventually(LIMIT, || a_dir.join("ckpt/step-00000010").exists()),
        "no checkpoint at step 10:\n{}{}",
        a.out,
        a.err
    );
    kill(&coord, libc::SIGKILL);
    coord.wait(LIMIT);
    a.wait_line("does not answer", true, Duration::from_secs(30));
    // Restarted on the same address, without the token: the state has it.
    let (mut coord, again) = coordinator(&addr, FAST, &state_flag);
    assert_eq!(again, addr);
    let line = coord.wait_line("carrying on job ", false, Duration::from_secs(10));
    assert!(line.contains("generation 0 running on 2 node(s)"), "{line}");
    launch_util::both_succeed(&mut a, &mut b, LIMIT);
    assert!(a.err.contains("answers again, after"), "{}", a.err);
    assert!(
        !a.err.contains("generation 1"),
        "the outage restarted the job:\n{}",
        a.err
    );
    assert!(coord.wait(LIMIT).success(), "{}{}", coord.out, coord.err);
    assert!(
        coord
            .out
            .contains("job succeeded: all 4 ranks of generation 0 exited 0"),
        "{}",
        coord.out
    );

    let reference = dir.path().join("reference");
    std::fs::create_dir_all(&reference).unwrap();
    let (status, out, err) = run(
        quickstart(&reference, None, &["--nproc-per-node", "4"]),
        LIMIT,
    );
    assert!(status.success(), "{out}{err}");
    assert!(
        export(&a_dir) == export(&reference),
        "the weights differ from an uninterrupted run"
    );
}

#[test]
fn a_job_that_finishes_while_the_coordinator_is_down_exits_0_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state_flag = ["--state-dir", state.to_str().unwrap()];
    let extra = [&["--nnodes", "2", "--token", "t"][..], &state_flag].concat();
    let (mut coord, addr) = coordinator("127.0.0.1:0", FAST, &extra);
    let go = dir.path().join("go");
    let body = format!(
        "touch {d}/started_$RANK; while [ ! -f {g} ]; do sleep 0.05; done; echo finished",
        d = dir.path().display(),
        g = go.display()
    );
    let program = ["sh", "-c", body.as_str()];
    let logs = dir.path().join("logs");
    let spawn = || Proc::spawn(node(&addr, FAST, &logs, &["--nnodes", "2"], &program));
    let (mut a, mut b) = (spawn(), spawn());
    assert!(eventually(LIMIT, || dir.path().join("started_0").exists()
        && dir.path().join("started_1").exists()));
    kill(&coord, libc::SIGKILL);
    coord.wait(LIMIT);
    a.wait_line("does not answer", true, Duration::from_secs(30));
    b.wait_line("does not answer", true, Duration::from_secs(30));
    // Every worker exits 0 while there is no coordinator to tell.
    std::fs::write(&go, b"").unwrap();
    assert!(eventually(Duration::from_secs(10), || {
        std::fs::read_dir(&logs)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|job| std::fs::read_dir(job.path().join("attempt_0")).ok())
            .flatten()
            .flatten()
            .filter(|f| f.file_name().to_string_lossy().ends_with(".log"))
            .filter(|f| std::fs::read_to_string(f.path()).is_ok_and(|s| s.contains("finished")))
            .count()
            == 2
    }));
    let (mut coord, _) = coordinator(&addr, FAST, &extra);
    launch_util::both_succeed(&mut a, &mut b, LIMIT);
    assert!(a.err.contains("job succeeded"), "{}", a.err);
    assert!(coord.wait(LIMIT).success(), "{}{}", coord.out, coord.err);
}

#[test]
fn a_coordinator_gone_for_longer_than_the_grace_stops_the_nodes_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (coord, addr) = coordinator("127.0.0.1:0", FAST, &["--nnodes", "1", "--token", "t"]);
    let started = dir.path().join("started");
    let body = format!("touch {}; exec sleep 60", started.display());
    let mut a = Proc::spawn(node(
        &addr,
        FAST,
        &dir.path().join("logs"),
        &["--coordinator-grace", "2"],
        &["sh", "-c", &body],
    ));
    assert!(eventually(LIMIT, || started.exists()));
    kill(&coord, libc::SIGKILL);
    let status = a.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{}", a.err);
    assert!(
        a.err.contains("longer than --coordinator-grace 2s"),
        "{}",
        a.err
    );
    assert!(a.err.contains("--state-dir"), "{}", a.err);
}

#[test]
fn a_damaged_state_file_or_another_jobs_token_is_refused_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = state.join("coordinator.state");
    let bind = ["coordinator", "--bind", "127.0.0.1:0", "--state-dir"];
    // A first coordinator leaves a state; another token is refused.
    let (mut first, _) = coordinator(
        "127.0.0.1:0",
        FAST,
        &["--token", "t", "--state-dir", state.to_str().unwrap()],
    );
    assert!(eventually(Duration::from_secs(10), || file.exists()));
    kill(&first, libc::SIGKILL);
    first.wait(LIMIT);
    let mut cmd = cohort();
    cmd.args(bind).arg(&state).args(["--token", "other"]);
    let (status, _, err) = run(cmd, LIMIT);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{}: it is the state of a job with another token",
            file.display()
        )),
        "{err}"
    );
    std::fs::write(&file, b"not a state").unwrap();
    let mut cmd = cohort();
    cmd.args(bind).arg(&state);
    let (status, out, err) = run(cmd, LIMIT);
    assert_eq!(status.code(), Some(2), "{out}{err}");
    assert!(
        err.contains(&format!(
            "{}: not a cohort coordinator state file",
            file.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("move the file away to start a new job"),
        "{err}"
    );
    assert!(!out.contains("listening on"), "{out}");
    // A state directory that can't be made is found at start.
    let not_a_dir = dir.path().join("plain-file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let mut cmd = cohort();
    cmd.args(bind).arg(not_a_dir.join("state"));
    let (status, out, err) = run(cmd, LIMIT);
    assert_eq!(status.code(), Some(2), "{out}{err}");
    assert!(
        err.contains("cannot create the state directory")
            && err.contains("give --state-dir a directory this user can write"),
        "{err}"
    );
}

/// A fixed `--nnodes 2` job under `timing` whose generation 0 runs until
/// killed and whose later generations exit 0 at once: node b is SIGKILLed
/// once generation 0 runs on both nodes. Returns the coordinator, node a,
/// and a way to start another node of the job.
fn fixed_job_loses_a_node(dir: &Path, timing: &[&str]) -> (Proc, Proc, impl Fn() -> Proc) {
    let (coord, addr) = coordinator("127.0.0.1:0", timing, &["--nnodes", "2", "--token", "t"]);
    let body = format!(
        "echo $$ > {d}/worker_of_$PPID\n\
         if [ \"$COHORT_GENERATION\" = 0 ]; then exec sleep 60; fi\n\
         echo \"rank $RANK of $WORLD_SIZE in generation $COHORT_GENERATION\"\n",
        d = dir.display()
    );
    let script = launch_util::script(dir, "gen0.sh", &body);
    let logs = dir.join("logs");
    let timing: Vec<String> = timing.iter().map(|s| (*s).to_owned()).collect();
    let spawn = move || {
        let timing: Vec<&str> = timing.iter().map(String::as_str).collect();
        Proc::spawn(node(
            &addr,
            &timing,
            &logs,
            &["--nnodes", "2"],
            &["sh", script.to_str().unwrap()],
        ))
    };
    let (a, b) = (spawn(), spawn());
    let worker_of = |p: &Proc| dir.join(format!("worker_of_{}", p.pid()));
    assert!(eventually(LIMIT, || worker_of(&a).exists() && worker_of(&b).exists()));
    kill(&b, libc::SIGKILL);
    (coord, a, spawn)
}

#[test]
fn a_lost_node_of_a_fixed_job_is_replaced_by_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let timing = [FAST_LOSS, &["--last-call-ms", "300"]].concat();
    let (mut coord, mut a, spawn) = fixed_job_loses_a_node(dir.path(), &timing);
    let line = a.wait_line("once 1 new node(s) join", true, Duration::from_secs(30));
    assert!(line.contains("lost: no heartbeat for"), "{line}");
    assert!(
        line.contains("waiting up to 300s (--replacement-timeout)"),
        "{line}"
    );
    let mut c = spawn();
    launch_util::both_succeed(&mut a, &mut c, LIMIT);
    assert!(
        a.err.contains("generation 1 formed: 2 node(s)"),
        "{}",
        a.err
    );
    let out = format!("{}{}", a.out, c.out);
    assert!(out.contains("of 2 in generation 1"), "{out}");
    assert!(coord.wait(LIMIT).success(), "{}{}", coord.out, coord.err);
}

#[test]
fn with_no_replacement_the_job_fails_at_the_replacement_timeout_and_the_coordinator_exits() {
    let dir = tempfile::tempdir().unwrap();
    let timing = [FAST_LOSS, &["--replacement-timeout", "2"]].concat();
    let (mut coord, mut a, _) = fixed_job_loses_a_node(dir.path(), &timing);
    let status = a.wait(LIMIT);
    assert_eq!(status.code(), Some(1), "{}", a.err);
    assert!(
        a.err
            .contains("no node joined to replace it within --replacement-timeout 2s"),
        "{}",
        a.err
    );
    assert!(a.err.contains("[cohort] root cause: node "), "{}", a.err);
    let status = coord.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}{}", coord.out, coord.err);
}

#[test]
fn a_node_killed_after_the_others_finished_ends_the_job_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let timing = [FAST_LOSS, &["--last-call-ms", "300"]].concat();
    let (mut coord, addr) =
        coordinator("127.0.0.1:0", &timing, &["--nnodes", "1:2", "--token", "t"]);
    // Rank 0 finishes at once, rank 1 keeps running until its node is killed.
    let body = format!(
        "echo $$ > {d}/worker_of_$PPID\n\
         if [ \"$RANK\" = 1 ]; then exec sleep 60; fi\n\
         echo done\n",
        d = dir.path().display()
    );
    let script = launch_util::script(dir.path(), "one_done.sh", &body);
    let logs = dir.path().join("logs");
    let spawn = || {
        Proc::spawn(node(
            &addr,
            &timing,
            &logs,
            &["--nnodes", "1:2"],
            &["sh", script.to_str().unwrap()],
        ))
    };
    let (a, b) = (spawn(), spawn());
    let worker_of = |p: &Proc| dir.path().join(format!("worker_of_{}", p.pid()));
    assert!(eventually(LIMIT, || worker_of(&a).exists() && worker_of(&b).exists()));
    let rank1 = |p: &Proc| {
        std::fs::read_to_string(worker_of(p))
            .ok()
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{}/environ", pid.trim())).ok())
            .is_some_and(|env| env.split('\0').any(|v| v == "RANK=1"))
    };
    let (mut done, busy) = if rank1(&b) { (a, b) } else { (b, a) };
    done.wait_line("[rank 0] done", false, Duration::from_secs(30));
    kill(&busy, libc::SIGKILL);
    let status = done.wait(LIMIT);
    assert!(status.success(), "{}", done.err);
    assert!(
        done.err
            .contains("job succeeded: every rank of the node(s) still up exited 0 in generation 0"),
        "{}",
        done.err
    );
    assert!(done.err.contains("lost: no heartbeat for"), "{}", done.err);
    assert!(!done.err.contains("generation 1"), "{}", done.err);
    assert!(coord.wait(LIMIT).success(), "{}{}", coord.out, coord.err);
}

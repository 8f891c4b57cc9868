//! PyTorch programs written for torchrun, unchanged under `cohort launch`
//! on one host: torchrun's worker environment (TORCHELASTIC_*, ROLE_*,
//! GROUP_*), a snapshot resumed on restart, `@record` error files naming
//! the root cause, the default `env://` init. tests/multihost.rs runs the
//! same programs on two namespace hosts.

mod fixtures;
mod launch_util;

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use launch_util::{FAST, cohort, run};

const LIMIT: Duration = Duration::from_secs(180);

/// `cohort launch FAST --nproc-per-node 2 --log-dir DIR FLAGS -- PROGRAM`.
fn launch(dir: &Path, flags: &[&str], program: &[&OsStr]) -> (bool, String, String) {
    let mut cmd = cohort();
    cmd.current_dir(dir)
        .arg("launch")
        .args(FAST)
        .args(["--nproc-per-node", "2", "--log-dir"])
        .arg(dir.join("logs"))
        .args(flags)
        .arg("--")
        .args(program);
    let (status, out, err) = run(cmd, LIMIT);
    (status.success(), out, err)
}

#[test]
fn a_snapshot_is_resumed_through_torchelastic_restart_count() {
    let Some(python) = fixtures::python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let script = fixtures::fixture("elastic_snapshot.py");
    let snapshot = dir.path().join("snapshot.pt");
    let program = [python.as_os_str(), script.as_os_str(), snapshot.as_os_str()];
    let (ok, out, err) = launch(dir.path(), &["--max-restarts", "1"], &program);
    assert!(ok, "{out}{err}");
    let resumed = fixtures::check_snapshot_resume(&out, &err);

    // The same training without the failure ends with the same weights.
    let clean = dir.path().join("clean.pt");
    let program = [
        python.as_os_str(),
        script.as_os_str(),
        clean.as_os_str(),
        OsStr::new("--fail-epoch"),
        OsStr::new("-1"),
    ];
    let (ok, out, err) = launch(dir.path(), &["--max-restarts", "0"], &program);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!(
            "done: 4 epochs, restart count 0, weights {resumed}"
        )),
        "resumed weights {resumed} differ from the run without a failure:\n{out}"
    );
}

#[test]
fn the_late_raiser_is_named_with_its_value_error() {
    let Some(python) = fixtures::python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let script = fixtures::fixture("record_late_raise.py");
    let (ok, out, err) = launch(
        dir.path(),
        &["--max-restarts", "0"],
        &[python.as_os_str(), script.as_os_str()],
    );
    assert!(!ok, "{out}{err}");
    fixtures::check_late_raiser_named(&err);
}

#[test]
fn the_default_init_and_torchruns_whole_environment() {
    let Some(python) = fixtures::python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let script = fixtures::fixture("env_init.py");
    let (ok, out, err) = launch(dir.path(), &[], &[python.as_os_str(), script.as_os_str()]);
    assert!(ok, "{out}{err}");
    fixtures::check_env_init(&out, 2);

    // What torch.distributed.elastic gives every worker, with its meaning.
    let env = fixtures::fixture("print_env.py");
    let (ok, out, err) = launch(
        dir.path(),
        &[
            "--role",
            "trainer",
            "--max-restarts",
            "2",
            "--job-id",
            "envjob",
        ],
        &[python.as_os_str(), env.as_os_str()],
    );
    assert!(ok, "{out}{err}");
    let logs = dir.path().join("logs/envjob/attempt_0");
    for rank in 0..2 {
        let error_file = logs.join(format!("rank_{rank}.error.json"));
        for (name, value) in [
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("WORLD_SIZE", "2".into()),
            ("LOCAL_WORLD_SIZE", "2".into()),
            ("GROUP_RANK", "0".into()),
            ("GROUP_WORLD_SIZE", "1".into()),
            ("ROLE_NAME", "trainer".into()),
            ("ROLE_RANK", rank.to_string()),
            ("ROLE_WORLD_SIZE", "2".into()),
            ("TORCHELASTIC_RESTART_COUNT", "0".into()),
            ("TORCHELASTIC_MAX_RESTARTS", "2".into()),
            ("TORCHELASTIC_RUN_ID", "envjob".into()),
            ("TORCHELASTIC_USE_AGENT_STORE", "False".into()),
            ("TORCHELASTIC_ERROR_FILE", error_file.display().to_string()),
            ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1".into()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("GLOO_SOCKET_IFNAME", "lo".into()),
            ("NCCL_SOCKET_IFNAME", "lo".into()),
        ] {
            let line = format!("[rank {rank}] {name}={value}");
            assert!(out.lines().any(|l| l == line), "no {line:?} in:\n{out}");
        }
    }

    // What the user set is theirs.
    let mut cmd = cohort();
    cmd.current_dir(dir.path())
        .env("GLOO_SOCKET_IFNAME", "mine0")
        .env("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
        .args(["launch", "--log-dir", "logs", "--"])
        .args([python.as_os_str(), env.as_os_str()]);
    let (status, out, err) = run(cmd, LIMIT);
    assert!(status.success(), "{out}{err}");
    for line in [
        "[rank 0] GLOO_SOCKET_IFNAME=mine0",
        "[rank 0] TORCH_NCCL_ASYNC_ERROR_HANDLING=0",
        "[rank 0] NCCL_SOCKET_IFNAME=lo",
    ] {
        assert!(out.lines().any(|l| l == line), "no {line:?} in:\n{out}");
    }
}

/// `cohort launch` with `env` added and torchrun's flags; its stdout.
fn print_env(dir: &Path, env: &[(&str, &str)], flags: &[&str], program: &[&OsStr]) -> String {
    let python = fixtures::python().expect("checked by the caller");
    let mut cmd = cohort();
    cmd.current_dir(dir)
        .env("PYTHON_EXEC", &python)
        .envs(env.iter().copied())
        .args(["launch", "--log-dir"])
        .arg(dir.join("logs"))
        .args(flags)
        .arg("--")
        .args(program);
    let (status, out, err) = run(cmd, LIMIT);
    assert!(status.success(), "{flags:?} {env:?}:\n{out}{err}");
    out
}

#[test]
fn torchruns_flags_and_their_pet_and_cohort_variables() {
    if fixtures::python().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = fixtures::fixture("print_env.py");
    let script = [script.as_os_str()];
    let has = |out: &str, line: &str| out.lines().any(|l| l == line);
    // A .py program runs with python ($PYTHON_EXEC); PET_ gives the flag.
    let out = print_env(dir.path(), &[("PET_NPROC_PER_NODE", "2")], &[], &script);
    assert!(has(&out, "[rank 1] LOCAL_WORLD_SIZE=2"), "{out}");
    // A flag beats COHORT_, which beats PET_.
    let both = [("PET_NPROC_PER_NODE", "2"), ("COHORT_NPROC_PER_NODE", "3")];
    let out = print_env(dir.path(), &both, &[], &script);
    assert!(has(&out, "[rank 2] LOCAL_WORLD_SIZE=3"), "{out}");
    let out = print_env(dir.path(), &both, &["--nproc_per_node", "1"], &script);
    assert!(has(&out, "[rank 0] LOCAL_WORLD_SIZE=1"), "{out}");
    // torchrun's aliases; only the filtered local ranks on the terminal.
    let flags = [
        "--nproc-per-node",
        "3",
        "--local-ranks-filter",
        "1",
        "--rdzv-id",
        "aliased",
        "--standalone",
    ];
    let out = print_env(dir.path(), &[("PET_ROLE", "pet-role")], &flags, &script);
    assert!(has(&out, "[rank 1] TORCHELASTIC_RUN_ID=aliased"), "{out}");
    assert!(has(&out, "[rank 1] ROLE_NAME=pet-role"), "{out}");
    assert!(
        !out.contains("[rank 0]") && !out.contains("[rank 2]"),
        "{out}"
    );
    let log = dir.path().join("logs/aliased/attempt_0/rank_2.log");
    assert!(std::fs::read_to_string(&log).unwrap().contains("RANK=2"));
    // -m runs a module; static ranks host the coordinator on --master-port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
        .to_string();
    let mut cmd = cohort();
    cmd.current_dir(fixtures::fixture(""))
        .env("PYTHON_EXEC", fixtures::python().unwrap())
        .env("PET_MASTER_PORT", &port)
        .env("PET_NODE_RANK", "0")
        .args(["launch", "--log-dir"])
        .arg(dir.path().join("logs"))
        .args(["-m", "--", "print_env"]);
    let (status, out, err) = run(cmd, LIMIT);
    assert!(status.success(), "{out}{err}");
    assert!(has(&out, "[rank 0] ROLE_NAME=default"), "{out}");
    assert!(
        err.contains(&format!("coordinator listening on 127.0.0.1:{port}")),
        "{err}"
    );
}

/// A node that waits says so every 5 s: while it connects to the
/// coordinator, and while the other nodes haven't joined.
#[test]
fn waiting_is_visible() {
    let dir = tempfile::tempdir().unwrap();
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .to_string();
    let mut cmd = cohort();
    cmd.args(["launch", "--coordinator", &unused, "--token", "t"])
        .args(["--connect-retry-ms", "6000", "--log-dir"])
        .arg(dir.path())
        .args(["--", "true"]);
    let (status, _, err) = run(cmd, LIMIT);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "[cohort] still connecting to the coordinator at {unused} (giving up after 6s): 5s so far"
        )),
        "{err}"
    );

    let mut cmd = cohort();
    cmd.args([
        "launch",
        "--nnodes",
        "2",
        "--coordinator-bind",
        "127.0.0.1:0",
    ])
    .args(["--rendezvous-timeout", "6", "--log-dir"])
    .arg(dir.path())
    .args(["--", "true"]);
    let (status, _, err) = run(cmd, LIMIT);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "[cohort] waiting for the nodes of --nnodes 2 to join the coordinator at 127.0.0.1:"
        ) && err.contains("(giving up after 6s): 5s so far"),
        "{err}"
    );
    assert!(!err.contains('\x1b'), "colour codes in a pipe:\n{err:?}");
}

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

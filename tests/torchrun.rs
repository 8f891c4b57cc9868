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
    let port = free_port();
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

/// `cohort launch --log-dir DIR/logs FLAGS -- PROGRAM`, run to its end.
fn launch_program(
    dir: &Path,
    env: &[(&str, &OsStr)],
    flags: &[&str],
    program: &[&OsStr],
) -> (std::process::ExitStatus, String, String) {
    let mut cmd = cohort();
    cmd.current_dir(dir)
        .envs(env.iter().copied())
        .args(["launch"])
        .args(FAST)
        .arg("--log-dir")
        .arg(dir.join("logs"))
        .args(flags)
        .arg("--")
        .args(program);
    run(cmd, LIMIT)
}

/// `launch_util::script`, executable.
fn executable(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = launch_util::script(dir, name, body);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A `.py` program runs as `$PYTHON_EXEC -u PROGRAM` (torchrun's `-u`), a
/// module as `$PYTHON_EXEC -u -m MODULE`, and with `--no-python` the
/// program runs as it is.
#[test]
fn a_py_program_runs_with_python_u_unless_no_python() {
    let dir = tempfile::tempdir().unwrap();
    let python = executable(dir.path(), "python", "echo \"python $*\"\n");
    let program = executable(dir.path(), "prog.py", "echo \"ran as itself: $*\"\n");
    let env = [("PYTHON_EXEC", python.as_os_str())];
    let has = |out: &str, line: &str| out.lines().any(|l| l == line);

    let args = [program.as_os_str(), OsStr::new("a")];
    let (status, out, err) = launch_program(dir.path(), &env, &[], &args);
    assert!(status.success(), "{out}{err}");
    let line = format!("[rank 0] python -u {} a", program.display());
    assert!(has(&out, &line), "no {line:?} in:\n{out}");

    let (status, out, err) = launch_program(dir.path(), &env, &["--no-python"], &args);
    assert!(status.success(), "{out}{err}");
    assert!(has(&out, "[rank 0] ran as itself: a"), "{out}");
    assert!(!out.contains("python"), "{out}");

    let args = [OsStr::new("some.module"), OsStr::new("a")];
    let (status, out, err) = launch_program(dir.path(), &env, &["-m"], &args);
    assert!(status.success(), "{out}{err}");
    assert!(has(&out, "[rank 0] python -u -m some.module a"), "{out}");
}

/// A Python worker's line reaches the terminal while the worker runs, not
/// when it exits (its stdout is a pipe: without `-u` Python holds it back).
#[test]
fn a_python_workers_output_is_not_held_back() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let python = if python.exists() {
        python.into_os_string()
    } else {
        "python3".into()
    };
    let usable = std::process::Command::new(&python)
        .args(["-c", "pass"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !usable {
        println!("skipped: no python ({})", python.to_string_lossy());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release");
    let program = dir.path().join("blocks.py");
    std::fs::write(
        &program,
        "import os, sys, time\n\
         print('waiting for', sys.argv[1])\n\
         while not os.path.exists(sys.argv[1]):\n    time.sleep(0.05)\n\
         print('released')\n",
    )
    .unwrap();
    let mut cmd = cohort();
    cmd.current_dir(dir.path())
        .env("PYTHON_EXEC", &python)
        .env_remove("PYTHONUNBUFFERED")
        .args(["launch"])
        .args(FAST)
        .arg("--log-dir")
        .arg(dir.path().join("logs"))
        .arg("--")
        .arg(&program)
        .arg(&release);
    let mut launcher = launch_util::Proc::spawn(cmd);
    // The worker blocks until the file exists: the line must come first.
    launcher.wait_line("[rank 0] waiting for", false, Duration::from_secs(30));
    std::fs::write(&release, b"").unwrap();
    let status = launcher.wait(LIMIT);
    assert!(status.success(), "{}{}", launcher.out, launcher.err);
    assert!(
        launcher.out.contains("[rank 0] released"),
        "{}",
        launcher.out
    );
}

/// `sh -c 'echo ...'`: every worker prints its place in the job.
const PLACE: [&str; 3] = [
    "sh",
    "-c",
    "echo \"place rank=$RANK world=$WORLD_SIZE local=$LOCAL_WORLD_SIZE node=$GROUP_RANK run=$TORCHELASTIC_RUN_ID\"",
];

fn place() -> Vec<&'static OsStr> {
    PLACE.iter().map(OsStr::new).collect()
}

/// The local ranks that printed their place, each with LOCAL_WORLD_SIZE = `n`.
fn workers_started(out: &str, n: u32) -> u32 {
    let started = out
        .lines()
        .filter(|l| l.contains("] place rank="))
        .collect::<Vec<_>>();
    for rank in 0..n {
        let line = format!("[rank {rank}] place rank={rank} world={n} local={n} ");
        assert!(
            started.iter().any(|l| l.starts_with(&line)),
            "no {line:?} in:\n{out}"
        );
    }
    u32::try_from(started.len()).unwrap()
}

/// torchrun's names for a worker count: `cpu` is one per CPU, `auto` one
/// per GPU if there are any, else one per CPU; `gpu` without a GPU is a
/// usage error before any worker starts.
#[test]
fn nproc_per_node_cpu_auto_and_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = u32::try_from(cpus).unwrap();
    let gpus =
        cohort_collectives::nccl::probe::cuda_driver().map(|d| u32::try_from(d.devices).unwrap());
    if cpus == 1 {
        println!("note: one CPU here: `cpu` can't be told from the default of 1 worker");
    }
    let (status, out, err) =
        launch_program(dir.path(), &[], &["--nproc-per-node", "cpu"], &place());
    assert!(status.success(), "{out}{err}");
    assert_eq!(workers_started(&out, cpus), cpus, "{out}");

    let auto = *gpus.as_ref().unwrap_or(&cpus);
    let (status, out, err) =
        launch_program(dir.path(), &[], &["--nproc_per_node", "auto"], &place());
    assert!(status.success(), "{out}{err}");
    assert_eq!(workers_started(&out, auto), auto, "{out}");

    let (status, out, err) =
        launch_program(dir.path(), &[], &["--nproc-per-node", "gpu"], &place());
    match gpus {
        Ok(n) => {
            assert!(status.success(), "{out}{err}");
            assert_eq!(workers_started(&out, n), n, "{out}");
        }
        Err(_) => {
            assert_eq!(status.code(), Some(2), "{out}{err}");
            assert!(
                err.contains("--nproc-per-node gpu, but this host has no usable GPU:")
                    && err.contains("give a number or cpu"),
                "{err}"
            );
            assert!(!out.contains("place rank="), "a worker started:\n{out}");
        }
    }
}

/// `--standalone` is one node: with `--nnodes 2` it is refused (torchrun
/// would wait for a second node that can't find its random local port).
#[test]
fn standalone_with_two_nodes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--standalone", "--nnodes", "2"];
    assert_refused(
        dir.path(),
        &flags,
        "--standalone runs one node, but --nnodes is 2",
    );
    // Alone it runs (the default, one node).
    let (status, out, err) = launch_program(dir.path(), &[], &["--standalone"], &place());
    assert!(status.success(), "{out}{err}");
    assert_eq!(workers_started(&out, 1), 1);
}

/// `cohort launch FLAGS` of the placement program exits 2 with `message`
/// on stderr, before any worker starts.
fn assert_refused(dir: &Path, flags: &[&str], message: &str) {
    let (status, out, err) = launch_program(dir, &[], flags, &place());
    assert_eq!(status.code(), Some(2), "{out}{err}");
    assert!(err.contains(message), "{err}");
    assert!(!out.contains("place rank="), "a worker started:\n{out}");
}

/// A port nothing listens on (bound, then let go).
fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
        .to_string()
}

/// `--master-addr` without `--node-rank`: one node hosts the coordinator at
/// MASTER_ADDR:MASTER_PORT; several are refused (which one is node 0?).
#[test]
fn master_addr_without_node_rank() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let flags = ["--master-addr", "127.0.0.1", "--master-port", &port];
    let (status, out, err) = launch_program(dir.path(), &[], &flags, &place());
    assert!(status.success(), "{out}{err}");
    assert!(
        err.contains(&format!("coordinator listening on 127.0.0.1:{port}")),
        "{err}"
    );
    assert_eq!(workers_started(&out, 1), 1);

    let flags = [&flags[..], &["--nnodes", "2"]].concat();
    assert_refused(
        dir.path(),
        &flags,
        "--master-addr/--master-port need --node-rank on every node",
    );
}

/// Two `cohort launch` nodes of 1 worker on this host: node 0 started with
/// `first` (it must print `listening` and the port after it), node 1 with
/// `join(port)` once it does. Both must succeed; their stdouts.
fn two_nodes(
    dir: &Path,
    first: &[&str],
    listening: &str,
    join: impl FnOnce(&str) -> Vec<String>,
) -> (String, String) {
    let node = |logs: &str, flags: &[String]| {
        let mut cmd = cohort();
        cmd.current_dir(dir)
            .args(["launch"])
            .args(FAST)
            .args(["--nnodes", "2", "--nproc-per-node", "1", "--token", "t"])
            .arg("--log-dir")
            .arg(dir.join(logs))
            .args(flags)
            .arg("--")
            .args(PLACE);
        launch_util::Proc::spawn(cmd)
    };
    let first: Vec<String> = first.iter().map(|s| (*s).to_owned()).collect();
    let mut node0 = node("logs0", &first);
    let line = node0.wait_line(listening, true, Duration::from_secs(30));
    let port = line
        .rsplit(':')
        .next()
        .and_then(|p| p.split_whitespace().next())
        .unwrap()
        .to_owned();
    let mut node1 = node("logs1", &join(&port));
    let (s0, s1) = (node0.wait(LIMIT), node1.wait(LIMIT));
    let report = format!(
        "node 0 ({s0}):\n{}{}\nnode 1 ({s1}):\n{}{}",
        node0.out, node0.err, node1.out, node1.err
    );
    assert!(s0.success() && s1.success(), "{report}");
    (node0.out.clone(), node1.out.clone())
}

/// torchrun's static ranks on 127.0.0.1: node 0 hosts the coordinator on
/// --master-port, node 1 joins it at --master-addr:--master-port.
#[test]
fn node_1_joins_node_0_at_master_addr_and_port() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let first = [
        "--node-rank",
        "0",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        &port,
    ];
    let (out0, out1) = two_nodes(
        dir.path(),
        &first,
        &format!("coordinator listening on 0.0.0.0:{port}"),
        |port| {
            [
                "--node_rank",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
            ]
            .map(str::to_owned)
            .to_vec()
        },
    );
    assert!(
        out0.contains("[rank 0] place rank=0 world=2 local=1 node=0 "),
        "{out0}"
    );
    assert!(
        out1.contains("[rank 1] place rank=1 world=2 local=1 node=1 "),
        "{out1}"
    );
}

/// `--rdzv-endpoint` (and `--rdzv_endpoint`) joins a coordinator as
/// `--coordinator` does; `--rdzv-id` is the job id.
#[test]
fn rdzv_endpoint_and_rdzv_id_are_aliases() {
    let dir = tempfile::tempdir().unwrap();
    let first = ["--coordinator-bind", "127.0.0.1:0", "--rdzv-id", "rdzvjob"];
    for endpoint in ["--rdzv-endpoint", "--rdzv_endpoint"] {
        let (out0, out1) = two_nodes(
            dir.path(),
            &first,
            "coordinator listening on 127.0.0.1:",
            |port| {
                [
                    endpoint,
                    &format!("127.0.0.1:{port}"),
                    "--rdzv_id",
                    "rdzvjob",
                ]
                .map(str::to_owned)
                .to_vec()
            },
        );
        let all = format!("{out0}{out1}");
        for rank in 0..2 {
            let line =
                format!("[rank {rank}] place rank={rank} world=2 local=1 node={rank} run=rdzvjob");
            assert!(
                all.lines().any(|l| l == line),
                "{endpoint}: no {line:?} in:\n{all}"
            );
        }
    }
}

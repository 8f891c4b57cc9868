//! `cohort launch` on separate hosts: network namespaces on a bridge
//! (tests/netns), each host with its own address, a launcher on each, the
//! first one hosting the coordinator. Skipped (with a message) only where
//! this process can't make network namespaces.

mod fixtures;
mod launch_util;
mod netns;
mod worker_bin;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use launch_util::{FAST, Proc, cohort, run};
use netns::{Host, Net};

const LIMIT: Duration = Duration::from_secs(180);

/// `cohort launch` on `host` (`launch` given the flags to add), hosting the
/// coordinator on its address, any free port; returns the launcher and the
/// coordinator's port.
fn first_node(host: &Host, launch: impl FnOnce(&[String]) -> Command) -> (Proc, u16) {
    let bind = [
        "--coordinator-bind".to_owned(),
        format!("{}:0", host.addr()),
    ];
    let mut p = Proc::spawn(host.inside(launch(&bind)));
    let line = p.wait_line("coordinator listening on", true, Duration::from_secs(30));
    let port = line
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    (p, port)
}

/// `cohort launch` with the fast clock, `flags`, and the quickstart config
/// cut to `steps` steps with one checkpoint at the end, into `ckpt`.
fn quickstart(dir: &Path, ckpt: &str, steps: u32, flags: &[&str]) -> Command {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = cohort();
    cmd.current_dir(dir)
        .arg("launch")
        .args(FAST)
        .args(flags)
        .arg(repo.join("configs/quickstart.toml"))
        .args([
            "--set",
            &format!("data.path={}", repo.join("configs/data/tiny.txt").display()),
        ])
        .args(["--set", &format!("train.max_steps={steps}")])
        .args(["--set", "train.eval_every=0"])
        .args(["--set", &format!("checkpoint.every={steps}")])
        .args(["--set", &format!("checkpoint.dir={ckpt}")])
        // The flat ring on any topology, so both runs add in the same
        // order: on 2 hosts x 2 `auto` would take the node-aware
        // all-reduce, which adds within a host first (equal to rounding).
        .args(["--set", "parallel.algorithm=ring"]);
    cmd
}

/// `cohort launch FLAGS --log-dir LOG_DIR EXTRA -- PROGRAM`.
fn run_program(flags: &[&str], log_dir: &Path, extra: &[String], program: &[&OsStr]) -> Command {
    let mut cmd = cohort();
    cmd.arg("launch")
        .args(flags)
        .arg("--log-dir")
        .arg(log_dir)
        .args(extra)
        .arg("--")
        .args(program);
    cmd
}

/// The bytes `cohort ckpt export` writes for the latest checkpoint in `ckpt`.
fn export(dir: &Path, ckpt: &str) -> Vec<u8> {
    let out = dir.join(format!("{ckpt}.safetensors"));
    let mut cmd = cohort();
    cmd.args(["ckpt", "export"])
        .arg(dir.join(ckpt))
        .arg("--out")
        .arg(&out);
    let (status, stdout, stderr) = run(cmd, Duration::from_secs(60));
    assert!(
        status.success(),
        "export of {ckpt} failed:\n{stdout}{stderr}"
    );
    std::fs::read(&out).unwrap()
}

#[test]
fn quickstart_on_two_hosts_matches_one_host_byte_for_byte() {
    let Some(net) = Net::new(2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let steps = 6;
    worker_bin::ensure();

    // 1 host x 4 workers.
    let one = quickstart(
        dir.path(),
        "one",
        steps,
        &["--nproc-per-node", "4", "--log-dir", "logs-one"],
    );
    let (status, out, err) = run(one, LIMIT);
    assert!(status.success(), "1 host x 4 failed:\n{out}{err}");

    // 2 hosts x 2 workers: host0 runs the coordinator, host1 finds it by name.
    let flags = [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "2",
        "--token",
        "multihost",
    ];
    let (mut host0, port) = first_node(net.host(0), |bind| {
        let mut launch = quickstart(dir.path(), "two", steps, &flags);
        launch.args(["--log-dir", "logs-host0"]).args(bind);
        launch
    });
    let mut launch1 = quickstart(dir.path(), "two", steps, &flags);
    launch1
        .args(["--log-dir", "logs-host1"])
        .args(["--coordinator", &format!("{}:{port}", net.host(0).name())]);
    let mut host1 = Proc::spawn(net.host(1).inside(launch1));
    let (s0, s1) = (host0.wait(LIMIT), host1.wait(LIMIT));
    assert!(
        s0.success() && s1.success(),
        "host0 ({s0}):\n{}{}\nhost1 ({s1}):\n{}{}",
        host0.out,
        host0.err,
        host1.out,
        host1.err
    );
    // (Which node's join each launcher prints depends on when its event
    // stream started: count the nodes instead.)
    assert!(
        host0
            .err
            .contains("generation 0 formed: 2 node(s), 4 ranks"),
        "{}",
        host0.err
    );
    assert!(
        host0
            .err
            .contains("job succeeded: all 4 ranks of generation 0 exited 0"),
        "{}",
        host0.err
    );

    let (one, two) = (export(dir.path(), "one"), export(dir.path(), "two"));
    assert!(
        one == two,
        "the weights of 2 hosts x 2 workers differ from 1 host x 4 after {steps} steps"
    );
}

#[test]
fn a_host_whose_link_goes_down_is_named_lost_and_an_elastic_job_goes_on() {
    host1_fails_and_an_elastic_job_goes_on(Failure::LinkDown);
}

#[test]
fn a_host_whose_launcher_is_killed_is_named_lost_and_an_elastic_job_goes_on() {
    host1_fails_and_an_elastic_job_goes_on(Failure::LauncherKilled);
}

/// What happens to host1 mid-job.
#[derive(Clone, Copy, PartialEq)]
enum Failure {
    LinkDown,
    LauncherKilled,
}

fn host1_fails_and_an_elastic_job_goes_on(how: Failure) {
    let Some(net) = Net::new(2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let timing = [
        launch_util::FAST_LOSS,
        // Long enough for host1 to join generation 0: it forms at once
        // when both nodes are in.
        &["--last-call-ms", "5000"],
    ]
    .concat();
    // Generation 0 waits until told (a file per host); generation 1 ends at once.
    let body = format!(
        "touch {d}/started_on_$(hostname)\n\
         if [ \"$COHORT_GENERATION\" = 0 ]; then sleep 60; fi\n\
         echo \"rank $RANK of $WORLD_SIZE in generation $COHORT_GENERATION\"\n",
        d = dir.path().display()
    );
    let script = launch_util::script(dir.path(), "elastic.sh", &body);
    let flags = [
        &timing[..],
        &["--nnodes", "1:2", "--token", "t", "--max-restarts", "1"],
        // host1, cut off, gives up on the coordinator after this.
        &["--coordinator-grace", "3"],
    ]
    .concat();
    let program = ["sh".as_ref(), script.as_os_str()];
    let log_dir = dir.path().join("logs");
    let launch = |extra: &[String]| run_program(&flags, &log_dir, extra, &program);
    let (mut host0, port) = first_node(net.host(0), launch);
    let coordinator = format!("host0:{port}");
    let mut host1 = Proc::spawn(
        net.host(1)
            .inside(launch(&["--coordinator".into(), coordinator])),
    );
    let started = |h: &str| dir.path().join(format!("started_on_{h}")).exists();
    assert!(
        launch_util::eventually(Duration::from_secs(60), || started("host0")
            && started("host1")),
        "generation 0 did not start on both hosts:\n{}{}\n{}{}",
        host0.out,
        host0.err,
        host1.out,
        host1.err
    );
    match how {
        Failure::LinkDown => net.host(1).link_down(),
        // SAFETY: kill has no memory-safety preconditions.
        Failure::LauncherKilled => unsafe {
            libc::kill(host1.pid(), libc::SIGKILL);
        },
    }
    let status = host0.wait(LIMIT);
    assert!(status.success(), "host0:\n{}{}", host0.out, host0.err);
    assert!(
        host0
            .err
            .contains(&format!("({}) lost: no heartbeat for", net.host(1).addr())),
        "host1 was not named lost by its address:\n{}",
        host0.err
    );
    assert!(
        host0.out.contains("rank 0 of 1 in generation 1"),
        "{}",
        host0.out
    );
    // host1 can't reach anyone: it gives up on its own (or was killed).
    let status = host1.wait(LIMIT);
    if how == Failure::LauncherKilled {
        return;
    }
    assert!(
        !status.success(),
        "host1 without a link succeeded:\n{}{}",
        host1.out,
        host1.err
    );
}

/// The harness itself: hosts reach each other by name and address, not
/// after their link went down; a rate limit holds; everything is removed
/// on drop, also when the test panics.
#[test]
fn netns_hosts_connect_by_name_go_down_are_limited_and_are_removed() {
    let Some(net) = Net::new(2) else { return };
    let (h0, h1) = (net.host(0), net.host(1));
    assert_eq!(h0.addr().to_string(), "198.18.0.1");
    assert_eq!(h1.addr().to_string(), "198.18.0.2");

    // host1 listens; host0 sends a payload to it by name and is told how many
    // bytes arrived, and who it was.
    let sink = r#"
import socket, sys
s = socket.socket(); s.bind(("0.0.0.0", 0)); s.listen()
print(s.getsockname()[1], flush=True)
while True:
    c, peer = s.accept(); n = 0
    while (d := c.recv(65536)):
        n += len(d)
    print(socket.gethostname(), n, peer[0], flush=True)
"#;
    let mut listener = Proc::spawn(h1.command("python3", ["-c", sink]));
    let port: u16 = listener
        .wait_line("", false, Duration::from_secs(30))
        .trim()
        .parse()
        .unwrap();
    let send = |bytes: usize| {
        let code = format!(
            "import socket\ns = socket.create_connection(('host1', {port}), timeout=5)\n\
             s.sendall(b'x' * {bytes}); s.close()"
        );
        let mut cmd = h0.command("python3", ["-c", &code]);
        cmd.stderr(std::process::Stdio::piped());
        cmd.output().unwrap()
    };
    let out = send(1000);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = listener.wait_line(" 1000 ", false, Duration::from_secs(30));
    assert_eq!(line, "host1 1000 198.18.0.1");

    // tbf at 2 Mbit/s with a 256 KiB bucket: 768 KiB take at least 2 s
    // (a lower bound, which a loaded machine only makes longer).
    h0.limit("2mbit");
    let start = Instant::now();
    assert!(send(768 * 1024).status.success());
    listener.wait_line(&format!(" {} ", 768 * 1024), false, Duration::from_secs(60));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1900),
        "768 KiB at 2 Mbit/s took only {took:?}"
    );
    h0.unlimit();

    h0.link_down();
    let out = send(10);
    assert!(
        !out.status.success(),
        "host0 reached host1 with its link down"
    );
    h0.link_up();
    assert!(send(10).status.success(), "host0's link did not come back");

    // The loopback of a host is its own: host1's port is not on host0's.
    let out = h0
        .command(
            "python3",
            [
                "-c",
                &format!(
                    "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
                ),
            ],
        )
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "host1's port answered on host0's loopback"
    );

    let names: Vec<String> = net
        .hosts()
        .iter()
        .map(|h| h.namespace().to_owned())
        .collect();
    drop(listener);
    drop(net);
    for ns in &names {
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "{ns} is left behind"
        );
    }

    // A panicking test leaves nothing behind either.
    let made = std::thread::spawn(|| {
        let net = Net::new(1).expect("namespaces worked a moment ago");
        let ns = net.host(0).namespace().to_owned();
        std::panic::panic_any(ns);
    })
    .join()
    .expect_err("the thread panics");
    let ns = made.downcast_ref::<String>().unwrap();
    assert!(
        !Path::new("/run/netns").join(ns).exists(),
        "{ns} is left behind after a panic"
    );
}

/// `PROGRAM` under `cohort launch FLAGS` on 2 hosts x 1 worker (each host's
/// name on loopback in its own hosts file), host0 hosting the coordinator
/// as node 0: both succeeded, their stdout (host0's first), each one's stderr.
fn on_two_hosts(flags: &[&str], program: &[&OsStr]) -> Option<(bool, String, [String; 2])> {
    let net = Net::with_loopback_names(2)?;
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        FAST,
        &[
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--token",
            "torchrun",
        ],
        flags,
    ]
    .concat();
    let launch = |extra: &[String]| {
        let mut cmd = run_program(&flags, dir.path(), extra, program);
        cmd.current_dir(dir.path());
        cmd
    };
    let rank0 = ["--node-rank".to_owned(), "0".to_owned()];
    let (mut host0, port) = first_node(net.host(0), |bind| launch(&[bind, &rank0].concat()));
    let join = [
        "--coordinator".to_owned(),
        format!("host0:{port}"),
        "--node-rank".to_owned(),
        "1".to_owned(),
    ];
    let mut host1 = Proc::spawn(net.host(1).inside(launch(&join)));
    let (s0, s1) = (host0.wait(LIMIT), host1.wait(LIMIT));
    Some((
        s0.success() && s1.success(),
        format!("{}{}", host0.out, host1.out),
        [host0.err.clone(), host1.err.clone()],
    ))
}

/// A PyTorch DDP program with the default init (env://, as under torchrun)
/// on 2 hosts x 1 worker whose host names resolve to a loopback address:
/// Gloo uses the interface cohort names (GLOO_SOCKET_IFNAME), not the name.
#[test]
fn pytorch_ddp_with_the_default_init_runs_across_two_hosts() {
    let Some(python) = fixtures::python() else {
        return;
    };
    let script = fixtures::fixture("env_init.py");
    let Some((ok, out, err)) = on_two_hosts(&[], &[python.as_os_str(), script.as_os_str()]) else {
        return;
    };
    let err = err.concat();
    assert!(ok, "{out}{err}");
    fixtures::check_env_init(&out, 2);
    for (rank, host) in [(0, "host0"), (1, "host1")] {
        let line = format!(
            "[rank {rank}] env init ok: rank {rank} of 2 (local rank 0 of 1, node {rank}), host {host}, "
        );
        assert!(out.contains(&line), "no {line:?}:\n{out}{err}");
    }
}

#[test]
fn a_snapshot_is_resumed_on_two_hosts() {
    let Some(python) = fixtures::python() else {
        return;
    };
    let script = fixtures::fixture("elastic_snapshot.py");
    let snapshot = tempfile::tempdir().unwrap();
    let snapshot = snapshot.path().join("snapshot.pt");
    let program = [python.as_os_str(), script.as_os_str(), snapshot.as_os_str()];
    let Some((ok, out, err)) = on_two_hosts(&["--max-restarts", "1"], &program) else {
        return;
    };
    let err = err.concat();
    assert!(ok, "{out}{err}");
    fixtures::check_snapshot_resume(&out, &err);
}

#[test]
fn the_late_raiser_on_the_other_host_is_named_with_its_value_error() {
    let Some(python) = fixtures::python() else {
        return;
    };
    let script = fixtures::fixture("record_late_raise.py");
    let program = [python.as_os_str(), script.as_os_str()];
    let Some((ok, out, err)) = on_two_hosts(&["--max-restarts", "0"], &program) else {
        return;
    };
    assert!(!ok, "{out}{}", err.concat());
    // Both launchers name rank 1 on host1, although rank 0 on host0 exited first.
    for err in &err {
        fixtures::check_late_raiser_named(err);
        assert!(
            err.contains("[cohort] root cause: rank 1 on node host1-"),
            "{err}"
        );
    }
}

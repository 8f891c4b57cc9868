//! `cohort coordinator` with several `cohort launch` nodes: rank layout,
//! the job token, garbage on the port, and a PyTorch gloo job.

mod launch_util;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use launch_util::{FAST, Proc, alive, cohort, eventually, run};

const LIMIT: Duration = Duration::from_secs(60);

/// Starts `cohort coordinator` on a free port; returns it and its address.
fn coordinator(extra: &[&str]) -> (Proc, String) {
    coordinator_timed(FAST, extra)
}

/// Heartbeats often enough to find a node lost in 1.5 s.
const LOSS: &[&str] = launch_util::FAST_LOSS;

/// [`coordinator`] with the clock flags `timing`.
fn coordinator_timed(timing: &[&str], extra: &[&str]) -> (Proc, String) {
    launch_util::coordinator("127.0.0.1:0", timing, extra)
}

fn node(
    addr: &str,
    token: &str,
    log_dir: &Path,
    extra: &[&str],
    program: &[&str],
) -> std::process::Command {
    let mut cmd = cohort();
    cmd.arg("launch")
        .args(FAST)
        .args(["--coordinator", addr, "--token", token])
        .arg("--log-dir")
        .arg(log_dir)
        .args(extra)
        .arg("--")
        .args(program);
    cmd
}

#[test]
fn two_nodes_get_every_rank_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr) = coordinator(&["--nnodes", "2", "--token", "s3cret"]);
    let program = [
        "sh",
        "-c",
        "echo \"layout rank=$RANK world=$WORLD_SIZE node=$GROUP_RANK local=$LOCAL_RANK\"",
    ];
    let extra = ["--nnodes", "2", "--nproc-per-node", "2"];
    let mut a = Proc::spawn(node(&addr, "s3cret", dir.path(), &extra, &program));
    let mut b = Proc::spawn(node(&addr, "s3cret", dir.path(), &extra, &program));
    launch_util::both_succeed(&mut a, &mut b, LIMIT);
    let mut ranks: Vec<u32> = Vec::new();
    for out in [&a.out, &b.out] {
        for line in out.lines().filter(|l| l.contains("layout ")) {
            assert!(line.contains("world=4"), "{line}");
            let (rank, node, local) = (
                field(line, "rank="),
                field(line, "node="),
                field(line, "local="),
            );
            assert_eq!(rank, node * 2 + local, "{line}");
            ranks.push(rank);
        }
    }
    ranks.sort_unstable();
    assert_eq!(ranks, vec![0, 1, 2, 3], "a:\n{}\nb:\n{}", a.out, b.out);
    let status = coord.wait(LIMIT);
    assert!(status.success(), "{}{}", coord.out, coord.err);
    assert!(
        coord
            .out
            .contains("job succeeded: all 4 ranks of generation 0 exited 0"),
        "{}",
        coord.out
    );
}

#[test]
fn the_first_node_can_host_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let program = ["sh", "-c", "echo \"rank $RANK of $WORLD_SIZE\""];
    let mut first = cohort();
    first
        .arg("launch")
        .args(FAST)
        .args(["--coordinator-bind", "127.0.0.1:0", "--nnodes", "2"])
        .arg("--log-dir")
        .arg(dir.path())
        .arg("--")
        .args(program);
    let mut first = Proc::spawn(first);
    let line = first.wait_line("coordinator listening on", true, Duration::from_secs(30));
    let addr = line.rsplit(' ').next().unwrap().to_owned();
    let line = first.wait_line("job token: ", true, Duration::from_secs(30));
    let token = line
        .split("job token: ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();
    let (status, out, err) = run(
        node(&addr, &token, dir.path(), &["--nnodes", "2"], &program),
        LIMIT,
    );
    assert!(status.success(), "{out}{err}");
    assert!(first.wait(LIMIT).success(), "{}{}", first.out, first.err);
    let mut lines: Vec<&str> = first.out.lines().chain(out.lines()).collect();
    lines.sort_unstable();
    assert_eq!(lines, ["[rank 0] rank 0 of 2", "[rank 1] rank 1 of 2"]);
}

#[test]
fn a_silent_node_is_dropped_and_an_elastic_job_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let timing = [LOSS, &["--last-call-ms", "300"]].concat();
    let (_coord, addr) = coordinator_timed(&timing, &["--nnodes", "1:2", "--token", "t"]);
    // Generation 0 waits (each worker records its pid under its launcher's
    // pid); generation 1 finishes at once.
    let body = format!(
        "echo $$ > {d}/worker_of_$PPID\n\
         if [ \"$COHORT_GENERATION\" = 0 ]; then sleep 60; fi\n\
         echo \"rank $RANK of $WORLD_SIZE in generation $COHORT_GENERATION\"\n",
        d = dir.path().display()
    );
    let script = launch_util::script(dir.path(), "elastic.sh", &body);
    let spawn_node = || {
        let mut cmd = cohort();
        cmd.arg("launch")
            .args(&timing)
            .args(["--coordinator", &addr, "--token", "t", "--nnodes", "1:2"])
            // The dropped node wakes after the job is over and its
            // coordinator gone: it gives up on it after the grace.
            .args(["--coordinator-grace", "2"])
            .arg("--log-dir")
            .arg(dir.path().join("logs"))
            .arg("--")
            .arg("sh")
            .arg(&script);
        Proc::spawn(cmd)
    };
    let mut a = spawn_node();
    let mut b = spawn_node();
    let worker_of = |p: &Proc| dir.path().join(format!("worker_of_{}", p.pid()));
    assert!(
        eventually(Duration::from_secs(30), || worker_of(&a).exists()
            && worker_of(&b).exists()),
        "generation 0 did not start"
    );
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(b.pid(), libc::SIGSTOP);
    }
    let status = a.wait(LIMIT);
    // SAFETY: as above.
    unsafe {
        libc::kill(b.pid(), libc::SIGCONT);
    }
    assert!(status.success(), "a:\n{}{}", a.out, a.err);
    assert!(
        a.err.contains("(127.0.0.1) lost: no heartbeat for"),
        "{}",
        a.err
    );
    assert!(a.err.contains("the last at "), "{}", a.err);
    assert!(
        a.err.contains("generation 1 formed: 1 node(s), 1 ranks"),
        "{}",
        a.err
    );
    assert!(a.out.contains("rank 0 of 1 in generation 1"), "{}", a.out);
    b.wait(LIMIT);
    let b_worker: i32 = std::fs::read_to_string(worker_of(&b))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !alive(b_worker)),
        "the dropped node's worker is still running:\n{}{}",
        b.out,
        b.err
    );
}

/// When a node dies, the collectives of the nodes left break at once, well
/// before its heartbeats are missed: the job names the lost node, not the
/// survivor's rank that exited first.
#[test]
fn a_dead_node_is_named_rather_than_the_survivor_whose_peer_went_away() {
    let dir = tempfile::tempdir().unwrap();
    let timing = LOSS;
    let (coord, addr) = coordinator_timed(timing, &["--nnodes", "2", "--token", "t"]);
    // Rank 1 waits; rank 0 stands for a collective with it: it fails as
    // soon as rank 1's process is gone.
    let body = format!(
        "if [ \"$RANK\" = 1 ]; then echo $$ > {d}/rank1.tmp; mv {d}/rank1.tmp {d}/rank1; exec sleep 60; fi\n\
         while [ ! -f {d}/rank1 ]; do sleep 0.05; done\n\
         peer=$(cat {d}/rank1)\n\
         alive() {{ s=$(cut -d' ' -f3 /proc/$peer/stat 2>/dev/null); [ -n \"$s\" ] && [ \"$s\" != Z ]; }}\n\
         while alive; do sleep 0.05; done\n\
         echo 'connection reset by peer' >&2; exit 1\n",
        d = dir.path().display()
    );
    let script = launch_util::script(dir.path(), "peer.sh", &body);
    let spawn_node = || {
        let mut cmd = cohort();
        cmd.arg("launch")
            .args(timing)
            .args(["--coordinator", &addr, "--token", "t", "--nnodes", "2"])
            .args(["--max-restarts", "0"])
            .arg("--log-dir")
            .arg(dir.path().join("logs"))
            .arg("--")
            .arg("sh")
            .arg(&script);
        Proc::spawn(cmd)
    };
    let mut a = spawn_node();
    let mut b = spawn_node();
    let rank1 = dir.path().join("rank1");
    assert!(
        eventually(Duration::from_secs(30), || rank1.exists()),
        "the job did not start:\n{}{}",
        a.err,
        b.err
    );
    let rank1_pid: i32 = std::fs::read_to_string(&rank1)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Kill the launcher of the node running rank 1 (its worker goes with it).
    let a_has_rank1 = std::fs::read_to_string(format!("/proc/{rank1_pid}/status"))
        .is_ok_and(|s| s.contains(&format!("PPid:\t{}\n", a.pid())));
    let (survivor, dead) = if a_has_rank1 {
        (&mut b, &mut a)
    } else {
        (&mut a, &mut b)
    };
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(dead.pid(), libc::SIGKILL);
    }
    let status = survivor.wait(LIMIT);
    assert!(!status.success(), "{}", survivor.err);
    let summary = survivor
        .err
        .lines()
        .find(|l| l.contains("job failed: "))
        .unwrap_or_else(|| panic!("no summary:\n{}", survivor.err))
        .to_owned();
    assert!(
        summary.contains("job failed: node ")
            && summary.contains("(127.0.0.1) lost: no heartbeat for")
            && summary.contains(" UTC (then rank 0 on node "),
        "{}",
        survivor.err
    );
    dead.wait(LIMIT);
    drop(coord);
}

#[test]
fn wrong_token_and_garbage_are_refused_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr) = coordinator(&["--nnodes", "1", "--token", "right"]);

    // Garbage bytes: the connection is dropped, the coordinator goes on.
    let mut garbage = std::net::TcpStream::connect(&addr).unwrap();
    garbage
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    garbage
        .write_all(b"GET / HTTP/1.0\r\n\r\n\x00\xff\xfe garbage \x13\x37")
        .unwrap();
    let mut sink = Vec::new();
    // Closed (EOF) or reset, but not left open until the read timeout.
    let closed = garbage.read_to_end(&mut sink);
    assert!(
        closed.is_ok()
            || closed
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the coordinator kept a garbage connection open: {closed:?}"
    );

    let (status, _, err) = run(node(&addr, "wrong", dir.path(), &[], &["true"]), LIMIT);
    // A usage error: retrying with the same token can't help.
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("the coordinator at {addr} refused our job token")),
        "{err}"
    );

    let (status, out, err) = run(
        node(
            &addr,
            "right",
            dir.path(),
            &[],
            &["sh", "-c", "echo served"],
        ),
        LIMIT,
    );
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("[rank 0] served"), "{out}");
    assert!(coord.wait(LIMIT).success(), "{}{}", coord.out, coord.err);
    assert!(
        coord.err.contains("with a wrong job token"),
        "{}",
        coord.err
    );
}

#[test]
fn pytorch_gloo_all_reduce_runs_under_launch() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let probe = std::process::Command::new(&python)
        .args(["-c", "import torch.distributed"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        println!("skipped: torch can't be imported with {}", python.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/launch_gloo_allreduce.py");
    let mut cmd = cohort();
    cmd.arg("launch")
        .args(FAST)
        .args(["--nproc-per-node", "2"])
        .arg("--log-dir")
        .arg(dir.path())
        .arg("--")
        .arg(&python)
        .arg(&script);
    let (status, out, err) = run(cmd, Duration::from_secs(120));
    assert!(status.success(), "stdout:\n{out}\nstderr:\n{err}");
    for rank in 0..2 {
        assert!(
            out.contains(&format!(
                "[rank {rank}] gloo all_reduce ok: rank {rank} of 2, sum 3.0"
            )),
            "{out}"
        );
    }
}

/// The number after `key` in a `rank=R node=N local=L` line.
fn field(line: &str, key: &str) -> u32 {
    let rest = line
        .split(key)
        .nth(1)
        .unwrap_or_else(|| panic!("no {key} in {line:?}"));
    rest.split(' ').next().unwrap().parse().unwrap()
}

//! Failures across real processes, over TCP and shared memory: a worker
//! killed mid-run, a worker with the wrong job token, idle connections to a
//! worker's listening port, and what a killed job leaves behind.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills and reaps every process it holds when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts rank `rank` of `world` in the hidden worker mode of the benchmark.
fn worker(store: &Path, rank: usize, world: usize, token: &str, timeout_s: &str) -> Child {
    worker_up_to(store, rank, world, token, timeout_s, "64M", "auto", 3)
}

/// As [`worker`], with buffers of 1 KiB up to `max_bytes`, over `transport`,
/// `iters` iterations per size.
#[allow(clippy::too_many_arguments)]
fn worker_up_to(
    store: &Path,
    rank: usize,
    world: usize,
    token: &str,
    timeout_s: &str,
    max_bytes: &str,
    transport: &str,
    iters: usize,
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["bench", "collectives", "--nproc", &world.to_string()])
        .args([
            "--op",
            "all_reduce",
            "--min-bytes",
            "1K",
            "--max-bytes",
            max_bytes,
            "--factor",
            "2",
        ])
        .args([
            "--iters",
            &iters.to_string(),
            "--warmup",
            "0",
            "--transport",
            transport,
            "--worker-rank",
            &rank.to_string(),
            "--store",
        ])
        .arg(store)
        .env("COHORT_TOKEN", token)
        .env("COHORT_COLLECTIVE_TIMEOUT_S", timeout_s)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a worker")
}

/// Waits for `child` to exit, up to `limit`; returns its stderr.
fn wait_failed(child: &mut Child, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(!status.success(), "the worker should have failed: {err}");
            return err;
        }
        assert!(
            Instant::now() < deadline,
            "a worker still runs after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_worker_fails_the_others_quickly() {
    for transport in ["tcp", "shm"] {
        let store = tempfile::tempdir().unwrap();
        // A 60 s op timeout: the survivors must notice the death long before.
        let mut procs = Procs(
            (0..3)
                .map(|r| worker_up_to(store.path(), r, 3, "sekrit", "60", "64M", transport, 3))
                .collect(),
        );
        // Rank 0 prints a row once the group is up and running ops.
        let out = procs.0[0].stdout.take().unwrap();
        let first = BufReader::new(out).lines().next().expect("a row").unwrap();
        assert!(first.contains("\"op\":\"all_reduce\""), "{first}");

        let killed_at = Instant::now();
        procs.0[2].kill().unwrap();
        let errors: Vec<String> = (0..2)
            .map(|rank| wait_failed(&mut procs.0[rank], Duration::from_secs(20)))
            .collect();
        assert!(killed_at.elapsed() < Duration::from_secs(20));
        for (rank, err) in errors.iter().enumerate() {
            // Each survivor fails on the dead rank or on the other survivor,
            // which gave up first and closed or aborted.
            assert!(
                err.contains("ended") || err.contains("aborted"),
                "{transport}: rank {rank}: {err}"
            );
        }
        // The first failure can only be about the dead rank.
        assert!(
            errors.iter().any(|e| e.contains("rank 2")),
            "{transport}: {errors:#?}"
        );
    }
}

/// Shared-memory segments are memfds: they live only as long as a process
/// holds them, so a job killed with SIGKILL leaves nothing in /dev/shm (or
/// anywhere). The workers are seen holding their segments first: 1000
/// iterations of every size up to 64 MiB keep them busy for many seconds
/// after the first row (where 3 could finish the sweep and drop the
/// segments before their descriptors were read).
#[test]
fn a_killed_job_leaves_no_segment_behind() {
    let shm_entries = || -> Vec<String> {
        std::fs::read_dir("/dev/shm")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = shm_entries();
    let store = tempfile::tempdir().unwrap();
    let mut procs = Procs(
        (0..2)
            .map(|r| worker_up_to(store.path(), r, 2, "tok", "60", "64M", "shm", 1000))
            .collect(),
    );
    let out = procs.0[0].stdout.take().unwrap();
    BufReader::new(out).lines().next().expect("a row").unwrap();
    for child in &procs.0 {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", child.id())).unwrap();
        let segments = fds
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter(|target| {
                target
                    .to_string_lossy()
                    .contains("memfd:cohort-collectives")
            })
            .count();
        assert!(segments >= 1, "worker {} holds no segment", child.id());
    }
    for child in &mut procs.0 {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let left: Vec<String> = shm_entries()
        .into_iter()
        .filter(|e| !before.contains(e))
        .collect();
    assert!(left.is_empty(), "left in /dev/shm: {left:?}");
}

#[test]
fn a_worker_with_the_wrong_token_is_refused() {
    let store = tempfile::tempdir().unwrap();
    let mut procs = Procs(vec![
        worker(store.path(), 1, 2, "right", "3"),
        worker(store.path(), 0, 2, "wrong", "3"),
    ]);
    let connector = wait_failed(&mut procs.0[1], Duration::from_secs(20));
    assert!(
        connector.contains("authentication") && connector.contains("COHORT_TOKEN"),
        "{connector}"
    );
    let listener = wait_failed(&mut procs.0[0], Duration::from_secs(20));
    assert!(listener.contains("failed authentication"), "{listener}");
    assert!(
        listener.contains("waiting for ranks [0] to connect"),
        "{listener}"
    );
}

/// Three idle connections to a worker's listening port (port scans, health
/// checks, half-open connections) cost the job nothing: with an 8 s
/// bootstrap timeout both ranks still join and finish, where handshakes
/// taken one at a time gave each idle connection 10 s. The listener says
/// what it closed and why.
#[test]
fn idle_connections_to_a_worker_cost_nothing() {
    let store = tempfile::tempdir().unwrap();
    let mut procs = Procs(vec![worker_up_to(
        store.path(),
        1,
        2,
        "tok",
        "8",
        "1K",
        "auto",
        3,
    )]);
    // Rank 1's address, once it has published it.
    let entry = store.path().join("bench%addr%1");
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        if let Ok(text) = std::fs::read_to_string(&entry) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "rank 1 never published its address"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let addr = text.split_whitespace().next().unwrap().to_owned();
    let idle: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    procs
        .0
        .push(worker_up_to(store.path(), 0, 2, "tok", "8", "1K", "tcp", 3));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut outcomes = Vec::new();
    for child in procs.0.iter_mut() {
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "a worker still runs after 20 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        outcomes.push((status, err));
    }
    for (rank, (status, err)) in outcomes.iter().rev().enumerate() {
        assert!(status.success(), "rank {rank} failed: {err}");
    }
    let listener = &outcomes[0].1;
    assert!(
        listener.matches("sent nothing").count() == 3,
        "rank 1 should name the 3 idle connections: {listener}"
    );
    drop(idle);
}

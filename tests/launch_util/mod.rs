//! Helpers of the `cohort launch` / `cohort coordinator` tests: run the real
//! binary with short timings, with deadlines everywhere, and never leave a
//! process behind.

#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Flags that shorten the launcher's clock so tests run in seconds.
pub const FAST: &[&str] = &[
    "--heartbeat-interval-ms",
    "100",
    "--heartbeat-timeout-ms",
    "5000",
    "--grace-period-ms",
    "1000",
    "--connect-retry-ms",
    "3000",
    "--last-call-ms",
    "500",
];

/// `cohort` with a clean worker environment.
pub fn cohort() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cohort"));
    cmd.env_remove("COHORT_TOKEN")
        .env_remove("COHORT_HOST")
        .env_remove("OMP_NUM_THREADS")
        .env("RUST_LOG", "warn");
    cmd
}

/// A running process, its output collected by threads; killed on drop.
pub struct Proc {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    pub out: String,
    pub err: String,
}

fn reader(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start cohort");
        let stdout = reader(child.stdout.take().unwrap());
        let stderr = reader(child.stderr.take().unwrap());
        Self {
            child,
            stdout,
            stderr,
            out: String::new(),
            err: String::new(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn drain(&mut self) {
        while let Ok(line) = self.stdout.try_recv() {
            self.out.push_str(&line);
            self.out.push('\n');
        }
        while let Ok(line) = self.stderr.try_recv() {
            self.err.push_str(&line);
            self.err.push('\n');
        }
    }

    /// Waits for the first stdout (or stderr) line containing `needle`.
    pub fn wait_line(&mut self, needle: &str, stderr: bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let rx = if stderr { &self.stderr } else { &self.stdout };
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(line) => {
                    let buf = if stderr { &mut self.err } else { &mut self.out };
                    buf.push_str(&line);
                    buf.push('\n');
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => {
                    self.drain();
                    panic!(
                        "no line with {needle:?} within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                        self.out, self.err
                    );
                }
            }
        }
    }

    /// Waits for the process to exit; kills it and fails on timeout.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            if let Some(status) = self.child.try_wait().unwrap() {
                // Read what is left, until the pipes close.
                let until = Instant::now() + Duration::from_secs(2);
                collect(&self.stdout, &mut self.out, until);
                collect(&self.stderr, &mut self.err, until);
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "cohort did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.out, self.err
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn collect(rx: &mpsc::Receiver<String>, buf: &mut String, until: Instant) {
    while let Ok(line) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
        buf.push_str(&line);
        buf.push('\n');
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SIGTERM first: the launcher stops its workers' process groups.
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
                // A test may have stopped it (SIGSTOP).
                libc::kill(self.child.id() as i32, libc::SIGCONT);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if self.child.try_wait().ok().flatten().is_some() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` to completion (with a deadline).
pub fn run(cmd: Command, timeout: Duration) -> (ExitStatus, String, String) {
    let mut p = Proc::spawn(cmd);
    let status = p.wait(timeout);
    (
        status,
        std::mem::take(&mut p.out),
        std::mem::take(&mut p.err),
    )
}

/// Writes an executable shell script.
pub fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    path
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The live processes whose environment holds every one of `vars` (`NAME=value`).
pub fn processes_with_env(vars: &[&str]) -> Vec<i32> {
    let marks: Vec<&[u8]> = vars.iter().map(|v| v.as_bytes()).collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                let have: Vec<&[u8]> = env.split(|&b| b == 0).collect();
                marks.iter().all(|m| have.contains(m))
            })
        })
        .filter(|&pid| alive(pid))
        .collect()
}

/// The live worker of `rank` in the job `job` (by its env contract).
pub fn worker_pid(job: &str, rank: u32) -> Option<i32> {
    processes_with_env(&[&format!("COHORT_JOB_ID={job}"), &format!("RANK={rank}")])
        .first()
        .copied()
}

/// Starts `cohort coordinator` on `bind` (port 0: a free one) with the clock
/// flags `timing` and `extra`; returns it and the address it listens on.
pub fn coordinator(bind: &str, timing: &[&str], extra: &[&str]) -> (Proc, String) {
    let mut cmd = cohort();
    cmd.args(["coordinator", "--bind", bind])
        .args(timing)
        .args(extra);
    let mut p = Proc::spawn(cmd);
    let line = p.wait_line("listening on", false, Duration::from_secs(30));
    let addr = line.rsplit(' ').next().unwrap().to_owned();
    (p, addr)
}

/// Waits for both nodes `a` and `b`; fails, with both outputs, unless both
/// exited 0.
pub fn both_succeed(a: &mut Proc, b: &mut Proc, timeout: Duration) {
    let (sa, sb) = (a.wait(timeout), b.wait(timeout));
    assert!(
        sa.success() && sb.success(),
        "a ({sa}):\n{}{}\nb ({sb}):\n{}{}",
        a.out,
        a.err,
        b.out,
        b.err
    );
}

/// `cohort launch` timing flags under which a node is found lost in 1.5 s
/// (heartbeats every 100 ms), for tests that lose one.
pub const FAST_LOSS: &[&str] = &[
    "--heartbeat-interval-ms",
    "100",
    "--heartbeat-timeout-ms",
    "1500",
    "--grace-period-ms",
    "500",
    "--connect-retry-ms",
    "3000",
];

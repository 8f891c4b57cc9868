//! No process of a job outlives its launcher.
//!
//! Three layers, because each misses something the next catches:
//!
//! 1. Every worker gets a parent-death signal (`PR_SET_PDEATHSIG`, SIGKILL):
//!    when the launcher dies, however it dies, the kernel kills the worker.
//!    It reaches only the worker itself, not the programs it started.
//! 2. Every worker leads its own process group ([`crate::worker`]); the
//!    launcher kills the group when the worker exits or is stopped.
//! 3. Every worker's environment carries this launcher's cookie
//!    ([`COOKIE_VAR`]), which the programs it starts inherit, also those that
//!    start their own process group or session (`setsid`, a shell's job
//!    control, a daemonizing server). Processes carrying it are found in
//!    `/proc/*/environ` and killed (Jenkins' ProcessTreeKiller uses the same
//!    mark).
//!
//! A launcher killed with SIGKILL can't run layers 2 and 3 itself, so at
//! start it runs a small reaper (`cohort` again, the hidden `__reap`
//! command) in a process group of its own, holding the read end of a pipe.
//! The launcher writes each worker's group id into it as the worker starts,
//! and takes it back once reaped. When the pipe reaches end of file (the
//! launcher exited, or was killed) the reaper kills the groups still listed
//! and every process with the cookie, then exits.

use std::ffi::OsStr;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The variable that marks every process of this launcher's job.
pub const COOKIE_VAR: &str = "COHORT_LAUNCHER_COOKIE";

/// The hidden `cohort` command that runs the reaper.
pub const REAP_COMMAND: &str = "__reap";

fn cookie_cell() -> &'static String {
    static COOKIE: OnceLock<String> = OnceLock::new();
    COOKIE.get_or_init(|| {
        let bits: u64 = rand::random();
        format!("{}-{bits:016x}", std::process::id())
    })
}

/// This launcher's cookie: the value of [`COOKIE_VAR`] in its workers' env.
pub fn cookie() -> &'static str {
    cookie_cell()
}

/// The pipe to the reaper, once started.
static PIPE: Mutex<Option<ChildStdin>> = Mutex::new(None);

fn send(line: &str) {
    let mut pipe = PIPE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(stdin) = pipe.as_mut() {
        // A reaper that died can't help any more; the launcher goes on.
        if writeln!(stdin, "{line}").is_err() {
            *pipe = None;
        }
    }
}

/// Starts the reaper for this launcher (`reaper_exe __reap COOKIE`); a
/// warning, not an error, when it can't start: the parent-death signal
/// still kills the workers themselves.
pub fn start(reaper_exe: Option<std::path::PathBuf>) -> Result<(), String> {
    let exe = match reaper_exe {
        Some(exe) => exe,
        None => std::env::current_exe().map_err(|e| format!("cannot locate this binary: {e}"))?,
    };
    let child = std::process::Command::new(&exe)
        .arg(REAP_COMMAND)
        .arg(cookie())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .env_remove(COOKIE_VAR)
        // Out of the terminal's foreground group: a Ctrl-C is for the
        // launcher, which stops the workers itself.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {} {REAP_COMMAND}: {e}", exe.display()))?;
    let mut child = child;
    *PIPE.lock().unwrap_or_else(|e| e.into_inner()) = child.stdin.take();
    // The reaper exits on its own once the pipe closes; nobody waits for it
    // (a zombie of an exited launcher is reaped by init).
    std::mem::forget(child);
    Ok(())
}

/// A worker's process group started: the reaper kills it if the launcher dies.
pub fn track(pgid: i32) {
    send(&format!("+{pgid}"));
}

/// A worker's process group is gone (reaped): its id may be reused.
pub fn untrack(pgid: i32) {
    send(&format!("-{pgid}"));
}

/// The env var assignment that marks a process of the job with `cookie`.
fn mark(cookie: &str) -> Vec<u8> {
    format!("{COOKIE_VAR}={cookie}").into_bytes()
}

/// The live processes (not this one) whose environment holds `cookie`.
pub fn marked_processes(cookie: &str) -> Vec<i32> {
    let mark = mark(cookie);
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == mark.as_slice()))
        })
        .collect()
}

/// SIGKILLs every process marked with `cookie`, again until none is left
/// (a process may fork while the others are killed) or `within` passed;
/// returns how many were killed.
pub fn kill_marked(cookie: &str, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let mut killed = std::collections::HashSet::new();
    loop {
        let pids = marked_processes(cookie);
        let fresh: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|pid| killed.insert(*pid) || is_alive(*pid))
            .collect();
        if fresh.is_empty() || Instant::now() >= deadline {
            return killed.len();
        }
        for pid in fresh {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process that exists and is not a zombie (a killed zombie still shows
/// its environment until its parent reaps it).
fn is_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X')
    })
}

/// The reaper's process: `cohort __reap COOKIE`, its stdin the launcher's
/// pipe. Returns the exit code.
pub fn reap_main(cookie: &OsStr) -> i32 {
    let Some(cookie) = cookie.to_str() else {
        eprintln!("error: {REAP_COMMAND} needs the launcher's cookie (it is run by cohort launch)");
        return 2;
    };
    // Whatever ends the launcher's terminal session must not end this one.
    // SAFETY: setting signal dispositions in a single-threaded process.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let launcher = std::os::unix::process::parent_id();
    let mut groups = std::collections::BTreeSet::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if let Some(pgid) = line.strip_prefix('+').and_then(|p| p.parse::<i32>().ok()) {
            groups.insert(pgid);
        } else if let Some(pgid) = line.strip_prefix('-').and_then(|p| p.parse::<i32>().ok()) {
            groups.remove(&pgid);
        }
    }
    // The launcher is gone (or done). A group id is never 0 or 1 here: a
    // worker leads its own group.
    for &pgid in groups.iter().filter(|&&g| g > 1) {
        // SAFETY: killpg has no memory-safety preconditions.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
    let killed = kill_marked(cookie, Duration::from_secs(5));
    if !groups.is_empty() || killed > 0 {
        eprintln!(
            "[cohort] the launcher (pid {launcher}) exited with {} worker group(s) still running: \
             killed them and {killed} process(es) of its job",
            groups.len()
        );
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_processes_are_found_and_killed() {
        let cookie = format!("test-{}", rand::random::<u64>());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(COOKIE_VAR, &cookie)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !marked_processes(&cookie).contains(&pid) {
            assert!(Instant::now() < deadline, "the marked sleep was not found");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!marked_processes("another-cookie").contains(&pid));
        assert_eq!(kill_marked(&cookie, Duration::from_secs(5)), 1);
        let status = child.wait().unwrap();
        assert!(!status.success());
    }
}

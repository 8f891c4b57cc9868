//! In-place recovery as the node agent does it, with a fake worker: a
//! shell script stands in for `cohort-worker` (`WorkerCommand::Train`'s
//! worker), and this test plays the trainer's part through the
//! coordinator's store (it reads the notice and writes the replacement's
//! `Done`). The launcher runs in a child process (this test binary again,
//! running one test), so its console can be read.
//!
//! What the trainer does with the notice (abort, rejoin, the state
//! transfer) is tested with the real worker elsewhere.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cohort_collectives::store::Store;
use cohort_contract::recovery::{Done, EPOCH_KEY, Notice, done_key, notice_key};
use cohort_launcher::{
    CoordinatorMode, CoordinatorStore, LaunchOptions, NodeRange, RecoveryPolicy, Timing,
    WorkerCommand,
};

/// Set in the child: the directory of its test, and what it runs.
const CHILD_DIR: &str = "PEER_RECOVERY_TEST_DIR";
const CHILD_MODE: &str = "PEER_RECOVERY_TEST_MODE";
const CHILD_RESTARTS: &str = "PEER_RECOVERY_TEST_RESTARTS";

/// How long any one wait of these tests may take on a loaded host.
const DEADLINE: Duration = Duration::from_secs(60);

/// The fake worker. `FAKE_FAILURE` says what rank 1's first start does:
/// `kill` (SIGKILLs itself), `exit75`, `stop` (SIGSTOPs itself after its
/// first step), `replacement-fails` (as `kill`, and the replacement exits
/// 1). Every start appends "RANK EPOCH PID" to `starts` and writes its
/// environment to `env.RANK.EPOCH`; every worker reports a step every
/// 100 ms until the file `finish` exists.
const WORKER: &str = r#"#!/bin/sh
d="$FAKE_DIR"
epoch="${COHORT_EPOCH:-0}"
env | sort > "$d/.env.$RANK.$epoch"
mv "$d/.env.$RANK.$epoch" "$d/env.$RANK.$epoch"
echo "$RANK $epoch $$" >> "$d/starts"
echo "rank $RANK up in epoch $epoch"
status() {
    printf '{"step":%d,"max_steps":0,"loss":null,"tokens_per_s":null,"time":0}' "$1" > "$COHORT_STATUS_FILE.tmp"
    mv "$COHORT_STATUS_FILE.tmp" "$COHORT_STATUS_FILE"
}
if [ "$RANK" = 1 ] && [ "${COHORT_RESTART_COUNT:-0}" = 0 ]; then
    case "$epoch.$FAKE_FAILURE" in
        0.kill|0.replacement-fails) echo "rank 1 kills itself"; kill -9 $$ ;;
        0.exit75) echo "error: in-place recovery failed: no survivor holds step 3" >&2; exit 75 ;;
        0.stop) status 1; kill -STOP $$ ;;
        1.replacement-fails) echo "the replacement fails"; exit 1 ;;
    esac
fi
step=0
while [ ! -e "$d/finish" ]; do
    step=$((step + 1))
    status "$step"
    sleep 0.1
done
echo "rank $RANK done"
"#;

/// One test's launcher, in a child process, and what it printed.
struct Launcher {
    dir: PathBuf,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Launcher {
    /// Starts the launcher of a 2-rank job whose rank 1 fails as `mode`
    /// says (see [`WORKER`]), under `policy` (`peer` or `restart`), with
    /// `restarts` restarts allowed. `test` is the calling test's name.
    fn start(test: &str, mode: &str, policy: &str, restarts: u32) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "cohort-peer-recovery-{test}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, &dir)
            .env(CHILD_MODE, policy)
            .env(CHILD_RESTARTS, restarts.to_string())
            .env("FAKE_DIR", &dir)
            .env("FAKE_FAILURE", mode)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self { dir, child, lines }
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The first line of the launcher's output that contains `text`.
    fn wait_line(&self, text: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self.lines.lock().unwrap().iter().find(|l| l.contains(text)) {
                return line.clone();
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no line with {text:?} within {DEADLINE:?}; the launcher said:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The contents of `name` in the test's directory once it exists.
    fn wait_file(&self, name: &str) -> String {
        let path = self.dir.join(name);
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                return text;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{} did not appear within {DEADLINE:?}; the launcher said:\n{}",
                path.display(),
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The store of the job's generation, as the replacement of `epoch`
    /// reaches it (from its environment).
    fn store(&self, epoch: u64) -> CoordinatorStore {
        let env = self.wait_file(&format!("env.1.{epoch}"));
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name} in the replacement's environment:\n{env}"))
                .to_owned()
        };
        CoordinatorStore::connect(
            &var("COHORT_COORDINATOR"),
            &var("COHORT_TOKEN"),
            &var("COHORT_JOB_ID"),
            var("COHORT_GENERATION").parse().unwrap(),
        )
        .unwrap()
    }

    /// Lets the workers finish; the launcher's exit status and output.
    fn finish(&mut self) -> (ExitStatus, String) {
        std::fs::write(self.dir.join("finish"), "").unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The reader thread takes the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return (status, self.output());
            }
            if start.elapsed() > DEADLINE {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the launcher did not exit within {DEADLINE:?}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log of rank `rank` in generation `generation`.
    fn log(&self, generation: u64, rank: u32) -> String {
        let job = std::fs::read_dir(self.dir.join("logs"))
            .unwrap()
            .next()
            .expect("a job directory")
            .unwrap()
            .path();
        std::fs::read_to_string(
            job.join(format!("attempt_{generation}"))
                .join(format!("rank_{rank}.log")),
        )
        .unwrap()
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// In the child: runs the launcher of the test's job and exits with its
/// code. Returns (in the parent) without doing anything.
fn child_launcher() -> bool {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return false;
    };
    let dir = PathBuf::from(dir);
    let worker = dir.join("worker.sh");
    std::fs::write(&worker, WORKER).unwrap();
    let mut permissions = std::fs::metadata(&worker).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&worker, permissions).unwrap();
    let recovery = match std::env::var(CHILD_MODE).unwrap().as_str() {
        "peer" => RecoveryPolicy::Peer {
            rejoin_timeout: Duration::from_secs(30),
        },
        _ => RecoveryPolicy::Restart,
    };
    let options = LaunchOptions {
        nnodes: NodeRange::exactly(1),
        nproc_per_node: 2,
        node_rank: None,
        role: "default".into(),
        local_ranks_filter: None,
        coordinator: CoordinatorMode::Embedded,
        max_restarts: std::env::var(CHILD_RESTARTS).unwrap().parse().unwrap(),
        hang_timeout: Duration::from_secs(2),
        log_dir: dir.join("logs"),
        job_id: None,
        token: None,
        command: WorkerCommand::Train {
            worker,
            config_toml: String::new(),
            resume: None,
            source: "fake.toml".into(),
            recovery,
        },
        timing: Timing {
            heartbeat_interval: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_secs(10),
            grace_period: Duration::from_secs(2),
            connect_retry: Duration::from_secs(10),
            last_call: Duration::from_secs(1),
            rendezvous_timeout: Duration::from_secs(60),
            coordinator_grace: Duration::from_secs(10),
            replacement_timeout: Duration::ZERO,
        },
        host: None,
        user_set: cohort_contract::UserSet::default(),
    };
    let code = cohort_launcher::launch(options).unwrap();
    std::process::exit(code);
}

fn done(notice: &Notice) -> Done {
    let t = notice.noticed_unix_ms;
    Done {
        epoch: notice.epoch,
        rank: notice.rank,
        source_rank: 0,
        step: 4,
        in_flight: 4,
        bytes: 2_000_000,
        survivors_left_unix_ms: t + 5,
        connecting_unix_ms: t + 100,
        connected_unix_ms: t + 150,
        synced_unix_ms: t + 160,
        redone_unix_ms: t + 200,
    }
}

/// The replacement's part: the notice of epoch 1 as it is in the store;
/// then it writes its `Done`.
fn notice_then_done(launcher: &Launcher) -> Notice {
    let store = launcher.store(1);
    assert_eq!(store.get(EPOCH_KEY).unwrap().as_deref(), Some(&b"1"[..]));
    let notice = store.wait(&[notice_key(1)], DEADLINE).unwrap();
    let notice: Notice = serde_json::from_slice(&notice[0]).unwrap();
    store
        .set(&done_key(1), &serde_json::to_vec(&done(&notice)).unwrap())
        .unwrap();
    notice
}

/// Every "RANK EPOCH PID" line of the starts so far.
fn starts(dir: &Path) -> Vec<(u32, u64, u32)> {
    std::fs::read_to_string(dir.join("starts"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_killed_worker_starts_again_in_place_and_the_others_keep_running() {
    if child_launcher() {
        return;
    }
    let mut launcher = Launcher::start(
        "a_killed_worker_starts_again_in_place_and_the_others_keep_running",
        "kill",
        "peer",
        0,
    );
    let notice = notice_then_done(&launcher);
    assert_eq!(notice.epoch, 1);
    assert_eq!(notice.rank, 1);
    assert_eq!(notice.reason, "was killed by signal 9 (SIGKILL)");
    assert!(
        notice.failed_unix_ms <= notice.noticed_unix_ms,
        "{notice:?}"
    );
    let recovering = launcher.wait_line("recovering in place");
    assert_eq!(
        recovering,
        "[cohort] rank 1 was killed by signal 9 (SIGKILL): recovering in place (epoch 1): \
         the other ranks keep running, rank 1 starts again"
    );
    let recovered = launcher.wait_line("recovered in place");
    assert!(
        recovered.starts_with(
            "[cohort] rank 1 recovered in place (epoch 1): it was killed by signal 9 (SIGKILL) \
             during step 4; its state came from rank 0"
        ),
        "{recovered}"
    );
    // The replacement's environment is the first start's, plus the epoch.
    let first = launcher.wait_file("env.1.0");
    let again = launcher.wait_file("env.1.1");
    let first: Vec<&str> = first.lines().collect();
    let again: Vec<&str> = again.lines().collect();
    let added: Vec<&&str> = again.iter().filter(|l| !first.contains(l)).collect();
    let gone: Vec<&&str> = first.iter().filter(|l| !again.contains(l)).collect();
    assert_eq!(added, [&"COHORT_EPOCH=1"], "{again:?}");
    assert!(gone.is_empty(), "{gone:?}");
    // Both starts of rank 1 are in its one log, the second after a
    // separator line.
    let log = launcher.log(0, 1);
    let kills = log.find("rank 1 kills itself").expect(&log);
    let separator = log
        .find(
            "[cohort] ---- rank 1 was killed by signal 9 (SIGKILL); started again in place \
             (epoch 1) ----",
        )
        .expect(&log);
    let again = log.find("rank 1 up in epoch 1").expect(&log);
    assert!(kills < separator && separator < again, "{log}");
    let (status, output) = launcher.finish();
    assert!(status.success(), "{status}:\n{output}");
    assert!(
        output.contains("job succeeded: all 2 ranks of generation 0 exited 0 (0 restart(s))"),
        "{output}"
    );
    // Rank 0 started once and ran on; rank 1 twice, the second in epoch 1.
    let starts = starts(&launcher.dir);
    assert_eq!(starts.iter().filter(|s| s.0 == 0).count(), 1, "{starts:?}");
    let ones: Vec<u64> = starts.iter().filter(|s| s.0 == 1).map(|s| s.1).collect();
    assert_eq!(ones, [0, 1], "{starts:?}");
}

#[test]
fn a_stopped_worker_is_the_hang_culprit_and_is_replaced_in_place() {
    if child_launcher() {
        return;
    }
    let mut launcher = Launcher::start(
        "a_stopped_worker_is_the_hang_culprit_and_is_replaced_in_place",
        "stop",
        "peer",
        0,
    );
    let notice = notice_then_done(&launcher);
    assert_eq!(notice.rank, 1);
    assert!(
        notice
            .reason
            .starts_with("hung: its process is stopped at step 1"),
        "{notice:?}"
    );
    // The failure is when it last made progress, before the hang timeout.
    assert!(
        notice.noticed_unix_ms - notice.failed_unix_ms >= 2_000,
        "{notice:?}"
    );
    let recovering = launcher.wait_line("recovering in place");
    assert!(
        recovering.starts_with("[cohort] rank 1 hung: its process is stopped at step 1"),
        "{recovering}"
    );
    assert!(
        recovering.ends_with(
            ": recovering in place (epoch 1): the other ranks keep running, rank 1 starts again"
        ),
        "{recovering}"
    );
    launcher.wait_line("rank 1 recovered in place (epoch 1): it hung: its process is stopped");
    let (status, output) = launcher.finish();
    assert!(status.success(), "{status}:\n{output}");
    let starts = starts(&launcher.dir);
    assert_eq!(starts.iter().filter(|s| s.0 == 0).count(), 1, "{starts:?}");
}

#[test]
fn a_replacement_that_fails_before_it_rejoined_falls_back_to_a_restart() {
    if child_launcher() {
        return;
    }
    let mut launcher = Launcher::start(
        "a_replacement_that_fails_before_it_rejoined_falls_back_to_a_restart",
        "replacement-fails",
        "peer",
        0,
    );
    launcher.wait_line("recovering in place (epoch 1)");
    launcher.wait_line("job failed");
    let (status, output) = launcher.finish();
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains(
            "exited with code 1 (it was the replacement of the in-place recovery of epoch 1 \
             and failed before it rejoined; a failure during a recovery means falling back to \
             a restart from the newest checkpoint)"
        ),
        "{output}"
    );
    assert!(!output.contains("recovered in place"), "{output}");
}

#[test]
fn a_worker_whose_recovery_failed_restarts_the_job_naming_why() {
    if child_launcher() {
        return;
    }
    let mut launcher = Launcher::start(
        "a_worker_whose_recovery_failed_restarts_the_job_naming_why",
        "exit75",
        "peer",
        1,
    );
    let line = launcher.wait_line("generation 0 ended");
    assert!(
        line.contains(
            "exited with code 75 (its in-place recovery failed, as its output says; falling \
             back to a restart from the newest checkpoint); restart 1 of --max-restarts 1"
        ),
        "{line}"
    );
    let line = launcher.wait_line("no survivor holds step 3");
    assert!(line.starts_with("[rank 1] error:"), "{line}");
    // Generation 1 runs every rank from the start again.
    launcher.wait_line("generation 1 formed");
    let (status, output) = launcher.finish();
    assert!(status.success(), "{status}:\n{output}");
    assert!(
        output.contains("job succeeded: all 2 ranks of generation 1 exited 0 (1 restart(s))"),
        "{output}"
    );
    assert!(!output.contains("recovering in place"), "{output}");
}

#[test]
fn with_mode_restart_a_killed_worker_restarts_the_job() {
    if child_launcher() {
        return;
    }
    let mut launcher = Launcher::start(
        "with_mode_restart_a_killed_worker_restarts_the_job",
        "kill",
        "restart",
        0,
    );
    launcher.wait_line("job failed");
    let (status, output) = launcher.finish();
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("killed by signal 9 (SIGKILL); no restarts left"),
        "{output}"
    );
    assert!(!output.contains("in place"), "{output}");
}

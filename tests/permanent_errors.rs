//! Failures a restart can't fix stop the job at once: a worker failing on
//! its configuration or input (a checkpoint of another model, a data file
//! it can't use, a full disk) exits with `exit::PERMANENT_FAILURE`, and
//! `cohort launch` exits 2 with no restart and the error shown once, naming
//! the user's config file. A worker killed by a signal is still restarted.

mod launch_util;
mod worker_bin;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cohort_contract::exit::PERMANENT_FAILURE;
use launch_util::{FAST, cohort, run, script};

const DEADLINE: Duration = Duration::from_secs(120);

/// A copy of the quickstart config in `dir` (the file the user names), its
/// data path made absolute.
fn user_config(dir: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(repo.join("configs/quickstart.toml"))
        .unwrap()
        .replace(
            "path = \"configs/data/tiny.txt\"",
            &format!("path = {:?}", repo.join("configs/data/tiny.txt")),
        );
    let path = dir.join("my-job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `cohort launch CONFIG --set ...` with 2 workers and 3 restarts allowed.
fn launch(dir: &Path, config: &Path, sets: &[&str]) -> Command {
    let mut cmd = cohort();
    cmd.current_dir(dir)
        .arg("launch")
        .args(FAST)
        .args([
            "--log-dir",
            "logs",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "3",
        ])
        .arg(config);
    for set in sets {
        cmd.args(["--set", set]);
    }
    cmd
}

/// Asserts a permanent failure as a user sees it: exit 2, no restart, at
/// most `lines` `error:` lines (one per distinct error: every rank failing
/// alike shows one), each naming `config` and mentioning `needle`, the OS
/// error (if any) once.
fn assert_permanent(
    status: std::process::ExitStatus,
    out: &str,
    err: &str,
    lines: usize,
    config: &Path,
    needle: &str,
) {
    let all = format!("{out}{err}");
    assert_eq!(status.code(), Some(2), "{all}");
    assert!(!all.contains("restart 1 of"), "restarted:\n{all}");
    assert!(!all.contains("generation 1"), "restarted:\n{all}");
    assert!(
        all.contains(&format!("exited with code {PERMANENT_FAILURE}")),
        "{all}"
    );
    let errors: Vec<&str> = all.lines().filter(|l| l.contains("error: ")).collect();
    assert!(
        (1..=lines).contains(&errors.len()),
        "1 to {lines} error lines expected:\n{all}"
    );
    for error in errors {
        assert!(error.contains(&config.display().to_string()), "{error}");
        assert!(
            !error.contains("config.toml"),
            "names the job's copy: {error}"
        );
        assert!(error.contains(needle), "{error}");
        if let Some(at) = error.find("(os error") {
            assert!(
                !error[at + 1..].contains("(os error"),
                "OS error twice: {error}"
            );
        }
    }
}

#[test]
fn a_checkpoint_of_another_model_is_not_retried() {
    worker_bin::ensure();
    let dir = tempfile::tempdir().unwrap();
    let config = user_config(dir.path());
    let ckpt = dir.path().join("ck");
    let ckpt_dir = format!("checkpoint.dir={}", ckpt.display());
    let small = [
        "model.n_embd=32",
        "train.max_steps=2",
        "train.eval_every=0",
        "checkpoint.every=2",
        &ckpt_dir,
    ];
    let (status, out, err) = run(launch(dir.path(), &config, &small), DEADLINE);
    assert!(status.success(), "{out}{err}");

    let (status, out, err) = run(
        launch(dir.path(), &config, &["checkpoint.every=2", &ckpt_dir]),
        DEADLINE,
    );
    assert_permanent(
        status,
        &out,
        &err,
        1,
        &config,
        "checkpoint does not fit this model",
    );
}

#[test]
fn a_data_file_too_short_is_not_retried() {
    worker_bin::ensure();
    let dir = tempfile::tempdir().unwrap();
    let config = user_config(dir.path());
    let data = dir.path().join("short.txt");
    std::fs::write(&data, "too short").unwrap();
    let (status, out, err) = run(
        launch(
            dir.path(),
            &config,
            &[&format!("data.path={}", data.display())],
        ),
        DEADLINE,
    );
    assert_permanent(status, &out, &err, 1, &config, "short.txt");
}

/// A checkpoint directory on a 64 KiB tmpfs (unmounted on drop).
struct FullDisk(PathBuf);

impl FullDisk {
    fn new(dir: &Path) -> Self {
        let at = dir.join("full");
        std::fs::create_dir(&at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&at)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a small tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        FullDisk(at)
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_not_retried() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: a full disk is a small tmpfs, which only root can mount");
        return;
    }
    worker_bin::ensure();
    let dir = tempfile::tempdir().unwrap();
    let config = user_config(dir.path());
    let disk = FullDisk::new(dir.path());
    let (status, out, err) = run(
        launch(
            dir.path(),
            &config,
            &[
                "train.max_steps=4",
                "checkpoint.every=2",
                &format!("checkpoint.dir={}", disk.0.join("ck").display()),
            ],
        ),
        DEADLINE,
    );
    // Each rank writes its own shard file: one error line per rank.
    assert_permanent(status, &out, &err, 2, &config, "No space left on device");
}

/// Any program may exit with the status; a signal still restarts.
#[test]
fn the_status_stops_any_program_and_a_signal_still_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let program = |body: &str| {
        let mut cmd = cohort();
        cmd.current_dir(dir.path())
            .arg("launch")
            .args(FAST)
            .args(["--log-dir", "logs", "--max-restarts", "1", "--"])
            .arg("sh")
            .arg(script(dir.path(), "job.sh", body));
        cmd
    };
    let (status, out, err) = run(
        program(&format!(
            "echo 'error: bad input' >&2; exit {PERMANENT_FAILURE}\n"
        )),
        DEADLINE,
    );
    assert_eq!(status.code(), Some(2), "{out}{err}");
    assert!(!err.contains("restart 1 of"), "{err}");

    let (status, out, err) = run(
        program("[ \"$COHORT_RESTART_COUNT\" = 1 ] && exit 0; kill -9 $$\n"),
        DEADLINE,
    );
    assert!(status.success(), "{out}{err}");
    assert!(err.contains("restart 1 of --max-restarts 1"), "{err}");
}

//! scripts/gpu_check.sh without a GPU: its plumbing mode runs every check's
//! CPU stand-in through the same commands, budgets and comparisons, so the
//! script's one run on a GPU machine is not its first. And the metrics
//! checks it relies on can fail.

mod worker_bin;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    root().join(".venv/bin/python")
}

/// The script with the binaries under test, in plumbing mode.
fn gpu_check(out: &Path, budget_s: u32) -> Output {
    worker_bin::ensure();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_cohort")).parent().unwrap();
    Command::new("bash")
        .arg(root().join("scripts/gpu_check.sh"))
        .env("GPU_CHECK_MODE", "plumbing")
        .env("GPU_CHECK_BUDGET_S", budget_s.to_string())
        .env("COHORT_BIN_DIR", bin_dir)
        .env("OUT", out)
        .env("PYTHON", python())
        .output()
        .expect("running scripts/gpu_check.sh")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn plumbing_mode_passes_or_skips_every_check_and_keeps_its_evidence() {
    let out = tempfile::tempdir().unwrap();
    let run = gpu_check(out.path(), 480);
    let summary = std::fs::read_to_string(out.path().join("summary.txt")).unwrap_or_default();
    assert!(run.status.success(), "{summary}\n{}", text(&run));
    let checks: Vec<&str> = summary
        .lines()
        .filter(|l| l.starts_with("PASS") || l.starts_with("SKIP") || l.starts_with("FAIL"))
        .collect();
    assert_eq!(checks.len(), 11, "{summary}");
    for line in &checks {
        assert!(
            line.starts_with("PASS") || line.ends_with("skipped: no GPU"),
            "{line}\n{summary}"
        );
    }
    assert!(
        summary.contains("of a 480 s budget; mode plumbing"),
        "{summary}"
    );
    // Every training run left its metrics, each check its logs.
    let metrics = std::fs::read_dir(out.path().join("metrics"))
        .unwrap()
        .count();
    assert!(metrics >= 12, "{metrics} metrics files");
    let log = std::fs::read_to_string(out.path().join("gpu_check.log")).unwrap();
    assert!(log.contains("agree on loss,grad_norm"), "{log}");
    assert!(log.contains("resumed from"), "{log}");
    assert!(log.contains("#wrong"), "{log}");
}

#[test]
fn a_spent_budget_fails_the_checks_it_could_not_run() {
    let out = tempfile::tempdir().unwrap();
    let run = gpu_check(out.path(), 12);
    let summary = std::fs::read_to_string(out.path().join("summary.txt")).unwrap();
    assert!(!run.status.success(), "{summary}");
    assert!(
        summary.contains("not run, the 12 s budget is spent"),
        "{summary}"
    );
}

/// Writes metrics lines (step, loss, grad norm) to a file.
fn metrics(dir: &Path, name: &str, rows: &[(u32, f64, f64)]) -> PathBuf {
    let path = dir.join(name);
    let lines: Vec<String> = rows
        .iter()
        .map(|(s, l, g)| format!(r#"{{"step":{s},"loss":{l},"grad_norm":{g}}}"#))
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn tool(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let o = Command::new(python())
        .arg(root().join("scripts/gpu_check_metrics.py"))
        .args(args)
        .output()
        .unwrap();
    (o.status.success(), text(&o))
}

#[test]
fn the_metrics_checks_catch_zero_gradients_a_flat_loss_and_diverging_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = metrics(d, "good", &[(1, 5.0, 2.0), (2, 4.0, 1.5), (3, 3.0, 1.0)]);
    let zero = metrics(d, "zero", &[(1, 5.0, 2.0), (2, 4.0, 0.0), (3, 3.0, 1.0)]);
    let flat = metrics(d, "flat", &[(1, 5.0, 2.0), (2, 5.0, 1.5), (3, 5.0, 1.0)]);
    let near = metrics(
        d,
        "near",
        &[(1, 5.0, 2.0), (2, 4.00001, 1.5), (3, 3.0, 1.0)],
    );
    let short = metrics(d, "short", &[(1, 5.0, 2.0), (2, 4.0, 1.5)]);
    let sane = |f: &Path| tool(&["sane".as_ref(), f.as_os_str()]);
    assert!(sane(&good).0, "{}", sane(&good).1);
    let (ok, why) = sane(&zero);
    assert!(!ok && why.contains("step 2: grad norm 0"), "{why}");
    let (ok, why) = sane(&flat);
    assert!(!ok && why.contains("does not fall"), "{why}");
    let same = |a: &Path, b: &Path, rtol: &str| {
        tool(&[
            "same".as_ref(),
            a.as_os_str(),
            b.as_os_str(),
            "--rtol".as_ref(),
            rtol.as_ref(),
            "--keys".as_ref(),
            "loss,grad_norm".as_ref(),
        ])
    };
    assert!(same(&good, &good, "1e-6").0);
    let (ok, why) = same(&good, &near, "1e-6");
    assert!(!ok && why.contains("step 2: loss"), "{why}");
    assert!(same(&good, &near, "1e-5").0);
    let (ok, why) = same(&good, &short, "1e-6");
    assert!(!ok && why.contains("different steps"), "{why}");
}

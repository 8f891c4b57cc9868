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
    assert_eq!(checks.len(), 9, "{summary}");
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
    // The preflight is one stage with one budget, its parts timed.
    let preflight = checks[0];
    assert!(
        preflight.contains("preflight, one 20 s budget")
            && preflight.contains("binaries ")
            && preflight.contains("doctor ")
            && preflight.contains("torch ")
            && preflight.contains(" of 20 s]"),
        "{preflight}"
    );
    // Every training run left its metrics, each check its logs.
    let metrics = std::fs::read_dir(out.path().join("metrics"))
        .unwrap()
        .count();
    assert!(metrics >= 15, "{metrics} metrics files");
    let log = std::fs::read_to_string(out.path().join("gpu_check.log")).unwrap();
    assert!(log.contains("agree on loss,grad_norm"), "{log}");
    // NCCL vs TCP is judged against the TCP run launched twice.
    assert!(log.contains("noise floor 0 ("), "{log}");
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

#[test]
fn a_tiny_preflight_budget_fails_the_preflight_and_says_which_part_ran_out() {
    worker_bin::ensure();
    let out = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_cohort")).parent().unwrap();
    let run = Command::new("bash")
        .arg(root().join("scripts/gpu_check.sh"))
        .env("GPU_CHECK_MODE", "plumbing")
        .env("GPU_CHECK_BUDGET_S", "22")
        .env("GPU_CHECK_PREFLIGHT_S", "1")
        .env("COHORT_BIN_DIR", bin_dir)
        .env("OUT", out.path())
        .env("PYTHON", python())
        .output()
        .unwrap();
    let summary = std::fs::read_to_string(out.path().join("summary.txt")).unwrap();
    assert!(!run.status.success(), "{summary}");
    let preflight = summary.lines().next().unwrap();
    assert!(
        preflight.starts_with("FAIL  preflight, one 1 s budget")
            && preflight.contains("preflight's 1 s budget"),
        "{preflight}\n{}",
        text(&run)
    );
}

#[test]
fn the_noise_floor_widens_the_limit_only_as_far_as_the_measured_noise() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rows = |eps: f64| [(1, 5.0, 2.0), (2, 4.0 * (1.0 + eps), 1.5), (3, 3.0, 1.0)];
    let base = metrics(d, "base", &rows(0.0));
    let again_exact = metrics(d, "again_exact", &rows(0.0));
    let again_noisy = metrics(d, "again_noisy", &rows(1e-5));
    let again_wild = metrics(d, "again_wild", &rows(1e-2));
    let within = metrics(d, "within", &rows(5e-5));
    let diverging = metrics(
        d,
        "diverging",
        &[(1, 5.0, 2.0), (2, 4.0, 1.5), (3, 3.3, 1.0)],
    );
    let same = |a: &Path, b: &Path, c: &Path, e: &Path| {
        tool(&[
            "same".as_ref(),
            a.as_os_str(),
            b.as_os_str(),
            "--rtol".as_ref(),
            "1e-6".as_ref(),
            "--keys".as_ref(),
            "loss,grad_norm".as_ref(),
            "--noise".as_ref(),
            c.as_os_str(),
            e.as_os_str(),
        ])
    };
    // A floor of 0: the limit stays 1e-6, a 5e-5 difference fails.
    let (ok, why) = same(&within, &base, &base, &again_exact);
    assert!(
        !ok && why.contains("noise floor 0") && why.contains("> 1e-06"),
        "{why}"
    );
    // A 1e-5 floor: the limit is 1e-4, and 5e-5 is within the noise.
    let (ok, why) = same(&within, &base, &base, &again_noisy);
    assert!(
        ok && why.contains("noise floor 1e-05") && why.contains("= 0.0001"),
        "{why}"
    );
    // A run that diverges (10% at step 3) is caught under a small floor.
    let (ok, why) = same(&diverging, &base, &base, &again_noisy);
    assert!(
        !ok && why.contains("step 3: loss") && why.contains("> 0.0001"),
        "{why}"
    );
    // A floor above 1e-3 says the comparison means nothing, and fails.
    let (ok, why) = same(&base, &base, &base, &again_wild);
    assert!(!ok && why.contains("too much"), "{why}");
}

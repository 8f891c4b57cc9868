//! `cohort doctor` as a user runs it.

mod worker_bin;

use std::process::Command;

#[test]
fn doctor_reports_libtorch_nccl_and_backend() {
    worker_bin::ensure();
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .arg("doctor")
        .output()
        .expect("run cohort doctor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "doctor failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("libtorch 2.11.0"), "{stdout}");
    assert!(stdout.contains("collective backend (auto): "), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("NCCL ") || l.starts_with("NCCL: not loadable")),
        "{stdout}"
    );
}

#[test]
fn doctor_json_is_machine_readable() {
    worker_bin::ensure();
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["doctor", "--json"])
        .output()
        .expect("run cohort doctor --json");
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let version = report["libtorch"]["libtorch_version"].as_str().unwrap();
    assert!(version.starts_with("2.11.0"), "{version}");
    assert!(report["cores"].as_u64().unwrap() >= 1);
    assert!(matches!(report["backend"].as_str(), Some("tcp" | "nccl")));
}

#[test]
fn unknown_subcommand_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .arg("frobnicate")
        .output()
        .expect("run cohort");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("frobnicate"));
}

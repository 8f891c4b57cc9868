//! `cohort bench collectives` end to end: the real binary, N processes on
//! 127.0.0.1 with ephemeral ports, every op checked.

use std::process::Command;

fn cohort() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cohort"))
}

fn rows(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).expect("the --json file");
    serde_json::from_str(&text).expect("a JSON array")
}

#[test]
fn every_op_checks_out_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    for (nproc, algo, dtype, transport) in [
        ("3", "auto", "f32", "auto"),
        ("4", "ring", "bf16", "tcp"),
        ("5", "tree", "i64", "shm"),
        ("2", "doubling", "f64", "shm"),
    ] {
        let json = dir.path().join(format!("rows-{nproc}.json"));
        let out = cohort()
            .args([
                "bench",
                "collectives",
                "--nproc",
                nproc,
                "--algo",
                algo,
                "--dtype",
                dtype,
                "--transport",
                transport,
            ])
            .args(["--op", "all_reduce,reduce_scatter,all_gather,broadcast"])
            .args(["--min-bytes", "1K", "--max-bytes", "64K", "--factor", "8"])
            .args(["--iters", "2", "--warmup", "1", "--json"])
            .arg(&json)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{nproc} {algo} {dtype} {transport}: {stdout}\n{stderr}"
        );
        assert!(
            stdout.contains("busbw(GB/s)") && stdout.contains("#wrong"),
            "{stdout}"
        );
        let rows = rows(&json);
        // 4 ops × sizes 1K, 8K, 64K.
        assert_eq!(rows.len(), 12, "{rows:#?}");
        for row in &rows {
            for key in [
                "op",
                "dtype",
                "bytes",
                "count",
                "world",
                "algo",
                "transport",
                "time_us",
                "median_us",
                "p99_us",
                "algbw_gbps",
                "busbw_gbps",
                "wrong",
            ] {
                assert!(row.get(key).is_some(), "row lacks {key}: {row}");
            }
            assert_eq!(row["wrong"], 0, "{row}");
            assert_eq!(row["dtype"], dtype);
            assert_eq!(row["transport"], transport);
            assert_eq!(row["world"].as_u64().unwrap().to_string(), nproc);
            assert!(row["time_us"].as_f64().unwrap() > 0.0, "{row}");
            if algo != "auto" {
                assert_eq!(row["algo"], algo, "{row}");
            }
        }
    }
}

#[test]
fn bad_flags_exit_2_with_a_clear_error() {
    for (args, needle) in [
        (vec!["--dtype", "f31"], "f31"),
        (vec!["--nproc", "0"], "nproc"),
        (vec!["--op", "all_to_all"], "all_to_all"),
        (vec!["--min-bytes", "12Q"], "12Q"),
        (vec!["--algo", "mesh"], "mesh"),
        (vec!["--backend", "gloo"], "gloo"),
        (vec!["--transport", "rdma"], "rdma"),
    ] {
        let out = cohort()
            .args(["bench", "collectives"])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let out = cohort()
        .args([
            "bench",
            "collectives",
            "--min-bytes",
            "1M",
            "--max-bytes",
            "1K",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--min-bytes"));
}

/// Without a usable CUDA driver and NCCL (CI), `--backend nccl` stops before
/// starting any worker and says what is missing; with more ranks than GPUs
/// it says NCCL needs one GPU per rank.
#[test]
fn the_nccl_backend_explains_what_it_lacks() {
    let out = cohort()
        .args(["bench", "collectives", "--backend", "nccl", "--nproc", "64"])
        .args(["--min-bytes", "1K", "--max-bytes", "1K", "--iters", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--backend nccl")
            && (stderr.contains("CUDA driver")
                || stderr.contains("NCCL does not load")
                || stderr.contains("one rank per GPU")),
        "{stderr}"
    );
}

//! `cohort ckpt inspect|verify|export` on checkpoints written by the
//! checkpoint crate, through the real binary.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use cohort_checkpoint::{Meta, ParamLayout, Saver, SaverOptions, Shard};
use cohort_collectives::shard_range;

fn layout() -> Vec<ParamLayout> {
    let mut offset = 0;
    [
        ("transformer.wte.weight", vec![11, 4]),
        ("transformer.h.0.mlp.c_fc.weight", vec![4, 3]),
        ("lm_head.bias", vec![11]),
    ]
    .into_iter()
    .map(|(name, shape)| {
        let p = ParamLayout {
            name: name.into(),
            shape,
            offset,
        };
        offset += p.numel();
        p
    })
    .collect()
}

fn flat_params(total: usize) -> Vec<f32> {
    (0..total).map(|i| i as f32 * 0.125 - 3.0).collect()
}

/// A checkpoint root with steps 5 and 10 saved by 2 ranks.
fn write_checkpoint(root: &Path) {
    let layout = layout();
    let total: usize = layout.iter().map(ParamLayout::numel).sum();
    for step in [5, 10] {
        std::thread::scope(|s| {
            for rank in 0..2 {
                let layout = layout.clone();
                s.spawn(move || {
                    let opts = SaverOptions {
                        keep_last: 3,
                        async_save: false,
                        commit_timeout: Duration::from_secs(60),
                        ..SaverOptions::default()
                    };
                    let mut saver = Saver::new(root, rank, 2, opts).unwrap();
                    let range = shard_range(total, 2, rank);
                    let params = flat_params(total)[range.clone()]
                        .iter()
                        .map(|x| x + step as f32)
                        .collect();
                    let meta = Meta {
                        step,
                        world: 2,
                        zero_stage: 2,
                        total,
                        layout,
                        state_names: vec!["momentum".into()],
                        train_state: serde_json::json!({"data_position": step * 8}),
                        config_toml:
                            "# a comment\n[model]\nname = \"gpt-tiny\"\n\n[optim]\nlr = 0.001\n"
                                .into(),
                    };
                    let shard = Shard {
                        states: vec![vec![0.5; range.len()]],
                        params,
                        range,
                    };
                    saver.save(meta, shard).unwrap();
                    saver.finish().unwrap();
                });
            }
        });
    }
}

fn cohort(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn inspect_shows_step_world_tensors_states_sizes_config() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path());
    let out = cohort(&["ckpt", "inspect", s(dir.path())]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    for want in [
        "step-00000010",
        "step         10",
        "world size   2 (zero stage 2)",
        "transformer.h.0.mlp.c_fc.weight",
        "[4, 3]",
        "states       momentum",
        "rank-00001.safetensors",
        "on disk",
        "name = \"gpt-tiny\"",
        "\"data_position\":80",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("# a comment"), "{stdout}");

    let step5 = dir.path().join("step-00000005");
    let out = cohort(&["ckpt", "inspect", "--json", s(&step5)]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["step"], 5);
    assert_eq!(v["world"], 2);
    assert_eq!(v["tensors"][2]["name"], "lm_head.bias");
    let on_disk: u64 = [
        "manifest.json",
        "rank-00000.safetensors",
        "rank-00001.safetensors",
    ]
    .iter()
    .map(|f| fs::metadata(step5.join(f)).unwrap().len())
    .sum();
    assert_eq!(v["bytes_on_disk"], on_disk);
}

#[test]
fn verify_says_ok_with_counts() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path());
    let out = cohort(&["ckpt", "verify", s(dir.path())]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("ok: ")
            && stdout.contains("step 10")
            && stdout.contains("2 shard files"),
        "{stdout}"
    );
}

#[test]
fn verify_names_each_bad_file_with_expected_and_actual_crc() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path());
    let step = dir.path().join("step-00000010");
    for rank in 0..2 {
        let file = step.join(format!("rank-0000{rank}.safetensors"));
        let mut bytes = fs::read(&file).unwrap();
        let at = bytes.len() - 3;
        bytes[at] ^= 1;
        fs::write(&file, bytes).unwrap();
    }
    let out = cohort(&["ckpt", "verify", s(&step)]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for rank in 0..2 {
        let line = stderr
            .lines()
            .find(|l| l.contains(&format!("rank-0000{rank}.safetensors")))
            .unwrap_or_else(|| panic!("rank {rank} not named in:\n{stderr}"));
        assert!(
            line.contains("expected crc32c 0x") && line.contains("actual 0x"),
            "{line}"
        );
    }
    assert!(stderr.contains("2 of 2 shard files are bad"), "{stderr}");
    // The older step is untouched.
    let out = cohort(&["ckpt", "verify", s(&dir.path().join("step-00000005"))]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
}

#[test]
fn verify_names_a_missing_shard_and_a_truncated_manifest() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path());
    let step10 = dir.path().join("step-00000010");
    fs::remove_file(step10.join("rank-00001.safetensors")).unwrap();
    let out = cohort(&["ckpt", "verify", s(dir.path())]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("missing shard file") && stderr.contains("rank-00001.safetensors"),
        "{stderr}"
    );

    let manifest = dir.path().join("step-00000005/manifest.json");
    let bytes = fs::read(&manifest).unwrap();
    fs::write(&manifest, &bytes[..bytes.len() - 10]).unwrap();
    for cmd in ["verify", "inspect"] {
        let out = cohort(&["ckpt", cmd, s(manifest.parent().unwrap())]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {stderr}");
        assert!(
            stderr.contains("step-00000005/manifest.json") && stderr.contains("truncated"),
            "{cmd}: {stderr}"
        );
    }
}

#[test]
fn usage_errors_exit_2_and_bad_checkpoints_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    for args in [
        vec!["ckpt", "verify", s(&missing)],
        vec!["ckpt", "inspect"],
        vec!["ckpt", "export", s(dir.path())],
        vec!["ckpt", "frobnicate", s(dir.path())],
        vec!["ckpt", "verify", "--bogus", s(dir.path())],
    ] {
        let out = cohort(&args);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(!stderr.is_empty(), "{args:?}");
    }
    let out = cohort(&["ckpt", "verify", s(&missing)]);
    assert!(text(&out).1.contains("does not exist"));

    // An existing directory that is not a checkpoint.
    let out = cohort(&["ckpt", "verify", s(dir.path())]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not a checkpoint"), "{stderr}");

    write_checkpoint(dir.path());
    let out_path = dir.path().join("no-such-dir/model.safetensors");
    let out = cohort(&["ckpt", "export", s(dir.path()), "--out", s(&out_path)]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
}

/// The repository's Python venv, if it exists.
fn venv_python() -> Option<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    python.exists().then_some(python)
}

#[test]
fn export_is_read_back_by_python_safetensors_torch() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path());
    let model = dir.path().join("model.safetensors");
    let out = cohort(&["ckpt", "export", s(dir.path()), "--out", s(&model)]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("exported step 10") && stdout.contains("3 tensors"),
        "{stdout}"
    );

    // The file is valid safetensors with the model's names, shapes and values
    // (checked here without Python, then with it when it is available).
    let bytes = fs::read(&model).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let total: usize = layout().iter().map(ParamLayout::numel).sum();
    let flat: Vec<f32> = flat_params(total).iter().map(|x| x + 10.0).collect();
    for p in layout() {
        let t = st.tensor(&p.name).unwrap();
        assert_eq!(t.shape(), p.shape.as_slice());
        let want = &flat[p.offset..p.offset + p.numel()];
        assert_eq!(t.data(), le_bytes(want), "{}", p.name);
    }

    let Some(python) = venv_python() else {
        println!("skipping the Python read-back: no .venv/bin/python (run `make setup`)");
        return;
    };
    let script = r#"
import json, sys
try:
    from safetensors.torch import load_file
except Exception as e:
    print("IMPORT-FAILED", e)
    sys.exit(0)
tensors = load_file(sys.argv[1])
print(json.dumps({k: {"dtype": str(v.dtype), "shape": list(v.shape), "values": v.flatten().tolist()} for k, v in tensors.items()}))
"#;
    let out = Command::new(&python)
        .args(["-c", script, s(&model)])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    if stdout.starts_with("IMPORT-FAILED") {
        println!("skipping the Python read-back: {}", stdout.trim());
        return;
    }
    let got: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(got.as_object().unwrap().len(), 3);
    for p in layout() {
        let t = &got[&p.name];
        assert_eq!(t["dtype"], "torch.float32", "{}", p.name);
        assert_eq!(t["shape"], serde_json::json!(p.shape), "{}", p.name);
        let want: Vec<f64> = flat[p.offset..p.offset + p.numel()]
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        assert_eq!(t["values"], serde_json::json!(want), "{}", p.name);
    }
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

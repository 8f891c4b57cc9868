//! Save with one `Saver` per rank (threads), load with other world sizes,
//! prune, crash mid-save (a child process), corrupt files, bad input.

use std::fs;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cohort_checkpoint::{
    CkptError, Meta, ParamLayout, Saver, SaverOptions, Shard, find_resumable, load, verify,
};
use cohort_contract::{FaultPoint, FaultSpec, shard_range};

const STATES: [&str; 2] = ["exp_avg", "exp_avg_sq"];

fn layout() -> Vec<ParamLayout> {
    let mut offset = 0;
    [
        ("wte.weight", vec![13, 7]),
        ("h.0.attn.w", vec![7, 5]),
        ("ln_f.bias", vec![5]),
        ("scale", vec![]),
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

/// The consolidated state of a model at `step`: params and the two moments.
fn model(step: u64) -> (Vec<f32>, Vec<Vec<f32>>) {
    let total: usize = layout().iter().map(ParamLayout::numel).sum();
    let s = step as f32;
    let params = (0..total).map(|i| i as f32 * 0.5 - s).collect();
    let states = (0..STATES.len())
        .map(|k| {
            (0..total)
                .map(|i| (i * (k + 2)) as f32 + s * 0.25)
                .collect()
        })
        .collect();
    (params, states)
}

fn meta(step: u64, world: usize) -> Meta {
    let layout = layout();
    Meta {
        step,
        world,
        zero_stage: 1,
        total: layout.iter().map(ParamLayout::numel).sum(),
        layout,
        state_names: STATES.iter().map(|s| s.to_string()).collect(),
        train_state: serde_json::json!({"data_position": step * 64, "rng": [1, 2, 3]}),
        config_toml: "[model]\nname = \"tiny\"\n".into(),
    }
}

fn shard_of(step: u64, world: usize, rank: usize) -> Shard {
    let (params, states) = model(step);
    let range = shard_range(params.len(), world, rank);
    Shard {
        params: params[range.clone()].to_vec(),
        states: states.iter().map(|s| s[range.clone()].to_vec()).collect(),
        range,
    }
}

fn opts(keep_last: usize, async_save: bool) -> SaverOptions {
    SaverOptions {
        keep_last,
        async_save,
        commit_timeout: Duration::from_secs(60),
        ..SaverOptions::default()
    }
}

/// Saves `steps` with `world` ranks, one thread and one Saver per rank.
fn save_steps(root: &Path, world: usize, steps: &[u64], opts: SaverOptions) {
    save_steps_with(root, world, steps, &|_| opts.clone());
}

/// As `save_steps`, with each rank's options from `opts(rank)`.
fn save_steps_with(
    root: &Path,
    world: usize,
    steps: &[u64],
    opts: &(dyn Fn(usize) -> SaverOptions + Sync),
) {
    std::thread::scope(|s| {
        for rank in 0..world {
            let opts = opts(rank);
            s.spawn(move || {
                let mut saver = Saver::new(root, rank, world, opts).unwrap();
                for &step in steps {
                    saver
                        .save(meta(step, world), shard_of(step, world, rank))
                        .unwrap();
                }
                saver.finish().unwrap();
            });
        }
    });
}

/// Loads every rank of `world` and concatenates: the consolidated state.
fn load_all(path: &Path, world: usize) -> (Meta, Vec<f32>, Vec<Vec<f32>>) {
    let mut params = Vec::new();
    let mut states = vec![Vec::new(); STATES.len()];
    let mut first = None;
    for rank in 0..world {
        let (m, shard) = load(path, rank, world).unwrap();
        assert_eq!(shard.range, shard_range(m.total, world, rank));
        params.extend(shard.params);
        for (all, part) in states.iter_mut().zip(shard.states) {
            all.extend(part);
        }
        first.get_or_insert(m);
    }
    (first.unwrap(), params, states)
}

fn step_dirs(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("step-") || n.starts_with(".partial"))
        .collect();
    names.sort();
    names
}

fn latest(root: &Path) -> String {
    fs::read_to_string(root.join("latest"))
        .unwrap()
        .trim()
        .to_string()
}

fn check_reslicing(async_save: bool) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ckpt");
    save_steps(&root, 2, &[10], opts(3, async_save));
    assert_eq!(latest(&root), "step-00000010");
    let (want_params, want_states) = model(10);
    for world in [1, 2, 3, 5] {
        let (m, params, states) = load_all(&root, world);
        assert_eq!(params, want_params, "params, load world {world}");
        assert_eq!(states, want_states, "states, load world {world}");
        assert_eq!(m, meta(10, 2), "meta, load world {world}");
    }
    let step_dir = root.join("step-00000010");
    let mut files: Vec<_> = fs::read_dir(&step_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "manifest.json",
            "rank-00000.safetensors",
            "rank-00001.safetensors"
        ]
    );
    let report = verify(&step_dir).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.files_ok, 2);
}

#[test]
fn sync_save_on_2_loads_on_1_2_3_5() {
    check_reslicing(false);
}

#[test]
fn async_save_on_2_loads_on_1_2_3_5() {
    check_reslicing(true);
}

#[test]
fn more_ranks_than_elements_loads_empty_shards() {
    let dir = tempfile::tempdir().unwrap();
    save_steps(dir.path(), 3, &[1], opts(1, false));
    let total = meta(1, 1).total;
    let (_, params, states) = load_all(dir.path(), total + 4);
    assert_eq!((params, states), model(1));
}

#[test]
fn keep_last_prunes_after_commit_and_removes_stale_partials() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir_all(root.join(".partial-step-00000001")).unwrap();
    fs::create_dir_all(root.join(".partial-step-00000099")).unwrap();
    save_steps(root, 2, &[2, 3, 4, 5], opts(2, true));
    assert_eq!(
        step_dirs(root),
        [".partial-step-00000099", "step-00000004", "step-00000005"]
    );
    assert_eq!(latest(root), "step-00000005");
    let (m, params, _) = load_all(root, 1);
    assert_eq!((m.step, params), (5, model(5).0));
    let (m, params, _) = load_all(&root.join("step-00000004"), 2);
    assert_eq!((m.step, params), (4, model(4).0));
}

#[test]
fn keep_last_zero_keeps_every_step_and_resaving_a_step_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    save_steps(dir.path(), 1, &[1, 2, 3, 4, 2], opts(0, false));
    assert_eq!(
        step_dirs(dir.path()),
        [
            "step-00000001",
            "step-00000002",
            "step-00000003",
            "step-00000004"
        ]
    );
    assert_eq!(latest(dir.path()), "step-00000002");
    assert!(verify(&dir.path().join("step-00000002")).unwrap().is_ok());
}

fn flip_byte(file: &Path, at: usize) {
    let mut bytes = fs::read(file).unwrap();
    let at = at.min(bytes.len() - 1);
    bytes[at] ^= 0x40;
    fs::write(file, bytes).unwrap();
}

/// Saves steps 1 and 2, damages step 2 with `damage`, and checks that the
/// error names `bad_file` and that `find_resumable` falls back to step 1.
fn check_fallback(damage: impl FnOnce(&Path), bad_file: &str, want: &str) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    save_steps(root, 2, &[1, 2], opts(3, true));
    let step2 = root.join("step-00000002");
    assert_eq!(find_resumable(root).unwrap(), Some(step2.clone()));
    damage(&step2);

    let err = load(root, 0, 1).unwrap_err().to_string();
    assert!(err.contains(bad_file) && err.contains(want), "{err}");
    assert_eq!(
        find_resumable(root).unwrap(),
        Some(root.join("step-00000001"))
    );
    let (m, params, states) = load_all(&root.join("step-00000001"), 3);
    assert_eq!((m.step, params, states), (1, model(1).0, model(1).1));
}

#[test]
fn flipped_byte_is_named_with_both_checksums_and_skipped() {
    check_fallback(
        |step| flip_byte(&step.join("rank-00001.safetensors"), 500),
        "rank-00001.safetensors",
        "expected crc32c 0x",
    );
    let dir = tempfile::tempdir().unwrap();
    save_steps(dir.path(), 2, &[1], opts(3, false));
    let file = dir.path().join("step-00000001/rank-00000.safetensors");
    let before = crc32c::crc32c(&fs::read(&file).unwrap());
    flip_byte(&file, 100);
    let after = crc32c::crc32c(&fs::read(&file).unwrap());
    let report = verify(dir.path()).unwrap();
    assert_eq!(report.files_ok, 1);
    match &report.problems[..] {
        [
            CkptError::Checksum {
                file: f,
                expected,
                actual,
            },
        ] => {
            assert_eq!((f, *expected, *actual), (&file, before, after));
        }
        other => panic!("expected one checksum problem, got {other:?}"),
    }
}

#[test]
fn missing_shard_is_named_and_skipped() {
    check_fallback(
        |step| fs::remove_file(step.join("rank-00000.safetensors")).unwrap(),
        "rank-00000.safetensors",
        "missing shard file",
    );
}

#[test]
fn truncated_manifest_is_named_and_skipped() {
    check_fallback(
        |step| {
            let path = step.join("manifest.json");
            let bytes = fs::read(&path).unwrap();
            fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        },
        "manifest.json",
        "truncated or corrupt",
    );
}

#[test]
fn truncated_shard_is_named_and_skipped() {
    check_fallback(
        |step| {
            let path = step.join("rank-00001.safetensors");
            let bytes = fs::read(&path).unwrap();
            fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        },
        "rank-00001.safetensors",
        "the manifest records",
    );
}

#[test]
fn nothing_resumable_is_none() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(find_resumable(&dir.path().join("absent")).unwrap(), None);
    assert_eq!(find_resumable(dir.path()).unwrap(), None);
}

#[test]
fn incompatible_layout_names_the_parameter() {
    let dir = tempfile::tempdir().unwrap();
    save_steps(dir.path(), 1, &[1], opts(3, false));
    let (m, _) = load(dir.path(), 0, 1).unwrap();
    m.check_compatible(&layout()).unwrap();
    let mut other = layout();
    other[1].shape = vec![5, 7];
    let err = m.check_compatible(&other).unwrap_err().to_string();
    assert!(
        err.contains("h.0.attn.w") && err.contains("[7, 5]") && err.contains("[5, 7]"),
        "{err}"
    );
}

#[test]
fn unwritable_root_fails_at_new() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    fs::write(&file, b"not a directory").unwrap();
    let root = file.join("sub");
    let err = Saver::new(&root, 0, 1, opts(3, true)).err().unwrap();
    assert!(matches!(err, CkptError::NotWritable { .. }), "{err}");
    assert!(err.to_string().contains("file/sub"), "{err}");
}

#[test]
fn inconsistent_saves_are_rejected_before_any_io() {
    let dir = tempfile::tempdir().unwrap();
    let mut saver = Saver::new(dir.path(), 1, 2, opts(3, true)).unwrap();
    let mut shard = shard_of(1, 2, 1);
    shard.states[1].pop();
    let err = saver.save(meta(1, 2), shard).unwrap_err().to_string();
    assert!(err.contains("exp_avg_sq"), "{err}");
    let err = saver
        .save(meta(1, 2), shard_of(1, 2, 0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("owns elements"), "{err}");
    let err = saver
        .save(meta(1, 3), shard_of(1, 2, 1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("world 2"), "{err}");
    assert!(Saver::new(dir.path(), 2, 2, opts(3, true)).is_err());
    assert_eq!(step_dirs(dir.path()), Vec::<String>::new());
}

#[test]
fn missing_rank_times_out_and_the_error_surfaces_on_finish() {
    let dir = tempfile::tempdir().unwrap();
    save_steps(dir.path(), 2, &[1], opts(3, false));
    let short = SaverOptions {
        commit_timeout: Duration::from_millis(200),
        ..opts(3, true)
    };
    let mut saver = Saver::new(dir.path(), 0, 2, short).unwrap();
    saver.save(meta(2, 2), shard_of(2, 2, 0)).unwrap();
    let err = saver.finish().unwrap_err();
    assert!(
        matches!(&err, CkptError::CommitTimeout { missing, .. } if missing == &[1]),
        "{err}"
    );
    assert_eq!(latest(dir.path()), "step-00000001");
    assert_eq!(
        find_resumable(dir.path()).unwrap(),
        Some(dir.path().join("step-00000001"))
    );
    // The failed save left nothing behind: no partial directory, no probe.
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with('.')),
        "left behind: {names:?}"
    );
}

#[test]
fn when_no_checkpoint_verifies_resuming_is_refused_naming_each() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    save_steps(root, 2, &[1, 2], opts(3, true));
    flip_byte(&root.join("step-00000002/rank-00001.safetensors"), 500);
    fs::remove_file(root.join("step-00000001/rank-00000.safetensors")).unwrap();
    let err = find_resumable(root).unwrap_err();
    assert!(matches!(err, CkptError::NoneVerifies { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("step-00000002: ") && text.contains("rank-00001.safetensors"),
        "{text}"
    );
    assert!(text.contains("step-00000001: missing shard file"), "{text}");
    assert!(text.contains("--resume never"), "{text}");
}

#[test]
fn a_garbage_latest_falls_back_to_the_newest_step_and_is_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    save_steps(root, 1, &[1, 2], opts(3, true));
    for garbage in [
        &b"step-0000000x\n"[..],
        &[0xff, 0xfe, 0x00, 0x80][..],
        b"step-00000009\n",
    ] {
        fs::write(root.join("latest"), garbage).unwrap();
        let (m, params, _) = load_all(root, 1);
        assert_eq!((m.step, params), (2, model(2).0));
        assert_eq!(verify(root).unwrap().manifest.step, 2);
        assert_eq!(
            find_resumable(root).unwrap(),
            Some(root.join("step-00000002"))
        );
        // A writer starting on this root (even one that commits nothing)
        // rewrites it.
        drop(Saver::new(root, 0, 1, opts(3, true)).unwrap());
        assert_eq!(latest(root), "step-00000002");
    }
}

#[test]
fn io_errors_say_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    fs::write(&file, b"a file").unwrap();
    let Err(err) = Saver::new(&file.join("x"), 0, 1, opts(3, true)) else {
        panic!("a root under a file is not writable");
    };
    let text = anyhow_like_chain(&err);
    assert_eq!(text.matches("Not a directory").count(), 1, "{text}");
}

/// The error with its `source()` chain, as `{:#}` of anyhow prints it.
fn anyhow_like_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Kills the child process if the test ends before it does.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `std::process::abort` raises SIGABRT.
#[cfg(unix)]
const SIGABRT: i32 = 6;

const CHILD_ROOT_ENV: &str = "COHORT_CKPT_TEST_CHILD_ROOT";

/// Runs as the parent (spawning itself as the child) unless `CHILD_ROOT_ENV`
/// is set; the child saves steps 10 and 20 on 2 ranks and aborts mid-way
/// through step 20 by the injected fault.
#[test]
fn kill_during_save_leaves_the_previous_checkpoint() {
    if let Ok(root) = std::env::var(CHILD_ROOT_ENV) {
        let async_save = std::env::var("COHORT_CKPT_TEST_ASYNC").is_ok();
        // The worker parses the fault and hands each rank's saver its step.
        let fault = FaultSpec::parse(&std::env::var("COHORT_INJECT_FAULT").unwrap()).unwrap();
        let opts = |rank| SaverOptions {
            abort_before_commit: fault.step_for(rank, FaultPoint::Commit),
            ..opts(3, async_save)
        };
        // Step 10 is committed before any rank starts step 20, as training
        // steps (with their collectives) would separate them.
        save_steps_with(Path::new(&root), 2, &[10], &opts);
        save_steps_with(Path::new(&root), 2, &[20], &opts);
        panic!("the injected fault should have aborted this process");
    }
    for (rank, async_save) in [(1, false), (0, true)] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "kill_during_save_leaves_the_previous_checkpoint",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ROOT_ENV, &root)
        .env(
            "COHORT_INJECT_FAULT",
            format!("rank={rank},step=20,at=commit"),
        );
        if async_save {
            cmd.env("COHORT_CKPT_TEST_ASYNC", "1");
        }
        let mut child = ChildGuard(cmd.spawn().unwrap());
        let status = wait_with_deadline(&mut child.0, Duration::from_secs(120));
        assert!(!status.success(), "child should have aborted: {status}");
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(SIGABRT), "{status}");
        }
        let partial = root.join(".partial-step-00000020");
        assert!(partial.join(format!("rank-{rank:05}.safetensors")).exists());
        assert!(!partial.join("manifest.json").exists());
        assert!(!root.join("step-00000020").exists());
        assert_eq!(latest(&root), "step-00000010");
        assert_eq!(
            find_resumable(&root).unwrap(),
            Some(root.join("step-00000010"))
        );
        let (m, params, states) = load_all(&root, 3);
        assert_eq!((m.step, params, states), (10, model(10).0, model(10).1));

        // The restart saves step 20 again over the leftovers and commits.
        save_steps(&root, 2, &[20], opts(3, async_save));
        assert_eq!(step_dirs(&root), ["step-00000010", "step-00000020"]);
        assert!(verify(&root).unwrap().is_ok());
        let (m, params, _) = load_all(&root, 1);
        assert_eq!((m.step, params), (20, model(20).0));
    }
}

fn wait_with_deadline(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "child did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn resolve_rejects_paths_that_are_not_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let err = load(&dir.path().join("nope"), 0, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
    let err = load(dir.path(), 0, 1).unwrap_err().to_string();
    assert!(err.contains("neither manifest.json nor latest"), "{err}");
    fs::write(dir.path().join("latest"), "../../etc\n").unwrap();
    let err = load(dir.path(), 0, 1).unwrap_err().to_string();
    assert!(err.contains("not a step directory name"), "{err}");
    let err = load(dir.path(), 1, 1).unwrap_err().to_string();
    assert!(err.contains("rank 1 of world 1"), "{err}");
}

fn attempt_opts(attempt: &str) -> SaverOptions {
    SaverOptions {
        attempt: attempt.to_owned(),
        ..opts(3, false)
    }
}

#[test]
fn a_second_job_is_fenced_off_while_the_lease_holder_lives() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Another job's rank 0, alive on this host, holds the root.
    let mut other = ChildGuard(Command::new("sleep").arg("30").spawn().unwrap());
    let held = cohort_checkpoint::lease::Lease {
        pid: other.0.id(),
        ..cohort_checkpoint::lease::Lease::mine("job-a/3/3")
    };
    fs::write(root.join("lease.json"), serde_json::to_vec(&held).unwrap()).unwrap();
    let Err(err) = Saver::new(root, 0, 1, attempt_opts("job-b/0/0")) else {
        panic!("the second job must be refused");
    };
    let text = err.to_string();
    assert!(matches!(err, CkptError::Fenced { .. }), "{text}");
    assert!(text.contains("leased by job job-a, generation 3"), "{text}");
    assert!(text.contains(&format!("pid {}", other.0.id())), "{text}");
    // Its owner dies: the lease is taken over.
    other.0.kill().unwrap();
    other.0.wait().unwrap();
    let mut saver = Saver::new(root, 0, 1, attempt_opts("job-b/0/0")).unwrap();
    saver.save(meta(1, 1), shard_of(1, 1, 0)).unwrap();
    assert_eq!(latest(root), "step-00000001");
}

#[test]
fn a_stale_attempt_cannot_commit_after_a_restart_took_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut stale = Saver::new(root, 0, 1, attempt_opts("job/0/0")).unwrap();
    stale.save(meta(1, 1), shard_of(1, 1, 0)).unwrap();
    // The job restarted: generation 1 takes the lease over.
    let mut fresh = Saver::new(root, 0, 1, attempt_opts("job/1/1")).unwrap();
    let err = stale.save(meta(2, 1), shard_of(2, 1, 0)).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CkptError::Fenced { .. }), "{text}");
    assert!(text.contains("leased by job job, generation 1"), "{text}");
    assert!(!root.join("step-00000002").exists());
    // The stale attempt can't take it back either.
    assert!(Saver::new(root, 0, 1, attempt_opts("job/0/0")).is_err());
    fresh.save(meta(2, 1), shard_of(2, 1, 0)).unwrap();
    assert_eq!(latest(root), "step-00000002");
}

//! Checkpoint save throughput vs the disk's sequential write bandwidth, both
//! measured in this run on the same filesystem. Driven by bench/ckpt_save.sh.
//!
//! A model of `--mb` MiB of f32 params plus AdamW's two moments (3x that on
//! disk) is saved by `world` ranks (one thread and one Saver each), sync and
//! async. `dd bs=4M conv=fsync` of the same size gives the disk's
//! bandwidth, measured next to each save (the disk is shared and drifts),
//! from a tmpfs copy of the checkpoint's bytes and from /dev/zero.
//! Prints a table and writes JSON to `--json`.
//!
//! cargo run --release -p cohort-checkpoint --example ckpt_save_bench -- \
//!     --dir /tmp/ckpt-bench --mb 300 --worlds 1,2 --repeat 3 --json out.json

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use cohort_checkpoint::{Meta, ParamLayout, Saver, SaverOptions, Shard};
use cohort_contract::shard_range;

struct Args {
    dir: PathBuf,
    mb: usize,
    worlds: Vec<usize>,
    repeat: usize,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        dir: std::env::temp_dir().join("cohort-ckpt-bench"),
        mb: 300,
        worlds: vec![1, 2],
        repeat: 3,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => args.dir = value()?.into(),
            "--mb" => args.mb = value()?.parse().map_err(|e| format!("--mb: {e}"))?,
            "--repeat" => args.repeat = value()?.parse().map_err(|e| format!("--repeat: {e}"))?,
            "--json" => args.json = Some(value()?.into()),
            "--worlds" => {
                args.worlds = value()?
                    .split(',')
                    .map(|w| w.parse().map_err(|e| format!("--worlds {w:?}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.mb == 0 || args.repeat == 0 || args.worlds.contains(&0) {
        return Err("--mb, --repeat and every world size must be positive".into());
    }
    Ok(args)
}

/// `dd` from `input` (`/dev/zero`, or a file in memory) of `bytes` (rounded
/// up to 4 MiB blocks) with one fsync at the end.
fn dd_bandwidth(file: &Path, bytes: u64, input: &Path) -> Result<f64, String> {
    let count = bytes.div_ceil(4 << 20);
    let start = Instant::now();
    let out = Command::new("dd")
        .arg(format!("if={}", input.display()))
        .arg(format!("of={}", file.display()))
        .args(["bs=4M", &format!("count={count}"), "conv=fsync"])
        .output()
        .map_err(|e| format!("running dd: {e}"))?;
    let secs = start.elapsed().as_secs_f64();
    let written = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    if !out.status.success() {
        return Err(format!(
            "dd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(written as f64 / secs)
}

/// Flushes the filesystems (the deletions of the last repeat).
fn sync() {
    let _ = Command::new("sync").status();
}

fn meta(step: u64, world: usize, total: usize) -> Meta {
    Meta {
        step,
        world,
        zero_stage: 1,
        total,
        layout: vec![ParamLayout {
            name: "flat".into(),
            shape: vec![total],
            offset: 0,
        }],
        state_names: vec!["exp_avg".into(), "exp_avg_sq".into()],
        train_state: serde_json::json!({"step": step}),
        config_toml: String::new(),
    }
}

/// One timed save of the whole model by `world` ranks: (seconds until every
/// rank's `save` returned, seconds until committed, bytes on disk).
fn timed_save(
    root: &Path,
    world: usize,
    step: u64,
    model: &[Vec<f32>; 3],
    async_save: bool,
) -> (f64, f64, u64) {
    let total = model[0].len();
    let barrier = Barrier::new(world);
    let opts = SaverOptions {
        keep_last: 1,
        async_save,
        commit_timeout: Duration::from_secs(600),
        ..SaverOptions::default()
    };
    let times: Vec<(f64, f64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (barrier, opts) = (&barrier, opts.clone());
                s.spawn(move || {
                    let mut saver = Saver::new(root, rank, world, opts).unwrap();
                    // The host copy a trainer makes before handing data over.
                    let range = shard_range(total, world, rank);
                    let shard = Shard {
                        range: range.clone(),
                        params: model[0][range.clone()].to_vec(),
                        states: vec![model[1][range.clone()].to_vec(), model[2][range].to_vec()],
                    };
                    barrier.wait();
                    let start = Instant::now();
                    saver.save(meta(step, world, total), shard).unwrap();
                    let returned = start.elapsed().as_secs_f64();
                    saver.finish().unwrap();
                    (returned, start.elapsed().as_secs_f64())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let dir = root.join(format!("step-{step:08}"));
    let bytes = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let returned = times.iter().map(|t| t.0).fold(0.0, f64::max);
    let committed = times.iter().map(|t| t.1).fold(0.0, f64::max);
    (returned, committed, bytes)
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    std::fs::create_dir_all(&args.dir).unwrap();
    let total = args.mb * (1 << 20) / 4;
    let model: [Vec<f32>; 3] =
        [1.0f32, 2.0, 3.0].map(|k| (0..total).map(|i| (i % 1000) as f32 * k).collect());
    let bytes = 3 * 4 * total as u64;
    // dd's input: the checkpoint's own bytes, from memory (tmpfs).
    let dd_input = PathBuf::from(format!(
        "/dev/shm/cohort-ckpt-bench-{}.bin",
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&dd_input)
            .unwrap_or_else(|e| panic!("{}: {e}", dd_input.display()));
        for v in &model {
            std::io::Write::write_all(&mut f, bytemuck::cast_slice(v)).unwrap();
        }
    }

    println!(
        "model: {} MiB params + 2 AdamW moments = {} MiB per checkpoint; dir {}",
        args.mb,
        bytes >> 20,
        args.dir.display()
    );
    // Each save is paired with a dd run next to it, and compared with that
    // one: the disk is shared and its bandwidth drifts between runs.
    let mut rows = Vec::new();
    let mut step = 0;
    for rep in 0..args.repeat {
        // Every measurement writes new files, as a checkpoint does; they are
        // deleted (and `sync`ed) only between repeats: this filesystem may
        // be mounted with `discard`, and writes right after a deletion run
        // at another speed.
        let rep_dir = args.dir.join(format!("rep-{rep}"));
        std::fs::create_dir_all(&rep_dir).unwrap();
        for &world in &args.worlds {
            for async_save in [false, true] {
                step += 1;
                // dd before the save in even repeats, after it in odd ones,
                // so each configuration is measured in both orders.
                let dd = || {
                    let data = dd_bandwidth(&rep_dir.join(format!("dd-{step}")), bytes, &dd_input)
                        .unwrap_or_else(|e| panic!("{e}"));
                    let zero = dd_bandwidth(
                        &rep_dir.join(format!("dd0-{step}")),
                        bytes,
                        Path::new("/dev/zero"),
                    )
                    .unwrap_or_else(|e| panic!("{e}"));
                    (data, zero)
                };
                let dd_before = (rep % 2 == 0).then(dd);
                let root = rep_dir.join(format!("ckpt-{step}"));
                let (returned, committed, on_disk) =
                    timed_save(&root, world, step, &model, async_save);
                let (dd, dd_zero) = dd_before.unwrap_or_else(dd);
                rows.push(Row {
                    world,
                    async_save,
                    returned,
                    committed,
                    rate: on_disk as f64 / committed,
                    dd,
                    dd_zero,
                });
            }
        }
        std::fs::remove_dir_all(&rep_dir).unwrap();
        sync();
    }
    println!(
        "{:>5}  {:>5}  {:>8}  {:>11}  {:>9}  {:>9}  {:>9}  {:>8}  {:>8}  {:>8}  save/dd per run",
        "world",
        "mode",
        "save() s",
        "committed s",
        "save GB/s",
        "dd GB/s",
        "dd0 GB/s",
        "save/dd",
        "pooled",
        "vs dd0",
    );
    let mut json_rows = Vec::new();
    for &world in &args.worlds {
        for async_save in [false, true] {
            let runs: Vec<&Row> = rows
                .iter()
                .filter(|r| r.world == world && r.async_save == async_save)
                .collect();
            let med = |f: fn(&Row) -> f64| median(runs.iter().map(|r| f(r)).collect());
            let ratios: Vec<f64> = runs.iter().map(|r| r.rate / r.dd).collect();
            let mode = if async_save { "async" } else { "sync" };
            let pooled = pooled_ratio(&runs, |r| r.dd);
            let pooled_zero = pooled_ratio(&runs, |r| r.dd_zero);
            println!(
                "{world:>5}  {mode:>5}  {:>8.3}  {:>11.3}  {:>9.2}  {:>9.2}  {:>9.2}  {:>7.2}x  {:>7.2}x  {:>7.2}x  {}",
                med(|r| r.returned),
                med(|r| r.committed),
                med(|r| r.rate) / 1e9,
                med(|r| r.dd) / 1e9,
                med(|r| r.dd_zero) / 1e9,
                median(ratios.clone()),
                pooled,
                pooled_zero,
                ratios
                    .iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            json_rows.push(serde_json::json!({
                "world": world, "mode": mode,
                "save_returned_s": runs.iter().map(|r| r.returned).collect::<Vec<_>>(),
                "committed_s": runs.iter().map(|r| r.committed).collect::<Vec<_>>(),
                "save_bytes_per_s": runs.iter().map(|r| r.rate).collect::<Vec<_>>(),
                "dd_bytes_per_s": runs.iter().map(|r| r.dd).collect::<Vec<_>>(),
                "dd_zero_bytes_per_s": runs.iter().map(|r| r.dd_zero).collect::<Vec<_>>(),
                "median_ratio_vs_dd": median(ratios),
                "pooled_ratio_vs_dd": pooled,
                "pooled_ratio_vs_dd_zero": pooled_zero,
            }));
        }
    }
    let _ = std::fs::remove_file(&dd_input);
    let all: Vec<&Row> = rows.iter().collect();
    let pooled_all = pooled_ratio(&all, |r| r.dd);
    let pooled_all_zero = pooled_ratio(&all, |r| r.dd_zero);
    println!(
        "all {} saves pooled (total bytes / total seconds): {pooled_all:.2}x dd of the same bytes, {pooled_all_zero:.2}x dd of zeros",
        rows.len()
    );
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "model_mib_params": args.mb, "checkpoint_bytes": bytes, "repeat": args.repeat,
            "dir": args.dir, "saves": json_rows, "pooled_ratio_vs_dd": pooled_all,
            "pooled_ratio_vs_dd_zero": pooled_all_zero,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    }
}

/// One save and the dd run next to it.
struct Row {
    world: usize,
    async_save: bool,
    returned: f64,
    committed: f64,
    rate: f64,
    /// dd of the checkpoint's own bytes (from memory).
    dd: f64,
    /// dd from /dev/zero (some virtual disks write zeros at another speed).
    dd_zero: f64,
}

/// Total bytes over total seconds, saves vs their dd runs (equal sizes):
/// the ratio of the harmonic means of the rates. Steadier than a median of
/// per-pair ratios when the disk's bandwidth swings between runs.
fn pooled_ratio(runs: &[&Row], dd: fn(&Row) -> f64) -> f64 {
    let hmean =
        |f: &dyn Fn(&Row) -> f64| runs.len() as f64 / runs.iter().map(|r| 1.0 / f(r)).sum::<f64>();
    hmean(&|r| r.rate) / hmean(&|r| dd(r))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

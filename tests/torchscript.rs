//! `model.kind = "torchscript"`: the user's own module, scripted in Python.
//!
//! examples/torchscript/train.py scripts its TinyGPT, trains it with
//! `cohort launch` on 2 ranks (DDP), exports the checkpoint and loads it
//! into the unscripted module with `strict=True`; its per-step losses are
//! compared with the same module trained by PyTorch DDP (gloo, 2 ranks) on
//! the same batches (tests/torch_equivalence.py --module --ddp: cohort's
//! data order, schedule, AdamW and clipping), and so are those of ZeRO-2
//! training it and of DDP resumed from a checkpoint after rank 1 died.
//!
//! Tolerance: 1e-5 relative, as tests/torch_equivalence.rs. Both sides run
//! the same TorchScript graph in the same libtorch in fp32 from the same
//! weights (the file's), so they differ only in the order of the gradient
//! sums (cohort's ring all-reduce vs. gloo's) and of the global norm (f64
//! vs. PyTorch's fp32); measured, that leaves 1.7e-7 over the 20 steps.
//! The control, a 1% larger learning rate (PyTorch's 2 ranks simulated in
//! one process, which is faster than starting DDP again), moves the losses
//! by 3.3e-3, and must fail the comparison (differ by more than 1e-4).
//!
//! Bad modules (a missing file, a file that is not a module, a forward of
//! the wrong signature or not returning a scalar, no parameter to train,
//! buffers)
//! stop `cohort launch` before the first step with exit 2 and a message
//! naming model.path.

mod fixtures;
mod launch_util;
mod worker_bin;

use std::path::Path;
use std::time::Duration;

use fixtures::{max_rel_diff, step_losses};
use launch_util::{FAST, cohort, run};

const DEADLINE: Duration = Duration::from_secs(300);
const STEPS: usize = 20;
const TOLERANCE: f64 = 1e-5;
const CONTROL_MIN: f64 = 1e-4;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// tests/torch_equivalence.py's per-step losses for the module in `work`.
fn torch_losses(python: &Path, work: &Path, control: &[&str]) -> Vec<f64> {
    let out = work.join(format!("torch{}.json", control.join("")));
    let mut cmd = std::process::Command::new(python);
    cmd.arg(repo().join("tests/torch_equivalence.py"))
        .arg("--config")
        .arg(work.join("job.toml"))
        .args(["--world", "2", "--module"])
        .arg(work.join("model.pt"))
        .arg("--out")
        .arg(&out)
        .args(control)
        .env("OMP_NUM_THREADS", "1");
    let (status, stdout, stderr) = run(cmd, DEADLINE);
    assert!(
        status.success(),
        "torch_equivalence.py failed:\n{stdout}{stderr}"
    );
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

#[test]
fn the_example_trains_like_pytorch_and_loads_back_strictly() {
    let Some(python) = fixtures::python() else {
        return;
    };
    worker_bin::ensure();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("run");
    let logs = dir.path().join("logs");
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(repo().join("examples/torchscript/train.py"))
        .arg("--cohort")
        .arg(env!("CARGO_BIN_EXE_cohort"))
        .arg("--workdir")
        .arg(&work)
        .args(["--steps", &STEPS.to_string(), "--nproc", "2", "--"])
        .args(FAST)
        .args(["--max-restarts", "0", "--log-dir"])
        .arg(logs.join("ddp"))
        .env_remove("OMP_NUM_THREADS")
        .env("RUST_LOG", "warn");
    let (status, out, err) = run(cmd, DEADLINE);
    assert!(status.success(), "the example failed:\n{out}{err}");
    assert!(
        out.contains("into TinyGPT with strict=True: 30 of 30 tensors changed"),
        "{out}{err}"
    );
    let ddp = step_losses(&logs.join("ddp"));
    let reference = torch_losses(&python, &work, &["--ddp"]);
    let diff = max_rel_diff(&ddp, &reference, STEPS);
    println!("ddp: largest relative loss difference to PyTorch DDP {diff:.2e}");
    assert!(
        diff <= TOLERANCE,
        "DDP: per-step losses differ from PyTorch's by up to {diff:.2e} (> {TOLERANCE:e})\ncohort {ddp:?}\ntorch  {reference:?}"
    );
    let control = torch_losses(&python, &work, &["--lr-scale", "1.01"]);
    let moved = max_rel_diff(&ddp, &control, STEPS);
    println!("control --lr-scale 1.01: {moved:.2e}");
    assert!(
        moved > CONTROL_MIN,
        "the comparison cannot see a 1% larger learning rate: {moved:.2e}"
    );

    // The same file under ZeRO-2, from scratch (another checkpoint dir),
    // evaluated every 10 steps.
    let mut cmd = cohort();
    cmd.current_dir(&work)
        .arg("launch")
        .args(FAST)
        .args(["--max-restarts", "0", "--nproc-per-node", "2", "--log-dir"])
        .arg(logs.join("zero2"))
        .arg(work.join("job.toml"))
        .args([
            "--set",
            "parallel.zero_stage=2",
            "--set",
            "train.eval_every=10",
        ])
        .arg("--set")
        .arg(format!(
            "checkpoint.dir={}",
            dir.path().join("ckpt2").display()
        ));
    let (status, out, err) = run(cmd, DEADLINE);
    assert!(status.success(), "ZeRO-2 failed:\n{out}{err}");
    // Evaluation (the module in eval(), then back in train()) changes no
    // training loss.
    assert!(out.contains("eval loss"), "no evaluation:\n{out}{err}");
    let zero2 = step_losses(&logs.join("zero2"));
    let diff = max_rel_diff(&zero2, &reference, STEPS);
    println!("zero2: largest relative loss difference to PyTorch {diff:.2e}");
    assert!(
        diff <= TOLERANCE,
        "ZeRO-2: per-step losses differ from PyTorch's by up to {diff:.2e}\ncohort {zero2:?}\ntorch  {reference:?}"
    );

    // Rank 1 dies at step 13; the restart (`recovery.mode = "restart"`)
    // resumes from step 10's checkpoint, and the steps it redoes and those
    // after are the uninterrupted run's.
    let mut cmd = cohort();
    cmd.current_dir(&work)
        .arg("launch")
        .args(FAST)
        .args(["--max-restarts", "1", "--nproc-per-node", "2", "--log-dir"])
        .arg(logs.join("resumed"))
        .arg(work.join("job.toml"))
        .args(["--set", "checkpoint.every=5", "--set"])
        .arg(format!(
            "checkpoint.dir={}",
            dir.path().join("ckpt3").display()
        ))
        .args(["--set", "recovery.mode=restart"])
        .env("COHORT_INJECT_FAULT", "rank=1,step=13");
    let (status, out, err) = run(cmd, DEADLINE);
    let all = format!("{out}{err}");
    assert!(status.success(), "the resumed job failed:\n{all}");
    assert!(all.contains("resumed from"), "no resume:\n{all}");
    let metrics = fixtures::find_file(&logs.join("resumed"), "metrics.jsonl").unwrap();
    let mut resumed = vec![f64::NAN; STEPS];
    let mut lines = 0;
    for line in std::fs::read_to_string(metrics).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = v["step"].as_u64().unwrap() as usize;
        resumed[step - 1] = v["loss"].as_f64().unwrap();
        lines += 1;
    }
    assert!(
        lines > STEPS,
        "no step was redone after the restart ({lines} lines)"
    );
    let diff = max_rel_diff(&resumed, &reference, STEPS);
    println!("resumed: largest relative loss difference to PyTorch {diff:.2e}");
    assert!(
        diff <= TOLERANCE,
        "resumed: per-step losses differ from PyTorch's by up to {diff:.2e}\ncohort {resumed:?}\ntorch  {reference:?}"
    );
}

/// Writes the bad module `kind` to `out` (tests/torchscript.rs's cases).
const BAD_MODULES: &str = r#"
import sys
import torch
import torch.nn as nn
import torch.nn.functional as F

kind, out = sys.argv[1], sys.argv[2]


class OneArgument(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 256)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.emb(inputs).mean()


class Logits(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 256)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.emb(inputs)


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 256)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor):
        loss = F.cross_entropy(self.emb(inputs).view(-1, 256), targets.reshape(-1))
        return loss, loss


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 256)
        self.emb.weight.requires_grad_(False)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.emb(inputs).view(-1, 256), targets.reshape(-1))


class Buffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 256)
        self.bn = nn.BatchNorm1d(256)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.bn(self.emb(inputs).view(-1, 256)), targets.reshape(-1))


if kind == "text":
    open(out, "w").write("not a module\n")
else:
    torch.jit.script({"one_argument": OneArgument, "logits": Logits, "pair": Pair, "frozen": Frozen, "buffers": Buffers}[kind]()).save(out)
"#;

#[test]
fn bad_modules_are_refused_before_training_with_exit_2() {
    let Some(python) = fixtures::python() else {
        return;
    };
    worker_bin::ensure();
    let dir = tempfile::tempdir().unwrap();
    let data = repo().join("configs/data/tiny.txt");
    // torch.jit.script reads the classes' source: a file, not `-c`.
    let writer = dir.path().join("bad_modules.py");
    std::fs::write(&writer, BAD_MODULES).unwrap();
    let cases = [
        ("missing", "no such file"),
        ("text", "not a TorchScript module"),
        ("one_argument", "forward(inputs, targets) failed"),
        ("logits", "not a scalar"),
        ("pair", "forward returned a tuple, not a tensor"),
        ("frozen", "no parameter that requires grad"),
        ("buffers", "has buffers (bn.running_mean, bn.running_var"),
    ];
    for (kind, needle) in cases {
        let module = dir.path().join(format!("{kind}.pt"));
        if kind != "missing" {
            let mut cmd = std::process::Command::new(&python);
            cmd.arg(&writer).arg(kind).arg(&module);
            let (status, out, err) = run(cmd, DEADLINE);
            assert!(status.success(), "writing {kind}:\n{out}{err}");
        }
        let config = dir.path().join(format!("{kind}.toml"));
        std::fs::write(
            &config,
            format!(
                "[train]\nmax_steps = 2\nthreads = 1\n[model]\nkind = \"torchscript\"\npath = {:?}\nblock_size = 8\n[data]\nkind = \"text\"\npath = {:?}\n",
                module.display().to_string(),
                data.display().to_string()
            ),
        )
        .unwrap();
        let mut cmd = cohort();
        cmd.current_dir(dir.path())
            .arg("launch")
            .args(FAST)
            .args(["--max-restarts", "2", "--nproc-per-node", "1", "--log-dir"])
            .arg(dir.path().join("logs").join(kind))
            .arg(&config);
        let (status, out, err) = run(cmd, DEADLINE);
        let all = format!("{out}{err}");
        assert_eq!(status.code(), Some(2), "{kind}: {all}");
        assert!(all.contains(needle), "{kind}: no {needle:?} in\n{all}");
        assert!(all.contains("model.path"), "{kind}: {all}");
        assert!(!all.contains("step 1/"), "{kind} trained:\n{all}");
        assert!(!all.contains("restart 1 of"), "{kind} restarted:\n{all}");
    }
}

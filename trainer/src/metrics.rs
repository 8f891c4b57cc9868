//! Where the built-in trainer's step results go: one JSON line per step in
//! `LOG_DIR/metrics.jsonl` (rank 0), the worker's status file that the
//! launcher reads (every rank, through the contract's [`WorkerProgress`]),
//! and the progress line on rank 0's stdout every `train.log_every` steps.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cohort_contract::{Resumed, WorkerEnv, WorkerProgress};
use serde_json::json;

use crate::plan::hidden_fraction;
use crate::{StepReport, TrainError};

/// What one step of the built-in trainer measured, besides its
/// [`StepReport`].
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTimes {
    /// Enqueuing (on a GPU) or running the forward and backward passes.
    pub compute_s: f64,
    /// The whole step, up to its parameters updated.
    pub step_s: f64,
    /// The evaluation loss, when the step evaluated.
    pub eval_loss: Option<f64>,
    /// How long the step stalled for a checkpoint, when it saved one.
    pub ckpt_stall_s: Option<f64>,
}

/// One rank's metrics sink.
pub struct Metrics {
    rank: usize,
    max_steps: u64,
    log_every: u64,
    tokens_per_step: f64,
    /// Rank 0's `metrics.jsonl`.
    jsonl: Option<(File, PathBuf)>,
    status_file: Option<PathBuf>,
    resumed: Option<Resumed>,
    window: Window,
}

impl Metrics {
    /// The sink of `rank`: `env`'s log directory and status file.
    pub fn new(
        env: &WorkerEnv,
        rank: usize,
        max_steps: u64,
        log_every: u64,
        tokens_per_step: f64,
        resumed: Option<Resumed>,
    ) -> Result<Self, TrainError> {
        let jsonl = match (&env.log_dir, rank) {
            (Some(dir), 0) => {
                let path = dir.join("metrics.jsonl");
                Some((open_append(&path)?, path))
            }
            _ => None,
        };
        Ok(Metrics {
            rank,
            max_steps,
            log_every: log_every.max(1),
            tokens_per_step,
            jsonl,
            status_file: env.status_file.clone(),
            resumed,
            window: Window::default(),
        })
    }

    /// Replaces the status file (if any) with this worker's progress.
    pub fn status(
        &self,
        step: u64,
        loss: Option<f64>,
        tokens_per_s: Option<f64>,
    ) -> Result<(), TrainError> {
        let Some(path) = &self.status_file else {
            return Ok(());
        };
        let progress = WorkerProgress {
            step,
            max_steps: self.max_steps,
            loss,
            tokens_per_s,
            time: unix_now(),
            resumed: self.resumed.clone(),
        };
        Ok(progress.write(path)?)
    }

    /// Records a finished step everywhere it goes.
    pub fn record(&mut self, r: &StepReport, t: StepTimes) -> Result<(), TrainError> {
        let tokens_per_s = self.tokens_per_step / t.step_s;
        if let Some((out, path)) = self.jsonl.as_mut() {
            let line = metrics_line(r, &t, tokens_per_s);
            writeln!(out, "{line}").map_err(|source| TrainError::Io {
                path: path.clone(),
                source,
            })?;
        }
        self.status(r.step, r.loss, Some(tokens_per_s))?;
        if self.rank != 0 {
            return Ok(());
        }
        if let Some(stall) = t.ckpt_stall_s {
            println!(
                "checkpoint of step {}: the step stalled {:.1} ms for it ({:.1}% of the step)",
                r.step,
                stall * 1e3,
                100.0 * stall / t.step_s
            );
        }
        self.window.add(r, &t);
        if r.step % self.log_every == 0 || r.step == self.max_steps || t.eval_loss.is_some() {
            println!(
                "{}",
                self.window
                    .line(r, self.max_steps, self.tokens_per_step, t.eval_loss)
            );
            self.window = Window::default();
        }
        Ok(())
    }
}

fn metrics_line(r: &StepReport, t: &StepTimes, tokens_per_s: f64) -> serde_json::Value {
    let mut line = json!({
        "step": r.step,
        "loss": r.loss,
        "lr": r.lr,
        "grad_norm": r.grad_norm,
        "tokens_per_s": tokens_per_s,
        "step_s": t.step_s,
        "compute_s": t.compute_s,
        "comm_s": r.comm_s,
        "comm_wait_s": r.comm_wait_s,
        "grad_comm_s": r.grad_comm_s,
        "grad_comm_hidden_s": r.grad_comm_hidden_s,
        "buckets_in_backward": r.buckets_in_backward,
        "comm_hidden": r.hidden_comm_fraction(),
        "optimizer_s": r.optimizer_s,
        "pack_s": r.pack_s,
        "time": unix_now(),
    });
    if let Some(e) = t.eval_loss {
        line["eval_loss"] = json!(e);
    }
    if let Some(stall) = t.ckpt_stall_s {
        line["ckpt_stall_s"] = json!(stall);
    }
    line
}

/// Averages for the progress line between two prints.
#[derive(Default)]
struct Window {
    steps: u32,
    step_s: f64,
    compute_s: f64,
    comm_s: f64,
    grad_comm_s: f64,
    grad_hidden_s: f64,
    optimizer_s: f64,
}

impl Window {
    fn add(&mut self, r: &StepReport, t: &StepTimes) {
        self.steps += 1;
        self.step_s += t.step_s;
        self.compute_s += t.compute_s;
        self.comm_s += r.comm_s;
        self.grad_comm_s += r.grad_comm_s;
        self.grad_hidden_s += r.grad_comm_hidden_s;
        self.optimizer_s += r.optimizer_s;
    }

    fn line(
        &self,
        r: &StepReport,
        max_steps: u64,
        tokens_per_step: f64,
        eval: Option<f64>,
    ) -> String {
        let n = f64::from(self.steps.max(1));
        let ms = |s: f64| s / n * 1e3;
        let hidden = hidden_fraction(self.grad_hidden_s, self.grad_comm_s) * 100.0;
        let mut line = format!(
            "step {}/{max_steps} | loss {:.4} | lr {:.2e} | grad norm {:.3} | {:.0} tok/s | step {:.1} ms: compute {:.1}, comm {:.1} ({hidden:.0}% hidden), optimizer {:.1}",
            r.step,
            r.loss.unwrap_or(f64::NAN),
            r.lr,
            r.grad_norm,
            tokens_per_step * n / self.step_s,
            ms(self.step_s),
            ms(self.compute_s),
            ms(self.comm_s),
            ms(self.optimizer_s),
        );
        if let Some(e) = eval {
            line.push_str(&format!(" | eval loss {e:.4}"));
        }
        line
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

fn open_append(path: &Path) -> Result<File, TrainError> {
    let io = |source| TrainError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)
}

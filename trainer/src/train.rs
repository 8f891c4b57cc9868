//! The built-in trainer: what `cohort-worker train --config FILE` runs.
//!
//! One step, in order (as nanoGPT's loop): the micro-batches' forward and
//! backward passes (gradients accumulate in the variables; nothing is
//! communicated until the last one), then [`DataParallel::step_with_loss`]
//! (reduce, clip, optimizer, parameters), then metrics, evaluation and
//! checkpoint. Randomness (dropout) is re-seeded every step from
//! `(train.seed, step, rank)`, and the data order is a function of the
//! seed and the job's sample position, so a job resumed from a checkpoint
//! continues exactly where it stopped.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cohort_checkpoint::{Meta, ParamLayout, Saver, SaverOptions};
use cohort_configs::{DeviceChoice, JobConfig};
use cohort_contract::{FaultPoint, Resumed, WorkerEnv, WorkerProgress, var};
use serde_json::json;
use tch::{Device, Kind, Tensor, nn::VarStore};

use crate::data::{Dataset, Loader};
use crate::optim::LrSchedule;
use crate::{Collectives, DataParallel, StepReport, TrainError, model};

/// Where to resume from (`COHORT_RESUME`, the worker env's `resume`).
pub use cohort_contract::Resume;

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Optimizer steps completed (including those before a resume).
    pub steps: u64,
    /// Mean loss over the ranks of the last step run.
    pub final_loss: Option<f64>,
    /// Last evaluation loss.
    pub eval_loss: Option<f64>,
    /// The checkpoint the run resumed from.
    pub resumed_from: Option<PathBuf>,
}

/// Trains the model `job` describes with `comm` (world and rank taken from
/// it; `env` supplies the local rank, log dir, status file, where to resume
/// from, the job attempt and the fault to inject).
pub fn run(
    job: &JobConfig,
    env: &WorkerEnv,
    comm: impl Into<Collectives>,
) -> Result<Summary, TrainError> {
    let comm = comm.into();
    let (rank, world) = (comm.rank(), comm.world_size());
    let t = &job.train;
    if t.threads > 0 {
        tch::set_num_threads(t.threads as i32);
    }
    let device = resolve_device(t.device, env.local_rank)?;
    let precision = t.precision;
    let backend = comm.backend();

    let data = Arc::new(Dataset::open(
        &job.data,
        job.model.block_size,
        job.model.vocab_size,
        t.seed,
    )?);
    tch::manual_seed(t.seed as i64);
    let vs = VarStore::new(device);
    let net = model::build(&vs.root(), &job.model, data.vocab_size(), precision);
    let mut dp = DataParallel::new(&vs, comm, &job.optim, &job.parallel)?;
    dp.set_schedule(LrSchedule::new(&job.optim, t.max_steps));
    let mut loader = Loader::new(data.clone(), t.seed, rank, world, t.batch_size);

    let layout: Vec<ParamLayout> = dp
        .flat()
        .slots()
        .iter()
        .map(|s| ParamLayout {
            name: s.name.clone(),
            shape: s.shape.clone(),
            offset: s.offset,
        })
        .collect();
    let resume = env.resume.as_ref().unwrap_or(&Resume::Auto);
    let resumed_from = resume_from(job, resume, &layout, &mut dp, &mut loader)?;
    let fault = env.fault();
    let mut saver = match (&job.checkpoint.dir, job.checkpoint.every) {
        (Some(dir), every) if every > 0 => Some(Saver::new(
            dir,
            rank,
            world,
            SaverOptions {
                keep_last: job.checkpoint.keep_last,
                async_save: job.checkpoint.async_save,
                attempt: env.attempt(),
                abort_before_commit: fault.and_then(|f| f.step_for(rank, FaultPoint::Commit)),
                ..SaverOptions::default()
            },
        )?),
        _ => None,
    };
    let fault_step = fault.and_then(|f| f.step_for(rank, FaultPoint::Step));
    let mut metrics = match (&env.log_dir, rank) {
        (Some(dir), 0) => Some(open_append(&dir.join("metrics.jsonl"))?),
        _ => None,
    };
    let tokens_per_step = (world * t.batch_size * t.grad_accum_steps * job.model.block_size) as f64;
    if rank == 0 {
        println!(
            "training {:?} ({} parameters, {}) on {}, world {world}, {backend} collectives, zero stage {}, {} tokens/step{}",
            job.model.kind,
            dp.flat().total(),
            t.precision,
            describe_device(device),
            job.parallel.zero_stage,
            tokens_per_step,
            resumed_from
                .as_ref()
                .map(|p| format!(", resumed from {} at step {}", p.display(), dp.steps_done()))
                .unwrap_or_default()
        );
    }
    let resumed = resumed_from.as_ref().map(|p| Resumed {
        checkpoint: p.display().to_string(),
        step: dp.steps_done(),
    });
    let status = |step, loss, tokens_per_s| {
        write_status(env, step, t.max_steps, loss, tokens_per_s, resumed.clone())
    };
    status(dp.steps_done(), None, None)?;

    let mut summary = Summary {
        steps: dp.steps_done(),
        final_loss: None,
        eval_loss: None,
        resumed_from,
    };
    let mut window = Window::default();
    while dp.steps_done() < t.max_steps {
        let step = dp.steps_done();
        if fault_step == Some(step) {
            eprintln!("{}: rank {rank} aborting at step {step}", var::INJECT_FAULT);
            std::process::abort();
        }
        let start = Instant::now();
        tch::manual_seed(step_seed(t.seed, step, rank));

        // Micro-batches: each loss is divided by their number so the summed
        // gradients are those of the mean over the whole per-rank batch.
        // The loss is summed on the device and reduced with the gradient
        // norm: reading it here would make the host wait for the GPU.
        let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
        for _ in 0..t.grad_accum_steps {
            let batch = loader.next_batch(device);
            let loss = net.loss(&batch.inputs, &batch.targets, true) / t.grad_accum_steps as f64;
            loss.f_backward().map_err(|source| TrainError::Torch {
                context: format!("backward pass of step {step}"),
                source,
            })?;
            loss_sum += loss.detach().to_kind(Kind::Double);
        }
        // On a GPU, the time to enqueue the forward and backward passes: the
        // step waits for the device once, inside `step_with_loss_tensor`.
        let compute_s = start.elapsed().as_secs_f64();
        let report = dp.step_with_loss_tensor(&loss_sum)?;
        let step_s = start.elapsed().as_secs_f64();
        let tokens_per_s = tokens_per_step / step_s;
        summary.steps = report.step;
        summary.final_loss = report.loss;

        let eval_loss = if t.eval_every > 0
            && (report.step % t.eval_every == 0 || report.step == t.max_steps)
        {
            evaluate(&*net, &loader, t.eval_batches, device, &mut dp)?
        } else {
            None
        };
        summary.eval_loss = eval_loss.or(summary.eval_loss);

        // The time the step stalls for a checkpoint: with async saves, the
        // copy to host memory and the hand-off to the writer (or the wait for
        // the previous save still in flight).
        let save_start = Instant::now();
        let mut ckpt_stall_s = None;
        if let Some(saver) = saver.as_mut()
            && (report.step % job.checkpoint.every == 0 || report.step == t.max_steps)
        {
            let shard = dp.checkpoint_shard()?;
            let meta = Meta {
                step: report.step,
                world,
                zero_stage: job.parallel.zero_stage.as_u8(),
                total: dp.flat().total(),
                layout: layout.clone(),
                state_names: dp
                    .optimizer_state_names()
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                train_state: json!({
                    "data_position": loader.position(),
                    "seed": t.seed,
                    "rng": "re-seeded every step from (train.seed, step, rank)",
                    "lr_schedule": { "step": report.step, "next_lr": dp.next_lr() },
                }),
                config_toml: job.to_toml_string(),
            };
            saver.save(meta, shard)?;
            ckpt_stall_s = Some(save_start.elapsed().as_secs_f64());
        }
        if let Some(out) = metrics.as_mut() {
            let mut line = metrics_line(&report, compute_s, step_s, tokens_per_s, eval_loss);
            if let Some(stall) = ckpt_stall_s {
                line["ckpt_stall_s"] = json!(stall);
            }
            writeln!(out, "{line}").map_err(|source| TrainError::Io {
                path: env
                    .log_dir
                    .clone()
                    .unwrap_or_default()
                    .join("metrics.jsonl"),
                source,
            })?;
        }
        status(report.step, report.loss, Some(tokens_per_s))?;
        if rank == 0
            && let Some(stall) = ckpt_stall_s
        {
            println!(
                "checkpoint of step {}: the step stalled {:.1} ms for it ({:.1}% of the step)",
                report.step,
                stall * 1e3,
                100.0 * stall / step_s
            );
        }
        window.add(&report, compute_s, step_s);
        if rank == 0
            && (report.step % t.log_every.max(1) == 0
                || report.step == t.max_steps
                || eval_loss.is_some())
        {
            println!(
                "{}",
                window.line(&report, t.max_steps, tokens_per_step, eval_loss)
            );
            window = Window::default();
        }
    }
    if let Some(saver) = saver.as_mut() {
        saver.finish()?;
    }
    Ok(summary)
}

/// Loads the checkpoint `resume` names (or finds one), if any, into `dp`
/// and `loader`.
fn resume_from(
    job: &JobConfig,
    resume: &Resume,
    layout: &[ParamLayout],
    dp: &mut DataParallel,
    loader: &mut Loader,
) -> Result<Option<PathBuf>, TrainError> {
    let path = match (resume, &job.checkpoint.dir) {
        (Resume::Never, _) | (Resume::Auto, None) => return Ok(None),
        (Resume::Path(p), _) => p.clone(),
        (Resume::Auto, Some(dir)) if !dir.exists() => return Ok(None),
        (Resume::Auto, Some(dir)) => match cohort_checkpoint::find_resumable(dir)? {
            Some(p) => p,
            None => return Ok(None),
        },
    };
    let (meta, shard) = cohort_checkpoint::load(&path, dp.rank(), dp.world_size())?;
    meta.check_compatible(layout).map_err(|e| match e {
        cohort_checkpoint::CkptError::Incompatible { detail } => {
            cohort_checkpoint::CkptError::Incompatible {
                detail: format!(
                    "{}: {detail}; resume it with the model config it was saved with, \
                     or start afresh (--resume never, or another checkpoint.dir)",
                    path.display()
                ),
            }
        }
        other => other,
    })?;
    let names: Vec<&str> = meta.state_names.iter().map(String::as_str).collect();
    if names != dp.optimizer_state_names() {
        return Err(TrainError::Config(format!(
            "checkpoint {} holds optimizer state {:?}, but optim.kind = {:?} needs {:?}: resume with the optimizer it was saved with, or set {}=never",
            path.display(),
            names,
            job.optim.kind,
            dp.optimizer_state_names(),
            var::RESUME
        )));
    }
    let position = meta
        .train_state
        .get("data_position")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| {
            TrainError::Config(format!(
                "checkpoint {} has no train_state.data_position: it was not written by cohort's trainer",
                path.display()
            ))
        })?;
    dp.restore(meta.step, shard.params, shard.states)?;
    loader.set_position(position);
    Ok(Some(path))
}

/// Mean validation loss over the ranks (`None` without a held-out split).
fn evaluate(
    net: &dyn model::LanguageModel,
    loader: &Loader,
    batches: usize,
    device: Device,
    dp: &mut DataParallel,
) -> Result<Option<f64>, TrainError> {
    // The last step's all-gathers finish (or fail, under the watchdog)
    // before the loss reads below wait for the device.
    dp.wait_for_collectives()?;
    let mut sum = 0.0;
    for k in 0..batches.max(1) {
        let Some(batch) = loader.eval_batch(k, device) else {
            return Ok(None);
        };
        sum += tch::no_grad(|| {
            net.loss(&batch.inputs, &batch.targets, false)
                .double_value(&[])
        });
    }
    let mean = dp.mean_over_ranks(&[sum / batches.max(1) as f64])?;
    Ok(Some(mean[0]))
}

fn step_seed(seed: u64, step: u64, rank: usize) -> i64 {
    let mut rng =
        crate::data::SplitMix::new(seed ^ step.rotate_left(24) ^ (rank as u64).rotate_left(48));
    (rng.next_u64() >> 1) as i64
}

/// The device `train.device` names for the worker with `local_rank`: `cpu`;
/// `cuda` (an error without one), the GPU `local_rank` modulo the visible
/// devices; `auto`, that GPU when libtorch sees one, else the CPU.
pub fn resolve_device(choice: DeviceChoice, local_rank: usize) -> Result<Device, TrainError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda | DeviceChoice::Auto if tch::Cuda::is_available() => {
            Ok(Device::Cuda(local_rank % tch::Cuda::device_count().max(1) as usize))
        }
        DeviceChoice::Auto => Ok(Device::Cpu),
        DeviceChoice::Cuda => Err(TrainError::Config(
            "train.device = \"cuda\" but libtorch sees no CUDA device: use \"cpu\" or \"auto\" (check `cohort doctor`)".into(),
        )),
    }
}

fn describe_device(d: Device) -> String {
    match d {
        Device::Cpu => format!("cpu ({} threads)", tch::get_num_threads()),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}

fn metrics_line(
    r: &StepReport,
    compute_s: f64,
    step_s: f64,
    tokens_per_s: f64,
    eval_loss: Option<f64>,
) -> serde_json::Value {
    let mut line = json!({
        "step": r.step,
        "loss": r.loss,
        "lr": r.lr,
        "grad_norm": r.grad_norm,
        "tokens_per_s": tokens_per_s,
        "step_s": step_s,
        "compute_s": compute_s,
        "comm_s": r.comm_s,
        "comm_wait_s": r.comm_wait_s,
        "comm_hidden": r.hidden_comm_fraction(),
        "optimizer_s": r.optimizer_s,
        "pack_s": r.pack_s,
        "time": unix_now(),
    });
    if let Some(e) = eval_loss {
        line["eval_loss"] = json!(e);
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
    wait_s: f64,
    optimizer_s: f64,
}

impl Window {
    fn add(&mut self, r: &StepReport, compute_s: f64, step_s: f64) {
        self.steps += 1;
        self.step_s += step_s;
        self.compute_s += compute_s;
        self.comm_s += r.comm_s;
        self.wait_s += r.comm_wait_s;
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
        let hidden = if self.comm_s > 0.0 {
            ((self.comm_s - self.wait_s) / self.comm_s).clamp(0.0, 1.0) * 100.0
        } else {
            0.0
        };
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

/// Replaces the status file (`COHORT_STATUS_FILE`), if any, with this
/// worker's progress.
fn write_status(
    env: &WorkerEnv,
    step: u64,
    max_steps: u64,
    loss: Option<f64>,
    tokens_per_s: Option<f64>,
    resumed: Option<Resumed>,
) -> Result<(), TrainError> {
    let Some(path) = &env.status_file else {
        return Ok(());
    };
    let progress = WorkerProgress {
        step,
        max_steps,
        loss,
        tokens_per_s,
        time: unix_now(),
        resumed,
    };
    Ok(progress.write(path)?)
}

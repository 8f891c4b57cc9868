//! The built-in trainer: what `cohort-worker train --config FILE` runs.
//!
//! One step, in order (as nanoGPT's loop): the micro-batches' forward and
//! backward passes (gradients accumulate in the variables; nothing is
//! communicated until the last one, during whose backward pass the host
//! path starts reducing the gradient buckets), then [`DataParallel::step_with_loss`]
//! (reduce, clip, optimizer, parameters), then metrics, evaluation and
//! checkpoint. Randomness (dropout) is re-seeded every step from
//! `(train.seed, step, rank)`, and the data order is a function of the
//! seed and the job's sample position, so a job resumed from a checkpoint
//! continues exactly where it stopped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use cohort_configs::{DeviceChoice, JobConfig};
use cohort_contract::{FaultPoint, Resumed, WorkerEnv, var};
use tch::{Device, Kind, Tensor, nn::VarStore};

use crate::checkpointer::Checkpointer;
use crate::data::{Dataset, Loader};
use crate::metrics::{Metrics, StepTimes};
use crate::optim::LrSchedule;
use crate::parallel::Held;
use crate::recover::Recovery;
use crate::{Collectives, DataParallel, TrainError, model};

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
/// from, the job attempt and the fault to inject). A failed peer fails the
/// run (the launcher restarts the job from disk).
pub fn run(
    job: &JobConfig,
    env: &WorkerEnv,
    comm: impl Into<Collectives>,
) -> Result<Summary, TrainError> {
    run_recovering(job, env, comm, None)
}

/// As [`run`]; with `recovery`, a failed peer is replaced in place (see
/// [`crate::recover`]): this rank keeps its state, leaves the step in
/// flight, moves to the next communicator epoch with the others and redoes
/// the step. When `recovery` says this worker is itself a replacement, it
/// takes its state from the survivors instead of a checkpoint.
pub fn run_recovering(
    job: &JobConfig,
    env: &WorkerEnv,
    comm: impl Into<Collectives>,
    mut recovery: Option<Recovery>,
) -> Result<Summary, TrainError> {
    // Setup: the device, the data, the model, its data-parallel wrapper,
    // the checkpoint to resume from, and where metrics go.
    let comm = comm.into();
    let (rank, world) = (comm.rank(), comm.world_size());
    let t = &job.train;
    if t.threads > 0 {
        tch::set_num_threads(t.threads as i32);
    }
    let device = resolve_device(t.device, env.local_rank)?;
    let backend = comm.backend();
    let data = Arc::new(Dataset::open(
        &job.data,
        job.model.block_size,
        job.model.vocab_size,
        t.seed,
    )?);
    tch::manual_seed(t.seed as i64);
    let vs = VarStore::new(device);
    let net = model::build(&vs.root(), &job.model, data.vocab_size(), t.precision)?;
    let joining = recovery.as_ref().is_some_and(Recovery::is_replacement);
    if let (Some(r), Collectives::Host(c)) = (&recovery, &comm) {
        r.watch(c);
    }
    let mut dp = match comm {
        Collectives::Host(c) if joining => {
            DataParallel::new_joining(&vs, c, &job.optim, &job.parallel)?
        }
        _ if joining => {
            return Err(TrainError::RecoveryFailed(
                "in-place recovery needs the host collectives (parallel.backend = \"tcp\")".into(),
            ));
        }
        comm => DataParallel::new(&vs, comm, &job.optim, &job.parallel)?,
    };
    dp.set_schedule(LrSchedule::new(&job.optim, t.max_steps));
    // ZeRO: a rank's shard exists once; in-place recovery keeps a mirror.
    let mirrors = recovery
        .as_ref()
        .and_then(|_| dp.keep_mirrors(job.recovery.mirror_every, env.local_world));
    let mut loader = Loader::new(data.clone(), t.seed, rank, world, t.batch_size);

    let (mut ckpt, resumed_from) = if joining {
        // The state comes from the survivors, not from disk.
        let env = WorkerEnv {
            resume: Some(Resume::Never),
            ..env.clone()
        };
        let started = Checkpointer::start(job, &env, &mut dp, &mut loader)?;
        let r = recovery.as_mut().expect("a replacement has its recovery");
        let synced = r.join(&mut dp)?;
        loader.set_position(synced.position);
        started
    } else {
        let started = Checkpointer::start(job, env, &mut dp, &mut loader)?;
        dp.refresh_mirrors(loader.position(), true)?;
        started
    };
    let fault_step = env.fault().and_then(|f| f.step_for(rank, FaultPoint::Step));
    let tokens_per_step = (world * t.batch_size * t.grad_accum_steps * job.model.block_size) as f64;
    if rank == 0 && !joining {
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
        if let Some((bytes, of)) = mirrors {
            println!(
                "in-place recovery: every rank keeps a mirror of another rank's ZeRO shard in host memory (rank 0 of rank {of}'s), with a snapshot of its own: {:.1} MB per rank, refreshed every {} step(s)",
                bytes as f64 / 1e6,
                job.recovery.mirror_every
            );
        }
    }
    let resumed = resumed_from.as_ref().map(|p| Resumed {
        checkpoint: p.display().to_string(),
        step: dp.steps_done(),
    });
    let mut metrics = Metrics::new(
        env,
        rank,
        t.max_steps,
        t.log_every,
        tokens_per_step,
        resumed,
    )?;
    metrics.status(dp.steps_done(), None, None)?;

    let mut summary = Summary {
        steps: dp.steps_done(),
        final_loss: None,
        eval_loss: None,
        resumed_from,
    };
    while dp.steps_done() < t.max_steps {
        let step = dp.steps_done();
        let position = loader.position();
        if fault_step == Some(step) {
            eprintln!("{}: rank {rank} aborting at step {step}", var::INJECT_FAULT);
            std::process::abort();
        }
        let start = Instant::now();
        let (report, compute_s) = match one_step(&*net, &mut dp, &mut loader, t, device, step) {
            Ok(done) => done,
            Err(e) => {
                recover(&mut recovery, e, &mut dp, &mut loader, (step, position))?;
                continue;
            }
        };
        let step_s = start.elapsed().as_secs_f64();
        summary.steps = report.step;
        summary.final_loss = report.loss;
        if let Some(r) = &mut recovery {
            r.after_step();
        }
        if let Err(e) = dp.refresh_mirrors(loader.position(), false) {
            let held = (dp.steps_done(), loader.position());
            recover(&mut recovery, e, &mut dp, &mut loader, held)?;
            continue;
        }

        let eval_loss = if t.eval_every > 0
            && (report.step % t.eval_every == 0 || report.step == t.max_steps)
        {
            match evaluate(&*net, &loader, t.eval_batches, device, &mut dp) {
                Ok(loss) => loss,
                Err(e) => {
                    let held = (dp.steps_done(), loader.position());
                    recover(&mut recovery, e, &mut dp, &mut loader, held)?;
                    continue;
                }
            }
        } else {
            None
        };
        summary.eval_loss = eval_loss.or(summary.eval_loss);
        let ckpt_stall_s = ckpt.after_step(&mut dp, &loader)?;
        metrics.record(
            &report,
            StepTimes {
                compute_s,
                step_s,
                eval_loss,
                ckpt_stall_s,
            },
        )?;
    }
    ckpt.finish()?;
    Ok(summary)
}

/// After a failure in-place recovery covers (see [`Recovery::covers`]),
/// with `recovery`: this rank keeps the state it holds (`held`: steps done,
/// the loader's position there) and takes the newest one a rank holds;
/// else the error.
fn recover(
    recovery: &mut Option<Recovery>,
    e: TrainError,
    dp: &mut DataParallel,
    loader: &mut Loader,
    held: (u64, u64),
) -> Result<(), TrainError> {
    match recovery {
        Some(r) if Recovery::covers(&e) => {
            let held = Held {
                step: held.0,
                position: held.1,
                left_unix_ms: cohort_contract::recovery::unix_ms(),
            };
            let synced = r.recover(dp, e, held)?;
            loader.set_position(synced.position);
            Ok(())
        }
        _ => Err(e),
    }
}

/// One optimizer step: the micro-batches' forward and backward passes,
/// then [`DataParallel::step_with_loss_tensor`]; also returns the time to
/// run (on a GPU, to enqueue) the passes.
fn one_step(
    net: &dyn model::LanguageModel,
    dp: &mut DataParallel,
    loader: &mut Loader,
    t: &cohort_configs::TrainConfig,
    device: Device,
    step: u64,
) -> Result<(crate::StepReport, f64), TrainError> {
    let start = Instant::now();
    tch::manual_seed(step_seed(t.seed, step, dp.rank()));

    // Micro-batches: each loss is divided by their number so the summed
    // gradients are those of the mean over the whole per-rank batch.
    // The loss is summed on the device and reduced with the gradient
    // norm: reading it here would make the host wait for the GPU.
    let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
    for micro in 0..t.grad_accum_steps {
        let batch = loader.next_batch(device);
        let loss = net.loss(&batch.inputs, &batch.targets, true)? / t.grad_accum_steps as f64;
        if micro + 1 < t.grad_accum_steps {
            dp.backward_no_sync(&loss)
        } else {
            dp.backward(&loss)
        }
        .map_err(|e| match e {
            TrainError::Torch { source, .. } => TrainError::Torch {
                context: format!("backward pass of step {step}"),
                source,
            },
            other => other,
        })?;
        loss_sum += loss.detach().to_kind(Kind::Double);
    }
    // On a GPU, the time to enqueue the forward and backward passes: the
    // step waits for the device once, inside `step_with_loss_tensor`.
    let compute_s = start.elapsed().as_secs_f64();
    // Reduce, clip, optimizer, parameters.
    let report = dp.step_with_loss_tensor(&loss_sum)?;
    Ok((report, compute_s))
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
        sum += tch::no_grad(|| net.loss(&batch.inputs, &batch.targets, false))?.double_value(&[]);
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

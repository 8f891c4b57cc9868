//! The data-parallel step, written once, over the [`Buffers`] a path keeps
//! its flat parameters, gradients and optimizer state in: host memory
//! (`host.rs`) or device tensors (`device.rs`).
//!
//! A step, after the micro-batches' backward passes:
//!
//! 1. **Reduce gradients**, bucket by bucket (`parallel.bucket_mb`), the
//!    last bucket first (the order a backward pass produces them in; a path
//!    may have started some during the backward pass): DDP all-reduces and
//!    keeps the whole gradient, ZeRO reduce-scatters and keeps this rank's
//!    shard; both average over the ranks.
//! 2. **Global norm and loss**: each rank's squared norm of the gradient it
//!    owns (DDP: rank 0's only, every rank holds all of it) and its loss,
//!    summed over the ranks in one small all-reduce.
//! 3. **Clip and step**: the clip factor is folded into the optimizer's
//!    gradient read; the optimizer steps the owned part of the flat space.
//! 4. **Parameters**: DDP writes its updated parameters into the model;
//!    ZeRO all-gathers every rank's updated shard, bucket by bucket, each
//!    bucket stepped just before its gather starts.
//!
//! How a path overlaps these (a communication thread on the host, the
//! device's stream order under NCCL) is its own business: the skeleton
//! says what happens in which order, the path when it waits.

use std::ops::Range;
use std::time::{Duration, Instant};

use cohort_checkpoint::Shard;
use cohort_collectives::OpKind;
use cohort_configs::ZeroStage;

use crate::TrainError;
use crate::optim::StepParams;
use crate::plan::{Core, Plan, StepReport, Timings, launch_order};

/// Where a path keeps the flat space, and the collectives it runs on it.
///
/// Ranges called `local` are offsets into the owned part of the flat space
/// (`Plan::owned`: all of it under DDP, this rank's shard under ZeRO).
pub(crate) trait Buffers {
    /// A rank's loss as the path holds it.
    type Loss;
    /// A flat f32 vector in the path's memory.
    type Flat;

    /// Before the step reads the model's gradients.
    fn begin_step(&mut self, core: &Core);

    /// Starts reducing (averaging) gradient bucket `k` with `kind`, unless
    /// the backward pass started it; called in [`launch_order`].
    fn reduce_grads(
        &mut self,
        core: &Core,
        plan: &Plan,
        k: usize,
        kind: OpKind,
    ) -> Result<(), TrainError>;

    /// Returns once every gradient bucket's result is in the owned gradient.
    fn grads_reduced(&mut self, core: &Core, plan: &Plan) -> Result<(), TrainError>;

    /// The sums over the ranks of this rank's squared norm of its owned
    /// gradient (0 when `count_norm` is false) and of its loss (0 without one).
    fn sum_norm_and_loss(
        &mut self,
        core: &Core,
        plan: &Plan,
        count_norm: bool,
        loss: Option<&Self::Loss>,
    ) -> Result<[f64; 2], TrainError>;

    /// Runs the optimizer on `local`.
    fn update(&mut self, plan: &Plan, local: Range<usize>, sp: StepParams);

    /// DDP: the model's parameters from the updated master copy.
    fn write_back_params(&mut self, core: &Core, plan: &Plan);

    /// ZeRO: starts the all-gather of bucket `k`'s updated parameters into
    /// the model.
    fn gather_params(&mut self, core: &Core, plan: &Plan, k: usize) -> Result<(), TrainError>;

    /// Waits for what the step must see done before it returns, and gives
    /// the step's timings.
    fn finish_step(&mut self, core: &Core, plan: &Plan) -> Result<Timings, TrainError>;

    /// Zeroes the model's gradients.
    fn zero_grads(&mut self, core: &Core);

    /// The model's parameters, the whole flat space.
    fn model_params(&mut self, core: &Core) -> Self::Flat;

    /// A whole-space vector holding `part` at this rank's checkpoint shard
    /// (`Core::shard`), zeros elsewhere.
    fn placed(&mut self, core: &Core, part: &[f32]) -> Self::Flat;

    /// `part` in the path's memory.
    fn upload(&mut self, part: &[f32]) -> Self::Flat;

    /// Runs `kind` on all of `flat` in place; it may complete only at the
    /// next [`Buffers::wait`]. `what` names it in an error.
    fn collective(
        &mut self,
        core: &Core,
        kind: OpKind,
        flat: &mut Self::Flat,
        what: &'static str,
    ) -> Result<(), TrainError>;

    /// Waits for every collective started, under the watchdog's deadline.
    fn wait(&mut self, core: &Core, what: &'static str) -> Result<(), TrainError>;

    /// The master copy (its owned part) and the model from whole-space
    /// parameters.
    fn install_params(&mut self, core: &Core, plan: &Plan, full: Self::Flat);

    /// Replaces the optimizer's state vectors (each over the owned range).
    fn set_states(&mut self, states: Vec<Self::Flat>) -> Result<(), String>;

    /// Elements `local` of the master parameters and of each optimizer
    /// state vector, in host memory.
    fn read_master(&mut self, plan: &Plan, local: Range<usize>) -> (Vec<f32>, Vec<Vec<f32>>);

    /// Sums `values` over the ranks, in place.
    fn sum_f64(&mut self, core: &Core, values: &mut [f64]) -> Result<(), TrainError>;
}

/// Every rank starts from rank 0's parameters, with no gradient; waited
/// for, so a peer that dies here is an error, not a hang later.
pub(crate) fn init<B: Buffers>(core: &Core, plan: &Plan, b: &mut B) -> Result<(), TrainError> {
    let mut full = b.model_params(core);
    b.collective(
        core,
        OpKind::Broadcast,
        &mut full,
        "broadcast of the initial parameters",
    )?;
    b.wait(core, "waiting for the broadcast of the initial parameters")?;
    b.install_params(core, plan, full);
    b.zero_grads(core);
    Ok(())
}

/// One step (see the module docs); `loss` is this rank's, averaged over
/// the ranks in the norm's collective.
pub(crate) fn step<B: Buffers>(
    core: &mut Core,
    plan: &Plan,
    b: &mut B,
    loss: Option<&B::Loss>,
) -> Result<StepReport, TrainError> {
    let start = Instant::now();
    b.begin_step(core);

    // 1. Gradients.
    let kind = core.grad_collective();
    for k in launch_order(plan.buckets.len()) {
        b.reduce_grads(core, plan, k, kind)?;
    }
    b.grads_reduced(core, plan)?;

    // 2. Global norm and mean loss.
    let [sq, loss_sum] = b.sum_norm_and_loss(core, plan, core.counts_norm(), loss)?;
    let grad_norm = sq.sqrt();
    let loss = loss.map(|_| loss_sum / core.world as f64);

    // 3 and 4. Clip, step, parameters.
    let (lr, sp) = core.step_params(grad_norm);
    let mut optimizer = Duration::ZERO;
    let mut update = |b: &mut B, local: Range<usize>| {
        let t = Instant::now();
        b.update(plan, local, sp);
        optimizer += t.elapsed();
    };
    match core.stage {
        ZeroStage::Ddp => {
            update(b, 0..plan.owned.len());
            b.write_back_params(core, plan);
        }
        ZeroStage::Zero1 | ZeroStage::Zero2 => {
            for (k, bucket) in plan.buckets.iter().enumerate() {
                update(b, plan.local(&bucket.own));
                b.gather_params(core, plan, k)?;
            }
        }
    }
    let t = b.finish_step(core, plan)?;
    b.zero_grads(core);
    core.step += 1;
    Ok(StepReport {
        step: core.step,
        lr,
        grad_norm,
        loss,
        comm_s: t.comm.as_secs_f64(),
        comm_wait_s: t.wait.as_secs_f64(),
        grad_comm_s: t.grad_comm.as_secs_f64(),
        grad_comm_hidden_s: t.grad_hidden.as_secs_f64(),
        buckets_in_backward: t.in_backward,
        optimizer_s: optimizer.as_secs_f64(),
        pack_s: t.pack.as_secs_f64(),
        total_s: start.elapsed().as_secs_f64(),
    })
}

/// This rank's checkpoint shard: `shard_range(total, world, rank)` of the
/// parameters and of each optimizer state vector.
pub(crate) fn checkpoint_shard<B: Buffers>(
    core: &Core,
    plan: &Plan,
    b: &mut B,
) -> Result<Shard, TrainError> {
    b.wait(core, "waiting for the parameter collectives")?;
    let shard = core.shard();
    let (params, states) = b.read_master(plan, plan.local(&shard));
    Ok(Shard {
        range: shard,
        params,
        states,
    })
}

/// Restores `steps_done` and this rank's checkpoint shard of the
/// parameters and optimizer states (every rank calls it): the parameters
/// are all-gathered into the whole space; DDP, which keeps the whole
/// optimizer state, gathers the states too.
pub(crate) fn restore<B: Buffers>(
    core: &mut Core,
    plan: &Plan,
    b: &mut B,
    steps_done: u64,
    params: Vec<f32>,
    states: Vec<Vec<f32>>,
) -> Result<(), TrainError> {
    let total = core.flat.total();
    let shard = core.shard();
    if params.len() != shard.len() || states.iter().any(|s| s.len() != shard.len()) {
        return Err(TrainError::Config(format!(
            "checkpoint shard for rank {} holds {} parameters (states {:?}), expected {} (elements {:?} of {total})",
            core.rank,
            params.len(),
            states.iter().map(Vec::len).collect::<Vec<_>>(),
            shard.len(),
            shard
        )));
    }
    const WHAT: &str = "all_gather of a restored checkpoint";
    let gathered = |b: &mut B, part: &[f32]| -> Result<B::Flat, TrainError> {
        let mut full = b.placed(core, part);
        b.collective(core, OpKind::AllGather, &mut full, WHAT)?;
        Ok(full)
    };
    let full = gathered(b, &params)?;
    let states = match core.stage {
        ZeroStage::Ddp => states
            .iter()
            .map(|s| gathered(b, s))
            .collect::<Result<Vec<_>, _>>()?,
        ZeroStage::Zero1 | ZeroStage::Zero2 => states.iter().map(|s| b.upload(s)).collect(),
    };
    b.wait(core, "waiting for the all_gather of a restored checkpoint")?;
    b.set_states(states)
        .map_err(|e| TrainError::Config(format!("checkpoint optimizer state: {e}")))?;
    b.install_params(core, plan, full);
    core.step = steps_done;
    Ok(())
}

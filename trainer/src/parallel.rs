//! Data parallelism over a `VarStore`: DDP and ZeRO-1/2, on the CPU or a
//! GPU.
//!
//! One call per step, [`DataParallel::step`], after the micro-batches'
//! backward passes (tch accumulates their gradients in the variables):
//! gradients are reduced in buckets (`parallel.bucket_mb`, 25 MiB as PyTorch
//! DDP), clipped by the global norm, the optimizer steps the part of the
//! flat fp32 parameter space this rank owns (all of it under DDP, its
//! `shard_range` under ZeRO), and the model's parameters are updated
//! (all-gathered under ZeRO).
//!
//! Two paths, chosen by where the `VarStore` lives, with the same results,
//! bucket layout, optimizer state and checkpoints:
//! - the host path (`host`, CPU tensors): master parameters, gradients and
//!   optimizer state in host memory, Rust optimizer loops (one pass over
//!   memory per step), a communication thread overlapping the collectives
//!   with packing and the optimizer;
//! - the device path (`device`, CUDA tensors): the model's parameters and
//!   gradients are views of two flat device buffers, buckets are reduced in
//!   place (NCCL, or staged through host memory over TCP), and the
//!   optimizer runs as tensor ops on the flat buffers: nothing is copied
//!   per parameter, and nothing leaves the GPU under NCCL.

use std::ops::Range;

use cohort_collectives::{Algorithm, OpOptions, shard_range};
pub use cohort_configs::ZeroStage;
use cohort_configs::{AlgorithmChoice, OptimConfig, ParallelConfig};
use tch::{Device, Tensor, nn::VarStore};

use cohort_checkpoint::Shard;

use crate::TrainError;
use crate::backend::Collectives;
use crate::device::DeviceParallel;
use crate::flat::FlatParams;
use crate::host::HostParallel;
use crate::optim::LrSchedule;

/// What one step did and where its time went.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// Optimizer steps completed, this one included.
    pub step: u64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Loss averaged over the ranks (when the step was given one).
    pub loss: Option<f64>,
    /// Time the collectives ran on the communication thread.
    pub comm_s: f64,
    /// Time this thread waited for them: the communication not hidden.
    pub comm_wait_s: f64,
    /// Time in the optimizer update.
    pub optimizer_s: f64,
    /// Time packing gradients into buckets and unpacking results.
    pub pack_s: f64,
    /// The whole call.
    pub total_s: f64,
}

impl StepReport {
    /// Share of the communication that overlapped other work (0..=1).
    pub fn hidden_comm_fraction(&self) -> f64 {
        if self.comm_s > 0.0 {
            ((self.comm_s - self.comm_wait_s) / self.comm_s).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// A bucket: flat ranges laid end to end in its buffer.
pub(crate) struct Bucket {
    pub segs: Vec<Range<usize>>,
    pub len: usize,
    /// Where this rank's result sits: offset in the buffer, flat range.
    pub own_at: usize,
    pub own: Range<usize>,
}

/// What a path needs besides its [`Core`]: the collectives' options, the
/// part of the flat space this rank steps and the bucket layout.
pub(crate) struct Plan {
    pub opts: OpOptions,
    pub owned: Range<usize>,
    pub buckets: Vec<Bucket>,
}

impl Plan {
    /// The core and plan of `rank` of `world` over `flat`, from the config.
    pub fn new(
        flat: FlatParams,
        rank: usize,
        world: usize,
        optim: &OptimConfig,
        parallel: &ParallelConfig,
    ) -> Result<(Core, Plan), TrainError> {
        let stage = parallel.zero_stage;
        let algorithm = match parallel.algorithm {
            AlgorithmChoice::Auto => Algorithm::Auto,
            AlgorithmChoice::Ring => Algorithm::Ring,
            AlgorithmChoice::Tree => Algorithm::Tree,
            AlgorithmChoice::Doubling => Algorithm::Doubling,
            AlgorithmChoice::Hierarchical => Algorithm::Hierarchical,
        };
        let total = flat.total();
        let owned = match stage {
            ZeroStage::Ddp => 0..total,
            _ => shard_range(total, world, rank),
        };
        let bucket_elems = ((parallel.bucket_mb * 1024.0 * 1024.0 / 4.0) as usize).max(world);
        let decay_steps = if optim.decay_steps == 0 {
            u64::MAX
        } else {
            optim.decay_steps
        };
        let core = Core {
            flat,
            stage,
            rank,
            world,
            schedule: LrSchedule::new(optim, decay_steps),
            grad_clip: optim.grad_clip,
            step: 0,
        };
        let plan = Plan {
            opts: OpOptions {
                algorithm,
                ..OpOptions::default()
            },
            owned,
            buckets: make_buckets(total, world, rank, stage, bucket_elems),
        };
        Ok((core, plan))
    }
}

/// What both paths hold alike: the flat layout, this rank's place, the
/// schedule and the steps done.
pub(crate) struct Core {
    pub flat: FlatParams,
    pub stage: ZeroStage,
    pub rank: usize,
    pub world: usize,
    pub schedule: LrSchedule,
    /// `optim.grad_clip`.
    pub grad_clip: f64,
    /// Optimizer steps completed.
    pub step: u64,
}

impl Core {
    /// This rank's checkpoint shard of the flat space: the same under DDP
    /// and ZeRO, on either path.
    pub fn shard(&self) -> Range<usize> {
        shard_range(self.flat.total(), self.world, self.rank)
    }
}

enum Path {
    Host(HostParallel),
    Device(DeviceParallel),
}

/// Data-parallel training of one `VarStore`.
///
/// See the crate docs for an example.
pub struct DataParallel {
    path: Path,
}

/// Forwards a method to whichever path runs.
macro_rules! forward {
    ($self:ident . $m:ident ( $($a:expr),* )) => {
        match &$self.path {
            Path::Host(p) => p.$m($($a),*),
            Path::Device(p) => p.$m($($a),*),
        }
    };
    (mut $self:ident . $m:ident ( $($a:expr),* )) => {
        match &mut $self.path {
            Path::Host(p) => p.$m($($a),*),
            Path::Device(p) => p.$m($($a),*),
        }
    };
}

impl DataParallel {
    /// Wraps `vs`'s trainable variables. Rank 0's parameters are broadcast so
    /// every rank starts from the same point. The learning-rate schedule is
    /// warmup then cosine to `optim.min_lr` at `optim.decay_steps` (0 = no
    /// decay: the built-in trainer sets it to `train.max_steps`).
    ///
    /// A `VarStore` on the CPU takes the host path and needs the host
    /// communicator; one on a CUDA device takes the device path, over NCCL
    /// or (host communicator) staged through host memory.
    pub fn new(
        vs: &VarStore,
        comm: impl Into<Collectives>,
        optim: &OptimConfig,
        parallel: &ParallelConfig,
    ) -> Result<Self, TrainError> {
        let path = match (vs.device(), comm.into()) {
            (Device::Cpu, Collectives::Host(comm)) => {
                Path::Host(HostParallel::new(vs, comm, optim, parallel)?)
            }
            (Device::Cpu, Collectives::Nccl(_)) => {
                return Err(TrainError::Config(
                    "the NCCL backend reduces CUDA tensors, but the model is on the CPU: \
                     train on a CUDA device or use the tcp backend"
                        .into(),
                ));
            }
            (Device::Cuda(_), comm) => {
                Path::Device(DeviceParallel::new(vs, comm, optim, parallel)?)
            }
            (other, _) => {
                return Err(TrainError::Config(format!(
                    "cohort trains on the CPU or CUDA devices, not {other:?}"
                )));
            }
        };
        Ok(DataParallel { path })
    }

    /// As [`DataParallel::new`], but the device path whatever the device
    /// (for tests: the device path on CPU tensors must match the host path).
    #[doc(hidden)]
    pub fn new_device_path(
        vs: &VarStore,
        comm: impl Into<Collectives>,
        optim: &OptimConfig,
        parallel: &ParallelConfig,
    ) -> Result<Self, TrainError> {
        Ok(DataParallel {
            path: Path::Device(DeviceParallel::new(vs, comm.into(), optim, parallel)?),
        })
    }

    fn core(&self) -> &Core {
        match &self.path {
            Path::Host(p) => &p.core,
            Path::Device(p) => &p.core,
        }
    }

    /// Replaces the learning-rate schedule (e.g. to decay over `max_steps`).
    pub fn set_schedule(&mut self, schedule: LrSchedule) {
        match &mut self.path {
            Path::Host(p) => p.core.schedule = schedule,
            Path::Device(p) => p.core.schedule = schedule,
        }
    }

    pub fn rank(&self) -> usize {
        self.core().rank
    }

    pub fn world_size(&self) -> usize {
        self.core().world
    }

    pub fn stage(&self) -> ZeroStage {
        self.core().stage
    }

    /// Optimizer steps completed.
    pub fn steps_done(&self) -> u64 {
        self.core().step
    }

    /// The flat parameter layout.
    pub fn flat(&self) -> &FlatParams {
        &self.core().flat
    }

    /// Bytes of optimizer state this rank holds.
    pub fn optimizer_state_bytes(&self) -> usize {
        forward!(self.optimizer_state_bytes())
    }

    /// Names of the optimizer's per-element state vectors.
    pub fn optimizer_state_names(&self) -> &'static [&'static str] {
        forward!(self.optimizer_state_names())
    }

    /// Learning rate the next step will use.
    pub fn next_lr(&self) -> f64 {
        let core = self.core();
        core.schedule.at(core.step)
    }

    /// Runs `loss.backward()`, then [`DataParallel::step_with_loss`].
    pub fn backward_and_step(&mut self, loss: &Tensor) -> Result<StepReport, TrainError> {
        loss.f_backward().map_err(|source| TrainError::Torch {
            context: "backward pass".into(),
            source,
        })?;
        self.step_with_loss_tensor(loss)
    }

    /// Reduces the gradients accumulated in the variables, clips them by the
    /// global norm, steps the optimizer, updates the model's parameters and
    /// zeroes the gradients.
    pub fn step(&mut self) -> Result<StepReport, TrainError> {
        forward!(mut self.step_inner(None))
    }

    /// As [`DataParallel::step`]; `local_loss` (this rank's loss) is averaged
    /// over the ranks in the same collective as the gradient norm.
    pub fn step_with_loss(&mut self, local_loss: f64) -> Result<StepReport, TrainError> {
        match &mut self.path {
            Path::Host(p) => p.step_inner(Some(local_loss)),
            Path::Device(p) => {
                let t = Tensor::from(local_loss).to_device(p.device());
                p.step_inner(Some(&t))
            }
        }
    }

    /// As [`DataParallel::step_with_loss`], with the loss a scalar tensor
    /// (on the model's device). On a GPU it is not read on its own: it goes
    /// to the device-side all-reduce with the gradient norm, so the step
    /// waits for the device once.
    pub fn step_with_loss_tensor(&mut self, local_loss: &Tensor) -> Result<StepReport, TrainError> {
        match &mut self.path {
            Path::Host(p) => {
                let value = local_loss
                    .f_double_value(&[])
                    .map_err(|source| TrainError::Torch {
                        context: "reading the loss".into(),
                        source,
                    })?;
                p.step_inner(Some(value))
            }
            Path::Device(p) => p.step_inner(Some(local_loss)),
        }
    }

    /// Waits for the collectives still running on the device (the ZeRO
    /// all-gathers of the last step) under the watchdog: call it before
    /// reading the model's parameters or outputs on the host. A no-op on
    /// the host path, whose collectives are synchronous.
    pub fn wait_for_collectives(&mut self) -> Result<(), TrainError> {
        match &mut self.path {
            Path::Host(_) => Ok(()),
            Path::Device(p) => p.wait("waiting for the parameter collectives"),
        }
    }

    /// Collectives enqueued on the device and not yet waited for under the
    /// watchdog (0 on the host path).
    pub fn collectives_in_flight(&self) -> usize {
        match &self.path {
            Path::Host(_) => 0,
            Path::Device(p) => p.collectives_in_flight(),
        }
    }

    /// The mean over the ranks of each of `values` (every rank must call it).
    pub fn mean_over_ranks(&mut self, values: &[f64]) -> Result<Vec<f64>, TrainError> {
        let mut sums = values.to_vec();
        forward!(mut self.sum_over_ranks(&mut sums))?;
        let world = self.core().world as f64;
        Ok(sums.iter().map(|s| s / world).collect())
    }

    /// This rank's checkpoint shard: `shard_range(total, world, rank)` of the
    /// parameters and of each optimizer state vector (the same range under
    /// DDP and ZeRO, on either path, so a checkpoint holds every element
    /// once and any path and world size can load it).
    pub fn checkpoint_shard(&mut self) -> Result<Shard, TrainError> {
        forward!(mut self.checkpoint_shard())
    }

    /// Restores a checkpoint: `steps_done` and this rank's
    /// `shard_range(total, world, rank)` of the parameters and optimizer
    /// states (as [`DataParallel::checkpoint_shard`] gives them, from any
    /// world size once re-sliced). Every rank must call it.
    pub fn restore(
        &mut self,
        steps_done: u64,
        params: Vec<f32>,
        states: Vec<Vec<f32>>,
    ) -> Result<(), TrainError> {
        let core = self.core();
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
        forward!(mut self.restore(steps_done, params, states))
    }
}

pub(crate) fn make_buckets(
    total: usize,
    world: usize,
    rank: usize,
    stage: ZeroStage,
    bucket_elems: usize,
) -> Vec<Bucket> {
    if stage == ZeroStage::Ddp {
        return (0..total)
            .step_by(bucket_elems)
            .map(|s| {
                let r = s..(s + bucket_elems).min(total);
                Bucket {
                    segs: vec![r.clone()],
                    len: r.len(),
                    own_at: 0,
                    own: r,
                }
            })
            .collect();
    }
    let shards: Vec<Range<usize>> = (0..world).map(|r| shard_range(total, world, r)).collect();
    let chunk = (bucket_elems / world).max(1);
    let n = shards[0].len().div_ceil(chunk).max(1);
    (0..n)
        .map(|k| {
            let segs: Vec<Range<usize>> = shards
                .iter()
                .map(|s| {
                    let a = (s.start + k * chunk).min(s.end);
                    a..(a + chunk).min(s.end)
                })
                .collect();
            let len = segs.iter().map(Range::len).sum();
            let own_at: usize = segs[..rank].iter().map(Range::len).sum();
            let own = segs[rank].clone();
            assert_eq!(
                own_at..own_at + own.len(),
                shard_range(len, world, rank),
                "ZeRO bucket {k} layout must match the reduce-scatter shard"
            );
            Bucket {
                segs,
                len,
                own_at,
                own,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_buckets_cover_the_space_once_and_match_shards() {
        for (total, world, elems) in [
            (10, 3, 4),
            (101, 4, 8),
            (7, 8, 8),
            (64, 2, 64),
            (1000, 3, 7),
        ] {
            let mut seen = vec![0u8; total];
            for rank in 0..world {
                let buckets = make_buckets(total, world, rank, ZeroStage::Zero2, elems);
                let mut own: Vec<usize> = Vec::new();
                for b in &buckets {
                    own.extend(b.own.clone());
                    if rank == 0 {
                        for s in &b.segs {
                            for i in s.clone() {
                                seen[i] += 1;
                            }
                        }
                    }
                }
                assert_eq!(own, shard_range(total, world, rank).collect::<Vec<_>>());
            }
            assert!(seen.iter().all(|&c| c == 1), "{total} {world} {elems}");
        }
    }
}

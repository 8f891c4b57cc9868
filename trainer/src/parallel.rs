//! Data parallelism over a `VarStore`: DDP and ZeRO-1/2, on the CPU or a
//! GPU.
//!
//! One call per step, [`DataParallel::step`], after the micro-batches'
//! backward passes (tch accumulates their gradients in the variables; run
//! them with [`DataParallel::backward_no_sync`] and, the last one,
//! [`DataParallel::backward`], and the host path reduces the gradient
//! buckets during that last backward pass, as PyTorch DDP does):
//! gradients are reduced in buckets (`parallel.bucket_mb`, 25 MiB as PyTorch
//! DDP), clipped by the global norm, the optimizer steps the part of the
//! flat fp32 parameter space this rank owns (all of it under DDP, its
//! `shard_range` under ZeRO), and the model's parameters are updated
//! (all-gathered under ZeRO).
//!
//! The step is written once (`step.rs`) over the buffers of two paths,
//! chosen by where the `VarStore` lives, with the same results, bucket
//! layout (`plan.rs`), optimizer state and checkpoints:
//! - the host path (`host`, CPU tensors): master parameters, gradients and
//!   optimizer state in host memory, Rust optimizer loops (one pass over
//!   memory per step), a communication thread overlapping the collectives
//!   with packing and the optimizer;
//! - the device path (`device`, CUDA tensors): the model's parameters and
//!   gradients are views of two flat device buffers, buckets are reduced in
//!   place (NCCL, or staged through host memory over TCP), and the
//!   optimizer runs as tensor ops on the flat buffers: nothing is copied
//!   per parameter, and nothing leaves the GPU under NCCL.

use cohort_checkpoint::Shard;
use cohort_configs::{OptimConfig, ParallelConfig};
use tch::{Device, Tensor, nn::VarStore};

use crate::TrainError;
use crate::backend::Collectives;
use crate::device::DeviceBuffers;
use crate::flat::FlatParams;
use crate::host::HostBuffers;
use crate::optim::LrSchedule;
pub use crate::plan::StepReport;
use crate::plan::{Core, Plan};
use crate::step;
pub use cohort_configs::ZeroStage;

/// The buffers of the path that runs.
enum Path {
    Host(HostBuffers),
    Device(DeviceBuffers),
}

/// Data-parallel training of one `VarStore`.
///
/// See the crate docs for an example.
pub struct DataParallel {
    core: Core,
    plan: Plan,
    path: Path,
}

/// Runs a `step.rs` function on whichever path's buffers, with the core and
/// plan: the one place the two paths are told apart.
macro_rules! on_path {
    ($self:ident, $f:path $(, $a:expr)*) => {
        match &mut $self.path {
            Path::Host(b) => $f(&mut $self.core, &$self.plan, b $(, $a)*),
            Path::Device(b) => $f(&mut $self.core, &$self.plan, b $(, $a)*),
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
        match (vs.device(), comm.into()) {
            (Device::Cpu, Collectives::Host(comm)) => {
                let (core, plan, b) = HostBuffers::new(vs, comm, optim, parallel)?;
                Self::start(core, plan, Path::Host(b))
            }
            (Device::Cpu, Collectives::Nccl(_)) => Err(TrainError::Config(
                "the NCCL backend reduces CUDA tensors, but the model is on the CPU: \
                 train on a CUDA device or use the tcp backend"
                    .into(),
            )),
            (Device::Cuda(_), comm) => Self::new_on_device(vs, comm, optim, parallel),
            (other, _) => Err(TrainError::Config(format!(
                "cohort trains on the CPU or CUDA devices, not {other:?}"
            ))),
        }
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
        Self::new_on_device(vs, comm.into(), optim, parallel)
    }

    fn new_on_device(
        vs: &VarStore,
        comm: Collectives,
        optim: &OptimConfig,
        parallel: &ParallelConfig,
    ) -> Result<Self, TrainError> {
        let (core, plan, b) = DeviceBuffers::new(vs, comm, optim, parallel)?;
        Self::start(core, plan, Path::Device(b))
    }

    fn start(core: Core, plan: Plan, path: Path) -> Result<Self, TrainError> {
        let mut dp = DataParallel { core, plan, path };
        match &mut dp.path {
            Path::Host(b) => step::init(&dp.core, &dp.plan, b)?,
            Path::Device(b) => step::init(&dp.core, &dp.plan, b)?,
        }
        Ok(dp)
    }

    /// Replaces the learning-rate schedule (e.g. to decay over `max_steps`).
    pub fn set_schedule(&mut self, schedule: LrSchedule) {
        self.core.schedule = schedule;
    }

    pub fn rank(&self) -> usize {
        self.core.rank
    }

    pub fn world_size(&self) -> usize {
        self.core.world
    }

    pub fn stage(&self) -> ZeroStage {
        self.core.stage
    }

    /// Optimizer steps completed.
    pub fn steps_done(&self) -> u64 {
        self.core.step
    }

    /// The flat parameter layout.
    pub fn flat(&self) -> &FlatParams {
        &self.core.flat
    }

    /// Bytes of optimizer state this rank holds.
    pub fn optimizer_state_bytes(&self) -> usize {
        match &self.path {
            Path::Host(b) => b.optimizer_state_bytes(),
            Path::Device(b) => b.optimizer_state_bytes(),
        }
    }

    /// Names of the optimizer's per-element state vectors.
    pub fn optimizer_state_names(&self) -> &'static [&'static str] {
        match &self.path {
            Path::Host(b) => b.optimizer_state_names(),
            Path::Device(b) => b.optimizer_state_names(),
        }
    }

    /// Learning rate the next step will use.
    pub fn next_lr(&self) -> f64 {
        self.core.schedule.at(self.core.step)
    }

    /// Runs [`DataParallel::backward`], then
    /// [`DataParallel::step_with_loss_tensor`].
    pub fn backward_and_step(&mut self, loss: &Tensor) -> Result<StepReport, TrainError> {
        self.backward(loss)?;
        self.step_with_loss_tensor(loss)
    }

    /// The backward pass of a step's last (or only) micro-batch: on the
    /// host path, each gradient bucket's reduction starts during it, as
    /// soon as the last of its gradients has been accumulated (gradient
    /// hooks on the parameters); the next [`DataParallel::step`] waits for
    /// them. Run the micro-batches before it with
    /// [`DataParallel::backward_no_sync`], and no backward pass after it
    /// before the step (an error at the step: the buckets started hold the
    /// gradients as they were). A plain `loss.backward()` works too: the
    /// step then starts every bucket itself, with the same result.
    pub fn backward(&mut self, loss: &Tensor) -> Result<(), TrainError> {
        match &mut self.path {
            Path::Host(b) => {
                b.arm()?;
                let result = run_backward(loss);
                b.disarm();
                result
            }
            Path::Device(_) => run_backward(loss),
        }
    }

    /// The backward pass of a micro-batch before a step's last: its
    /// gradients accumulate in the variables and nothing is communicated
    /// (PyTorch DDP's `no_sync`).
    pub fn backward_no_sync(&mut self, loss: &Tensor) -> Result<(), TrainError> {
        run_backward(loss)
    }

    /// Reduces the gradients accumulated in the variables (those buckets the
    /// last [`DataParallel::backward`] did not start, and waits for those it
    /// did), clips them by the
    /// global norm, steps the optimizer, updates the model's parameters and
    /// zeroes the gradients.
    pub fn step(&mut self) -> Result<StepReport, TrainError> {
        on_path!(self, step::step, None)
    }

    /// As [`DataParallel::step`]; `local_loss` (this rank's loss) is averaged
    /// over the ranks in the same collective as the gradient norm.
    pub fn step_with_loss(&mut self, local_loss: f64) -> Result<StepReport, TrainError> {
        match &mut self.path {
            Path::Host(b) => step::step(&mut self.core, &self.plan, b, Some(&local_loss)),
            Path::Device(b) => {
                let t = Tensor::from(local_loss).to_device(b.device());
                step::step(&mut self.core, &self.plan, b, Some(&t))
            }
        }
    }

    /// As [`DataParallel::step_with_loss`], with the loss a scalar tensor
    /// (on the model's device). On a GPU it is not read on its own: it goes
    /// to the device-side all-reduce with the gradient norm, so the step
    /// waits for the device once.
    pub fn step_with_loss_tensor(&mut self, local_loss: &Tensor) -> Result<StepReport, TrainError> {
        match &mut self.path {
            Path::Host(b) => {
                let value = local_loss
                    .f_double_value(&[])
                    .map_err(|source| TrainError::Torch {
                        context: "reading the loss".into(),
                        source,
                    })?;
                step::step(&mut self.core, &self.plan, b, Some(&value))
            }
            Path::Device(b) => step::step(&mut self.core, &self.plan, b, Some(local_loss)),
        }
    }

    /// Waits for the collectives still running on the device (the ZeRO
    /// all-gathers of the last step) under the watchdog: call it before
    /// reading the model's parameters or outputs on the host. A no-op on
    /// the host path, whose collectives are synchronous.
    pub fn wait_for_collectives(&mut self) -> Result<(), TrainError> {
        use step::Buffers;
        const WHAT: &str = "waiting for the parameter collectives";
        match &mut self.path {
            Path::Host(b) => b.wait(&self.core, WHAT),
            Path::Device(b) => b.wait(&self.core, WHAT),
        }
    }

    /// Collectives enqueued on the device and not yet waited for under the
    /// watchdog (0 on the host path).
    pub fn collectives_in_flight(&self) -> usize {
        match &self.path {
            Path::Host(_) => 0,
            Path::Device(b) => b.collectives_in_flight(),
        }
    }

    /// The mean over the ranks of each of `values` (every rank must call it).
    pub fn mean_over_ranks(&mut self, values: &[f64]) -> Result<Vec<f64>, TrainError> {
        use step::Buffers;
        let mut sums = values.to_vec();
        match &mut self.path {
            Path::Host(b) => b.sum_f64(&self.core, &mut sums)?,
            Path::Device(b) => b.sum_f64(&self.core, &mut sums)?,
        }
        let world = self.core.world as f64;
        Ok(sums.iter().map(|s| s / world).collect())
    }

    /// This rank's checkpoint shard: `shard_range(total, world, rank)` of the
    /// parameters and of each optimizer state vector (the same range under
    /// DDP and ZeRO, on either path, so a checkpoint holds every element
    /// once and any path and world size can load it).
    pub fn checkpoint_shard(&mut self) -> Result<Shard, TrainError> {
        match &mut self.path {
            Path::Host(b) => step::checkpoint_shard(&self.core, &self.plan, b),
            Path::Device(b) => step::checkpoint_shard(&self.core, &self.plan, b),
        }
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
        on_path!(self, step::restore, steps_done, params, states)
    }
}

fn run_backward(loss: &Tensor) -> Result<(), TrainError> {
    loss.f_backward().map_err(|source| TrainError::Torch {
        context: "backward pass".into(),
        source,
    })
}

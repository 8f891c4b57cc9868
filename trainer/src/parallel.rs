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
use cohort_collectives::Communicator;
use cohort_configs::{OptimConfig, ParallelConfig};
use tch::{Device, Tensor, nn::VarStore};

use crate::TrainError;
use crate::backend::Collectives;
use crate::device::DeviceBuffers;
use crate::flat::FlatParams;
use crate::host::HostBuffers;
use crate::mirror::{Mirrors, Snap};
use crate::optim::LrSchedule;
pub use crate::plan::StepReport;
use crate::plan::{Core, Plan};
use crate::step;
pub use cohort_configs::ZeroStage;

/// Why a model on a GPU can't recover in place.
const HOST_PATH_ONLY: &str = "in-place recovery runs on the host path (CPU training) so far";

/// What a rank brings to [`DataParallel::rejoin`].
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerState {
    /// `None` for a replacement, which holds nothing yet.
    pub have: Option<Held>,
}

/// The state a surviving rank holds.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    /// Its optimizer steps completed.
    pub step: u64,
    /// Its data loader's position at that step.
    pub position: u64,
    /// When it left the failed step (Unix ms).
    pub left_unix_ms: u64,
}

/// What [`DataParallel::rejoin`] agreed on.
#[derive(Debug, Clone, Copy)]
pub struct Synced {
    /// The rank whose state every rank now holds.
    pub source: usize,
    /// Its optimizer steps completed.
    pub step: u64,
    /// Its data position, to continue from.
    pub position: u64,
    /// Bytes of state broadcast.
    pub bytes: u64,
    /// When the last survivor left the failed step (Unix ms).
    pub survivors_left_unix_ms: u64,
    /// The step the survivors were in when they left it (1-based: the
    /// step that completes `in_flight` steps).
    pub in_flight: u64,
}

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
    /// ZeRO with in-place recovery: the shard mirrors.
    mirrors: Option<Mirrors>,
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

    /// As [`DataParallel::new`] for a worker that replaces a failed rank in
    /// place: nothing is broadcast at start (the other ranks are past it);
    /// its state comes from [`DataParallel::rejoin`]. The host path only
    /// (see [`DataParallel::recovers_in_place`]).
    pub fn new_joining(
        vs: &VarStore,
        comm: Communicator,
        optim: &OptimConfig,
        parallel: &ParallelConfig,
    ) -> Result<Self, TrainError> {
        if vs.device() != Device::Cpu {
            return Err(TrainError::RecoveryFailed(HOST_PATH_ONLY.into()));
        }
        let (core, plan, b) = HostBuffers::new(vs, comm, optim, parallel)?;
        Ok(DataParallel {
            core,
            plan,
            path: Path::Host(b),
            mirrors: None,
        })
    }

    /// Whether a failed peer can be replaced in place (its state sent from
    /// a survivor), and why not: on the host path, every rank holds the
    /// whole state (DDP) or the shard mirrors are kept (ZeRO).
    pub fn recovers_in_place(&self) -> Result<(), String> {
        match (&self.path, self.core.stage) {
            (Path::Host(_), ZeroStage::Ddp) => Ok(()),
            (Path::Device(_), _) => Err(HOST_PATH_ONLY.into()),
            (Path::Host(_), _) if self.mirrors.is_some() => Ok(()),
            (Path::Host(_), stage) => Err(format!(
                "under ZeRO (parallel.zero_stage = {stage}) a rank's shard exists once and no shard mirrors are kept"
            )),
        }
    }

    /// ZeRO on the host path: keeps the shard mirrors in-place recovery
    /// needs, refreshed every `every` steps (see `mirror.rs`), on ranks
    /// laid out `local` per node; returns the host memory they take and
    /// the rank whose shard this rank mirrors. `None` where there is
    /// nothing to mirror (DDP: every rank holds the whole state) or no
    /// host path. Take the first snapshot with
    /// [`DataParallel::refresh_mirrors`].
    pub fn keep_mirrors(&mut self, every: u64, local: usize) -> Option<(u64, usize)> {
        let Path::Host(b) = &self.path else {
            return None;
        };
        if self.core.stage == ZeroStage::Ddp || self.core.world == 1 {
            return None;
        }
        let states = b.optimizer_state_names().len();
        let m = Mirrors::new(&self.core, states, every, local);
        let info = (
            m.bytes(),
            (self.core.rank + self.core.world - m.offset) % self.core.world,
        );
        self.mirrors = Some(m);
        Some(info)
    }

    /// After a step (`position`: the data loader's, now): refreshes the
    /// shard mirrors when they are due (`force`: now, and waits for it).
    /// Every rank calls it at the same steps.
    pub fn refresh_mirrors(&mut self, position: u64, force: bool) -> Result<(), TrainError> {
        let (Some(m), Path::Host(b)) = (&mut self.mirrors, &mut self.path) else {
            return Ok(());
        };
        if force || m.due(self.core.step) {
            m.refresh(&self.core, b, position, force)?;
        }
        Ok(())
    }

    /// Moves to a new communicator epoch after a peer failed, and makes
    /// every rank's state the newest one a rank holds: the step in flight
    /// is dropped; `comm` (the epoch's communicator; `None`: the one this
    /// was made with, for a replacement) replaces the broken one; the
    /// ranks agree on a source (the lowest rank whose state is the newest)
    /// which broadcasts its parameters and optimizer state to the others
    /// over the transport; `mine` is what this rank brings. Every rank of
    /// the new epoch calls it.
    pub fn rejoin(
        &mut self,
        comm: Option<Communicator>,
        mine: PeerState,
    ) -> Result<Synced, TrainError> {
        self.recovers_in_place()
            .map_err(TrainError::RecoveryFailed)?;
        let Path::Host(b) = &mut self.path else {
            unreachable!("checked above");
        };
        let (core, plan) = (&mut self.core, &self.plan);
        if let Some(comm) = comm {
            b.reconnect(core, plan, comm);
        } else {
            core.flat.zero_grads();
        }
        if let Some(m) = &mut self.mirrors {
            return rejoin_sharded(core, plan, b, m, mine);
        }
        let world = core.world;
        // What each rank holds: its step + 1 (0: nothing), its data position
        // and when it left the failed step, summed so every rank sees all.
        let mut table = vec![0.0f64; 3 * world];
        if let Some(have) = mine.have {
            table[core.rank] = (have.step + 1) as f64;
            table[world + core.rank] = have.position as f64;
            table[2 * world + core.rank] = have.left_unix_ms as f64;
        }
        step::Buffers::sum_f64(b, core, &mut table)?;
        let newest = table[..world].iter().copied().fold(0.0, f64::max);
        if newest == 0.0 {
            return Err(TrainError::RecoveryFailed(
                "no rank of the new epoch holds the job's state".into(),
            ));
        }
        let source = table[..world]
            .iter()
            .position(|&s| s == newest)
            .expect("the maximum is in the table");
        let bytes = b.broadcast_state(core, plan, source)?;
        core.step = newest as u64 - 1;
        Ok(Synced {
            source,
            step: core.step,
            position: table[world + source] as u64,
            bytes,
            in_flight: newest as u64,
            survivors_left_unix_ms: table[2 * world..].iter().copied().fold(0.0, f64::max) as u64,
        })
    }

    fn start(core: Core, plan: Plan, path: Path) -> Result<Self, TrainError> {
        let mut dp = DataParallel {
            core,
            plan,
            path,
            mirrors: None,
        };
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

/// [`DataParallel::rejoin`] under ZeRO: every rank goes back to the
/// snapshot step of the mirrors; a survivor takes its own shard from its
/// snapshot, a replacement its shard from the rank that mirrors it; the
/// parameters are gathered into the model, and the mirrors refreshed.
fn rejoin_sharded(
    core: &mut Core,
    plan: &Plan,
    b: &mut HostBuffers,
    m: &mut Mirrors,
    mine: PeerState,
) -> Result<Synced, TrainError> {
    let world = core.world;
    let rank = core.rank;
    // Per rank (0 for a replacement): its snapshots' steps + 1 and
    // positions, its mirror's step + 1 (0: none), when it left the step.
    const COLS: usize = 7;
    let mut table = vec![0.0f64; COLS * world];
    if let Some(have) = mine.have {
        let own = m.own.as_ref().ok_or_else(|| {
            TrainError::RecoveryFailed(format!("rank {rank} has no snapshot of its shard"))
        })?;
        let row = &mut table[COLS * rank..COLS * (rank + 1)];
        row[0] = (own.step + 1) as f64;
        row[1] = own.position as f64;
        if let Some(prev) = &m.prev {
            row[2] = (prev.step + 1) as f64;
            row[3] = prev.position as f64;
        }
        row[4] = m.held().map_or(0.0, |h| (h.step + 1) as f64);
        row[5] = have.left_unix_ms as f64;
        row[6] = (have.step + 1) as f64;
    }
    step::Buffers::sum_f64(b, core, &mut table)?;
    let row = |r: usize| &table[COLS * r..COLS * (r + 1)];
    let step_of = |x: f64| x as u64 - 1;
    let survivors: Vec<usize> = (0..world).filter(|&r| row(r)[0] > 0.0).collect();
    let replaced: Vec<usize> = (0..world).filter(|&r| row(r)[0] == 0.0).collect();
    let Some(&first) = survivors.first() else {
        return Err(TrainError::RecoveryFailed(
            "no rank of the new epoch holds the job's state".into(),
        ));
    };
    // The step to go back to: that of the replaced ranks' mirrors (all the
    // same), or the survivors' newest snapshot when no rank was replaced.
    let mut target = None;
    for &q in &replaced {
        let h = m.holder_of(q, world);
        if row(h)[0] == 0.0 {
            return Err(TrainError::RecoveryFailed(format!(
                "rank {q} and rank {h}, which held the mirror of its shard, were lost together"
            )));
        }
        if row(h)[4] == 0.0 {
            return Err(TrainError::RecoveryFailed(format!(
                "rank {h} holds no mirror of rank {q}'s shard yet"
            )));
        }
        let at = step_of(row(h)[4]);
        match target {
            Some(t) if t != at => {
                return Err(TrainError::RecoveryFailed(format!(
                    "the mirrors of the replaced ranks are of different steps ({t} and {at})"
                )));
            }
            _ => target = Some(at),
        }
    }
    let step = target.unwrap_or_else(|| step_of(row(first)[0]));
    // Every survivor must hold its own shard as of that step.
    let mut position = None;
    for &r in &survivors {
        let snaps = [(row(r)[0], row(r)[1]), (row(r)[2], row(r)[3])];
        match snaps.iter().find(|(s, _)| *s > 0.0 && step_of(*s) == step) {
            Some(&(_, pos)) => {
                position.get_or_insert(pos as u64);
            }
            None => {
                return Err(TrainError::RecoveryFailed(format!(
                    "rank {r} holds no snapshot of its shard as of step {step}, the step the mirrors of the replaced ranks are of"
                )));
            }
        }
    }
    let position = position.expect("there is a survivor");
    let mut bytes = 0;
    let mut source = first;
    for &q in &replaced {
        let h = m.holder_of(q, world);
        source = h;
        let data = if rank == h {
            m.held().expect("checked in the table").data.to_vec()
        } else {
            vec![0.0; m.slot_len()]
        };
        bytes += (data.len() * std::mem::size_of::<f32>()) as u64;
        let (data, result) = b.run(move |comm, opts| {
            let mut data = data;
            let r = comm.broadcast(&mut data, h, opts);
            (data, r)
        });
        result.map_err(|e| {
            TrainError::RecoveryFailed(format!(
                "sending rank {q}'s shard from rank {h}'s mirror: {e}"
            ))
        })?;
        if rank == q {
            m.adopt(Snap {
                step,
                position,
                data: std::sync::Arc::new(data),
            });
        }
    }
    let own = m.own_at(step).cloned().ok_or_else(|| {
        TrainError::RecoveryFailed(format!(
            "rank {rank} got no shard of step {step} to start from"
        ))
    })?;
    let (params, states) = m.unpack(&own, core.shard().len());
    step::restore(core, plan, b, step, params, states).map_err(|e| {
        TrainError::RecoveryFailed(format!(
            "gathering the parameters of step {step}: {}",
            crate::describe_error(&e)
        ))
    })?;
    m.refresh(core, b, position, true)?;
    Ok(Synced {
        source,
        step,
        position,
        bytes,
        survivors_left_unix_ms: (0..world).map(|r| row(r)[5]).fold(0.0, f64::max) as u64,
        in_flight: (0..world).map(|r| row(r)[6]).fold(0.0, f64::max) as u64,
    })
}

fn run_backward(loss: &Tensor) -> Result<(), TrainError> {
    loss.f_backward().map_err(|source| TrainError::Torch {
        context: "backward pass".into(),
        source,
    })
}

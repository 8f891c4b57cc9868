//! The device path of data parallelism (CUDA tensors): DDP and ZeRO-1/2 with
//! the parameters, gradients and optimizer state in device memory.
//!
//! Layout. At start the model's parameters become views of one flat fp32
//! buffer (`params`, in `FlatParams` order) and their `.grad`s views of
//! another (`grads`): autograd accumulates straight into the flat gradient
//! (as PyTorch DDP's `gradient_as_bucket_view`), and the optimizer's updates
//! to the flat parameters are the model's. Nothing is copied per parameter.
//!
//! The step itself is `step.rs`'s; what this path does at each of its points:
//! 1. **Reduce gradients.** DDP: each bucket is a range of `grads`,
//!    all-reduced (average) in place. ZeRO: bucket *k* is packed from `grads`
//!    (a copy per rank's chunk, as the host path lays buckets out), reduced
//!    and scattered, and this rank's part is copied back into `grads` at its
//!    own range. Under NCCL these are enqueued on the default stream after
//!    the backward kernels; staged over TCP they run synchronously.
//! 2. **Global norm.** The watchdog waits for the collectives (a dead peer
//!    fails here, within the timeout), then the squared norm of the owned
//!    gradient and the loss go through one small all-reduce.
//! 3. **Clip and step.** [`TensorOptimizer`] on the owned ranges of `params`
//!    and `grads`, the clip factor folded into its gradient read.
//! 4. **Parameters.** ZeRO all-gathers each bucket's parameters back into
//!    `params`. Then `grads` is zeroed for the next step.
//!
//! Memory per rank (P parameters, S optimizer state vectors): P params +
//! P grads + S·P state (DDP) or S·P/N (ZeRO) + one bucket (ZeRO). ZeRO-2
//! keeps the full flat gradient too: autograd writes every parameter's
//! gradient, as on the host path.

use std::ops::Range;
use std::time::{Duration, Instant};

use cohort_collectives::{OpKind, OpOptions};
use cohort_configs::{OptimConfig, ParallelConfig, ZeroStage};
use tch::{Device, Kind, Tensor, nn::VarStore};

use crate::TrainError;
use crate::backend::Collectives;
use crate::flat::FlatParams;
use crate::optim::{StepParams, TensorOptimizer};
use crate::plan::{Core, Plan, Timings};
use crate::step::Buffers;

/// The device path's buffers: the whole flat space's parameters and
/// gradients (the model's are views of them) and the optimizer state over
/// the owned range, as tensors on the model's device.
pub(crate) struct DeviceBuffers {
    device: Device,
    /// Every trainable parameter, end to end; the model's are views of it.
    params: Tensor,
    /// Their gradients, end to end; the model's `.grad`s are views of it.
    grads: Tensor,
    /// ZeRO: the buffer buckets are packed into (as long as the longest).
    bucket_buf: Tensor,
    optimizer: TensorOptimizer,
    comm: Collectives,
    opts: OpOptions,
    /// Gradients were found set to none and re-aliased (warned once).
    realiased: bool,
    /// Collectives enqueued since the last wait under the watchdog: every
    /// host read of device memory comes after such a wait (the test seam
    /// that keeps it so).
    unwaited: usize,
    /// This step: time enqueuing (or, staged, running) collectives, and
    /// waiting for the device.
    comm_time: Duration,
    wait_time: Duration,
    /// This step: the part of `comm_time` reducing gradient buckets.
    grad_time: Duration,
}

impl DeviceBuffers {
    /// The core, plan and buffers of `vs` on its device; see
    /// [`crate::DataParallel::new`].
    pub fn new(
        vs: &VarStore,
        comm: Collectives,
        optim: &OptimConfig,
        parallel: &ParallelConfig,
    ) -> Result<(Core, Plan, Self), TrainError> {
        let device = vs.device();
        let (rank, world) = (comm.rank(), comm.world_size());
        let (core, plan) = Plan::new(FlatParams::new(vs)?, rank, world, optim, parallel)?;
        let total = core.flat.total();
        let zeros = |n: usize| Tensor::zeros([n as i64], (Kind::Float, device));
        let mut params = zeros(total);
        core.flat.alias_params(&mut params);
        let grads = zeros(total);
        core.flat.alias_grads(&grads);
        let longest = match core.stage {
            ZeroStage::Ddp => 0,
            _ => plan.buckets.iter().map(|b| b.len).max().unwrap_or(0),
        };
        let decay = core.flat.decay_runs(plan.owned.clone());
        let buffers = DeviceBuffers {
            optimizer: TensorOptimizer::new(optim, plan.owned.len(), device, &decay),
            bucket_buf: zeros(longest),
            device,
            params,
            grads,
            opts: plan.opts.clone(),
            comm,
            realiased: false,
            unwaited: 0,
            comm_time: Duration::ZERO,
            wait_time: Duration::ZERO,
            grad_time: Duration::ZERO,
        };
        Ok((core, plan, buffers))
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn optimizer_state_bytes(&self) -> usize {
        self.optimizer.state_bytes()
    }

    pub fn optimizer_state_names(&self) -> &'static [&'static str] {
        self.optimizer.state_names()
    }

    /// Collectives enqueued and not yet waited for under the watchdog.
    pub fn collectives_in_flight(&self) -> usize {
        self.unwaited
    }

    /// The model's `.grad`s must still be the views of `grads` that
    /// autograd accumulates into. A program that set them to none (e.g.
    /// `tch::nn::Optimizer::zero_grad`) made the backward allocate fresh
    /// ones: their values are copied into the flat buffer and the views
    /// restored, with a warning the first time, instead of stepping on a
    /// zeroed buffer.
    fn check_grad_aliasing(&mut self, core: &Core) {
        let lost = core.flat.unaliased_grads(&self.grads);
        if lost.is_empty() {
            return;
        }
        if !self.realiased {
            eprintln!(
                "[rank {}] warning: {} parameter gradient(s) (first: {}) no longer alias the \
                 flat gradient buffer (were they set to none, e.g. by Optimizer::zero_grad?): \
                 copied back and re-aliased; DataParallel zeroes gradients itself after each step",
                core.rank,
                lost.len(),
                lost[0]
            );
            self.realiased = true;
        }
        core.flat.alias_grads(&self.grads);
    }

    /// Runs `op` on elements `r` of `t`, timed as communication.
    fn run(
        &mut self,
        core: &Core,
        op: OpKind,
        t: &Tensor,
        r: Range<usize>,
        what: &'static str,
    ) -> Result<(), TrainError> {
        let start = Instant::now();
        self.unwaited += 1;
        let result = run_op(&mut self.comm, &self.opts, core.rank, op, t, r, what);
        self.comm_time += start.elapsed();
        result
    }
}

impl Buffers for DeviceBuffers {
    /// A scalar tensor on the device: read only with the norm, in the
    /// step's one wait.
    type Loss = Tensor;
    type Flat = Tensor;

    fn begin_step(&mut self, core: &Core) {
        self.comm_time = Duration::ZERO;
        self.wait_time = Duration::ZERO;
        self.grad_time = Duration::ZERO;
        self.check_grad_aliasing(core);
    }

    /// DDP: a range of `grads`, reduced in place. ZeRO: packed from `grads`
    /// into the bucket buffer, reduced and scattered, this rank's part
    /// copied back into `grads` at its own range. Under NCCL enqueued on
    /// the default stream after the backward kernels; staged over TCP, run.
    fn reduce_grads(
        &mut self,
        core: &Core,
        plan: &Plan,
        k: usize,
        kind: OpKind,
    ) -> Result<(), TrainError> {
        let b = &plan.buckets[k];
        let grads = self.grads.shallow_clone();
        let before = self.comm_time;
        let result = match core.stage {
            ZeroStage::Ddp => self.run(
                core,
                kind,
                &grads,
                b.own.clone(),
                "all_reduce of a gradient bucket",
            ),
            ZeroStage::Zero1 | ZeroStage::Zero2 => {
                let buf = self.bucket_buf.shallow_clone();
                tch::no_grad(|| {
                    let mut at = 0;
                    for seg in &b.segs {
                        copy_range(&buf, at, &grads, seg.start, seg.len());
                        at += seg.len();
                    }
                });
                self.run(
                    core,
                    kind,
                    &buf,
                    0..b.len,
                    "reduce_scatter of a gradient bucket",
                )?;
                tch::no_grad(|| copy_range(&grads, b.own.start, &buf, b.own_at, b.own.len()));
                Ok(())
            }
        };
        self.grad_time += self.comm_time - before;
        result
    }

    /// Nothing to wait for: the norm is computed after the collectives in
    /// stream order.
    fn grads_reduced(&mut self, _core: &Core, _plan: &Plan) -> Result<(), TrainError> {
        Ok(())
    }

    /// Computed on the device and read once, under the watchdog: a dead
    /// peer fails here, within the timeout.
    fn sum_norm_and_loss(
        &mut self,
        core: &Core,
        plan: &Plan,
        count_norm: bool,
        loss: Option<&Tensor>,
    ) -> Result<[f64; 2], TrainError> {
        let zero = || Tensor::zeros([], (Kind::Double, self.device));
        let sq = if count_norm {
            owned_view(plan, &self.grads).square().sum(Kind::Double)
        } else {
            zero()
        };
        let loss = loss.map_or_else(zero, |l| l.detach().to_kind(Kind::Double));
        let t = Instant::now();
        let sums = self
            .comm
            .sum_on_device(&Tensor::stack(&[sq, loss], 0), &self.opts)
            .map_err(TrainError::comm(
                core.rank,
                "all_reduce of the step's scalars (after the gradient collectives)",
            ))?;
        self.unwaited = 0;
        self.wait_time += t.elapsed();
        Ok([sums[0], sums[1]])
    }

    fn update(&mut self, plan: &Plan, local: Range<usize>, sp: StepParams) {
        let at = plan.owned.start + local.start;
        let part = |t: &Tensor| t.narrow(0, at as i64, local.len() as i64);
        let (mut p, g) = (part(&self.params), part(&self.grads));
        self.optimizer.update(local, &mut p, &g, sp);
    }

    /// The model's parameters are views of `params`: nothing to write.
    fn write_back_params(&mut self, _core: &Core, _plan: &Plan) {}

    /// Enqueued, and waited for at the next wait (the next step's scalars,
    /// an evaluation, a checkpoint), before anything reads the parameters.
    fn gather_params(&mut self, core: &Core, plan: &Plan, k: usize) -> Result<(), TrainError> {
        let b = &plan.buckets[k];
        let (params, buf) = (self.params.shallow_clone(), self.bucket_buf.shallow_clone());
        tch::no_grad(|| copy_range(&buf, b.own_at, &params, b.own.start, b.own.len()));
        self.run(
            core,
            OpKind::AllGather,
            &buf,
            0..b.len,
            "all_gather of a parameter bucket",
        )?;
        tch::no_grad(|| {
            let mut at = 0;
            for (r, seg) in b.segs.iter().enumerate() {
                if r != core.rank {
                    copy_range(&params, seg.start, &buf, at, seg.len());
                }
                at += seg.len();
            }
        });
        Ok(())
    }

    /// The collectives are not waited for here: every one of them counts
    /// as time this thread could not hide (the stream runs them in order).
    fn finish_step(&mut self, _core: &Core, _plan: &Plan) -> Result<Timings, TrainError> {
        let comm = self.comm_time + self.wait_time;
        Ok(Timings {
            comm,
            wait: comm,
            grad_comm: self.grad_time,
            ..Timings::default()
        })
    }

    fn zero_grads(&mut self, _core: &Core) {
        let _ = self.grads.zero_();
    }

    fn model_params(&mut self, _core: &Core) -> Tensor {
        self.params.shallow_clone()
    }

    fn placed(&mut self, core: &Core, part: &[f32]) -> Tensor {
        let full = Tensor::zeros([core.flat.total() as i64], (Kind::Float, self.device));
        let part_t = self.upload(part);
        tch::no_grad(|| copy_range(&full, core.shard().start, &part_t, 0, part.len()));
        full
    }

    fn upload(&mut self, part: &[f32]) -> Tensor {
        Tensor::from_slice(part).to_device(self.device)
    }

    fn collective(
        &mut self,
        core: &Core,
        kind: OpKind,
        flat: &mut Tensor,
        what: &'static str,
    ) -> Result<(), TrainError> {
        let all = 0..flat.numel();
        self.run(core, kind, flat, all, what)
    }

    fn wait(&mut self, core: &Core, what: &'static str) -> Result<(), TrainError> {
        self.comm
            .synchronize(self.opts.timeout)
            .map_err(TrainError::comm(core.rank, what))?;
        self.unwaited = 0;
        Ok(())
    }

    /// `full` is `params` itself at start (the model's parameters,
    /// broadcast in place); on restore it is copied in.
    fn install_params(&mut self, _core: &Core, _plan: &Plan, full: Tensor) {
        if full.data_ptr() != self.params.data_ptr() {
            tch::no_grad(|| self.params.copy_(&full));
        }
    }

    fn set_states(&mut self, states: Vec<Tensor>) -> Result<(), String> {
        self.optimizer.set_states(states)
    }

    fn read_master(&mut self, plan: &Plan, local: Range<usize>) -> (Vec<f32>, Vec<Vec<f32>>) {
        let global = plan.owned.start + local.start..plan.owned.start + local.end;
        let params = to_host(&self.params, global);
        let states = self
            .optimizer
            .states()
            .iter()
            .map(|s| to_host(s, local.clone()))
            .collect();
        (params, states)
    }

    fn sum_f64(&mut self, core: &Core, values: &mut [f64]) -> Result<(), TrainError> {
        self.comm
            .sum_f64(values, self.device, &self.opts)
            .map_err(TrainError::comm(
                core.rank,
                "all_reduce of the step's scalars",
            ))
    }
}

/// The owned range of a flat tensor.
fn owned_view(plan: &Plan, t: &Tensor) -> Tensor {
    t.narrow(0, plan.owned.start as i64, plan.owned.len() as i64)
}

/// Runs `op` in place on elements `r` of the flat tensor `t`, naming `what`
/// in an error.
fn run_op(
    comm: &mut Collectives,
    opts: &OpOptions,
    rank: usize,
    op: OpKind,
    t: &Tensor,
    r: Range<usize>,
    what: &'static str,
) -> Result<(), TrainError> {
    let mut part = t.narrow(0, r.start as i64, r.len() as i64);
    comm.tensor_op(op, &mut part, opts)
        .map_err(TrainError::comm(rank, what))
}

/// `dst[dst_at..dst_at+len] = src[src_at..src_at+len]` for flat tensors.
fn copy_range(dst: &Tensor, dst_at: usize, src: &Tensor, src_at: usize, len: usize) {
    if len == 0 {
        return;
    }
    let mut d = dst.narrow(0, dst_at as i64, len as i64);
    d.copy_(&src.narrow(0, src_at as i64, len as i64));
}

/// Elements `r` of a flat f32 tensor, in host memory.
fn to_host(t: &Tensor, r: Range<usize>) -> Vec<f32> {
    let mut out = vec![0f32; r.len()];
    if !r.is_empty() {
        t.narrow(0, r.start as i64, r.len() as i64)
            .to_device(Device::Cpu)
            .copy_data(&mut out, r.len());
    }
    out
}

//! The device path of data parallelism (CUDA tensors): DDP and ZeRO-1/2 with
//! the parameters, gradients and optimizer state in device memory.
//!
//! Layout. At start the model's parameters become views of one flat fp32
//! buffer (`params`, in `FlatParams` order) and their `.grad`s views of
//! another (`grads`): autograd accumulates straight into the flat gradient
//! (as PyTorch DDP's `gradient_as_bucket_view`), and the optimizer's updates
//! to the flat parameters are the model's. Nothing is copied per parameter.
//!
//! One step, in order:
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

use cohort_collectives::OpOptions;
use cohort_configs::{OptimConfig, ParallelConfig};
use tch::{Device, Kind, Tensor, nn::VarStore};

use cohort_checkpoint::Shard;

use crate::TrainError;
use crate::backend::{Collectives, TensorOp};
use crate::flat::FlatParams;
use crate::optim::{StepParams, TensorOptimizer};
use crate::parallel::{Bucket, Core, Plan, StepReport, ZeroStage};

/// Data-parallel training of one `VarStore` whose tensors live on a device.
pub(crate) struct DeviceParallel {
    pub(crate) core: Core,
    device: Device,
    owned: Range<usize>,
    /// Every trainable parameter, end to end; the model's are views of it.
    params: Tensor,
    /// Their gradients, end to end; the model's `.grad`s are views of it.
    grads: Tensor,
    buckets: Vec<Bucket>,
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
}

impl DeviceParallel {
    pub fn new(
        vs: &VarStore,
        comm: Collectives,
        optim: &OptimConfig,
        parallel: &ParallelConfig,
    ) -> Result<Self, TrainError> {
        let device = vs.device();
        let (rank, world) = (comm.rank(), comm.world_size());
        let (
            core,
            Plan {
                opts,
                owned,
                buckets,
            },
        ) = Plan::new(FlatParams::new(vs)?, rank, world, optim, parallel)?;
        let total = core.flat.total();
        let zeros = |n: usize| Tensor::zeros([n as i64], (Kind::Float, device));
        let mut params = zeros(total);
        core.flat.alias_params(&mut params);
        let grads = zeros(total);
        core.flat.alias_grads(&grads);
        let longest = match core.stage {
            ZeroStage::Ddp => 0,
            _ => buckets.iter().map(|b| b.len).max().unwrap_or(0),
        };
        let decay = core.flat.decay_runs(owned.clone());
        let mut dp = DeviceParallel {
            core,
            optimizer: TensorOptimizer::new(optim, owned.len(), device, &decay),
            bucket_buf: zeros(longest),
            device,
            owned,
            params,
            grads,
            buckets,
            comm,
            opts,
            realiased: false,
            unwaited: 0,
        };
        // Every rank starts from rank 0's parameters, with no gradient;
        // waited for under the watchdog, so a peer that dies here is an
        // error, not a hang in the first host read.
        let params = dp.params.shallow_clone();
        dp.collective(
            TensorOp::Broadcast,
            &params,
            "broadcast of the initial parameters",
        )?;
        dp.wait("waiting for the broadcast of the initial parameters")?;
        let _ = dp.grads.zero_();
        Ok(dp)
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

    /// Runs `op` in place on all of `params` (at start and restore).
    fn collective(
        &mut self,
        op: TensorOp,
        t: &Tensor,
        what: &'static str,
    ) -> Result<(), TrainError> {
        let all = 0..t.numel();
        self.unwaited += 1;
        run_op(&mut self.comm, &self.opts, self.core.rank, op, t, all, what)
    }

    /// Collectives enqueued and not yet waited for under the watchdog.
    pub fn collectives_in_flight(&self) -> usize {
        self.unwaited
    }

    /// Waits for every enqueued collective under the watchdog.
    pub(crate) fn wait(&mut self, what: &'static str) -> Result<(), TrainError> {
        self.comm
            .synchronize(self.opts.timeout)
            .map_err(TrainError::comm(self.core.rank, what))?;
        self.unwaited = 0;
        Ok(())
    }

    /// The model's `.grad`s must still be the views of `grads` that
    /// autograd accumulates into. A program that set them to none (e.g.
    /// `tch::nn::Optimizer::zero_grad`) made the backward allocate fresh
    /// ones: their values are copied into the flat buffer and the views
    /// restored, with a warning the first time, instead of stepping on a
    /// zeroed buffer.
    fn check_grad_aliasing(&mut self) {
        let lost = self.core.flat.unaliased_grads(&self.grads);
        if lost.is_empty() {
            return;
        }
        if !self.realiased {
            eprintln!(
                "[rank {}] warning: {} parameter gradient(s) (first: {}) no longer alias the \
                 flat gradient buffer (were they set to none, e.g. by Optimizer::zero_grad?): \
                 copied back and re-aliased; DataParallel zeroes gradients itself after each step",
                self.core.rank,
                lost.len(),
                lost[0]
            );
            self.realiased = true;
        }
        self.core.flat.alias_grads(&self.grads);
    }

    /// One step; `local_loss` (a device scalar, this rank's loss) is
    /// averaged over the ranks in the same collective as the gradient norm,
    /// read with it: the step's only wait for the device.
    pub(crate) fn step_inner(
        &mut self,
        local_loss: Option<&Tensor>,
    ) -> Result<StepReport, TrainError> {
        let start = Instant::now();
        let mut comm_time = Duration::ZERO;
        self.check_grad_aliasing();

        // 1. Gradients.
        let t = Instant::now();
        self.unwaited += self.buckets.len();
        let (comm, opts, rank) = (&mut self.comm, &self.opts, self.core.rank);
        let (grads, buf) = (&self.grads, &self.bucket_buf);
        for b in &self.buckets {
            match self.core.stage {
                ZeroStage::Ddp => run_op(
                    comm,
                    opts,
                    rank,
                    TensorOp::AllReduceAvg,
                    grads,
                    b.own.clone(),
                    "all_reduce of a gradient bucket",
                )?,
                ZeroStage::Zero1 | ZeroStage::Zero2 => {
                    tch::no_grad(|| {
                        let mut at = 0;
                        for seg in &b.segs {
                            copy_range(buf, at, grads, seg.start, seg.len());
                            at += seg.len();
                        }
                    });
                    run_op(
                        comm,
                        opts,
                        rank,
                        TensorOp::ReduceScatterAvg,
                        buf,
                        0..b.len,
                        "reduce_scatter of a gradient bucket",
                    )?;
                    tch::no_grad(|| copy_range(grads, b.own.start, buf, b.own_at, b.own.len()));
                }
            }
        }
        comm_time += t.elapsed();

        // 2. Global norm and mean loss, computed on the device after the
        //    gradient collectives (stream order) and read once, under the
        //    watchdog: a dead peer fails here, within the timeout.
        let owned_grads = self.owned_view(&self.grads);
        let zero = || Tensor::zeros([], (Kind::Double, self.device));
        let sq = match self.core.stage {
            // Every rank holds the whole reduced gradient: count it once.
            ZeroStage::Ddp if self.core.rank != 0 => zero(),
            _ => owned_grads.square().sum(Kind::Double),
        };
        let loss_t = local_loss.map_or_else(zero, |l| l.detach().to_kind(Kind::Double));
        let t = Instant::now();
        let scalars = self
            .comm
            .sum_on_device(&Tensor::stack(&[sq, loss_t], 0), &self.opts)
            .map_err(TrainError::comm(
                self.core.rank,
                "all_reduce of the step's scalars (after the gradient collectives)",
            ))?;
        self.unwaited = 0;
        let wait = t.elapsed();
        let grad_norm = scalars[0].sqrt();
        let loss = local_loss.map(|_| scalars[1] / self.core.world as f64);

        // 3. Clip (as torch.nn.utils.clip_grad_norm_) and step.
        let grad_scale = if self.core.grad_clip > 0.0 {
            (self.core.grad_clip / (grad_norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        let lr = self.core.schedule.at(self.core.step);
        let t = Instant::now();
        let mut owned_params = self.owned_view(&self.params);
        self.optimizer.update(
            &mut owned_params,
            &owned_grads,
            StepParams {
                step: self.core.step,
                lr: lr as f32,
                grad_scale: grad_scale as f32,
            },
        );
        let optimizer = t.elapsed();

        // 4. ZeRO: every rank's updated shard, bucket by bucket. Waited for
        //    at the next wait (the next step's scalars, an evaluation, a
        //    checkpoint), before anything reads the parameters.
        let t = Instant::now();
        if self.core.stage != ZeroStage::Ddp {
            self.unwaited += self.buckets.len();
            let (comm, opts, rank) = (&mut self.comm, &self.opts, self.core.rank);
            let (params, buf) = (&self.params, &self.bucket_buf);
            for b in &self.buckets {
                tch::no_grad(|| copy_range(buf, b.own_at, params, b.own.start, b.own.len()));
                run_op(
                    comm,
                    opts,
                    rank,
                    TensorOp::AllGather,
                    buf,
                    0..b.len,
                    "all_gather of a parameter bucket",
                )?;
                tch::no_grad(|| {
                    let mut at = 0;
                    for (r, seg) in b.segs.iter().enumerate() {
                        if r != rank {
                            copy_range(params, seg.start, buf, at, seg.len());
                        }
                        at += seg.len();
                    }
                });
            }
        }
        comm_time += t.elapsed();
        let _ = self.grads.zero_();
        self.core.step += 1;
        Ok(StepReport {
            step: self.core.step,
            lr,
            grad_norm,
            loss,
            comm_s: (comm_time + wait).as_secs_f64(),
            comm_wait_s: (comm_time + wait).as_secs_f64(),
            optimizer_s: optimizer.as_secs_f64(),
            pack_s: 0.0,
            total_s: start.elapsed().as_secs_f64(),
        })
    }

    /// The owned range of a flat tensor.
    fn owned_view(&self, t: &Tensor) -> Tensor {
        t.narrow(0, self.owned.start as i64, self.owned.len() as i64)
    }

    /// Sums `values` over the ranks, in place (every rank must call it).
    pub fn sum_over_ranks(&mut self, values: &mut [f64]) -> Result<(), TrainError> {
        self.comm
            .sum_f64(values, self.device, &self.opts)
            .map_err(TrainError::comm(
                self.core.rank,
                "all_reduce of the step's scalars",
            ))
    }

    pub fn checkpoint_shard(&mut self) -> Result<Shard, TrainError> {
        self.wait("waiting for the parameter collectives")?;
        let shard = self.core.shard();
        let local = shard.start - self.owned.start..shard.end - self.owned.start;
        let params = to_host(&self.params, shard.clone());
        let states = self
            .optimizer
            .states()
            .iter()
            .map(|s| to_host(s, local.clone()))
            .collect();
        Ok(Shard {
            range: shard,
            params,
            states,
        })
    }

    /// See [`crate::DataParallel::restore`] (which has checked the lengths).
    pub fn restore(
        &mut self,
        steps_done: u64,
        params: Vec<f32>,
        states: Vec<Vec<f32>>,
    ) -> Result<(), TrainError> {
        let total = self.core.flat.total();
        let shard = self.core.shard();
        // A full-length vector with this rank's shard in place, gathered.
        let gather = |dp: &mut Self, part: &[f32]| -> Result<Tensor, TrainError> {
            let full = Tensor::zeros([total as i64], (Kind::Float, dp.device));
            tch::no_grad(|| {
                copy_range(
                    &full,
                    shard.start,
                    &Tensor::from_slice(part).to_device(dp.device),
                    0,
                    part.len(),
                )
            });
            dp.collective(
                TensorOp::AllGather,
                &full,
                "all_gather of a restored checkpoint",
            )?;
            Ok(full)
        };
        let full = gather(self, &params)?;
        let states = match self.core.stage {
            ZeroStage::Ddp => states
                .iter()
                .map(|s| gather(self, s))
                .collect::<Result<Vec<_>, _>>()?,
            _ => states
                .iter()
                .map(|s| Tensor::from_slice(s).to_device(self.device))
                .collect(),
        };
        self.wait("waiting for the all_gather of a restored checkpoint")?;
        self.optimizer
            .set_states(states)
            .map_err(|e| TrainError::Config(format!("checkpoint optimizer state: {e}")))?;
        tch::no_grad(|| self.params.copy_(&full));
        self.core.step = steps_done;
        Ok(())
    }
}

/// Runs `op` in place on elements `r` of the flat tensor `t`, naming `what`
/// in an error.
fn run_op(
    comm: &mut Collectives,
    opts: &OpOptions,
    rank: usize,
    op: TensorOp,
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

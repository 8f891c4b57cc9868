//! The host path of data parallelism (CPU tensors): DDP and ZeRO-1/2 with
//! fp32 master parameters, gradients and optimizer state in host memory,
//! and a communication thread that overlaps the collectives with packing,
//! unpacking and the optimizer.
//!
//! One call per step, [`HostParallel::step`], after the micro-batches' backward
//! passes (tch accumulates their gradients in the variables):
//!
//! 1. **Reduce gradients.** The flat gradient is cut into buckets
//!    (`parallel.bucket_mb`, 25 MiB as PyTorch DDP). Bucket *k* is packed from
//!    the variables' `.grad` and handed to the communication thread, which
//!    reduces it while this thread packs bucket *k+1* and unpacks the buckets
//!    that came back. DDP all-reduces (average) and keeps the whole gradient;
//!    ZeRO reduce-scatters (average) and keeps only the rank's own shard.
//! 2. **Global norm.** Each rank sums the squares of the gradient it owns; one
//!    small all-reduce gives the global norm (and the mean loss) on every rank.
//! 3. **Clip and step.** The optimizer runs on the owned part of the flat fp32
//!    parameters with the clip factor folded into its gradient read.
//! 4. **Parameters.** DDP writes its (full) parameters back into the model.
//!    ZeRO steps its shard bucket by bucket and all-gathers each bucket's
//!    parameters on the communication thread while it steps the next one.
//!
//! ZeRO buckets are laid out so that a reduce-scatter of bucket *k* lands
//! exactly on the rank's own global shard: bucket *k* holds, for each rank
//! *r* in order, the *k*-th chunk of `bucket/world` elements of *r*'s shard
//! `shard_range(total, world, r)`. The chunk lengths then follow the same
//! "first `len % world` ranks get one more" rule as `shard_range(bucket_len,
//! world, r)`, which is where the collective leaves each rank's result.
//!
//! Memory per rank (P = parameters, B = bucket, S = state vectors):
//! DDP: P master + P gradient + S·P state + 3 bucket buffers;
//! ZeRO-1: P/N master + P/N gradient + S·P/N state + P (the reduced gradient
//! buckets, kept); ZeRO-2: as ZeRO-1 but 3 bucket buffers instead of the P.
//! (tch's own `.grad` tensors are full size in every mode: autograd writes them.)

use std::ops::Range;
use std::time::{Duration, Instant};

use cohort_collectives::Communicator;
use cohort_configs::{OptimConfig, ParallelConfig};
use tch::nn::VarStore;

use cohort_checkpoint::Shard;

use crate::TrainError;
use crate::comm::{Buf, CommThread, Done, Op};
use crate::flat::FlatParams;
use crate::optim::{Optimizer, StepParams};
use crate::parallel::{Bucket, Core, Plan, StepReport, ZeroStage};

/// Bucket buffers in flight at once (DDP and ZeRO-2).
const PIPELINE: usize = 3;

#[derive(Default)]
struct Timers {
    comm: Duration,
    wait: Duration,
    pack: Duration,
    optimizer: Duration,
}

/// Data-parallel training of one `VarStore` on the CPU.
pub(crate) struct HostParallel {
    pub(crate) core: Core,
    /// The part of the flat space this rank steps: all of it under DDP, its
    /// `shard_range` under ZeRO.
    owned: Range<usize>,
    /// fp32 master parameters over `owned`.
    params: Vec<f32>,
    /// Reduced gradient over `owned`.
    grads: Vec<f32>,
    /// Weight-decay runs over `owned` (relative offsets).
    decay: Vec<(Range<usize>, bool)>,
    buckets: Vec<Bucket>,
    /// ZeRO-1: the reduced gradient buckets, kept between steps.
    kept: Vec<Vec<f32>>,
    /// Free bucket buffers.
    pool: Vec<Vec<f32>>,
    optimizer: Optimizer,
    comm: CommThread,
    timers: Timers,
    sq_norm: f64,
}

impl HostParallel {
    /// See [`crate::DataParallel::new`].
    pub fn new(
        vs: &VarStore,
        comm: Communicator,
        optim: &OptimConfig,
        parallel: &ParallelConfig,
    ) -> Result<Self, TrainError> {
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
        let decay = core.flat.decay_runs(owned.clone());
        let kept = match core.stage {
            ZeroStage::Zero1 => buckets.iter().map(|b| vec![0.0; b.len]).collect(),
            _ => Vec::new(),
        };
        let mut dp = HostParallel {
            core,
            optimizer: Optimizer::new(optim, owned.len()),
            params: vec![0.0; owned.len()],
            grads: vec![0.0; owned.len()],
            kept,
            owned,
            decay,
            buckets,
            pool: Vec::new(),
            comm: CommThread::spawn(comm, opts),
            timers: Timers::default(),
            sq_norm: 0.0,
        };
        let mut all = vec![0.0; total];
        dp.core.flat.read_params(0..total, &mut all);
        let all = dp.collective_f32(Op::Broadcast, all)?;
        dp.install_full_params(&all);
        Ok(dp)
    }

    /// Bytes of optimizer state this rank holds.
    pub fn optimizer_state_bytes(&self) -> usize {
        self.optimizer.state_bytes()
    }

    /// Names of the optimizer's per-element state vectors.
    pub fn optimizer_state_names(&self) -> &'static [&'static str] {
        self.optimizer.state_names()
    }

    pub(crate) fn step_inner(&mut self, local_loss: Option<f64>) -> Result<StepReport, TrainError> {
        let start = Instant::now();
        self.timers = Timers::default();
        self.sq_norm = 0.0;

        // 1. Gradients: pack bucket k while earlier buckets are being reduced.
        let op = match self.core.stage {
            ZeroStage::Ddp => Op::AllReduceAvg,
            _ => Op::ReduceScatterAvg,
        };
        let mut in_flight = 0;
        for k in 0..self.buckets.len() {
            let mut buf = self.take_buffer(k, &mut in_flight)?;
            let t = Instant::now();
            let bucket = &self.buckets[k];
            buf.resize(bucket.len, 0.0);
            let mut at = 0;
            for seg in &bucket.segs {
                self.core
                    .flat
                    .read_grads(seg.clone(), &mut buf[at..at + seg.len()]);
                at += seg.len();
            }
            self.timers.pack += t.elapsed();
            self.comm.submit(op, k, Buf::F32(buf));
            in_flight += 1;
        }
        self.drain(&mut in_flight)?;

        // 2. One small all-reduce: the squared norm (each element counted
        // once: under DDP every rank holds all of it, so only rank 0 adds it)
        // and the loss.
        let sq = match self.core.stage {
            ZeroStage::Ddp if self.core.rank != 0 => 0.0,
            _ => self.sq_norm,
        };
        let scalars = self.collective_f64(vec![sq, local_loss.unwrap_or(0.0)])?;
        let grad_norm = scalars[0].sqrt();
        let loss = local_loss.map(|_| scalars[1] / self.core.world as f64);

        // 3. Clip (as torch.nn.utils.clip_grad_norm_) and the step's learning rate.
        let grad_scale = if self.core.grad_clip > 0.0 {
            (self.core.grad_clip / (grad_norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        let lr = self.core.schedule.at(self.core.step);
        let sp = StepParams {
            step: self.core.step,
            lr: lr as f32,
            grad_scale: grad_scale as f32,
        };

        // 4. Optimizer and parameters.
        match self.core.stage {
            ZeroStage::Ddp => {
                self.update(0..self.owned.len(), sp);
                let t = Instant::now();
                self.core
                    .flat
                    .write_params(self.owned.clone(), &self.params);
                self.timers.pack += t.elapsed();
            }
            ZeroStage::Zero1 | ZeroStage::Zero2 => {
                let mut in_flight = 0;
                for k in 0..self.buckets.len() {
                    let own = self.buckets[k].own.clone();
                    let local = own.start - self.owned.start..own.end - self.owned.start;
                    self.update(local.clone(), sp);
                    let mut buf = self.take_buffer(k, &mut in_flight)?;
                    let bucket = &self.buckets[k];
                    buf.resize(bucket.len, 0.0);
                    buf[bucket.own_at..bucket.own_at + own.len()]
                        .copy_from_slice(&self.params[local]);
                    self.comm.submit(Op::AllGather, k, Buf::F32(buf));
                    in_flight += 1;
                }
                self.drain(&mut in_flight)?;
            }
        }
        self.core.flat.zero_grads();
        self.core.step += 1;
        let t = &self.timers;
        Ok(StepReport {
            step: self.core.step,
            lr,
            grad_norm,
            loss,
            comm_s: t.comm.as_secs_f64(),
            comm_wait_s: t.wait.as_secs_f64(),
            optimizer_s: t.optimizer.as_secs_f64(),
            pack_s: t.pack.as_secs_f64(),
            total_s: start.elapsed().as_secs_f64(),
        })
    }

    /// Runs the optimizer on `local` (offsets into the owned range).
    fn update(&mut self, local: Range<usize>, sp: StepParams) {
        let t = Instant::now();
        for (run, decay) in &self.decay {
            let lo = run.start.max(local.start);
            let hi = run.end.min(local.end);
            if lo < hi {
                self.optimizer.update(
                    lo..hi,
                    &mut self.params[lo..hi],
                    &self.grads[lo..hi],
                    *decay,
                    sp,
                );
            }
        }
        self.timers.optimizer += t.elapsed();
    }

    /// A buffer for bucket `k`: ZeRO-1's kept one, else a free one from the
    /// pool, waiting for an in-flight bucket to come back when the pipeline
    /// is full.
    fn take_buffer(&mut self, k: usize, in_flight: &mut usize) -> Result<Vec<f32>, TrainError> {
        if self.core.stage == ZeroStage::Zero1 {
            return Ok(std::mem::take(&mut self.kept[k]));
        }
        if self.pool.is_empty() && *in_flight >= PIPELINE {
            let done = self.wait();
            self.finish(done)?;
            *in_flight -= 1;
        }
        Ok(self.pool.pop().unwrap_or_default())
    }

    fn drain(&mut self, in_flight: &mut usize) -> Result<(), TrainError> {
        while *in_flight > 0 {
            let done = self.wait();
            *in_flight -= 1;
            self.finish(done)?;
        }
        Ok(())
    }

    fn wait(&mut self) -> Done {
        let t = Instant::now();
        let done = self.comm.recv();
        self.timers.wait += t.elapsed();
        self.timers.comm += done.busy;
        done
    }

    /// Unpacks a finished bucket and returns its buffer.
    fn finish(&mut self, done: Done) -> Result<(), TrainError> {
        let Done {
            op,
            tag,
            buf,
            result,
            ..
        } = done;
        result.map_err(TrainError::comm(self.core.rank, op.name()))?;
        let Buf::F32(buf) = buf else {
            unreachable!("bucket collectives carry f32 buffers")
        };
        let t = Instant::now();
        let bucket = &self.buckets[tag];
        match op {
            Op::AllReduceAvg | Op::ReduceScatterAvg => {
                let own = bucket.own.clone();
                let part = &buf[bucket.own_at..bucket.own_at + own.len()];
                let local = own.start - self.owned.start..own.end - self.owned.start;
                self.grads[local].copy_from_slice(part);
                self.sq_norm += part
                    .iter()
                    .map(|&g| f64::from(g) * f64::from(g))
                    .sum::<f64>();
            }
            Op::AllGather => {
                let mut at = 0;
                for seg in &bucket.segs {
                    self.core
                        .flat
                        .write_params(seg.clone(), &buf[at..at + seg.len()]);
                    at += seg.len();
                }
            }
            Op::SumScalars | Op::Broadcast => unreachable!("{op:?} is not a bucket op"),
        }
        self.timers.pack += t.elapsed();
        match self.core.stage {
            ZeroStage::Zero1 => self.kept[tag] = buf,
            _ => self.pool.push(buf),
        }
        Ok(())
    }

    fn collective_f32(&mut self, op: Op, buf: Vec<f32>) -> Result<Vec<f32>, TrainError> {
        self.comm.submit(op, usize::MAX, Buf::F32(buf));
        let done = self.wait();
        done.result
            .map_err(TrainError::comm(self.core.rank, op.name()))?;
        match done.buf {
            Buf::F32(b) => Ok(b),
            Buf::F64(_) => unreachable!("an f32 op returns its f32 buffer"),
        }
    }

    fn collective_f64(&mut self, buf: Vec<f64>) -> Result<Vec<f64>, TrainError> {
        self.comm.submit(Op::SumScalars, usize::MAX, Buf::F64(buf));
        let done = self.wait();
        done.result
            .map_err(TrainError::comm(self.core.rank, Op::SumScalars.name()))?;
        match done.buf {
            Buf::F64(b) => Ok(b),
            Buf::F32(_) => unreachable!("an f64 op returns its f64 buffer"),
        }
    }

    /// Sums `values` over the ranks, in place (every rank must call it).
    pub fn sum_over_ranks(&mut self, values: &mut [f64]) -> Result<(), TrainError> {
        let sums = self.collective_f64(values.to_vec())?;
        values.copy_from_slice(&sums);
        Ok(())
    }

    /// See [`crate::DataParallel::checkpoint_shard`].
    pub fn checkpoint_shard(&mut self) -> Result<Shard, TrainError> {
        let shard = self.core.shard();
        let local = shard.start - self.owned.start..shard.end - self.owned.start;
        let params = self.params[local.clone()].to_vec();
        let states = self
            .optimizer
            .states()
            .iter()
            .map(|s| s[local.clone()].to_vec())
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
        let gather = |dp: &mut Self, part: &[f32]| -> Result<Vec<f32>, TrainError> {
            let mut full = vec![0.0; total];
            full[shard.clone()].copy_from_slice(part);
            dp.collective_f32(Op::AllGather, full)
        };
        let full = gather(self, &params)?;
        let states = match self.core.stage {
            ZeroStage::Ddp => states
                .iter()
                .map(|s| gather(self, s))
                .collect::<Result<Vec<_>, _>>()?,
            _ => states,
        };
        self.optimizer
            .set_states(states)
            .map_err(|e| TrainError::Config(format!("checkpoint optimizer state: {e}")))?;
        self.install_full_params(&full);
        self.core.step = steps_done;
        Ok(())
    }

    /// Sets the master copy and the model from the full flat parameters.
    fn install_full_params(&mut self, all: &[f32]) {
        self.params.copy_from_slice(&all[self.owned.clone()]);
        self.core.flat.write_params(0..all.len(), all);
    }
}

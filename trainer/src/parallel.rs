//! Data parallelism over a `VarStore`: DDP and ZeRO-1/2.
//!
//! One call per step, [`DataParallel::step`], after the micro-batches' backward
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

use cohort_collectives::{Algorithm, Communicator, OpOptions, shard_range};
use cohort_configs::{OptimConfig, ParallelConfig};
use tch::{Tensor, nn::VarStore};

use crate::TrainError;
use crate::comm::{Buf, CommThread, Done, Op};
use crate::flat::FlatParams;
use crate::optim::{LrSchedule, Optimizer, StepParams};

/// Bucket buffers in flight at once (DDP and ZeRO-2).
const PIPELINE: usize = 3;

/// How gradients and optimizer state are spread over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroStage {
    /// All-reduce gradients; every rank keeps all optimizer state.
    Ddp,
    /// Reduce-scatter gradients; each rank keeps 1/N of the optimizer state.
    Zero1,
    /// As ZeRO-1, and only the rank's shard of the reduced gradient is kept.
    Zero2,
}

impl ZeroStage {
    pub fn from_config(stage: u8) -> Result<Self, TrainError> {
        match stage {
            0 => Ok(ZeroStage::Ddp),
            1 => Ok(ZeroStage::Zero1),
            2 => Ok(ZeroStage::Zero2),
            s => Err(TrainError::Config(format!(
                "parallel.zero_stage = {s} is not supported: use 0 (DDP), 1 or 2"
            ))),
        }
    }

    pub fn as_u8(self) -> u8 {
        match self {
            ZeroStage::Ddp => 0,
            ZeroStage::Zero1 => 1,
            ZeroStage::Zero2 => 2,
        }
    }
}

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
struct Bucket {
    segs: Vec<Range<usize>>,
    len: usize,
    /// Where this rank's result sits: offset in the buffer, flat range.
    own_at: usize,
    own: Range<usize>,
}

#[derive(Default)]
struct Timers {
    comm: Duration,
    wait: Duration,
    pack: Duration,
    optimizer: Duration,
}

/// Data-parallel training of one `VarStore`.
///
/// See the crate docs for an example.
pub struct DataParallel {
    flat: FlatParams,
    stage: ZeroStage,
    rank: usize,
    world: usize,
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
    schedule: LrSchedule,
    grad_clip: f64,
    step: u64,
    comm: CommThread,
    timers: Timers,
    sq_norm: f64,
}

impl DataParallel {
    /// Wraps `vs`'s trainable variables. Rank 0's parameters are broadcast so
    /// every rank starts from the same point. The learning-rate schedule is
    /// warmup then cosine to `optim.min_lr` at `optim.decay_steps` (0 = no
    /// decay: the built-in trainer sets it to `train.max_steps`).
    pub fn new(
        vs: &VarStore,
        comm: Communicator,
        optim: &OptimConfig,
        parallel: &ParallelConfig,
    ) -> Result<Self, TrainError> {
        let stage = ZeroStage::from_config(parallel.zero_stage)?;
        let algorithm: Algorithm = parallel
            .algorithm
            .parse()
            .map_err(|e| TrainError::Config(format!("parallel.algorithm: {e}")))?;
        if parallel.bucket_mb.is_nan() || parallel.bucket_mb <= 0.0 {
            return Err(TrainError::Config(
                "parallel.bucket_mb must be greater than 0".into(),
            ));
        }
        let flat = FlatParams::new(vs)?;
        let (rank, world) = (comm.rank(), comm.world_size());
        let total = flat.total();
        let owned = match stage {
            ZeroStage::Ddp => 0..total,
            _ => shard_range(total, world, rank),
        };
        let bucket_elems = ((parallel.bucket_mb * 1024.0 * 1024.0 / 4.0) as usize).max(world);
        let buckets = make_buckets(total, world, rank, stage, bucket_elems);
        let decay = flat.decay_runs(owned.clone());
        let schedule = LrSchedule::new(
            optim,
            if optim.decay_steps == 0 {
                u64::MAX
            } else {
                optim.decay_steps
            },
        );
        let opts = OpOptions {
            algorithm,
            ..OpOptions::default()
        };
        let mut dp = DataParallel {
            optimizer: Optimizer::new(optim, owned.len()),
            params: vec![0.0; owned.len()],
            grads: vec![0.0; owned.len()],
            kept: match stage {
                ZeroStage::Zero1 => buckets.iter().map(|b| vec![0.0; b.len]).collect(),
                _ => Vec::new(),
            },
            flat,
            stage,
            rank,
            world,
            owned,
            decay,
            buckets,
            pool: Vec::new(),
            schedule,
            grad_clip: optim.grad_clip,
            step: 0,
            comm: CommThread::spawn(comm, opts),
            timers: Timers::default(),
            sq_norm: 0.0,
        };
        let mut all = vec![0.0; total];
        dp.flat.read_params(0..total, &mut all);
        let all = dp.collective_f32(Op::Broadcast, all)?;
        dp.install_full_params(&all);
        Ok(dp)
    }

    /// Replaces the learning-rate schedule (e.g. to decay over `max_steps`).
    pub fn set_schedule(&mut self, schedule: LrSchedule) {
        self.schedule = schedule;
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    pub fn stage(&self) -> ZeroStage {
        self.stage
    }

    /// Optimizer steps completed.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// The flat parameter layout.
    pub fn flat(&self) -> &FlatParams {
        &self.flat
    }

    /// Bytes of optimizer state this rank holds.
    pub fn optimizer_state_bytes(&self) -> usize {
        self.optimizer.state_bytes()
    }

    /// Names of the optimizer's per-element state vectors.
    pub fn optimizer_state_names(&self) -> &'static [&'static str] {
        self.optimizer.state_names()
    }

    /// Learning rate the next step will use.
    pub fn next_lr(&self) -> f64 {
        self.schedule.at(self.step)
    }

    /// Runs `loss.backward()`, then [`DataParallel::step_with_loss`].
    pub fn backward_and_step(&mut self, loss: &Tensor) -> Result<StepReport, TrainError> {
        loss.f_backward().map_err(|source| TrainError::Torch {
            context: "backward pass".into(),
            source,
        })?;
        let value = loss
            .f_double_value(&[])
            .map_err(|source| TrainError::Torch {
                context: "reading the loss".into(),
                source,
            })?;
        self.step_with_loss(value)
    }

    /// Reduces the gradients accumulated in the variables, clips them by the
    /// global norm, steps the optimizer, updates the model's parameters and
    /// zeroes the gradients.
    pub fn step(&mut self) -> Result<StepReport, TrainError> {
        self.step_inner(None)
    }

    /// As [`DataParallel::step`]; `local_loss` (this rank's loss) is averaged
    /// over the ranks in the same collective as the gradient norm.
    pub fn step_with_loss(&mut self, local_loss: f64) -> Result<StepReport, TrainError> {
        self.step_inner(Some(local_loss))
    }

    fn step_inner(&mut self, local_loss: Option<f64>) -> Result<StepReport, TrainError> {
        let start = Instant::now();
        self.timers = Timers::default();
        self.sq_norm = 0.0;

        // 1. Gradients: pack bucket k while earlier buckets are being reduced.
        let op = match self.stage {
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
                self.flat
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
        let sq = match self.stage {
            ZeroStage::Ddp if self.rank != 0 => 0.0,
            _ => self.sq_norm,
        };
        let scalars = self.collective_f64(vec![sq, local_loss.unwrap_or(0.0)])?;
        let grad_norm = scalars[0].sqrt();
        let loss = local_loss.map(|_| scalars[1] / self.world as f64);

        // 3. Clip (as torch.nn.utils.clip_grad_norm_) and the step's learning rate.
        let grad_scale = if self.grad_clip > 0.0 {
            (self.grad_clip / (grad_norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        let lr = self.schedule.at(self.step);
        let sp = StepParams {
            step: self.step,
            lr: lr as f32,
            grad_scale: grad_scale as f32,
        };

        // 4. Optimizer and parameters.
        match self.stage {
            ZeroStage::Ddp => {
                self.update(0..self.owned.len(), sp);
                let t = Instant::now();
                self.flat.write_params(self.owned.clone(), &self.params);
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
        self.flat.zero_grads();
        self.step += 1;
        let t = &self.timers;
        Ok(StepReport {
            step: self.step,
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
        if self.stage == ZeroStage::Zero1 {
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
        result.map_err(|source| TrainError::Comm {
            op: op.name(),
            rank: self.rank,
            source,
        })?;
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
                    self.flat
                        .write_params(seg.clone(), &buf[at..at + seg.len()]);
                    at += seg.len();
                }
            }
            Op::SumScalars | Op::Broadcast => unreachable!("{op:?} is not a bucket op"),
        }
        self.timers.pack += t.elapsed();
        match self.stage {
            ZeroStage::Zero1 => self.kept[tag] = buf,
            _ => self.pool.push(buf),
        }
        Ok(())
    }

    fn collective_f32(&mut self, op: Op, buf: Vec<f32>) -> Result<Vec<f32>, TrainError> {
        self.comm.submit(op, usize::MAX, Buf::F32(buf));
        let done = self.wait();
        done.result.map_err(|source| TrainError::Comm {
            op: op.name(),
            rank: self.rank,
            source,
        })?;
        match done.buf {
            Buf::F32(b) => Ok(b),
            Buf::F64(_) => unreachable!("an f32 op returns its f32 buffer"),
        }
    }

    fn collective_f64(&mut self, buf: Vec<f64>) -> Result<Vec<f64>, TrainError> {
        self.comm.submit(Op::SumScalars, usize::MAX, Buf::F64(buf));
        let done = self.wait();
        done.result.map_err(|source| TrainError::Comm {
            op: Op::SumScalars.name(),
            rank: self.rank,
            source,
        })?;
        match done.buf {
            Buf::F64(b) => Ok(b),
            Buf::F32(_) => unreachable!("an f64 op returns its f64 buffer"),
        }
    }

    /// The mean over the ranks of each of `values` (every rank must call it).
    pub fn mean_over_ranks(&mut self, values: &[f64]) -> Result<Vec<f64>, TrainError> {
        let sums = self.collective_f64(values.to_vec())?;
        Ok(sums.iter().map(|s| s / self.world as f64).collect())
    }

    /// This rank's checkpoint shard: `shard_range(total, world, rank)` of the
    /// parameters and of each optimizer state vector (the same range under
    /// DDP and ZeRO, so a checkpoint holds every element once).
    pub fn checkpoint_shard(&self) -> (Range<usize>, Vec<f32>, Vec<Vec<f32>>) {
        let shard = shard_range(self.flat.total(), self.world, self.rank);
        let local = shard.start - self.owned.start..shard.end - self.owned.start;
        let params = self.params[local.clone()].to_vec();
        let states = self
            .optimizer
            .states()
            .iter()
            .map(|s| s[local.clone()].to_vec())
            .collect();
        (shard, params, states)
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
        let total = self.flat.total();
        let shard = shard_range(total, self.world, self.rank);
        if params.len() != shard.len() || states.iter().any(|s| s.len() != shard.len()) {
            return Err(TrainError::Config(format!(
                "checkpoint shard for rank {} holds {} parameters (states {:?}), expected {} (elements {:?} of {total})",
                self.rank,
                params.len(),
                states.iter().map(Vec::len).collect::<Vec<_>>(),
                shard.len(),
                shard
            )));
        }
        let gather = |dp: &mut Self, part: &[f32]| -> Result<Vec<f32>, TrainError> {
            let mut full = vec![0.0; total];
            full[shard.clone()].copy_from_slice(part);
            dp.collective_f32(Op::AllGather, full)
        };
        let full = gather(self, &params)?;
        let states = match self.stage {
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
        self.step = steps_done;
        Ok(())
    }

    /// Sets the master copy and the model from the full flat parameters.
    fn install_full_params(&mut self, all: &[f32]) {
        self.params.copy_from_slice(&all[self.owned.clone()]);
        self.flat.write_params(0..all.len(), all);
    }
}

fn make_buckets(
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

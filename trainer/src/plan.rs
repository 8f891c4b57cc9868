//! What the two paths of data parallelism share, and what the step
//! skeleton (`step.rs`) works from: this rank's place ([`Core`]), the
//! bucket layout and the collectives' options ([`Plan`]), and what a step
//! reports ([`StepReport`]). Nothing here knows which path runs.

use std::ops::Range;
use std::time::Duration;

use cohort_collectives::{Algorithm, OpKind, OpOptions, shard_range};
use cohort_configs::{AlgorithmChoice, OptimConfig, ParallelConfig, ZeroStage};

use crate::TrainError;
use crate::flat::FlatParams;
use crate::optim::{LrSchedule, StepParams};

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
    /// Time the gradient buckets' reductions ran (part of `comm_s`).
    pub grad_comm_s: f64,
    /// The part of `grad_comm_s` that ran while the last micro-batch's
    /// backward pass was still running (host path, buckets started from
    /// the gradient hooks; 0 on the device path).
    pub grad_comm_hidden_s: f64,
    /// Gradient buckets whose reduction started during the backward pass.
    pub buckets_in_backward: usize,
    /// Time in the optimizer update.
    pub optimizer_s: f64,
    /// Time packing gradients into buckets and unpacking results.
    pub pack_s: f64,
    /// The whole call.
    pub total_s: f64,
}

impl StepReport {
    /// Share of the gradient reduction time that ran while backward was
    /// still running (0..=1): the communication hidden behind compute.
    pub fn hidden_comm_fraction(&self) -> f64 {
        hidden_fraction(self.grad_comm_hidden_s, self.grad_comm_s)
    }
}

/// `hidden / total`, in 0..=1 (0 without communication).
pub(crate) fn hidden_fraction(hidden: f64, total: f64) -> f64 {
    if total > 0.0 {
        (hidden / total).clamp(0.0, 1.0)
    } else {
        0.0
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

    /// The collective that reduces a gradient bucket (averaging): DDP keeps
    /// the whole bucket, ZeRO the rank's shard of it.
    pub fn grad_collective(&self) -> OpKind {
        match self.stage {
            ZeroStage::Ddp => OpKind::AllReduce,
            ZeroStage::Zero1 | ZeroStage::Zero2 => OpKind::ReduceScatter,
        }
    }

    /// Whether this rank's squared gradient norm goes into the global sum:
    /// under DDP every rank holds the whole reduced gradient, so only rank
    /// 0 adds it (each element counted once); under ZeRO every rank adds
    /// its own shard.
    pub fn counts_norm(&self) -> bool {
        self.stage != ZeroStage::Ddp || self.rank == 0
    }

    /// The learning rate of the next step and its optimizer inputs, with the
    /// gradients clipped to `optim.grad_clip` by the global norm as
    /// `torch.nn.utils.clip_grad_norm_` does.
    pub fn step_params(&self, grad_norm: f64) -> (f64, StepParams) {
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
        (lr, sp)
    }
}

impl Plan {
    /// `r` (a range of the flat space inside `owned`) relative to `owned`.
    pub fn local(&self, r: &Range<usize>) -> Range<usize> {
        r.start - self.owned.start..r.end - self.owned.start
    }
}

/// Where a step's time went, as a path measured it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Timings {
    /// The collectives ran (on the communication thread, or enqueued).
    pub comm: Duration,
    /// This thread waited for them.
    pub wait: Duration,
    /// Packing gradients into buckets and unpacking results.
    pub pack: Duration,
    /// The gradient buckets' reductions ran.
    pub grad_comm: Duration,
    /// The part of `grad_comm` before the backward pass ended.
    pub grad_hidden: Duration,
    /// Gradient buckets started during the backward pass.
    pub in_backward: usize,
}

/// The order gradient buckets are reduced in: the last first, as a
/// backward pass produces gradients (PyTorch DDP's reducer, too, orders its
/// buckets by reverse registration order).
pub(crate) fn launch_order(buckets: usize) -> impl Iterator<Item = usize> {
    (0..buckets).rev()
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

//! The collectives a trainer rank runs on, and their operations on tensors.
//!
//! - [`Collectives::Host`]: cohort's own communicator (TCP between
//!   processes, in-process for tests). It works on host memory: a CPU
//!   tensor is reduced in place; a CUDA tensor is staged through host
//!   memory (copied out, reduced, copied back), the fallback for GPUs
//!   without NCCL.
//! - [`Collectives::Nccl`]: NCCL on CUDA tensors, in place through their
//!   device addresses, enqueued on the default stream after the kernels
//!   that produced them (see `cohort_collectives::nccl`). Nothing waits for
//!   the GPU until a result is read on the host, and that read goes through
//!   the watchdog, so a dead peer is an error, not a hang.

use std::time::Duration;

use cohort_collectives::nccl::{NcclCommunicator, Stream};
use cohort_collectives::{Backend, CommError, Communicator, DType, OpKind, OpOptions, ReduceOp};
use tch::{Device, Kind, Tensor};

/// A rank's collectives: cohort's host communicator or NCCL.
pub enum Collectives {
    Host(Communicator),
    Nccl(NcclCommunicator),
}

impl From<Communicator> for Collectives {
    fn from(c: Communicator) -> Self {
        Collectives::Host(c)
    }
}

impl From<NcclCommunicator> for Collectives {
    fn from(c: NcclCommunicator) -> Self {
        Collectives::Nccl(c)
    }
}

impl Collectives {
    pub fn rank(&self) -> usize {
        match self {
            Collectives::Host(c) => c.rank(),
            Collectives::Nccl(c) => c.rank(),
        }
    }

    pub fn world_size(&self) -> usize {
        match self {
            Collectives::Host(c) => c.world_size(),
            Collectives::Nccl(c) => c.world_size(),
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Collectives::Host(_) => Backend::Tcp,
            Collectives::Nccl(_) => Backend::Nccl,
        }
    }

    /// Runs `op` in place on `t` (see [`run_host`] for what each does): a
    /// contiguous 1-D f32 tensor, the same length on every rank. Under NCCL
    /// the op is enqueued, not waited for.
    pub(crate) fn tensor_op(
        &mut self,
        op: OpKind,
        t: &mut Tensor,
        opts: &OpOptions,
    ) -> Result<(), CommError> {
        check_flat(t, Kind::Float, op)?;
        let count = t.numel();
        match self {
            Collectives::Host(comm) => with_host_f32(t, |buf| run_host(comm, op, buf, opts)),
            Collectives::Nccl(nccl) => {
                let addr = device_addr(nccl, t)?;
                let s = Stream::DEFAULT;
                // SAFETY: `t` is a contiguous f32 tensor of `count` elements on
                // the communicator's device; the caller keeps it alive, and
                // every later use of it is ordered after the op on the
                // default stream.
                unsafe {
                    match op {
                        OpKind::AllReduce => nccl.all_reduce(addr, count, DType::F32, REDUCE, s),
                        OpKind::ReduceScatter => nccl
                            .reduce_scatter(addr, count, DType::F32, REDUCE, s)
                            .map(drop),
                        OpKind::AllGather => nccl.all_gather(addr, count, DType::F32, s),
                        OpKind::Broadcast => nccl.broadcast(addr, count, DType::F32, ROOT, s),
                        OpKind::Barrier => nccl.barrier(),
                        OpKind::Shift => Err(not_in_place()),
                    }
                }
            }
        }
    }

    /// Sums `values` over the ranks (small host scalars: loss, norms).
    pub(crate) fn sum_f64(
        &mut self,
        values: &mut [f64],
        device: Device,
        opts: &OpOptions,
    ) -> Result<(), CommError> {
        match self {
            Collectives::Host(comm) => comm.all_reduce(values, ReduceOp::Sum, opts),
            Collectives::Nccl(_) => {
                let t = Tensor::from_slice(values).to_device(device);
                let sums = self.sum_on_device(&t, opts)?;
                values.copy_from_slice(&sums);
                Ok(())
            }
        }
    }

    /// The sums over the ranks of `t` (a 1-D f64 tensor on `device`, whose
    /// values may still be being computed on the device), read into host
    /// memory: the step's one wait for the device. Through NCCL the sum
    /// runs on the device and the wait is the watchdog's (a dead peer is an
    /// error within the timeout); staged, the values are read first.
    pub(crate) fn sum_on_device(
        &mut self,
        t: &Tensor,
        opts: &OpOptions,
    ) -> Result<Vec<f64>, CommError> {
        check_flat(t, Kind::Double, OpKind::AllReduce)?;
        let n = t.numel();
        let mut values = vec![0f64; n];
        match self {
            Collectives::Host(comm) => {
                t.to_device(Device::Cpu).copy_data(&mut values, n);
                comm.all_reduce(&mut values, ReduceOp::Sum, opts)?;
            }
            Collectives::Nccl(nccl) => {
                let addr = device_addr(nccl, t)?;
                // SAFETY: `t` is `n` contiguous f64 on the communicator's
                // device and lives until after the synchronize below.
                unsafe { nccl.all_reduce(addr, n, DType::F64, ReduceOp::Sum, Stream::DEFAULT)? };
                nccl.synchronize(Stream::DEFAULT, opts.timeout)?;
                // The stream is idle now: this copy waits for nothing.
                t.to_device(Device::Cpu).copy_data(&mut values, n);
            }
        }
        Ok(values)
    }

    /// Waits for every enqueued collective (NCCL; the host communicator is
    /// synchronous), with the watchdog's deadline.
    pub(crate) fn synchronize(&mut self, timeout: Option<Duration>) -> Result<(), CommError> {
        match self {
            Collectives::Host(_) => Ok(()),
            Collectives::Nccl(nccl) => nccl.synchronize(Stream::DEFAULT, timeout),
        }
    }
}

/// How the trainer reduces: every reduction of a flat f32 vector (gradient
/// buckets) averages over the ranks.
const REDUCE: ReduceOp = ReduceOp::Avg;
/// The rank a broadcast starts from.
const ROOT: usize = 0;

/// Runs `op` in place on `buf` through the host communicator: all-reduce
/// and reduce-scatter average (reduce-scatter leaves this rank's
/// `shard_range` of the result), all-gather fills every rank's
/// `shard_range` from its owner, broadcast copies rank 0's buffer.
pub(crate) fn run_host(
    comm: &mut Communicator,
    op: OpKind,
    buf: &mut [f32],
    opts: &OpOptions,
) -> Result<(), CommError> {
    match op {
        OpKind::AllReduce => comm.all_reduce(buf, REDUCE, opts),
        OpKind::ReduceScatter => comm.reduce_scatter(buf, REDUCE, opts).map(drop),
        OpKind::AllGather => comm.all_gather(buf, opts),
        OpKind::Broadcast => comm.broadcast(buf, ROOT, opts),
        OpKind::Barrier => comm.barrier(opts),
        OpKind::Shift => Err(not_in_place()),
    }
}

/// A shift sends one buffer and receives another: it has no in-place form.
fn not_in_place() -> CommError {
    CommError::InvalidArgument {
        op: "shift",
        reason: "a shift sends one buffer and receives another; it does not run in place".into(),
    }
}

fn check_flat(t: &Tensor, kind: Kind, op: OpKind) -> Result<(), CommError> {
    if t.kind() != kind || t.dim() != 1 || !t.is_contiguous() {
        return Err(CommError::InvalidArgument {
            op: "tensor collective",
            reason: format!(
                "{op} needs a contiguous 1-D {kind:?} tensor, got {:?} of shape {:?}",
                t.kind(),
                t.size()
            ),
        });
    }
    Ok(())
}

/// The device address of `t`, which must be on the communicator's GPU.
fn device_addr(nccl: &NcclCommunicator, t: &Tensor) -> Result<u64, CommError> {
    match t.device() {
        Device::Cuda(i) if i == nccl.device() => Ok(t.data_ptr() as u64),
        other => Err(CommError::InvalidArgument {
            op: "nccl tensor collective",
            reason: format!(
                "the tensor is on {other:?}, but this rank's NCCL communicator is on cuda:{}",
                nccl.device()
            ),
        }),
    }
}

/// Runs `f` on `t`'s f32 elements in host memory: in place for a CPU
/// tensor, through a host copy for any other device.
fn with_host_f32(
    t: &mut Tensor,
    f: impl FnOnce(&mut [f32]) -> Result<(), CommError>,
) -> Result<(), CommError> {
    let n = t.numel();
    if n == 0 {
        return f(&mut []);
    }
    if t.device() == Device::Cpu {
        // SAFETY: `t` is a contiguous f32 CPU tensor of `n` elements,
        // borrowed mutably for the duration of `f`.
        let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<f32>(), n) };
        return f(buf);
    }
    let mut host = vec![0f32; n];
    t.to_device(Device::Cpu).copy_data(&mut host, n);
    f(&mut host)?;
    t.copy_(&Tensor::from_slice(&host).to_device(t.device()));
    Ok(())
}

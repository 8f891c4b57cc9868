//! The NCCL backend: collectives on CUDA device memory through NVIDIA's NCCL,
//! loaded at run time (cudarc with `dynamic-loading`): nothing links against
//! CUDA, so this crate builds and its tests run on machines without a GPU,
//! and a machine without NCCL or a CUDA driver gets an error naming what is
//! missing ([`probe`]), never a panic.
//!
//! Why this is not a [`Transport`](crate::transport): the TCP and in-process
//! transports move host bytes for cohort's own algorithms (ring, tree). NCCL
//! runs its own ring and tree kernels on the GPU, reading and writing device
//! memory directly; cohort hands it whole collectives.
//!
//! Bootstrap: rank 0 asks NCCL for a unique id and publishes it in the store
//! under `nccl/unique_id` (the coordinator's key-value store under `cohort
//! launch`); every rank waits for it there and joins with
//! `ncclCommInitRankConfig` on a thread of its own, waited for with a
//! deadline, so a rank that never arrives makes the others fail instead of
//! hang.
//!
//! Blocking, with a watchdog, as PyTorch's ProcessGroupNCCL: the communicator
//! is blocking, so an op's NCCL call returns once the work is enqueued (a
//! non-blocking communicator answers `ncclInProgress` and finishes each call
//! on a helper thread, polled; 0.1-1 ms per op). A call that blocks on a
//! peer that is gone is ended by the [`watchdog`] thread, which aborts the
//! communicator at the call's deadline.
//!
//! Ordering with other GPU work: each op is enqueued on the CUDA stream the
//! caller names and returns without waiting. [`Stream::DEFAULT`] is the
//! legacy default stream, which is libtorch's current stream unless a
//! program changes it, so an op runs after the kernels that produced its
//! input and before the ones that read its output, with no host
//! synchronisation. [`NcclCommunicator::synchronize`] waits for a stream
//! with a deadline (the watchdog): an op that does not finish in time (a
//! dead, stopped or desynchronised peer) aborts the communicator instead of
//! hanging the process.
//!
//! Semantics match [`Communicator`](crate::Communicator)'s: the same dtypes
//! and reduce ops (`Avg` is NCCL's `ncclAvg`: a sum, then a division that
//! truncates toward zero for integers); reduce-scatter and all-gather work in
//! place on the full-length buffer with `shard_range` shards. When the count
//! divides evenly they are one `ncclReduceScatter`/`ncclAllGather`; otherwise
//! a group of per-shard `ncclReduce`/`ncclBroadcast` calls (as PyTorch does
//! for uneven shards). After any error the communicator is broken: it aborts
//! NCCL's communicator and answers [`CommError::Broken`]; rebuild it.

mod device;
pub mod probe;
mod watchdog;

use std::ffi::{CStr, c_int, c_void};
use std::ops::Range;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cudarc::driver::{result as cu, sys as cusys};
use cudarc::nccl::sys as nc;

use device::primary_context;
pub use device::{DeviceBuffer, Stream};
pub use probe::{CudaDriver, NcclLibrary, NcclReady, probe};
use watchdog::{Cause, Watchdog};

use crate::error::CommError;
use crate::store::Store;
use crate::types::{DType, ReduceOp, shard_range};

/// The store key rank 0 publishes NCCL's unique id under.
const UNIQUE_ID_KEY: &str = "nccl/unique_id";
/// The NCCL version the config struct is laid out for (2.28.0).
const CONFIG_VERSION: u32 = 22800;

/// One rank's member of an NCCL communicator on one CUDA device.
pub struct NcclCommunicator {
    comm: nc::ncclComm_t,
    ctx: cusys::CUcontext,
    rank: usize,
    world: usize,
    device: usize,
    default_timeout: Duration,
    /// A small device buffer for barriers.
    token: DeviceBuffer,
    broken: Option<String>,
    /// Aborts `comm` when a call outlives its deadline; the one place that
    /// aborts it at all.
    watchdog: Watchdog,
}

// SAFETY: the NCCL communicator and CUDA context handles may be used from any
// thread (each call first makes the context current on the calling thread);
// `&mut self` on every operation keeps them from being used concurrently.
unsafe impl Send for NcclCommunicator {}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.device)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl NcclCommunicator {
    /// Joins the NCCL communicator of `world` ranks as `rank`, on CUDA
    /// device `device` (an ordinal among the visible devices; every rank
    /// needs its own GPU: NCCL refuses two ranks on one device). Rank 0
    /// publishes the unique id in `store`; the others wait for it. Fails
    /// with [`CommError::Unavailable`] where NCCL can't run, and when the
    /// other ranks don't join within `timeout`.
    pub fn connect(
        store: &dyn Store,
        rank: usize,
        world: usize,
        device: usize,
        timeout: Duration,
    ) -> Result<NcclCommunicator, CommError> {
        if world == 0 || rank >= world {
            return Err(CommError::InvalidArgument {
                op: "NcclCommunicator::connect",
                reason: format!("rank {rank} is not in a world of {world}"),
            });
        }
        let ready = probe().map_err(CommError::Unavailable)?;
        if device >= ready.driver.devices {
            return Err(CommError::Config(format!(
                "rank {rank} asked for CUDA device {device}, but {} device(s) are visible \
                 (one GPU per rank: check --nproc-per-node and CUDA_VISIBLE_DEVICES)",
                ready.driver.devices
            )));
        }
        let fail = |op: &str, detail: String| CommError::Nccl {
            rank,
            op: op.into(),
            detail,
        };
        let ctx = primary_context(device)
            .map_err(|e| fail(&format!("making CUDA device {device} current"), e))?;
        let id = if rank == 0 {
            let mut id = nc::ncclUniqueId { internal: [0; 128] };
            // SAFETY: a valid out-pointer.
            nccl_ok(unsafe { nc::ncclGetUniqueId(&mut id) })
                .map_err(|e| fail("creating the NCCL unique id", e))?;
            store.set(UNIQUE_ID_KEY, &id_bytes(&id))?;
            id
        } else {
            let got = store.wait(&[UNIQUE_ID_KEY.to_owned()], timeout)?;
            id_from_bytes(&got[0]).ok_or_else(|| {
                CommError::Config(format!(
                    "the store's {UNIQUE_ID_KEY} holds {} bytes, not an NCCL unique id (128): \
                     is another program using this store?",
                    got[0].len()
                ))
            })?
        };
        let token =
            DeviceBuffer::new(device, 8).map_err(|e| fail("allocating device memory", e))?;
        let comm = init_blocking(ctx, id, rank, world, timeout)
            .map_err(|detail| fail("joining the NCCL communicator", detail))?;
        let (comm_addr, ctx_addr) = (comm as usize, ctx as usize);
        let watchdog = Watchdog::start(
            format!("nccl-watchdog-{rank}"),
            Box::new(move || {
                // SAFETY: the communicator NCCL returned, aborted once (the
                // watchdog guarantees it) and never used afterwards; its
                // context is made current on the calling thread first.
                unsafe {
                    let _ = cu::ctx::set_current(ctx_addr as cusys::CUcontext);
                    nc::ncclCommAbort(comm_addr as nc::ncclComm_t);
                }
            }),
        )
        .map_err(|e| fail("starting the watchdog thread", e.to_string()))?;
        Ok(NcclCommunicator {
            comm,
            ctx,
            rank,
            world,
            device,
            default_timeout: timeout,
            token,
            broken: None,
            watchdog,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The CUDA device ordinal this rank's communicator runs on.
    pub fn device(&self) -> usize {
        self.device
    }

    /// The watchdog's deadline for [`NcclCommunicator::synchronize`] when
    /// none is given.
    pub fn set_default_timeout(&mut self, timeout: Duration) {
        self.default_timeout = timeout;
    }

    /// Enqueues an in-place all-reduce of `count` elements at `buf` on `stream`.
    ///
    /// # Safety
    /// `buf` must be the device address of at least `count` elements of
    /// `dtype` on this communicator's device, and stay valid (and not be
    /// written by other work) until the op completes on `stream`.
    pub unsafe fn all_reduce(
        &mut self,
        buf: u64,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        stream: Stream,
    ) -> Result<(), CommError> {
        let what = format!("all_reduce({dtype}, count {count}, {op})");
        self.run(&what, |comm, _| {
            // SAFETY: the caller's contract covers `buf`; in place is allowed.
            vec![unsafe {
                nc::ncclAllReduce(
                    ptr(buf),
                    ptr(buf),
                    count,
                    nccl_dtype(dtype),
                    nccl_op(op),
                    comm,
                    stream.nccl(),
                )
            }]
        })
    }

    /// Enqueues an in-place reduce-scatter over the full-length buffer:
    /// afterwards this rank's `shard_range(count, world, rank)` (returned)
    /// holds the reduced shard; the rest is unspecified.
    ///
    /// # Safety
    /// As [`NcclCommunicator::all_reduce`].
    pub unsafe fn reduce_scatter(
        &mut self,
        buf: u64,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        stream: Stream,
    ) -> Result<Range<usize>, CommError> {
        let (n, es) = (self.world, dtype.size());
        let what = format!("reduce_scatter({dtype}, count {count}, {op})");
        let s = stream.nccl();
        self.run(&what, |comm, rank| {
            if count % n == 0 {
                let shard = count / n;
                let own = buf + (rank * shard * es) as u64;
                // SAFETY: in place (recvbuff = sendbuff + rank·recvcount), as
                // NCCL documents; the caller's contract covers the buffer.
                vec![unsafe {
                    nc::ncclReduceScatter(
                        ptr(buf),
                        ptr(own),
                        shard,
                        nccl_dtype(dtype),
                        nccl_op(op),
                        comm,
                        s,
                    )
                }]
            } else {
                // Uneven shards: one reduce to each shard's owner, grouped.
                per_shard(buf, count, n, es, |owner, at, len| {
                    // SAFETY: each shard lies inside the caller's buffer.
                    unsafe {
                        nc::ncclReduce(
                            ptr(at),
                            ptr(at),
                            len,
                            nccl_dtype(dtype),
                            nccl_op(op),
                            owner as c_int,
                            comm,
                            s,
                        )
                    }
                })
            }
        })?;
        Ok(shard_range(count, n, self.rank))
    }

    /// Enqueues an in-place all-gather: on entry this rank's `shard_range`
    /// holds its part; afterwards every rank has the whole buffer.
    ///
    /// # Safety
    /// As [`NcclCommunicator::all_reduce`].
    pub unsafe fn all_gather(
        &mut self,
        buf: u64,
        count: usize,
        dtype: DType,
        stream: Stream,
    ) -> Result<(), CommError> {
        let (n, es) = (self.world, dtype.size());
        let what = format!("all_gather({dtype}, count {count})");
        let s = stream.nccl();
        self.run(&what, |comm, rank| {
            if count % n == 0 {
                let shard = count / n;
                let own = buf + (rank * shard * es) as u64;
                // SAFETY: in place (sendbuff = recvbuff + rank·sendcount).
                vec![unsafe {
                    nc::ncclAllGather(ptr(own), ptr(buf), shard, nccl_dtype(dtype), comm, s)
                }]
            } else {
                per_shard(buf, count, n, es, |owner, at, len| {
                    // SAFETY: each shard lies inside the caller's buffer.
                    unsafe {
                        nc::ncclBroadcast(
                            ptr(at),
                            ptr(at),
                            len,
                            nccl_dtype(dtype),
                            owner as c_int,
                            comm,
                            s,
                        )
                    }
                })
            }
        })
    }

    /// Enqueues a broadcast of `root`'s buffer into every rank's.
    ///
    /// # Safety
    /// As [`NcclCommunicator::all_reduce`].
    pub unsafe fn broadcast(
        &mut self,
        buf: u64,
        count: usize,
        dtype: DType,
        root: usize,
        stream: Stream,
    ) -> Result<(), CommError> {
        if root >= self.world {
            return Err(CommError::InvalidArgument {
                op: "broadcast",
                reason: format!("root {root} is not a rank of a world of {}", self.world),
            });
        }
        let what = format!("broadcast({dtype}, count {count}, root {root})");
        self.run(&what, |comm, _| {
            // SAFETY: the caller's contract covers `buf`.
            vec![unsafe {
                nc::ncclBroadcast(
                    ptr(buf),
                    ptr(buf),
                    count,
                    nccl_dtype(dtype),
                    root as c_int,
                    comm,
                    stream.nccl(),
                )
            }]
        })
    }

    /// Returns once every rank has entered the barrier (or fails at the
    /// default timeout).
    pub fn barrier(&mut self) -> Result<(), CommError> {
        let token = self.token.ptr();
        // SAFETY: the token buffer is this communicator's own 8 bytes.
        unsafe { self.all_reduce(token, 1, DType::U8, ReduceOp::Max, Stream::DEFAULT)? };
        self.synchronize(Stream::DEFAULT, None)
    }

    /// Waits until every op enqueued on `stream` has finished, at most
    /// `timeout` (default: the communicator's). The watchdog: on a timeout or
    /// an asynchronous NCCL error it aborts the communicator (so a peer's
    /// death becomes an error here, not a hang) and breaks it.
    pub fn synchronize(
        &mut self,
        stream: Stream,
        timeout: Option<Duration>,
    ) -> Result<(), CommError> {
        self.usable()?;
        let timeout = timeout.unwrap_or(self.default_timeout);
        let started = Instant::now();
        let deadline = started + timeout;
        let mut pause = Duration::from_micros(1);
        let result = loop {
            // SAFETY: the context handle is valid for the communicator's life.
            if let Err(e) = unsafe { cu::ctx::set_current(self.ctx) } {
                break Err(probe::driver_error(e));
            }
            // SAFETY: a stream handle of this context (or the default stream).
            match unsafe { cusys::cuStreamQuery(stream.driver()) } {
                cusys::CUresult::CUDA_SUCCESS => break Ok(()),
                cusys::CUresult::CUDA_ERROR_NOT_READY => {}
                other => break Err(probe::driver_error(cu::DriverError(other))),
            }
            if let Err(detail) = async_error(self.comm) {
                break Err(detail);
            }
            if Instant::now() >= deadline {
                break Err(format!(
                    "the stream's collectives did not finish within {timeout:?}: a rank may have \
                     died, stopped, or called a different collective (see the other ranks' logs)"
                ));
            }
            // Spin briefly (a short op finishes in microseconds), then back off.
            if pause < Duration::from_micros(50) {
                std::thread::yield_now();
                pause *= 2;
            } else {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(1));
            }
        };
        result.map_err(|detail| self.break_with("synchronize", detail))
    }

    /// Runs `enqueue` (the NCCL calls of one op, each's result returned),
    /// checks the results and waits until NCCL has accepted the work.
    fn run(
        &mut self,
        what: &str,
        enqueue: impl FnOnce(nc::ncclComm_t, usize) -> Vec<nc::ncclResult_t>,
    ) -> Result<(), CommError> {
        self.usable()?;
        // SAFETY: the context handle is valid for the communicator's life.
        if let Err(e) = unsafe { cu::ctx::set_current(self.ctx) } {
            return Err(self.break_with(what, probe::driver_error(e)));
        }
        let timeout = self.default_timeout;
        let (comm, rank) = (self.comm, self.rank);
        let (results, timed_out) = self
            .watchdog
            .guard(Instant::now() + timeout, || enqueue(comm, rank));
        let result = if timed_out {
            Err(format!(
                "the NCCL call did not return within {timeout:?}: a rank may have died or \
                 stopped before connecting (see the other ranks' logs)"
            ))
        } else {
            results.into_iter().try_for_each(nccl_ok)
        };
        result.map_err(|detail| {
            // SAFETY: the communicator handle is valid until drop.
            let last = unsafe { CStr::from_ptr(nc::ncclGetLastError(self.comm)) };
            let last = last.to_string_lossy();
            let detail = if last.is_empty() {
                detail
            } else {
                format!("{detail}: {last}")
            };
            self.break_with(what, detail)
        })
    }

    fn usable(&self) -> Result<(), CommError> {
        match &self.broken {
            Some(cause) => Err(CommError::Broken {
                rank: self.rank,
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Aborts NCCL's communicator (in-flight ops end), marks this one broken
    /// and returns the error.
    fn break_with(&mut self, op: &str, detail: String) -> CommError {
        let err = CommError::Nccl {
            rank: self.rank,
            op: op.to_owned(),
            detail,
        };
        if self.broken.is_none() {
            let cause = match self.watchdog.abort() {
                Cause::Deadline => format!("{err} (aborted by the watchdog)"),
                Cause::Owner => err.to_string(),
            };
            self.broken = Some(cause);
        }
        err
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        // Abort rather than destroy: destroy waits for outstanding work, which
        // could hang if a peer is gone; anything the program needed it has
        // synchronised on. A no-op when already aborted.
        self.watchdog.abort();
    }
}

fn ptr(addr: u64) -> *mut c_void {
    addr as usize as *mut c_void
}

fn nccl_dtype(d: DType) -> nc::ncclDataType_t {
    match d {
        DType::F32 => nc::ncclDataType_t::ncclFloat32,
        DType::F64 => nc::ncclDataType_t::ncclFloat64,
        DType::F16 => nc::ncclDataType_t::ncclFloat16,
        DType::BF16 => nc::ncclDataType_t::ncclBfloat16,
        DType::I32 => nc::ncclDataType_t::ncclInt32,
        DType::I64 => nc::ncclDataType_t::ncclInt64,
        DType::U8 => nc::ncclDataType_t::ncclUint8,
    }
}

fn nccl_op(op: ReduceOp) -> nc::ncclRedOp_t {
    match op {
        ReduceOp::Sum => nc::ncclRedOp_t::ncclSum,
        ReduceOp::Prod => nc::ncclRedOp_t::ncclProd,
        ReduceOp::Max => nc::ncclRedOp_t::ncclMax,
        ReduceOp::Min => nc::ncclRedOp_t::ncclMin,
        ReduceOp::Avg => nc::ncclRedOp_t::ncclAvg,
    }
}

/// One NCCL group of `call(owner, address, len)` over the non-empty
/// `shard_range` shards of the `count` elements of `es` bytes at `buf`.
fn per_shard(
    buf: u64,
    count: usize,
    n: usize,
    es: usize,
    mut call: impl FnMut(usize, u64, usize) -> nc::ncclResult_t,
) -> Vec<nc::ncclResult_t> {
    // SAFETY: group calls bracket the enqueues below.
    let mut results = vec![unsafe { nc::ncclGroupStart() }];
    for owner in 0..n {
        let shard = shard_range(count, n, owner);
        if !shard.is_empty() {
            results.push(call(owner, buf + (shard.start * es) as u64, shard.len()));
        }
    }
    // SAFETY: closes the group opened above.
    results.push(unsafe { nc::ncclGroupEnd() });
    results
}

/// `ncclCommInitRankConfig` for a blocking communicator, on a thread of its
/// own (a blocking init can't be interrupted): it waits for the other ranks
/// at most `timeout`. When they never come the thread stays blocked in NCCL
/// and the caller gets the error; the process is then on its way out.
fn init_blocking(
    ctx: cusys::CUcontext,
    id: nc::ncclUniqueId,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<nc::ncclComm_t, String> {
    let (tx, rx) = mpsc::channel();
    let ctx_addr = ctx as usize;
    std::thread::Builder::new()
        .name(format!("nccl-init-{rank}"))
        .spawn(move || {
            let mut config = config_initializer();
            config.blocking = 1;
            let mut comm: nc::ncclComm_t = std::ptr::null_mut();
            // SAFETY: the context of this rank's device, made current here;
            // valid out-pointers.
            let rc = unsafe {
                match cu::ctx::set_current(ctx_addr as cusys::CUcontext) {
                    Ok(()) => nc::ncclCommInitRankConfig(
                        &mut comm,
                        world as c_int,
                        id,
                        rank as c_int,
                        &mut config,
                    ),
                    Err(_) => nc::ncclResult_t::ncclUnhandledCudaError,
                }
            };
            let _ = tx.send((rc, comm as usize));
        })
        .map_err(|e| format!("starting a thread for NCCL's init: {e}"))?;
    match rx.recv_timeout(timeout) {
        Ok((nc::ncclResult_t::ncclSuccess, comm)) => Ok(comm as nc::ncclComm_t),
        Ok((rc, comm)) => {
            let mut detail = nccl_error(rc);
            if comm != 0 {
                // SAFETY: the handle NCCL returned with the error: its last
                // error names the cause; aborted once, never used again.
                unsafe {
                    let last = CStr::from_ptr(nc::ncclGetLastError(comm as nc::ncclComm_t));
                    if !last.is_empty() {
                        detail = format!("{detail}: {}", last.to_string_lossy());
                    }
                    nc::ncclCommAbort(comm as nc::ncclComm_t);
                }
            }
            Err(detail)
        }
        Err(_) => Err(format!(
            "the other ranks did not join within {timeout:?} (are all {world} started, each on \
             its own GPU, and can they reach each other?)"
        )),
    }
}

/// NCCL's asynchronous error of `comm`, if any (a remote failure, say).
fn async_error(comm: nc::ncclComm_t) -> Result<(), String> {
    let mut state = nc::ncclResult_t::ncclSuccess;
    // SAFETY: a valid communicator and out-pointer.
    let rc = unsafe { nc::ncclCommGetAsyncError(comm, &mut state) };
    match (rc, state) {
        (nc::ncclResult_t::ncclSuccess, nc::ncclResult_t::ncclSuccess)
        | (nc::ncclResult_t::ncclSuccess, nc::ncclResult_t::ncclInProgress) => Ok(()),
        (nc::ncclResult_t::ncclSuccess, failed) | (failed, _) => Err(nccl_error(failed)),
    }
}

fn nccl_ok(rc: nc::ncclResult_t) -> Result<(), String> {
    match rc {
        nc::ncclResult_t::ncclSuccess => Ok(()),
        other => Err(nccl_error(other)),
    }
}

fn nccl_error(rc: nc::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static string for any code.
    let text = unsafe { CStr::from_ptr(nc::ncclGetErrorString(rc)) };
    format!("{rc:?}: {}", text.to_string_lossy())
}

/// NCCL_CONFIG_INITIALIZER: every field "undefined" (NCCL's defaults).
fn config_initializer() -> nc::ncclConfig_t {
    const UNDEF: c_int = c_int::MIN;
    nc::ncclConfig_t {
        size: std::mem::size_of::<nc::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: CONFIG_VERSION,
        blocking: UNDEF,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
    }
}

fn id_bytes(id: &nc::ncclUniqueId) -> Vec<u8> {
    id.internal.iter().map(|&c| c as u8).collect()
}

fn id_from_bytes(bytes: &[u8]) -> Option<nc::ncclUniqueId> {
    let mut id = nc::ncclUniqueId { internal: [0; 128] };
    if bytes.len() != id.internal.len() {
        return None;
    }
    for (d, &b) in id.internal.iter_mut().zip(bytes) {
        *d = b as _;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    #[test]
    fn unique_ids_round_trip_through_store_bytes() {
        let mut id = nc::ncclUniqueId { internal: [0; 128] };
        for (i, c) in id.internal.iter_mut().enumerate() {
            *c = (i as u8).wrapping_mul(37) as _;
        }
        let bytes = id_bytes(&id);
        assert_eq!(bytes.len(), 128);
        assert_eq!(id_from_bytes(&bytes).map(|i| i.internal), Some(id.internal));
        assert!(id_from_bytes(&bytes[..100]).is_none());
    }

    #[test]
    fn every_dtype_and_op_has_an_nccl_counterpart() {
        for d in DType::ALL {
            let _ = nccl_dtype(d);
        }
        assert_eq!(nccl_op(ReduceOp::Avg), nc::ncclRedOp_t::ncclAvg);
        assert_eq!(nccl_dtype(DType::BF16), nc::ncclDataType_t::ncclBfloat16);
    }

    /// Where NCCL can't run (CI: no driver), connecting is a clear error,
    /// not a panic; bad arguments are rejected first.
    #[test]
    fn connecting_without_a_gpu_says_why() {
        let store = MemStore::new();
        let err = NcclCommunicator::connect(&store, 3, 2, 0, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, CommError::InvalidArgument { .. }), "{err}");
        if probe().is_err() {
            let err =
                NcclCommunicator::connect(&store, 0, 1, 0, Duration::from_secs(1)).unwrap_err();
            assert!(matches!(err, CommError::Unavailable(_)), "{err}");
            assert!(
                err.to_string().contains("nccl backend is not usable"),
                "{err}"
            );
        }
    }
}

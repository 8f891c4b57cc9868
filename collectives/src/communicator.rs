//! The front: validates arguments, numbers ops, resolves the algorithm,
//! applies the timeout, dispatches to `algorithms`, records every op in the
//! flight recorder, and breaks the communicator on the first failure.

use std::collections::VecDeque;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::abort::{AbortHandle, AbortSignal};
use crate::algorithms::{self, Ctx, Nodes};
use crate::error::CommError;
use crate::store::Store;
use crate::transport::Transport;
use crate::transport::bootstrap;
use crate::transport::mem::MemTransport;
use crate::transport::tcp::TcpConfig;
use crate::types::{Algorithm, DType, Element, OpKind, ReduceOp, shard_range};
use crate::wire::Header;

/// Ops kept by the flight recorder.
const FLIGHT_RECORDS: usize = 64;
/// Default largest pipeline segment. The ring forwards each segment through
/// every step of its slice before the next slice starts, so a slice (one
/// segment of every chunk) should stay in a core's L2: 256 KiB measured best
/// for 2 and 4 ranks at 64 MiB (against 64 KiB-1 MiB, see bench/RESULTS.md).
const DEFAULT_SEGMENT_BYTES: usize = 256 << 10;
/// Default op timeout of in-process groups.
const MEM_DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Per-call options.
#[derive(Clone, Debug, Default)]
pub struct OpOptions {
    /// Which algorithm; `Auto` picks from the size and world.
    pub algorithm: Algorithm,
    /// How long the op may take; `None` uses the communicator's default
    /// (`TcpConfig::default_timeout` for TCP).
    pub timeout: Option<Duration>,
}

/// One op as remembered by the flight recorder.
#[derive(Clone, Debug)]
pub struct OpRecord {
    pub seq: u64,
    pub kind: OpKind,
    pub dtype: DType,
    pub count: usize,
    pub algorithm: Algorithm,
    /// The peer the op was waiting on or talking to when it failed.
    pub peer: Option<usize>,
    pub duration: Duration,
    /// `Ok` or the error, as text.
    pub outcome: Result<(), String>,
}

impl fmt::Display for OpRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seq {} {}({}, count {}, {}) {:?}",
            self.seq, self.kind, self.dtype, self.count, self.algorithm, self.duration
        )?;
        match (&self.outcome, self.peer) {
            (Ok(()), _) => write!(f, " ok"),
            (Err(e), Some(p)) => write!(f, " FAILED with rank {p}: {e}"),
            (Err(e), None) => write!(f, " FAILED: {e}"),
        }
    }
}

/// A group of `world` ranks that run collectives together; this value is
/// one rank's member.
///
/// Semantics shared by every op:
/// - Every rank must call the same ops in the same order, with the same
///   dtype, element count, reduce op, root and algorithm. A rank that
///   doesn't makes every rank fail with [`CommError::Desync`] (or, on ranks
///   that were not talking to it, [`CommError::PeerAborted`] carrying the
///   desync).
/// - Every op has a timeout (`OpOptions::timeout`, else the default); the
///   error names the op and the peer waited on.
/// - After any error other than [`CommError::InvalidArgument`], the
///   communicator is broken: it tells its peers, closes its connections and
///   answers [`CommError::Broken`]. Rebuild it (under a new store prefix).
/// - Another thread can end the op in flight at once through an
///   [`AbortHandle`] ([`Communicator::abort_handle`]), e.g. when a peer is
///   known to be gone: the op fails with [`CommError::Aborted`] (the next
///   one, if none is in flight) and the communicator breaks as above, so
///   peers waiting on this rank fail with [`CommError::PeerAborted`]
///   instead of waiting out their timeout.
/// - Reductions: see [`ReduceOp`] (integer `Avg` truncates toward zero).
///   Results are identical on every rank.
pub struct Communicator {
    rank: usize,
    world: usize,
    transport: Box<dyn Transport>,
    seq: u64,
    default_timeout: Duration,
    segment_bytes: usize,
    scratch: Vec<u64>,
    broken: Option<String>,
    flight: VecDeque<OpRecord>,
    /// How the ranks sit on hosts, when node-aware algorithms apply.
    nodes: Option<Nodes>,
    /// Shared with the transport and every `AbortHandle`.
    abort: Arc<AbortSignal>,
}

impl fmt::Debug for Communicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Communicator")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("seq", &self.seq)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Communicator {
    fn new(
        rank: usize,
        world: usize,
        transport: Box<dyn Transport>,
        timeout: Duration,
        nodes: Option<Nodes>,
        abort: Arc<AbortSignal>,
    ) -> Self {
        Communicator {
            nodes,
            abort,
            rank,
            world,
            transport,
            seq: 0,
            default_timeout: timeout,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            scratch: Vec::new(),
            broken: None,
            flight: VecDeque::with_capacity(FLIGHT_RECORDS),
        }
    }

    /// An in-process group of `world` ranks (run each on its own thread).
    /// Dropping one makes the others' pending and later ops fail.
    ///
    /// # Panics
    /// If `world` is 0.
    pub fn mem_group(world: usize) -> Vec<Communicator> {
        assert!(world > 0, "mem_group: world size must be at least 1");
        Communicator::mem_group_on_hosts(&vec![0; world])
    }

    /// An in-process group whose rank `r` plays a rank on host `hosts[r]`,
    /// for node-aware algorithms without processes. For tests.
    ///
    /// # Panics
    /// If `hosts` is empty.
    #[doc(hidden)]
    pub fn mem_group_on_hosts(hosts: &[usize]) -> Vec<Communicator> {
        let world = hosts.len();
        assert!(world > 0, "mem_group: world size must be at least 1");
        let aborts: Vec<Arc<AbortSignal>> = (0..world).map(|_| Arc::default()).collect();
        MemTransport::group(&aborts)
            .into_iter()
            .zip(aborts)
            .enumerate()
            .map(|(rank, (t, abort))| {
                let nodes = Nodes::from_hosts(hosts);
                Communicator::new(rank, world, Box::new(t), MEM_DEFAULT_TIMEOUT, nodes, abort)
            })
            .collect()
    }

    /// Joins a group of processes: listens, publishes `addr/<rank>` in
    /// `store`, waits for every rank's entry and connects (authenticated with
    /// `cfg.token`): shared memory with peers on this host unless
    /// `cfg.transport` is `Tcp`, TCP with the others. Every rank of the
    /// group calls this with the same store scope and world size.
    pub fn connect_tcp(
        store: &dyn Store,
        rank: usize,
        world: usize,
        cfg: &TcpConfig,
    ) -> Result<Communicator, CommError> {
        if world == 0 || rank >= world {
            return Err(CommError::InvalidArgument {
                op: "connect_tcp",
                reason: format!("rank {rank} is not in a world of {world}"),
            });
        }
        let abort = Arc::<AbortSignal>::default();
        let (transport, hosts) = bootstrap::connect(store, rank, world, cfg, abort.clone())?;
        Ok(Communicator::new(
            rank,
            world,
            Box::new(transport),
            cfg.default_timeout,
            Nodes::from_hosts(&hosts),
            abort,
        ))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// A handle that aborts this communicator from any thread: the op in
    /// flight fails at once with [`CommError::Aborted`] (or the next op, if
    /// none is), and the communicator is broken from then on.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle::new(self.abort.clone())
    }

    /// The timeout of ops whose options give none.
    pub fn set_default_timeout(&mut self, timeout: Duration) {
        self.default_timeout = timeout;
    }

    /// Largest message of a pipelined phase, in bytes (default 256 KiB; at
    /// least one element is always sent). Every rank must use the same
    /// value. For tests and tuning.
    #[doc(hidden)]
    pub fn set_max_segment_bytes(&mut self, bytes: usize) {
        self.segment_bytes = bytes.max(1);
    }

    /// How long a waiting op polls before it blocks (default: 100 µs, none
    /// when this host has more ranks than cores). For tuning.
    #[doc(hidden)]
    pub fn set_spin(&mut self, budget: Duration) {
        self.transport.set_spin(budget);
    }

    /// Sum (or another [`ReduceOp`]) of `buf` over all ranks, in place on
    /// every rank.
    pub fn all_reduce<T: Element>(
        &mut self,
        buf: &mut [T],
        op: ReduceOp,
        opts: &OpOptions,
    ) -> Result<(), CommError> {
        let count = buf.len();
        self.run(OpKind::AllReduce, T::DTYPE, op, 0, count, opts, |ctx| {
            algorithms::all_reduce(ctx, bytemuck::cast_slice_mut(buf))
        })
    }

    /// In place over the full-length buffer (same length on every rank);
    /// afterwards `buf[shard_range(buf.len(), world, rank)]` holds the reduced
    /// shard (returned); the rest is unspecified.
    pub fn reduce_scatter<T: Element>(
        &mut self,
        buf: &mut [T],
        op: ReduceOp,
        opts: &OpOptions,
    ) -> Result<Range<usize>, CommError> {
        let count = buf.len();
        self.run(OpKind::ReduceScatter, T::DTYPE, op, 0, count, opts, |ctx| {
            algorithms::reduce_scatter(ctx, bytemuck::cast_slice_mut(buf))
        })?;
        Ok(shard_range(count, self.world, self.rank))
    }

    /// In place: on entry each rank's own `shard_range` holds its part;
    /// afterwards every rank has the whole buffer.
    pub fn all_gather<T: Element>(
        &mut self,
        buf: &mut [T],
        opts: &OpOptions,
    ) -> Result<(), CommError> {
        let count = buf.len();
        self.run(
            OpKind::AllGather,
            T::DTYPE,
            ReduceOp::Sum,
            0,
            count,
            opts,
            |ctx| algorithms::all_gather(ctx, bytemuck::cast_slice_mut(buf)),
        )
    }

    /// Copies `root`'s `buf` into every rank's `buf`.
    pub fn broadcast<T: Element>(
        &mut self,
        buf: &mut [T],
        root: usize,
        opts: &OpOptions,
    ) -> Result<(), CommError> {
        if root >= self.world {
            return Err(CommError::InvalidArgument {
                op: "broadcast",
                reason: format!("root {root} is not a rank of a world of {}", self.world),
            });
        }
        let count = buf.len();
        self.run(
            OpKind::Broadcast,
            T::DTYPE,
            ReduceOp::Sum,
            root,
            count,
            opts,
            |ctx| algorithms::broadcast(ctx, bytemuck::cast_slice_mut(buf)),
        )
    }

    /// Sends `send` to rank `(rank + offset) % world` and receives `recv`
    /// from rank `(rank - offset) % world`, all ranks at once (each calls
    /// it with the same offset and length): e.g. every rank copies its
    /// state to a buddy. `offset` 0 (mod world) copies `send` into `recv`.
    pub fn shift<T: Element>(
        &mut self,
        send: &[T],
        recv: &mut [T],
        offset: usize,
        opts: &OpOptions,
    ) -> Result<(), CommError> {
        if send.len() != recv.len() {
            return Err(CommError::InvalidArgument {
                op: "shift",
                reason: format!(
                    "send has {} elements, recv {}: they must be as long",
                    send.len(),
                    recv.len()
                ),
            });
        }
        if offset % self.world == 0 {
            recv.copy_from_slice(send);
            return Ok(());
        }
        let count = send.len();
        self.run(
            OpKind::Shift,
            T::DTYPE,
            ReduceOp::Sum,
            offset % self.world,
            count,
            opts,
            |ctx| {
                algorithms::shift(
                    ctx,
                    bytemuck::cast_slice(send),
                    bytemuck::cast_slice_mut(recv),
                )
            },
        )
    }

    /// Returns once every rank has entered the barrier.
    pub fn barrier(&mut self, opts: &OpOptions) -> Result<(), CommError> {
        let mut token = [0u8; 1];
        self.run(
            OpKind::Barrier,
            DType::U8,
            ReduceOp::Max,
            0,
            1,
            opts,
            |ctx| algorithms::all_reduce(ctx, &mut token),
        )
    }

    /// The last ops of this rank, oldest first. `Display` each record (one
    /// line) to dump them, e.g. after a timeout.
    pub fn flight_record(&self) -> Vec<OpRecord> {
        self.flight.iter().cloned().collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        kind: OpKind,
        dtype: DType,
        op: ReduceOp,
        root: usize,
        count: usize,
        opts: &OpOptions,
        f: impl FnOnce(&mut Ctx<'_>) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        if let Some(cause) = &self.broken {
            return Err(CommError::Broken {
                rank: self.rank,
                cause: cause.clone(),
            });
        }
        let algorithm = match opts.algorithm {
            Algorithm::Auto => algorithms::choose(
                kind,
                count * dtype.size(),
                self.world,
                self.nodes.as_ref().map(Nodes::shape),
            ),
            chosen => chosen,
        };
        let seq = self.seq;
        self.seq += 1;
        let started = Instant::now();
        let timeout = opts.timeout.unwrap_or(self.default_timeout);
        let base = Header {
            kind,
            dtype,
            op,
            algo: algorithm,
            seq,
            count: count as u64,
            chunk: 0,
            root: root as u32,
            len: 0,
        };
        let mut result = if let Some(reason) = self.abort.reason() {
            Err(CommError::Aborted {
                rank: self.rank,
                op: base.describe(),
                reason: reason.to_owned(),
            })
        } else if self.world == 1 || count == 0 {
            Ok(())
        } else {
            let mut ctx = Ctx {
                transport: self.transport.as_mut(),
                rank: self.rank,
                world: self.world,
                members: None,
                tag: 0,
                root,
                nodes: self.nodes.as_ref(),
                base,
                deadline: started + timeout,
                seg_elems: (self.segment_bytes / dtype.size()).max(1),
                scratch: &mut self.scratch,
                red_dtype: dtype,
                red_op: op,
            };
            f(&mut ctx)
        };
        let duration = started.elapsed();
        if let Err(CommError::Timeout { waited, .. }) = &mut result {
            *waited = duration;
        }
        let peer = match &result {
            Err(
                CommError::Timeout { peer, .. }
                | CommError::PeerClosed { peer, .. }
                | CommError::PeerAborted { peer, .. }
                | CommError::Desync { peer, .. },
            ) => Some(*peer),
            _ => None,
        };
        if self.flight.len() == FLIGHT_RECORDS {
            self.flight.pop_front();
        }
        self.flight.push_back(OpRecord {
            seq,
            kind,
            dtype,
            count,
            algorithm,
            peer,
            duration,
            outcome: result.as_ref().map(|_| ()).map_err(ToString::to_string),
        });
        if let Err(e) = &result {
            let reason = e.to_string();
            tracing::debug!("rank {}: {kind} seq {seq} failed: {reason}", self.rank);
            self.transport.abort(&reason);
            self.broken = Some(reason);
        }
        result
    }
}

//! Transport-agnostic collective algorithms.
//!
//! An algorithm gets a [`Ctx`] (this rank, the world, the op's header, a
//! deadline, a scratch buffer and a [`Transport`]) and the caller's buffer as
//! bytes. It moves segments with `Transport::exchange` and combines them with
//! the kernels of `crate::reduce`. It never names a transport.
//!
//! - [`ring`]: reduce-scatter, all-gather, and all-reduce as the two in turn;
//! - [`tree`]: pipelined binary-tree all-reduce and broadcast;
//! - [`chain`]: pipelined chain broadcast (the "ring" broadcast);
//! - [`doubling`]: recursive-doubling all-reduce and binomial broadcast;
//! - [`hierarchical`]: node-aware compositions of rings within and across
//!   nodes.
//!
//! The front (`Communicator`) has already validated the arguments, resolved
//! `Algorithm::Auto` with [`choose`], and handles world 1 and empty buffers.

use std::ops::Range;
use std::time::Instant;

use crate::error::CommError;
use crate::transport::{Transport, Xfer};
use crate::types::{Algorithm, DType, OpKind, ReduceOp, shard_range};
use crate::wire::Header;
pub(crate) use hierarchical::Nodes;

pub(crate) mod chain;
pub(crate) mod doubling;
pub(crate) mod hierarchical;
pub(crate) mod pipeline;
pub(crate) mod ring;
pub(crate) mod tree;

/// Everything an algorithm needs besides the buffer.
///
/// An algorithm may run over a group of the ranks (the node-aware
/// algorithms run rings within a node and across nodes): `rank` and
/// `world` are then this rank's position in the group and its size, peers
/// are named by position, and [`Ctx::exchange`] turns positions into ranks
/// (`members`) and tags every message with the phase (`tag`).
pub(crate) struct Ctx<'a> {
    pub transport: &'a mut dyn Transport,
    pub rank: usize,
    pub world: usize,
    /// The ranks of the group by position; `None`: every rank, in order.
    pub members: Option<&'a [usize]>,
    /// Or-ed into every message's `chunk` (a phase of a composed algorithm).
    pub tag: u64,
    /// The root of a broadcast, as a position in the group.
    pub root: usize,
    /// The op's header; messages copy it and set `chunk` and `len`.
    pub base: Header,
    pub deadline: Instant,
    /// Largest message of a pipelined phase, in elements (at least 1).
    pub seg_elems: usize,
    /// Reused across ops; 8-byte aligned for every dtype.
    pub scratch: &'a mut Vec<u64>,
    /// How contributions combine (differs from `base` when an algorithm is
    /// built on another, e.g. all-gather as a byte-wise max).
    pub red_dtype: DType,
    pub red_op: ReduceOp,
    /// How the ranks sit on nodes, when node-aware algorithms can run.
    pub nodes: Option<&'a Nodes>,
}

impl Ctx<'_> {
    pub fn elem(&self) -> usize {
        self.red_dtype.size()
    }

    pub fn exchange(&mut self, xfers: &mut [Xfer<'_>]) -> Result<(), CommError> {
        if self.members.is_some() || self.tag != 0 {
            for x in xfers.iter_mut() {
                x.regroup(self.members, self.tag);
            }
        }
        self.transport.exchange(xfers, self.deadline)
    }

    /// A context for the group `members` (positions in this context's
    /// group), in which this rank is at `pos`, its messages tagged `tag`.
    pub fn group<'c>(&'c mut self, members: &'c [usize], pos: usize, tag: u64) -> Ctx<'c> {
        debug_assert!(self.members.is_none(), "groups don't nest");
        Ctx {
            transport: &mut *self.transport,
            rank: pos,
            world: members.len(),
            members: Some(members),
            tag,
            root: 0,
            base: self.base,
            deadline: self.deadline,
            seg_elems: self.seg_elems,
            scratch: &mut *self.scratch,
            red_dtype: self.red_dtype,
            red_op: self.red_op,
            nodes: None,
        }
    }
}

/// A send of message `chunk` of the op described by `base`, or nothing.
pub(crate) fn send_if<'b>(
    cond: bool,
    base: &Header,
    peer: usize,
    chunk: u64,
    data: &'b [u8],
) -> Xfer<'b> {
    if cond {
        send(base, peer, chunk, data)
    } else {
        Xfer::Idle
    }
}

/// A receive of message `chunk` of the op described by `base`, or nothing.
pub(crate) fn recv_if<'b>(
    cond: bool,
    base: &Header,
    peer: usize,
    chunk: u64,
    buf: &'b mut [u8],
) -> Xfer<'b> {
    if cond {
        recv(base, peer, chunk, buf)
    } else {
        Xfer::Idle
    }
}

/// A receive of message `chunk` of the op described by `base`, combined into
/// `dst` with the context's reduction, or nothing.
pub(crate) fn recv_reduce_if<'b>(
    cond: bool,
    ctx: &Ctx<'_>,
    peer: usize,
    chunk: u64,
    dst: &'b mut [u8],
) -> Xfer<'b> {
    if !cond {
        return Xfer::Idle;
    }
    Xfer::RecvReduce {
        peer,
        header: Header {
            chunk,
            len: dst.len() as u64,
            ..ctx.base
        },
        dst,
        dtype: ctx.red_dtype,
        op: ctx.red_op,
    }
}

/// A send of message `chunk` of the op described by `base`.
pub(crate) fn send<'b>(base: &Header, peer: usize, chunk: u64, data: &'b [u8]) -> Xfer<'b> {
    Xfer::Send {
        peer,
        header: Header {
            chunk,
            len: data.len() as u64,
            ..*base
        },
        data,
    }
}

/// A receive of message `chunk` of the op described by `base`.
pub(crate) fn recv<'b>(base: &Header, peer: usize, chunk: u64, buf: &'b mut [u8]) -> Xfer<'b> {
    Xfer::Recv {
        peer,
        header: Header {
            chunk,
            len: buf.len() as u64,
            ..*base
        },
        buf,
    }
}

/// `bytes` bytes of the scratch buffer, grown if needed (never shrunk: the
/// next op of the same size allocates nothing).
pub(crate) fn scratch_bytes(scratch: &mut Vec<u64>, bytes: usize) -> &mut [u8] {
    let words = bytes.div_ceil(8);
    if scratch.len() < words {
        scratch.resize(words, 0);
    }
    &mut bytemuck::cast_slice_mut(scratch.as_mut_slice())[..bytes]
}

/// Segment `k` of the element range `r`, cut in segments of `seg` elements.
pub(crate) fn segment(r: &Range<usize>, seg: usize, k: usize) -> Range<usize> {
    let start = (r.start + k * seg).min(r.end);
    start..(start + seg).min(r.end)
}

/// Number of segments of `seg` elements in `len` elements.
pub(crate) fn segments(len: usize, seg: usize) -> usize {
    len.div_ceil(seg)
}

/// Element range → byte range.
pub(crate) fn bytes(r: &Range<usize>, elem: usize) -> Range<usize> {
    r.start * elem..r.end * elem
}

/// Two disjoint byte ranges of `buf`: the first shared, the second mutable
/// (an empty range is disjoint from everything).
pub(crate) fn split_pair(buf: &mut [u8], a: Range<usize>, b: Range<usize>) -> (&[u8], &mut [u8]) {
    if a.is_empty() {
        return (&[], &mut buf[b]);
    }
    if b.is_empty() {
        return (&buf[a], &mut []);
    }
    assert!(
        a.end <= b.start || b.end <= a.start,
        "split_pair: ranges overlap"
    );
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.end - a.start], &mut lo[b])
    }
}

/// Picks the algorithm for `Algorithm::Auto`. A pure function of the op,
/// its size, the world and the nodes (the same store entries on every
/// rank), so every rank picks the same one.
///
/// Measured over TCP on the 2-core development machine (AMD EPYC, quiet)
/// with `cohort bench collectives --algo ring|tree --op all_reduce,broadcast
/// --iters 10`, f32, 256 KiB segments, mean time per op in microseconds
/// ("ring" is the chain for broadcast):
///
/// ```text
///                      4 KiB   16 KiB  64 KiB  256 KiB   1 MiB    4 MiB   16 MiB
/// all_reduce  4 ranks
///             ring       277      302     342      344    1031     6226    24935
///             tree       113      115     289      952    2141     9449    30655
/// all_reduce  8 ranks
///             ring      1077      817     972     1765    4233    17954    78370
///             tree       177      191     286      567    3059    16733    60522
/// broadcast   4 ranks
///             chain       57       63      71      224     878     3346    15366
///             tree        21       41     100      208     879     3927    18047
/// broadcast   8 ranks
///             chain      222      222     291      609    2487     8917    33234
///             tree        42       50      91      207    1044     6350    31473
/// ```
///
/// With 2 ranks ring and tree send the same messages. Above 2, the ring
/// pays 2(n-1) dependent steps per slice (each a wake-up of the next rank
/// when ranks outnumber cores) against the tree's 2·log2(n) levels, and
/// wins on bandwidth once messages are large enough to hide that: the
/// crossover grows with the ring's step count, at about 128 KiB for 4
/// ranks and a few MiB for 8 on this host. So: the tree up to
/// 32 KiB·(n-1)² (288 KiB at 4 ranks, 1.5 MiB at 8), never above 4 MiB,
/// for all-reduces and broadcasts; the ring (chain) above. Reduce-scatter
/// and all-gather use the ring: their tree variants move the whole buffer
/// through every link.
///
/// Recursive doubling needs one round trip per doubling (one at 2 ranks,
/// against the ring's two and the tree's two): all-reduces up to 64 KiB
/// and barriers take it (see bench/RESULTS.md for 4 KiB at 2 ranks).
///
/// On n hosts of k ranks (n, k > 1), measured on 2 namespace hosts × 2
/// ranks with `bench/collectives_netns.py --rate 1gbit`, mean time per op
/// in microseconds:
///
/// ```text
///                          4 KiB  16 KiB  64 KiB  256 KiB  1 MiB  4 MiB  16 MiB
/// all_reduce   ring          199     279     531     2883  12145  50740  208861
///              tree           57     555    1019     4740  31335 136927  558636
///              doubling       84     123     997     4096  16809  69038  283941
///              hierarchical   65     106     335     1959   8018  39179  141202
/// reduce_scatter ring              183             1005          24561
///              hierarchical           70              573          17167
/// all_gather   ring                   81             1078          24408
///              hierarchical           80              568          16523
/// broadcast    chain                  47             1723          33614
///              tree                   31             2993          67838
///              hierarchical           65             1926          34214
/// ```
///
/// So there all-reduces above 16 KiB (recursive doubling up to it, 55 us
/// against 90 at 4 KiB on unlimited links) and reduce-scatters and
/// all-gathers from 16 KiB go node-aware; broadcasts don't (the chain
/// already puts the buffer on every link once).
pub(crate) fn choose(
    kind: OpKind,
    bytes: usize,
    world: usize,
    nodes: Option<(usize, usize)>,
) -> Algorithm {
    let tree_max = (32usize << 10)
        .saturating_mul((world - 1) * (world - 1))
        .min(4 << 20);
    let node_aware = nodes.is_some();
    match kind {
        OpKind::Barrier => Algorithm::Doubling,
        // Point to point: each rank's two transfers, whatever the label.
        OpKind::Shift => Algorithm::Ring,
        OpKind::AllReduce | OpKind::ReduceScatter | OpKind::AllGather
            if node_aware && bytes > NODE_AWARE_FROM =>
        {
            Algorithm::Hierarchical
        }
        OpKind::AllReduce if bytes <= DOUBLING_MAX => Algorithm::Doubling,
        OpKind::AllReduce | OpKind::Broadcast if world > 2 && bytes <= tree_max => Algorithm::Tree,
        _ => Algorithm::Ring,
    }
}

/// Largest all-reduce `choose` gives to recursive doubling.
const DOUBLING_MAX: usize = 64 << 10;
/// On n × k nodes, ops above this many bytes go node-aware (see `choose`).
const NODE_AWARE_FROM: usize = 16 << 10;

/// All-reduce of `buf` (whole elements of `ctx.red_dtype`).
pub(crate) fn all_reduce(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    match ctx.base.algo {
        Algorithm::Tree => tree::all_reduce(ctx, buf),
        Algorithm::Doubling => doubling::all_reduce(ctx, buf),
        Algorithm::Hierarchical => hierarchical::all_reduce(ctx, buf),
        Algorithm::Ring | Algorithm::Auto => ring::all_reduce(ctx, buf),
    }
}

/// Reduce-scatter: afterwards this rank's shard holds the reduced values.
pub(crate) fn reduce_scatter(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    match ctx.base.algo {
        // The tree and doubling reduce everything everywhere; this rank's
        // shard is part of it.
        Algorithm::Tree | Algorithm::Doubling => all_reduce(ctx, buf),
        Algorithm::Hierarchical => hierarchical::reduce_scatter(ctx, buf),
        Algorithm::Ring | Algorithm::Auto => ring::reduce_scatter(ctx, buf),
    }
}

/// All-gather: on entry this rank's shard holds its part.
pub(crate) fn all_gather(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    match ctx.base.algo {
        Algorithm::Tree | Algorithm::Doubling => {
            // Every byte outside this rank's shard becomes 0, and a byte-wise
            // max all-reduce then leaves every shard's bytes exactly as its
            // owner had them (max(x, 0, ..., 0) == x for bytes).
            let es = ctx.elem();
            let own = bytes(&shard_range(buf.len() / es, ctx.world, ctx.rank), es);
            buf[..own.start].fill(0);
            buf[own.end..].fill(0);
            ctx.red_dtype = DType::U8;
            ctx.red_op = ReduceOp::Max;
            all_reduce(ctx, buf)
        }
        Algorithm::Hierarchical => hierarchical::all_gather(ctx, buf),
        Algorithm::Ring | Algorithm::Auto => ring::all_gather(ctx, buf),
    }
}

/// Sends `send` to the rank `ctx.base.root` (the offset) after this one
/// and receives `recv` (as long) from the rank as far before it, segment by
/// segment, both directions at once.
pub(crate) fn shift(
    ctx: &mut Ctx<'_>,
    send_buf: &[u8],
    recv_buf: &mut [u8],
) -> Result<(), CommError> {
    let offset = ctx.base.root as usize % ctx.world;
    let (to, from) = (
        (ctx.rank + offset) % ctx.world,
        (ctx.rank + ctx.world - offset) % ctx.world,
    );
    let elem = ctx.elem();
    let n = send_buf.len() / elem;
    let all = 0..n;
    for k in 0..segments(n, ctx.seg_elems) {
        let seg = bytes(&segment(&all, ctx.seg_elems, k), elem);
        let base = ctx.base;
        let mut xfers = [
            send(&base, to, k as u64, &send_buf[seg.clone()]),
            recv(&base, from, k as u64, &mut recv_buf[seg]),
        ];
        ctx.exchange(&mut xfers)?;
    }
    Ok(())
}

/// Broadcast from `root` (in `ctx.base.root`).
pub(crate) fn broadcast(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    match ctx.base.algo {
        Algorithm::Tree => tree::broadcast(ctx, buf),
        Algorithm::Doubling => doubling::broadcast(ctx, buf),
        Algorithm::Hierarchical => hierarchical::broadcast(ctx, buf),
        Algorithm::Ring | Algorithm::Auto => chain::broadcast(ctx, buf),
    }
}

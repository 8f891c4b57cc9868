//! Ring reduce-scatter, all-gather and all-reduce.
//!
//! Why a ring: every rank sends to its right neighbour and receives from its
//! left one, so every link carries the same load and, for large buffers, an
//! all-reduce moves only 2(n-1)/n of the buffer in and out of each rank, the
//! lower bound. The cost is 2(n-1) steps of latency, which is why small
//! messages go to the tree.
//!
//! How the chunks move. The buffer is cut into n chunks, chunk c being
//! `shard_range(count, n, c)` (so reduce-scatter leaves rank r's result where
//! the API promises, in its own shard).
//!
//! Reduce-scatter, n-1 steps. At step s rank r sends chunk (r-1-s) mod n to
//! rank r+1 and receives chunk (r-2-s) mod n from rank r-1, adding it into
//! its own copy. What r sends at step s+1 is exactly what it finished adding
//! at step s, so after n-1 steps every contribution has flowed through, and
//! the last chunk r receives, (r-2-(n-2)) = r, holds the sum of all ranks.
//! With n = 3 and chunks a, b, c (r: what rank r sends):
//!
//! ```text
//! step 0:  0: c -> 1    1: a -> 2    2: b -> 0     (1 adds c, 2 adds a, 0 adds b)
//! step 1:  0: b -> 1    1: c -> 2    2: a -> 0     (1 ends with b, 2 with c, 0 with a)
//! ```
//!
//! All-gather, n-1 steps. At step s rank r sends chunk (r-s) mod n and
//! receives chunk (r-s-1) mod n straight into place: what it receives at
//! step s it forwards at step s+1.
//!
//! All-reduce = reduce-scatter, then (for `Avg`) the division of the rank's
//! own chunk, then all-gather.
//!
//! Slices, as NCCL's ring. Every chunk is cut into segments of at most
//! `seg_elems` elements, and slice k is segment k of every chunk. The outer
//! loop runs over slices; each slice goes through all the steps (for an
//! all-reduce, the n-1 reduce-scatter steps and then the n-1 all-gather
//! steps) before the next slice starts. So a segment is forwarded right
//! after it was received and reduced, while it is still in this core's
//! cache, instead of a whole chunk later, when a large buffer has pushed it
//! out to memory: on loopback TCP the kernel's copies dominate, and a copy
//! from cache is several times cheaper than one from DRAM. Step-major order
//! (every segment of step s, then step s+1) would have the same messages
//! and dependencies, just worse locality.
//!
//! Each step of a slice is one exchange: the send to the right and the
//! receive from the left progress together (neither neighbour waits on the
//! other, whatever the size). A reduce-scatter segment is a
//! receive-and-reduce into place: the transport combines it as it arrives
//! (over shared memory, straight from the peer's ring); all-gather
//! segments land in place directly. Chunks differ in length by at most one
//! element, so a chunk may have one segment fewer than another; a step
//! whose outgoing or incoming chunk has no segment k sends or receives
//! nothing, and its neighbour, computing from the same chunk, agrees.

use super::{Ctx, bytes, recv_if, recv_reduce_if, segment, segments, send_if, split_pair};
use crate::error::CommError;
use crate::reduce;
use crate::types::{ReduceOp, shard_range};

/// Message numbers of the all-gather phase start here, after those of the
/// reduce-scatter phase.
const ALL_GATHER_BASE: u64 = 1 << 62;

/// Which phases of the ring to run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phases {
    ReduceScatter,
    AllGather,
    Both,
}

impl Phases {
    fn reduce_scatter(self) -> bool {
        self != Phases::AllGather
    }

    fn all_gather(self) -> bool {
        self != Phases::ReduceScatter
    }
}

/// Afterwards this rank's `shard_range` holds the reduced values (`Avg`
/// divided).
pub(crate) fn reduce_scatter(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    ring(ctx, buf, Phases::ReduceScatter)
}

/// On entry this rank's `shard_range` holds its part; afterwards every
/// rank has every part.
pub(crate) fn all_gather(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    ring(ctx, buf, Phases::AllGather)
}

pub(crate) fn all_reduce(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    ring(ctx, buf, Phases::Both)
}

fn ring(ctx: &mut Ctx<'_>, buf: &mut [u8], phases: Phases) -> Result<(), CommError> {
    let (r, n) = (ctx.rank, ctx.world);
    let es = ctx.elem();
    let count = buf.len() / es;
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    let seg = ctx.seg_elems;
    let chunk = |c: usize| shard_range(count, n, c % n);
    // Chunk 0 is the longest, so it has the most segments.
    let slices = segments(chunk(0).len(), seg);
    let base = ctx.base;
    let avg = ctx.red_op == ReduceOp::Avg && phases.reduce_scatter();
    for k in 0..slices {
        if phases.reduce_scatter() {
            for step in 0..n - 1 {
                let out = bytes(&segment(&chunk(r + 2 * n - 1 - step), seg, k), es);
                let inc = bytes(&segment(&chunk(r + 2 * n - 2 - step), seg, k), es);
                let id = ((step as u64) << 32) | k as u64;
                let (out_data, into) = split_pair(buf, out.clone(), inc.clone());
                let recv = recv_reduce_if(!inc.is_empty(), ctx, left, id, into);
                ctx.exchange(&mut [send_if(!out.is_empty(), &base, right, id, out_data), recv])?;
            }
            if avg {
                let own = segment(&chunk(r), seg, k);
                reduce::finish_avg(ctx.red_dtype, &mut buf[bytes(&own, es)], n);
            }
        }
        if phases.all_gather() {
            for step in 0..n - 1 {
                let out = bytes(&segment(&chunk(r + n - step), seg, k), es);
                let inc = bytes(&segment(&chunk(r + 2 * n - step - 1), seg, k), es);
                let id = ALL_GATHER_BASE | ((step as u64) << 32) | k as u64;
                let (out_data, landing) = split_pair(buf, out.clone(), inc.clone());
                ctx.exchange(&mut [
                    send_if(!out.is_empty(), &base, right, id, out_data),
                    recv_if(!inc.is_empty(), &base, left, id, landing),
                ])?;
            }
        }
    }
    Ok(())
}

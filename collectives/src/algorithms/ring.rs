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
//! Pipelining. A step's chunk goes in segments of at most `seg_elems`
//! elements. Segment k of the outgoing chunk and segment k of the incoming
//! one are one exchange (the send and the receive progress together, so
//! neither neighbour waits on the other); then the received segment is
//! reduced from the scratch buffer into place. While this rank reduces
//! segment k, its left neighbour's segment k+1 is already streaming into
//! the socket buffer, so sending, receiving and reducing overlap. Scratch
//! is one segment, allocated once per communicator.
//!
//! All-gather, n-1 steps. At step s rank r sends chunk (r-s) mod n and
//! receives chunk (r-s-1) mod n straight into place: what it receives at
//! step s it forwards at step s+1. There is nothing to compute, so each step
//! is one exchange of whole chunks.
//!
//! All-reduce = reduce-scatter, then (for `Avg`) the division of the rank's
//! own chunk, then all-gather.

use super::{
    Ctx, bytes, recv, recv_if, scratch_bytes, segment, segments, send, send_if, split_pair,
};
use crate::error::CommError;
use crate::reduce;
use crate::types::{ReduceOp, shard_range};

/// Message numbers of the all-gather phase start here, after those of the
/// reduce-scatter phase.
const ALL_GATHER_BASE: u64 = 1 << 62;

pub(crate) fn reduce_scatter(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    let (r, n) = (ctx.rank, ctx.world);
    let es = ctx.elem();
    let count = buf.len() / es;
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    let seg = ctx.seg_elems;
    let scratch_len = seg.min(shard_range(count, n, 0).len()) * es;
    let base = ctx.base;
    let mut scratch = std::mem::take(ctx.scratch);
    let result = (|| {
        let scratch = scratch_bytes(&mut scratch, scratch_len);
        for step in 0..n - 1 {
            let out = shard_range(count, n, (r + 2 * n - 1 - step) % n);
            let inc = shard_range(count, n, (r + 2 * n - 2 - step) % n);
            let (n_out, n_in) = (segments(out.len(), seg), segments(inc.len(), seg));
            for k in 0..n_out.max(n_in) {
                let chunk = ((step as u64) << 32) | k as u64;
                let out_seg = bytes(&segment(&out, seg, k), es);
                let in_seg = bytes(&segment(&inc, seg, k), es);
                let in_len = if k < n_in { in_seg.len() } else { 0 };
                let landing = &mut scratch[..in_len];
                ctx.exchange(&mut [
                    send_if(k < n_out, &base, right, chunk, &buf[out_seg]),
                    recv_if(k < n_in, &base, left, chunk, landing),
                ])?;
                if k < n_in {
                    reduce::reduce_into(
                        ctx.red_dtype,
                        ctx.red_op,
                        &mut buf[in_seg],
                        &scratch[..in_len],
                    );
                }
            }
        }
        Ok(())
    })();
    *ctx.scratch = scratch;
    result
}

pub(crate) fn all_gather(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    let (r, n) = (ctx.rank, ctx.world);
    let es = ctx.elem();
    let count = buf.len() / es;
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    let base = ctx.base;
    for step in 0..n - 1 {
        let out = bytes(&shard_range(count, n, (r + n - step) % n), es);
        let inc = bytes(&shard_range(count, n, (r + 2 * n - step - 1) % n), es);
        let chunk = ALL_GATHER_BASE + step as u64;
        let (out, inc) = split_pair(buf, out, inc);
        ctx.exchange(&mut [
            send(&base, right, chunk, out),
            recv(&base, left, chunk, inc),
        ])?;
    }
    Ok(())
}

pub(crate) fn all_reduce(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    reduce_scatter(ctx, buf)?;
    if ctx.red_op == ReduceOp::Avg {
        let es = ctx.elem();
        let own = shard_range(buf.len() / es, ctx.world, ctx.rank);
        reduce::finish_avg(ctx.red_dtype, &mut buf[bytes(&own, es)], ctx.world);
    }
    all_gather(ctx, buf)
}

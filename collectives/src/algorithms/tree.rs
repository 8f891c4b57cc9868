//! Pipelined binary-tree all-reduce and broadcast.
//!
//! Why a tree: a ring needs 2(n-1) message latencies per all-reduce; a
//! binary tree needs about 2·log2(n), so for small messages and large worlds
//! it finishes first. Its price is bandwidth: every byte goes up and down
//! every level and inner ranks handle two children, so above the measured
//! crossover (see `choose`) the ring wins.
//!
//! Shape. Ranks are numbered from the root (virtual rank v = (rank - root)
//! mod n); v's parent is (v-1)/2 and its children 2v+1 and 2v+2 when they
//! exist. With n = 6:
//!
//! ```text
//!            0
//!          /   \
//!         1     2
//!        / \   /
//!       3   4 5
//! ```
//!
//! How the chunks move. The buffer is cut into segments of at most
//! `seg_elems` elements. Going up (reduce), in round k every rank receives
//! segment k from each child into scratch and, in the same exchange, sends
//! segment k-1 (already combined with its children's) to its parent; then
//! it adds the children's segment k into its buffer. Going down
//! (broadcast), in round k every rank receives segment k from its parent
//! straight into place and, in the same exchange, forwards segment k-1 to its
//! children. So a segment climbs one level per round while the next one
//! follows: the whole reduction takes (segments + depth) rounds rather than
//! segments × depth.
//!
//! The root applies `Avg`'s division once, between the two phases. The
//! order in which contributions are added is fixed by the tree, so the
//! result is the same on every rank and from run to run.

use super::{Ctx, bytes, recv_if, scratch_bytes, segment, segments, send_if};
use crate::error::CommError;
use crate::reduce;
use crate::types::ReduceOp;

/// Message numbers of the broadcast phase start here, after the reduce phase.
const DOWN_BASE: u64 = 1 << 62;

fn to_rank(v: usize, root: usize, n: usize) -> usize {
    (v + root) % n
}

fn children(v: usize, n: usize) -> impl Iterator<Item = usize> {
    [2 * v + 1, 2 * v + 2].into_iter().filter(move |&c| c < n)
}

pub(crate) fn all_reduce(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    let n = ctx.world;
    let v = ctx.rank;
    let es = ctx.elem();
    let count = buf.len() / es;
    let seg = ctx.seg_elems;
    let nseg = segments(count, seg);
    let kids: Vec<usize> = children(v, n).collect();
    let parent = (v > 0).then(|| (v - 1) / 2);
    let whole = 0..count;
    let seg_bytes = seg.min(count) * es;
    let base = ctx.base;

    let mut scratch = std::mem::take(ctx.scratch);
    let up = (|| {
        let scratch = scratch_bytes(&mut scratch, 2 * seg_bytes);
        let (s0, s1) = scratch.split_at_mut(seg_bytes);
        for k in 0..=nseg {
            let this = bytes(&segment(&whole, seg, k), es);
            let prev = if k > 0 {
                bytes(&segment(&whole, seg, k - 1), es)
            } else {
                0..0
            };
            let len = this.len();
            let (c0, c1) = (kids.first().copied(), kids.get(1).copied());
            let to_parent = parent.filter(|_| k > 0);
            ctx.exchange(&mut [
                recv_if(
                    k < nseg && c0.is_some(),
                    &base,
                    c0.unwrap_or(0),
                    k as u64,
                    &mut s0[..len],
                ),
                recv_if(
                    k < nseg && c1.is_some(),
                    &base,
                    c1.unwrap_or(0),
                    k as u64,
                    &mut s1[..len],
                ),
                send_if(
                    to_parent.is_some(),
                    &base,
                    to_parent.unwrap_or(0),
                    (k as u64).wrapping_sub(1),
                    &buf[prev],
                ),
            ])?;
            if k < nseg {
                for src in [&s0[..len], &s1[..len]].into_iter().take(kids.len()) {
                    reduce::reduce_into(ctx.red_dtype, ctx.red_op, &mut buf[this.clone()], src);
                }
            }
        }
        Ok::<(), CommError>(())
    })();
    *ctx.scratch = scratch;
    up?;

    if parent.is_none() && ctx.red_op == ReduceOp::Avg {
        reduce::finish_avg(ctx.red_dtype, buf, n);
    }
    down(ctx, buf, parent, &kids, 0)
}

/// Broadcast from `ctx.root` down the binary tree.
pub(crate) fn broadcast(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    let (n, root) = (ctx.world, ctx.root);
    let v = (ctx.rank + n - root) % n;
    let parent = (v > 0).then(|| (v - 1) / 2);
    let kids: Vec<usize> = children(v, n).collect();
    down(ctx, buf, parent, &kids, root)
}

/// The downward half: segments flow from `parent` (none at the root) to
/// `kids`, all given as virtual ranks relative to `root`. Also the chain
/// broadcast, whose tree has one child per rank.
pub(crate) fn down(
    ctx: &mut Ctx<'_>,
    buf: &mut [u8],
    parent: Option<usize>,
    kids: &[usize],
    root: usize,
) -> Result<(), CommError> {
    let n = ctx.world;
    let es = ctx.elem();
    let count = buf.len() / es;
    let seg = ctx.seg_elems;
    let nseg = segments(count, seg);
    let whole = 0..count;
    let base = ctx.base;
    let parent = parent.map(|p| to_rank(p, root, n));
    let kids: Vec<usize> = kids.iter().map(|&c| to_rank(c, root, n)).collect();
    assert!(kids.len() <= 2, "a tree rank has at most two children");
    let (p, c0, c1) = (parent, kids.first().copied(), kids.get(1).copied());
    for k in 0..=nseg {
        // Segment k lands in `hi`; segment k-1, complete, is in `lo`.
        let this = bytes(&segment(&whole, seg, k), es);
        let prev = if k > 0 {
            bytes(&segment(&whole, seg, k - 1), es)
        } else {
            0..0
        };
        let (lo, hi) = buf.split_at_mut(this.start);
        let (chunk, prev_chunk) = (DOWN_BASE + k as u64, (DOWN_BASE + k as u64).wrapping_sub(1));
        let prev = &lo[prev];
        ctx.exchange(&mut [
            recv_if(
                k < nseg && p.is_some(),
                &base,
                p.unwrap_or(0),
                chunk,
                &mut hi[..this.len()],
            ),
            send_if(
                k > 0 && c0.is_some(),
                &base,
                c0.unwrap_or(0),
                prev_chunk,
                prev,
            ),
            send_if(
                k > 0 && c1.is_some(),
                &base,
                c1.unwrap_or(0),
                prev_chunk,
                prev,
            ),
        ])?;
    }
    Ok(())
}

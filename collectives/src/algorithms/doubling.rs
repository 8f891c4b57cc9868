//! Recursive doubling all-reduce, and the binomial-tree broadcast.
//!
//! Why: small messages pay for round trips, not bytes. A ring all-reduce
//! takes 2(n-1) dependent steps and the binary tree 2·log2(n); recursive
//! doubling takes log2(n) (two more when n is not a power of two), each one
//! exchange with one partner — at 2 ranks a single round trip where the
//! ring needs two. Its price is bandwidth: every step moves and reduces the
//! whole buffer, so large messages go to the ring (see `choose`).
//!
//! How the data moves, with n = 6 (p = 4, the largest power of two, and
//! r = n - p = 2 ranks over):
//!
//! ```text
//! fold:     0 -> 1, 2 -> 3          (1 holds x0+x1 as virtual rank 0, 3 holds x2+x3 as 1;
//!                                    4, 5 are virtual ranks 2, 3)
//! step 1:   v0 <-> v1, v2 <-> v3    (each adds its partner's buffer)
//! step 2:   v0 <-> v2, v1 <-> v3    (now every virtual rank holds the total)
//! unfold:   1 -> 0, 3 -> 2
//! ```
//!
//! Step s pairs virtual rank v with v XOR 2^(s-1). Both partners compute
//! `lower op higher` (the lower virtual rank's contribution on the left), so
//! they hold the same bits after every step even where `op` is not exactly
//! commutative (signed zeros under min/max, NaN payloads); at the end every
//! rank holds the same result. `Avg` divides once, at the end, on every
//! rank. The buffer goes in segments of at most `seg_elems` elements, each
//! through all the steps.
//!
//! The broadcast is the binomial tree: in step s, every rank that has the
//! data (virtual ranks below 2^(s-1), counted from the root) sends it to the
//! rank 2^(s-1) above it; log2(n) steps, one message per rank.

use super::{Ctx, bytes, recv, scratch_bytes, segment, segments, send};
use crate::error::CommError;
use crate::reduce;
use crate::types::ReduceOp;

/// Message numbers: `step << 32 | segment`, the fold being step 0 and the
/// unfold this one.
const UNFOLD: u64 = 0xFFFF;

pub(crate) fn all_reduce(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    let (rank, n) = (ctx.rank, ctx.world);
    let es = ctx.elem();
    let count = buf.len() / es;
    let seg = ctx.seg_elems;
    let p = 1usize << n.ilog2();
    let extra = n - p;
    // Ranks below 2·extra pair up; the odd one of a pair takes part.
    let (virt, folded) = if rank < 2 * extra {
        (rank / 2, rank % 2 == 0)
    } else {
        (rank - extra, false)
    };
    let real = |v: usize| if v < extra { 2 * v + 1 } else { v + extra };
    let base = ctx.base;
    let mut scratch = std::mem::take(ctx.scratch);
    let result = (|| {
        let landing = scratch_bytes(&mut scratch, seg.min(count) * es);
        for k in 0..segments(count, seg) {
            let r = bytes(&segment(&(0..count), seg, k), es);
            let (seg_buf, landing) = (&mut buf[r.clone()], &mut landing[..r.len()]);
            let id = |step: u64| (step << 32) | k as u64;
            if folded {
                ctx.exchange(&mut [send(&base, rank + 1, id(0), seg_buf)])?;
                ctx.exchange(&mut [recv(&base, rank + 1, id(UNFOLD), seg_buf)])?;
                continue;
            }
            if rank < 2 * extra {
                ctx.exchange(&mut [recv(&base, rank - 1, id(0), landing)])?;
                lower_first(ctx, seg_buf, landing, true);
            }
            let mut mask = 1;
            let mut step = 1;
            while mask < p {
                let partner = real(virt ^ mask);
                ctx.exchange(&mut [
                    send(&base, partner, id(step), seg_buf),
                    recv(&base, partner, id(step), landing),
                ])?;
                lower_first(ctx, seg_buf, landing, virt > (virt ^ mask));
                mask <<= 1;
                step += 1;
            }
            if rank < 2 * extra {
                ctx.exchange(&mut [send(&base, rank - 1, id(UNFOLD), seg_buf)])?;
            }
        }
        Ok::<(), CommError>(())
    })();
    *ctx.scratch = scratch;
    result?;
    if ctx.red_op == ReduceOp::Avg {
        reduce::finish_avg(ctx.red_dtype, buf, n);
    }
    Ok(())
}

/// Combines a partner's `theirs` into `ours`, with the lower rank's
/// contribution on the left: `theirs op ours` when `theirs_lower`, else
/// `ours op theirs`.
fn lower_first(ctx: &Ctx<'_>, ours: &mut [u8], theirs: &mut [u8], theirs_lower: bool) {
    if theirs_lower {
        reduce::reduce_into(ctx.red_dtype, ctx.red_op, theirs, ours);
        ours.copy_from_slice(theirs);
    } else {
        reduce::reduce_into(ctx.red_dtype, ctx.red_op, ours, theirs);
    }
}

/// Binomial-tree broadcast from `ctx.root`.
pub(crate) fn broadcast(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    let (n, root) = (ctx.world, ctx.root);
    let v = (ctx.rank + n - root) % n;
    let to_rank = |v: usize| (v + root) % n;
    let es = ctx.elem();
    let count = buf.len() / es;
    let seg = ctx.seg_elems;
    let base = ctx.base;
    for k in 0..segments(count, seg) {
        let seg_buf = &mut buf[bytes(&segment(&(0..count), seg, k), es)];
        let mut mask = 1;
        let mut step = 0u64;
        while mask < n {
            let id = (step << 32) | k as u64;
            if v < mask && v + mask < n {
                ctx.exchange(&mut [send(&base, to_rank(v + mask), id, seg_buf)])?;
            } else if (mask..2 * mask).contains(&v) {
                ctx.exchange(&mut [recv(&base, to_rank(v - mask), id, seg_buf)])?;
            }
            mask <<= 1;
            step += 1;
        }
    }
    Ok(())
}

//! Pipelined chain broadcast (what `Algorithm::Ring` means for broadcast).
//!
//! Why a chain: for a large buffer, the best a broadcast can do is move the
//! buffer once over every rank's inbound link. A chain root → root+1 → … →
//! root+n-1 does exactly that when it is pipelined: the buffer goes in
//! segments, and in round k rank i receives segment k from rank i-1 while it
//! forwards segment k-1 to rank i+1 (one exchange). Every link is busy at
//! once, and the broadcast takes (segments + n - 1) rounds, so its time
//! tends to that of a single point-to-point send of the buffer as segments
//! grow in number. Its latency grows with n, so small broadcasts go to the
//! tree.
//!
//! It is the tree's downward phase on a tree where every rank has one child.

use super::Ctx;
use super::tree::down;
use crate::error::CommError;

pub(crate) fn broadcast(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    let (n, root) = (ctx.world, ctx.root);
    let v = (ctx.rank + n - root) % n;
    let parent = v.checked_sub(1);
    let next: Vec<usize> = (v + 1 < n).then_some(v + 1).into_iter().collect();
    down(ctx, buf, parent, &next, root)
}

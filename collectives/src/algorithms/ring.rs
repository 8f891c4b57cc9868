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

use std::ops::Range;

use super::{Ctx, bytes, recv_if, recv_reduce_if, segment, segments, send_if, split_pair};
use crate::error::CommError;
use crate::reduce;
use crate::types::{ReduceOp, shard_range};

/// Message numbers of the all-gather phase start here, after those of the
/// reduce-scatter phase.
const ALL_GATHER_BASE: u64 = 1 << 62;

/// Which phases of the ring to run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phases {
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

/// Where the chunks of a ring lie in the buffer: chunk c (of member c) is
/// the concatenation of `pieces[c]`, element ranges in buffer order, each
/// cut into segments of at most `seg` elements. The flat ring has one
/// piece per chunk (`shard_range`); the node-aware algorithms give a
/// chunk one piece per node.
pub(crate) struct Layout {
    pieces: Vec<Vec<Range<usize>>>,
    /// Per chunk, the index of the first segment of each piece.
    firsts: Vec<Vec<usize>>,
    seg: usize,
}

impl Layout {
    pub fn new(pieces: Vec<Vec<Range<usize>>>, seg: usize) -> Layout {
        let firsts = pieces
            .iter()
            .map(|ps| {
                let mut first = 0;
                ps.iter()
                    .map(|p| {
                        let f = first;
                        first += segments(p.len(), seg);
                        f
                    })
                    .collect()
            })
            .collect();
        Layout {
            pieces,
            firsts,
            seg,
        }
    }

    /// Chunk c of `n` is `shard_range(count, n, c)`.
    pub fn flat(count: usize, n: usize, seg: usize) -> Layout {
        Layout::new(
            (0..n).map(|c| vec![shard_range(count, n, c)]).collect(),
            seg,
        )
    }

    fn segments(&self, c: usize) -> usize {
        match (self.pieces[c].last(), self.firsts[c].last()) {
            (Some(p), Some(f)) => f + segments(p.len(), self.seg),
            _ => 0,
        }
    }

    /// Segment `k` of chunk `c`, empty past its last one.
    fn segment(&self, c: usize, k: usize) -> Range<usize> {
        let i = self.firsts[c].partition_point(|&f| f <= k);
        match i.checked_sub(1) {
            Some(i) => segment(&self.pieces[c][i], self.seg, k - self.firsts[c][i]),
            None => 0..0,
        }
    }

    /// Slices: the most segments of any chunk.
    fn slices(&self) -> usize {
        (0..self.pieces.len())
            .map(|c| self.segments(c))
            .max()
            .unwrap_or(0)
    }
}

/// Afterwards this rank's `shard_range` holds the reduced values (`Avg`
/// divided).
pub(crate) fn reduce_scatter(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    flat(ctx, buf, Phases::ReduceScatter)
}

/// On entry this rank's `shard_range` holds its part; afterwards every
/// rank has every part.
pub(crate) fn all_gather(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    flat(ctx, buf, Phases::AllGather)
}

pub(crate) fn all_reduce(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    flat(ctx, buf, Phases::Both)
}

fn flat(ctx: &mut Ctx<'_>, buf: &mut [u8], phases: Phases) -> Result<(), CommError> {
    let layout = Layout::flat(buf.len() / ctx.elem(), ctx.world, ctx.seg_elems);
    let avg = (ctx.red_op == ReduceOp::Avg).then_some(ctx.world);
    ring(ctx, buf, phases, &layout, avg)
}

/// The ring over `layout` (one chunk per member). After the reduce-scatter
/// steps of each slice, the rank's own segment is divided by `divide_by`
/// (an `Avg` over that many ranks) when given.
pub(crate) fn ring(
    ctx: &mut Ctx<'_>,
    buf: &mut [u8],
    phases: Phases,
    layout: &Layout,
    divide_by: Option<usize>,
) -> Result<(), CommError> {
    let (r, n) = (ctx.rank, ctx.world);
    let es = ctx.elem();
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    let slices = layout.slices();
    let base = ctx.base;
    let divide_by = divide_by.filter(|_| phases.reduce_scatter());
    for k in 0..slices {
        if phases.reduce_scatter() {
            for step in 0..n - 1 {
                let out = bytes(&layout.segment((r + 2 * n - 1 - step) % n, k), es);
                let inc = bytes(&layout.segment((r + 2 * n - 2 - step) % n, k), es);
                let id = ((step as u64) << 32) | k as u64;
                let (out_data, into) = split_pair(buf, out.clone(), inc.clone());
                let recv = recv_reduce_if(!inc.is_empty(), ctx, left, id, into);
                ctx.exchange(&mut [send_if(!out.is_empty(), &base, right, id, out_data), recv])?;
            }
            if let Some(world) = divide_by {
                let own = bytes(&layout.segment(r, k), es);
                reduce::finish_avg(ctx.red_dtype, &mut buf[own], world);
            }
        }
        if phases.all_gather() {
            for step in 0..n - 1 {
                let out = bytes(&layout.segment((r + n - step) % n, k), es);
                let inc = bytes(&layout.segment((r + 2 * n - step - 1) % n, k), es);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_cut_pieces_into_segments() {
        let l = Layout::new(vec![vec![0..5, 10..12], vec![5..10], vec![]], 2);
        assert_eq!(l.segments(0), 4);
        assert_eq!(l.segment(0, 0), 0..2);
        assert_eq!(l.segment(0, 2), 4..5);
        assert_eq!(l.segment(0, 3), 10..12);
        assert!(l.segment(0, 4).is_empty());
        assert_eq!(l.segment(1, 2), 9..10);
        assert_eq!(l.segments(2), 0);
        assert!(l.segment(2, 0).is_empty());
        assert_eq!(l.slices(), 4);
        let flat = Layout::flat(7, 3, 2);
        assert_eq!(flat.segment(0, 1), 2..3);
        assert_eq!(flat.slices(), 2);
    }
}

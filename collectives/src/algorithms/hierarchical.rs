//! Node-aware all-reduce, reduce-scatter, all-gather and broadcast, for n
//! nodes of k ranks each (as NCCL, MPI and Horovod reduce within a node
//! first).
//!
//! Why: a flat ring over n·k ranks puts each node's link under 2(nk-1)/nk
//! of the buffer each way for an all-reduce. Reducing within the node
//! first leaves the link 2(n-1)/n (at 2 nodes × 2 ranks: one buffer
//! instead of 1.5), and the steps within a node go through shared memory,
//! which is cheap next to the network.
//!
//! How the data moves. Rank (i, j) is the j-th rank of node i, and S(r) =
//! `shard_range(count, N, r)` is rank r's shard of the N = n·k ranks.
//!
//! ```text
//! reduce_scatter:
//!   1. in each node, a ring reduce-scatter of its k ranks in which local
//!      rank j's chunk is the pieces S((i', j)) of every node i'
//!      -> (i, j) holds its node's sum of those pieces;
//!   2. across nodes, k rings at once, ring j of the ranks (·, j): a ring
//!      reduce-scatter in which node i's chunk is S((i, j))
//!      -> (i, j) holds the total of its own shard S((i, j)), in place.
//! all_gather: the same backwards: 3. ring j all-gathers the shards
//!   S((·, j)); 4. each node all-gathers, local rank j bringing S((·, j)).
//! all_reduce: the same four phases (Avg: each rank divides its part by N
//!   once, after 2), pipelined over pieces of the buffer (see `all_reduce`).
//! broadcast: the root's node broadcasts within (a chain); ring j, a chain
//!   from the root's node, carries piece j (shard j of k) to every node;
//!   every other node all-gathers its k pieces within.
//! ```
//!
//! Ring j carries 1/k of the data over the links, and the k rings run at
//! the same time, so the links carry the minimum an all-reduce needs.
//! Every phase tags its messages (`Ctx::tag`), so two phases between the
//! same two ranks can't be confused.
//!
//! Summation order: the flat ring adds the ranks' values one by one around
//! the ring; this adds within each node first. Integer sums and products
//! (wrapping) and min/max don't depend on the order, so their results
//! equal the flat ring's bit for bit; float sums, products and averages
//! can differ in the last bits, as between any two orders.
//!
//! It applies where every node has the same k > 1 ranks and n > 1
//! ([`Nodes::from_hosts`]); elsewhere the flat ring (the chain, for a
//! broadcast) runs instead.

use std::ops::Range;

use super::pipeline::{self, Step};
use super::ring::{self, Layout, Phases};
use super::{Ctx, bytes, chain};
use crate::error::CommError;
use crate::types::{ReduceOp, shard_range};

/// Phase tags (or-ed into `chunk`, above the ring's step and segment bits
/// and below its all-gather bit).
const INTRA_RS: u64 = 1 << 56;
const INTER: u64 = 2 << 56;
const INTRA_AG: u64 = 3 << 56;
const ROOT_NODE: u64 = 4 << 56;

/// How the ranks sit on nodes: n nodes of k ranks each, n > 1 and k > 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Nodes {
    /// `members[i][j]`: the j-th rank (in rank order) of node i.
    members: Vec<Vec<usize>>,
    /// `of[r]`: rank r's (node, local index).
    of: Vec<(usize, usize)>,
}

impl Nodes {
    /// From each rank's host: nodes numbered by their lowest rank. `None`
    /// unless there are several nodes and they all have the same number of
    /// ranks, more than one.
    pub fn from_hosts<H: PartialEq>(hosts: &[H]) -> Option<Nodes> {
        let mut members: Vec<Vec<usize>> = Vec::new();
        let mut of = Vec::with_capacity(hosts.len());
        for (r, h) in hosts.iter().enumerate() {
            let i = match (0..members.len()).find(|&i| hosts[members[i][0]] == *h) {
                Some(i) => i,
                None => {
                    members.push(Vec::new());
                    members.len() - 1
                }
            };
            of.push((i, members[i].len()));
            members[i].push(r);
        }
        let k = members.first().map_or(0, Vec::len);
        (members.len() > 1 && k > 1 && members.iter().all(|m| m.len() == k))
            .then_some(Nodes { members, of })
    }

    /// (nodes, ranks per node).
    pub fn shape(&self) -> (usize, usize) {
        (self.members.len(), self.members[0].len())
    }

    /// The ranks of equal local index `j` on every node, by node.
    fn across(&self, j: usize) -> Vec<usize> {
        self.members.iter().map(|m| m[j]).collect()
    }

    /// Chunks of the rings within a node: local rank j's chunk is the
    /// shards of the ranks (·, j).
    fn within(&self, shard: &impl Fn(usize) -> Range<usize>, seg: usize) -> Layout {
        let (_, k) = self.shape();
        Layout::new(
            (0..k)
                .map(|j| self.across(j).into_iter().map(shard).collect())
                .collect(),
            seg,
        )
    }

    /// Chunks of ring j across nodes: node i's chunk is the shard of (i, j).
    fn between(&self, j: usize, shard: &impl Fn(usize) -> Range<usize>, seg: usize) -> Layout {
        Layout::new(
            self.across(j).into_iter().map(|r| vec![shard(r)]).collect(),
            seg,
        )
    }
}

/// The halves of an all-reduce.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Half {
    ReduceScatter,
    AllGather,
}

fn run(ctx: &mut Ctx<'_>, buf: &mut [u8], half: Half) -> Result<(), CommError> {
    let Some(nodes) = ctx.nodes else {
        return match half {
            Half::ReduceScatter => ring::reduce_scatter(ctx, buf),
            Half::AllGather => ring::all_gather(ctx, buf),
        };
    };
    let world = ctx.world;
    let (i, j) = nodes.of[ctx.rank];
    let count = buf.len() / ctx.elem();
    let seg = ctx.seg_elems;
    let shard = |r: usize| shard_range(count, world, r);
    let within = nodes.within(&shard, seg);
    let between = nodes.between(j, &shard, seg);
    let node = &nodes.members[i];
    let across = nodes.across(j);
    let avg = (ctx.red_op == ReduceOp::Avg).then_some(world);
    if half != Half::AllGather {
        let mut g = ctx.group(node, j, INTRA_RS);
        ring::ring(&mut g, buf, Phases::ReduceScatter, &within, None)?;
    }
    let phases = match half {
        Half::ReduceScatter => Phases::ReduceScatter,
        Half::AllGather => Phases::AllGather,
    };
    ring::ring(
        &mut ctx.group(&across, i, INTER),
        buf,
        phases,
        &between,
        avg,
    )?;
    if half != Half::ReduceScatter {
        let mut g = ctx.group(node, j, INTRA_AG);
        ring::ring(&mut g, buf, Phases::AllGather, &within, None)?;
    }
    Ok(())
}

/// The all-reduce, pipelined (see `pipeline`): the buffer goes in pieces
/// of k segments, and each piece runs the four phases as one chain of
/// 2(k-1) + 2(n-1) steps, a new piece starting at every exchange: while
/// one piece crosses the links, the next ones are reduced within the
/// nodes, so the links never wait for shared memory. Within a piece, local
/// rank j's chunk is the j-th of k and, across nodes, node i's part of it
/// the i-th of n.
pub(crate) fn all_reduce(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    let Some(nodes) = ctx.nodes else {
        return ring::all_reduce(ctx, buf);
    };
    let (n, k) = nodes.shape();
    let world = ctx.world;
    let (i, j) = nodes.of[ctx.rank];
    let count = buf.len() / ctx.elem();
    let piece = k * ctx.seg_elems;
    let node = &nodes.members[i];
    let across = nodes.across(j);
    let divide = (ctx.red_op == ReduceOp::Avg).then_some(world);
    // Element ranges of piece p: its local chunk c, and part m of that.
    let piece_range = |p: usize| p * piece..((p + 1) * piece).min(count);
    let local = |p: usize, c: usize| {
        let r = piece_range(p);
        let s = shard_range(r.len(), k, c % k);
        r.start + s.start..r.start + s.end
    };
    let part = |p: usize, m: usize| {
        let c = local(p, j);
        let s = shard_range(c.len(), n, m % n);
        c.start + s.start..c.start + s.end
    };
    let (right, left) = (node[(j + 1) % k], node[(j + k - 1) % k]);
    let (next, prev) = (across[(i + 1) % n], across[(i + n - 1) % n]);
    let (rs, inter) = (k - 1, n - 1);
    let step = |p: usize, d: usize| {
        let mut st = Step {
            send: None,
            recv: None,
            reduce: false,
            divide: None,
        };
        if d < rs {
            // Ring reduce-scatter within the node (see `ring`).
            st.send = Some((right, local(p, j + 2 * k - 1 - d)));
            st.recv = Some((left, local(p, j + 2 * k - 2 - d)));
            st.reduce = true;
        } else if d < rs + inter {
            let e = d - rs;
            st.send = Some((next, part(p, i + 2 * n - 1 - e)));
            st.recv = Some((prev, part(p, i + 2 * n - 2 - e)));
            st.reduce = true;
            if e + 1 == inter {
                st.divide = divide.map(|w| (part(p, i), w));
            }
        } else if d < rs + 2 * inter {
            let e = d - rs - inter;
            st.send = Some((next, part(p, i + n - e)));
            st.recv = Some((prev, part(p, i + 2 * n - e - 1)));
        } else {
            let e = d - rs - 2 * inter;
            st.send = Some((right, local(p, j + k - e)));
            st.recv = Some((left, local(p, j + 2 * k - e - 1)));
        }
        st
    };
    pipeline::run(ctx, buf, count.div_ceil(piece), 2 * rs + 2 * inter, 1, step)
}

pub(crate) fn reduce_scatter(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    run(ctx, buf, Half::ReduceScatter)
}

pub(crate) fn all_gather(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    run(ctx, buf, Half::AllGather)
}

pub(crate) fn broadcast(ctx: &mut Ctx<'_>, buf: &mut [u8]) -> Result<(), CommError> {
    let Some(nodes) = ctx.nodes else {
        return chain::broadcast(ctx, buf);
    };
    let (_, k) = nodes.shape();
    let (i, j) = nodes.of[ctx.rank];
    let (root_node, root_local) = nodes.of[ctx.root];
    let es = ctx.elem();
    let count = buf.len() / es;
    let seg = ctx.seg_elems;
    let node = &nodes.members[i];
    if i == root_node {
        let mut g = ctx.group(node, j, ROOT_NODE);
        g.root = root_local;
        chain::broadcast(&mut g, buf)?;
    }
    let across = nodes.across(j);
    let mut g = ctx.group(&across, i, INTER);
    g.root = root_node;
    chain::broadcast(&mut g, &mut buf[bytes(&shard_range(count, k, j), es)])?;
    if i != root_node {
        let mut g = ctx.group(node, j, INTRA_AG);
        ring::ring(
            &mut g,
            buf,
            Phases::AllGather,
            &Layout::flat(count, k, seg),
            None,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_need_equal_sizes_above_one() {
        let n = Nodes::from_hosts(&["a", "b", "a", "b"]).unwrap();
        assert_eq!(n.shape(), (2, 2));
        assert_eq!(n.of, vec![(0, 0), (1, 0), (0, 1), (1, 1)]);
        assert_eq!(n.across(1), vec![2, 3]);
        assert!(Nodes::from_hosts(&["a", "a", "b"]).is_none());
        assert!(Nodes::from_hosts(&["a", "a"]).is_none());
        assert!(Nodes::from_hosts(&["a", "b"]).is_none());
    }
}

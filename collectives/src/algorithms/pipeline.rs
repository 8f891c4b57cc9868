//! Pipelined schedules: many slices of a buffer through the same chain of
//! steps, several slices at once.
//!
//! Why: a slice's steps depend on each other (what a rank forwards at step
//! d+1 is what it received at step d), so one slice at a time leaves every
//! link idle between steps, for a wake-up and a reduction per step. Over a
//! fast pipe that costs little; over a network link it costs ~10% (measured
//! on 1 Gbit/s links), and a node-aware all-reduce would also leave the
//! link idle while the ranks of a node reduce among themselves. Slices
//! don't depend on each other, so other slices can fill those gaps.
//!
//! How: slice s does its step d in exchange `s·stagger + d`, and an exchange
//! carries every step due in it, older slices first (two messages to one
//! peer then go in the order both sides expect; the transport moves them in
//! order). With `stagger` = the number of steps, one slice runs at a time
//! (the ring's slice-major order); with 1, a new slice starts at every
//! exchange and every step of the chain has a slice in it.

use std::ops::Range;

use super::{Ctx, bytes};
use crate::error::CommError;
use crate::reduce;
use crate::transport::Xfer;
use crate::wire::Header;

/// What one rank does in one step of a slice. Peers are positions in the
/// context's group; ranges are elements of the buffer.
pub(crate) struct Step {
    pub send: Option<(usize, Range<usize>)>,
    pub recv: Option<(usize, Range<usize>)>,
    /// The receive combines into place (else it copies).
    pub reduce: bool,
    /// After the step, these elements are divided by this many ranks (the
    /// end of an `Avg`).
    pub divide: Option<(Range<usize>, usize)>,
}

/// Runs `slices` slices through `steps` steps each, slice s's step d being
/// `step(s, d)`, with slice s starting at exchange `s·stagger`.
pub(crate) fn run(
    ctx: &mut Ctx<'_>,
    buf: &mut [u8],
    slices: usize,
    steps: usize,
    stagger: usize,
    step: impl Fn(usize, usize) -> Step,
) -> Result<(), CommError> {
    if slices == 0 || steps == 0 {
        return Ok(());
    }
    let es = ctx.elem();
    let stagger = stagger.clamp(1, steps);
    let exchanges = (slices - 1) * stagger + steps;
    let mut due: Vec<(usize, usize, Step)> = Vec::new();
    for t in 0..exchanges {
        due.clear();
        let first = (t + 1).saturating_sub(steps).div_ceil(stagger);
        for s in first..slices.min(t / stagger + 1) {
            let d = t - s * stagger;
            due.push((s, d, step(s, d)));
        }
        let mut wanted = Vec::with_capacity(2 * due.len());
        for (_, _, st) in &due {
            let span =
                |x: &Option<(usize, Range<usize>)>| x.as_ref().map_or(0..0, |(_, r)| bytes(r, es));
            wanted.push((span(&st.send), false));
            wanted.push((span(&st.recv), true));
        }
        let mut parts = carve(buf, &wanted).into_iter();
        let mut xfers = Vec::with_capacity(2 * due.len());
        for (s, d, st) in &due {
            let header = |len: usize| Header {
                chunk: ((*d as u64) << 32) | *s as u64,
                len: len as u64,
                ..ctx.base
            };
            let (send, recv) = (parts.next(), parts.next());
            if let (Some((peer, _)), Some(Part::Shared(data))) = (&st.send, send) {
                if !data.is_empty() {
                    xfers.push(Xfer::Send {
                        peer: *peer,
                        header: header(data.len()),
                        data,
                    });
                }
            }
            if let (Some((peer, _)), Some(Part::Mut(into))) = (&st.recv, recv) {
                if !into.is_empty() {
                    xfers.push(if st.reduce {
                        Xfer::RecvReduce {
                            peer: *peer,
                            header: header(into.len()),
                            dst: into,
                            dtype: ctx.red_dtype,
                            op: ctx.red_op,
                        }
                    } else {
                        Xfer::Recv {
                            peer: *peer,
                            header: header(into.len()),
                            buf: into,
                        }
                    });
                }
            }
        }
        ctx.exchange(&mut xfers)?;
        drop(xfers);
        for (_, _, st) in &due {
            if let Some((r, world)) = &st.divide {
                reduce::finish_avg(ctx.red_dtype, &mut buf[bytes(r, es)], *world);
            }
        }
    }
    Ok(())
}

/// A piece of a buffer cut by [`carve`].
enum Part<'b> {
    Shared(&'b [u8]),
    Mut(&'b mut [u8]),
}

/// Cuts `buf` into the byte ranges `wanted` (in that order; `true`:
/// mutable), which must not overlap (empty ones are disjoint from all).
///
/// # Panics
/// If two non-empty ranges overlap: an algorithm's invariant.
fn carve<'b>(buf: &'b mut [u8], wanted: &[(Range<usize>, bool)]) -> Vec<Part<'b>> {
    let mut order: Vec<usize> = (0..wanted.len()).collect();
    order.sort_by_key(|&i| wanted[i].0.start);
    let mut out: Vec<Option<Part<'b>>> = (0..wanted.len()).map(|_| None).collect();
    let mut rest = buf;
    let mut at = 0;
    for i in order {
        let (r, mutable) = (&wanted[i].0, wanted[i].1);
        let part = if r.is_empty() {
            &mut []
        } else {
            assert!(r.start >= at, "pipeline: overlapping ranges");
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - at);
            let (mid, tail) = tail.split_at_mut(r.len());
            rest = tail;
            at = r.end;
            mid
        };
        out[i] = Some(if mutable {
            Part::Mut(part)
        } else {
            Part::Shared(part)
        });
    }
    out.into_iter()
        .map(|p| p.expect("every range cut"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carving_keeps_the_order_asked() {
        let mut buf: Vec<u8> = (0..10).collect();
        let parts = carve(
            &mut buf,
            &[(6..8, true), (0..2, false), (3..3, true), (2..4, false)],
        );
        let view: Vec<(bool, Vec<u8>)> = parts
            .iter()
            .map(|p| match p {
                Part::Shared(s) => (false, s.to_vec()),
                Part::Mut(m) => (true, m.to_vec()),
            })
            .collect();
        assert_eq!(
            view,
            vec![
                (true, vec![6, 7]),
                (false, vec![0, 1]),
                (true, vec![]),
                (false, vec![2, 3])
            ]
        );
    }
}

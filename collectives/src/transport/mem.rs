//! The in-process transport: one mailbox per rank, holding a queue of
//! messages per sender. Sends copy the payload into the receiver's mailbox and
//! never block, so an exchange posts all its sends first and then waits for
//! its receives on a condition variable (no spinning). Thousands of ranks as
//! threads of one process run the real algorithms this way. An abort
//! through the communicator's handle wakes the rank's own mailbox.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::{Transport, Xfer};
use crate::abort::AbortSignal;
use crate::error::CommError;
use crate::reduce;
use crate::wire::{Bystander, Frame, Header, PROBE_AFTER};

enum Msg {
    Data(Header, Vec<u8>),
    /// See `wire`: "I am waiting on you in this op".
    Probe(Header),
    Abort(String),
}

#[derive(Default)]
struct Mailbox {
    queues: Mutex<HashMap<usize, VecDeque<Msg>>>,
    arrived: Condvar,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, HashMap<usize, VecDeque<Msg>>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Shared {
    boxes: Vec<Mailbox>,
    gone: Vec<AtomicBool>,
}

/// One rank's end of an in-process group.
pub(crate) struct MemTransport {
    rank: usize,
    shared: Arc<Shared>,
    abort: Arc<AbortSignal>,
}

impl MemTransport {
    /// The transports of a group of ranks, in rank order, one per abort
    /// signal (rank `r` is aborted through `aborts[r]`).
    pub fn group(aborts: &[Arc<AbortSignal>]) -> Vec<MemTransport> {
        let world = aborts.len();
        let shared = Arc::new(Shared {
            boxes: (0..world).map(|_| Mailbox::default()).collect(),
            gone: (0..world).map(|_| AtomicBool::new(false)).collect(),
        });
        aborts
            .iter()
            .enumerate()
            .map(|(rank, abort)| {
                let weak = Arc::downgrade(&shared);
                abort.on_abort(move || {
                    if let Some(shared) = weak.upgrade() {
                        let mailbox = &shared.boxes[rank];
                        // As in `leave`: the lock orders the wake-up after
                        // the waiter's check of the flag.
                        drop(mailbox.lock());
                        mailbox.arrived.notify_all();
                    }
                });
                MemTransport {
                    rank,
                    shared: shared.clone(),
                    abort: abort.clone(),
                }
            })
            .collect()
    }

    /// Why `peer`, which is gone, can't take part in `op`: the abort notice
    /// it left in this rank's mailbox, else that it was dropped.
    fn left(&self, peer: usize, op: &Header) -> CommError {
        let queues = self.shared.boxes[self.rank].lock();
        let notice = queues.get(&peer).and_then(|q| {
            q.iter().find_map(|m| match m {
                Msg::Abort(reason) => Some(reason.clone()),
                _ => None,
            })
        });
        match notice {
            Some(reason) => CommError::PeerAborted {
                rank: self.rank,
                peer,
                op: op.describe(),
                reason,
            },
            None => self.dropped(peer, op),
        }
    }

    fn dropped(&self, peer: usize, op: &Header) -> CommError {
        CommError::PeerClosed {
            rank: self.rank,
            peer,
            op: op.describe(),
            detail: String::from("its communicator was dropped"),
        }
    }

    /// `Aborted`, if the communicator's handle aborted it.
    fn check_abort(&self, op: &Header) -> Result<(), CommError> {
        match self.abort.reason() {
            Some(reason) => Err(CommError::Aborted {
                rank: self.rank,
                op: op.describe(),
                reason: reason.to_owned(),
            }),
            None => Ok(()),
        }
    }

    fn post(&self, peer: usize, msg: Msg) {
        let mailbox = &self.shared.boxes[peer];
        mailbox.lock().entry(self.rank).or_default().push_back(msg);
        mailbox.arrived.notify_one();
    }

    /// Marks this rank gone and wakes every rank that may be waiting on it.
    fn leave(&self) {
        if self.shared.gone[self.rank].swap(true, Ordering::SeqCst) {
            return;
        }
        for mailbox in &self.shared.boxes {
            // Taking the lock orders this wake-up after any waiter's check of
            // `gone`, so no waiter misses it.
            drop(mailbox.lock());
            mailbox.arrived.notify_all();
        }
    }

    fn gone(&self, peer: usize) -> bool {
        self.shared.gone[peer].load(Ordering::SeqCst)
    }

    /// The payload of the next message from `peer`, which must be `expect`.
    fn recv(&self, peer: usize, expect: &Header, deadline: Instant) -> Result<Vec<u8>, CommError> {
        let started = Instant::now();
        let mut probed = false;
        let mailbox = &self.shared.boxes[self.rank];
        let mut queues = mailbox.lock();
        loop {
            self.check_abort(expect)?;
            if let Some(msg) = queues.get_mut(&peer).and_then(VecDeque::pop_front) {
                match msg {
                    Msg::Data(header, data) => {
                        drop(queues);
                        expect.check(&Frame::Msg(header), self.rank, peer)?;
                        return Ok(data);
                    }
                    Msg::Probe(probe) => {
                        expect.check_probe(&probe, self.rank, peer)?;
                        continue;
                    }
                    Msg::Abort(reason) => {
                        return Err(CommError::PeerAborted {
                            rank: self.rank,
                            peer,
                            op: expect.describe(),
                            reason,
                        });
                    }
                }
            }
            if self.gone(peer) {
                // Its queue is empty: it left no abort notice.
                return Err(self.dropped(peer, expect));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    rank: self.rank,
                    peer,
                    op: expect.describe(),
                    what: "receiving from it",
                    waited: now - started,
                });
            }
            if !probed && now >= started + PROBE_AFTER {
                probed = true;
                drop(queues);
                self.post(peer, Msg::Probe(*expect));
                queues = mailbox.lock();
                continue;
            }
            if probed {
                self.check_bystanders(&mut queues, peer, expect)?;
            }
            let wake = if probed {
                deadline
            } else {
                deadline.min(started + PROBE_AFTER)
            };
            queues = mailbox
                .arrived
                .wait_timeout(queues, wake - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl MemTransport {
    /// Judges the first message from every sender but `peer` (see
    /// "Bystanders" in `wire`): probes are dropped, a desync or an abort is
    /// the error.
    fn check_bystanders(
        &self,
        queues: &mut HashMap<usize, VecDeque<Msg>>,
        peer: usize,
        op: &Header,
    ) -> Result<(), CommError> {
        for (&from, queue) in queues.iter_mut().filter(|(from, _)| **from != peer) {
            while let Some(front) = queue.front() {
                let frame = match front {
                    Msg::Data(h, _) => Frame::Msg(*h),
                    Msg::Probe(h) => Frame::Probe(*h),
                    Msg::Abort(reason) => {
                        return Err(CommError::PeerAborted {
                            rank: self.rank,
                            peer: from,
                            op: op.describe(),
                            reason: reason.clone(),
                        });
                    }
                };
                match op.check_bystander(&frame, self.rank, from)? {
                    Bystander::Consume => {
                        queue.pop_front();
                    }
                    Bystander::Later | Bystander::Aborted { .. } => break,
                }
            }
        }
        Ok(())
    }
}

impl Transport for MemTransport {
    fn exchange(&mut self, xfers: &mut [Xfer<'_>], deadline: Instant) -> Result<(), CommError> {
        if let Some(op) = xfers.iter().find_map(Xfer::header) {
            self.check_abort(op)?;
        }
        for xfer in xfers.iter() {
            if let Xfer::Send { peer, header, data } = xfer {
                if self.gone(*peer) {
                    return Err(self.left(*peer, header));
                }
                self.post(*peer, Msg::Data(*header, data.to_vec()));
            }
        }
        for xfer in xfers.iter_mut() {
            match xfer {
                Xfer::Recv { peer, header, buf } => {
                    buf.copy_from_slice(&self.recv(*peer, header, deadline)?);
                }
                Xfer::RecvReduce {
                    peer,
                    header,
                    dst,
                    dtype,
                    op,
                } => {
                    let data = self.recv(*peer, header, deadline)?;
                    reduce::reduce_into(*dtype, *op, dst, &data);
                }
                Xfer::Send { .. } | Xfer::Idle => {}
            }
        }
        Ok(())
    }

    fn abort(&mut self, reason: &str) {
        for peer in (0..self.shared.boxes.len()).filter(|&p| p != self.rank) {
            self.post(peer, Msg::Abort(reason.to_owned()));
        }
        self.leave();
    }
}

impl Drop for MemTransport {
    fn drop(&mut self) {
        self.leave();
    }
}

//! ZeRO's shard mirrors, for in-place recovery: under ZeRO a rank's shard
//! of the master parameters and optimizer state exists once, so every rank
//! keeps, in host memory, a copy of one other rank's shard (its buddy's:
//! the rank `offset` before it, on another node where there is one), and a
//! snapshot of its own shard as of the same step.
//!
//! Every `recovery.mirror_every` steps, after the step, each rank copies its
//! shard into a new snapshot (keeping the one before, for a rank that dies
//! while the mirrors are being refreshed) and [`Communicator::shift`]s it to the rank
//! `offset` after it, on the communication thread, while the next step's
//! forward pass runs: off the step's critical path. A mirror is replaced
//! only once the whole of the new one has arrived.
//!
//! A failed rank's state is then rebuilt as of the snapshot step: every
//! survivor rolls its shard back to its snapshot, the replacement receives
//! its shard from the rank holding its mirror, the parameters are gathered
//! into the model, and the steps since the snapshot are redone (at most the
//! step in flight with `mirror_every = 1`).

use std::sync::{Arc, Mutex};

use cohort_collectives::Communicator;

use crate::TrainError;
use crate::host::HostBuffers;
use crate::plan::Core;

/// One shard's state as of a step: the master parameters, then each
/// optimizer state vector, each padded to the longest shard.
#[derive(Clone)]
pub(crate) struct Snap {
    pub step: u64,
    /// The data loader's position at that step.
    pub position: u64,
    pub data: Arc<Vec<f32>>,
}

pub(crate) struct Mirrors {
    every: u64,
    /// This rank's mirror is of rank `rank - offset`; its own shard's is
    /// on rank `rank + offset`.
    pub offset: usize,
    /// The longest shard: every rank's padded to it.
    slot: usize,
    /// State vectors beside the parameters.
    states: usize,
    /// This rank's shard at the last refresh.
    pub own: Option<Snap>,
    /// And at the refresh before: a rank that dies while the mirrors are
    /// being refreshed leaves its mirror one refresh behind.
    pub prev: Option<Snap>,
    /// The shard of rank `rank - offset`, written by the communication
    /// thread once it has arrived whole.
    held: Arc<Mutex<Option<Snap>>>,
    /// The buffer of the mirror before, for the next one to arrive in:
    /// refreshes allocate (and fault in) nothing once running.
    spare: Arc<Mutex<Option<Vec<f32>>>>,
}

impl Mirrors {
    /// Mirrors refreshed every `every` steps, on ranks laid out `local`
    /// per node.
    pub fn new(core: &Core, states: usize, every: u64, local: usize) -> Mirrors {
        let world = core.world;
        let offset = if world > local && local > 0 { local } else { 1 };
        Mirrors {
            every: every.max(1),
            offset,
            slot: core.flat.total().div_ceil(world),
            states,
            own: None,
            prev: None,
            held: Arc::new(Mutex::new(None)),
            spare: Arc::new(Mutex::new(None)),
        }
    }

    /// Host memory the two snapshots and the mirror take.
    pub fn bytes(&self) -> u64 {
        (3 * (1 + self.states) * self.slot * std::mem::size_of::<f32>()) as u64
    }

    /// The rank holding the mirror of `rank`'s shard, in a world of
    /// `world`.
    pub fn holder_of(&self, rank: usize, world: usize) -> usize {
        (rank + self.offset) % world
    }

    /// What this rank holds of rank `rank - offset`.
    pub fn held(&self) -> Option<Snap> {
        lock(&self.held).clone()
    }

    /// Whether `step` (steps done) is one to refresh at.
    pub fn due(&self, step: u64) -> bool {
        step % self.every == 0
    }

    /// Takes this rank's snapshot as of `step` and sends it to its buddy
    /// on the communication thread (waiting for it when `wait`).
    pub fn refresh(
        &mut self,
        core: &Core,
        b: &mut HostBuffers,
        position: u64,
        wait: bool,
    ) -> Result<(), TrainError> {
        // The oldest snapshot's buffer becomes the newest.
        let mut data = self
            .prev
            .take()
            .and_then(|p| Arc::try_unwrap(p.data).ok())
            .unwrap_or_else(|| vec![0.0f32; self.slot_len()]);
        b.pack_master(self.slot, &mut data);
        let snap = Snap {
            step: core.step,
            position,
            data: Arc::new(data),
        };
        self.prev = self.own.replace(snap.clone());
        let (held, spare, offset) = (self.held.clone(), self.spare.clone(), self.offset);
        let send = move |comm: &mut Communicator, opts: &cohort_collectives::OpOptions| {
            let mut recv = lock(&spare)
                .take()
                .unwrap_or_else(|| vec![0.0f32; snap.data.len()]);
            let r = comm.shift(&snap.data, &mut recv, offset, opts);
            if r.is_ok() {
                let before = lock(&held).replace(Snap {
                    data: Arc::new(recv),
                    ..snap
                });
                if let Some(buf) = before.and_then(|b| Arc::try_unwrap(b.data).ok()) {
                    *lock(&spare) = Some(buf);
                }
            } else {
                *lock(&spare) = Some(recv);
            }
            r
        };
        if wait {
            b.run(send)
                .map_err(TrainError::comm(core.rank, "shift of the shard mirrors"))
        } else {
            // A failure breaks the communicator: the next step's collectives
            // report it.
            b.post(move |comm, opts| {
                let _ = send(comm, opts);
            });
            Ok(())
        }
    }

    /// The parameters and each state vector of the shard in `snap`, for a
    /// rank whose shard is `len` long.
    pub fn unpack(&self, snap: &Snap, len: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
        let part = |k: usize| snap.data[k * self.slot..k * self.slot + len].to_vec();
        (part(0), (1..=self.states).map(part).collect())
    }

    /// Elements of a snapshot.
    pub fn slot_len(&self) -> usize {
        (1 + self.states) * self.slot
    }

    /// This rank's snapshot of step `step`, if it has one.
    pub fn own_at(&self, step: u64) -> Option<&Snap> {
        [&self.own, &self.prev]
            .into_iter()
            .flatten()
            .find(|s| s.step == step)
    }

    /// The shard received for this rank (a replacement): its only snapshot.
    pub fn adopt(&mut self, snap: Snap) {
        self.own = Some(snap);
        self.prev = None;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

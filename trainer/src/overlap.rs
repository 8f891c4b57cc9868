//! The host path's gradient buckets, started from the gradient hooks
//! (`hooks.rs`) during the backward pass, as PyTorch DDP's reducer does:
//! buckets go in reverse order of the flat space (the last parameters'
//! gradients are the first a backward pass produces), and bucket *k* is
//! packed from the variables' `.grad` and handed to the communication
//! thread as soon as the gradient of every parameter it holds has been
//! accumulated — while autograd goes on with the earlier layers.
//!
//! Only a backward pass run with [`Launcher::arm`] (the last micro-batch of
//! a step: `DataParallel::backward`) starts buckets; those before it
//! (`DataParallel::backward_no_sync`) only accumulate. What a backward
//! pass did not start (a bucket holding a parameter the forward pass did
//! not use, or a step whose backward ran without arming) the step starts,
//! in the same order: every rank runs the same collectives in the same
//! order, whichever started them. A bucket reads the same `.grad` values
//! either way (its parameters' final ones), so the results are the same
//! bits.
//!
//! The state lives behind a mutex the hooks and the step's thread share;
//! on the CPU the hooks run on the thread that called backward, so the lock
//! is never contended.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cohort_collectives::OpKind;

use crate::TrainError;
use crate::comm::{Submitter, Tag};
use crate::flat::FlatParams;
use crate::hooks::GradHooks;
use crate::plan::{Bucket, launch_order};

/// What the hooks and the step share.
pub(crate) struct Launch {
    /// Handles to the model's variables, to read their gradients.
    flat: FlatParams,
    /// Each bucket's flat ranges and length.
    segs: Vec<(Vec<Range<usize>>, usize)>,
    /// The buckets each slot has elements in.
    slot_buckets: Vec<Vec<usize>>,
    /// The number of slots each bucket has elements of.
    slots_per_bucket: Vec<usize>,
    /// This pass: the slots of each bucket not accumulated yet.
    pending: Vec<usize>,
    /// This pass: the slots accumulated.
    fired: Vec<bool>,
    /// This step: the buckets started.
    pub started: Vec<bool>,
    /// The position in the launch order of the next bucket to start.
    next: usize,
    /// A backward pass that starts buckets is running.
    armed: bool,
    /// This step: buckets the hooks started (during backward).
    pub in_backward: usize,
    kind: OpKind,
    /// ZeRO-1: the reduced gradient buckets, kept between steps.
    pub kept: Option<Vec<Vec<f32>>>,
    /// Free bucket buffers.
    pub pool: Vec<Vec<f32>>,
    /// Buckets submitted and not yet received back.
    pub in_flight: usize,
    submitter: Submitter,
    /// This step: time packing gradients into buckets.
    pub pack: Duration,
    /// The first misuse a hook saw this step.
    error: Option<String>,
}

impl Launch {
    /// A buffer for bucket `k` without waiting: ZeRO-1's kept one, a free
    /// one, or a new one.
    pub fn take_free(&mut self, k: usize) -> Vec<f32> {
        match &mut self.kept {
            Some(kept) => std::mem::take(&mut kept[k]),
            None => self.pool.pop().unwrap_or_default(),
        }
    }

    /// Gives a received bucket buffer back.
    pub fn give_back(&mut self, k: usize, buf: Vec<f32>) {
        match &mut self.kept {
            Some(kept) => kept[k] = buf,
            None => self.pool.push(buf),
        }
    }

    /// Submits `kind` on `buf` (not a gradient bucket).
    pub fn submit(&mut self, kind: OpKind, tag: Tag, buf: Vec<f32>) {
        self.submitter.submit(kind, tag, buf);
        self.in_flight += 1;
    }

    /// The next bucket to start, in launch order.
    pub fn next_bucket(&self) -> Option<usize> {
        launch_order(self.segs.len()).nth(self.next)
    }

    /// Packs bucket `k` (the next in launch order) from the gradients into
    /// `buf` and submits its reduction.
    pub fn start(&mut self, k: usize, mut buf: Vec<f32>) {
        debug_assert_eq!(self.next_bucket(), Some(k));
        let t = Instant::now();
        let (segs, len) = &self.segs[k];
        buf.resize(*len, 0.0);
        let mut at = 0;
        for seg in segs {
            self.flat
                .read_grads(seg.clone(), &mut buf[at..at + seg.len()]);
            at += seg.len();
        }
        self.pack += t.elapsed();
        self.submit(self.kind, Tag::Grads(k), buf);
        self.started[k] = true;
        self.next += 1;
    }

    /// A hook: slot `slot`'s gradient has been accumulated.
    fn fired(&mut self, slot: usize) {
        if !self.armed {
            if self.next > 0 && self.error.is_none() {
                self.error = Some(format!(
                    "the gradient of {} was accumulated after the step's gradient reduction \
                     had started: run the backward passes of the micro-batches before the \
                     last with DataParallel::backward_no_sync, the last one with \
                     DataParallel::backward, then step",
                    self.flat.slots()[slot].name
                ));
            }
            return;
        }
        if std::mem::replace(&mut self.fired[slot], true) {
            self.error.get_or_insert_with(|| {
                format!(
                    "the gradient of {} was accumulated twice in one backward pass",
                    self.flat.slots()[slot].name
                )
            });
            return;
        }
        for &b in &self.slot_buckets[slot] {
            self.pending[b] -= 1;
        }
        while let Some(k) = self.next_bucket() {
            if self.pending[k] > 0 {
                break;
            }
            let buf = self.take_free(k);
            self.start(k, buf);
            self.in_backward += 1;
        }
    }

    /// Forgets the step in flight (its buckets went to a communicator that
    /// failed): the next step starts afresh, its collectives queued with
    /// `submitter`. Buffers that were in flight are not coming back; new
    /// ones are made as needed.
    pub fn reset(&mut self, submitter: Submitter) {
        self.submitter = submitter;
        self.in_flight = 0;
        self.armed = false;
        self.error = None;
        self.pending.clone_from(&self.slots_per_bucket);
        self.fired.fill(false);
        let _ = self.end_of_reduction();
    }

    /// The step's buckets are all started: the next step starts afresh.
    /// Returns the misuse a hook saw, if any.
    pub fn end_of_reduction(&mut self) -> Result<(), TrainError> {
        self.next = 0;
        self.started.fill(false);
        self.in_backward = 0;
        self.pack = Duration::ZERO;
        match self.error.take() {
            Some(e) => Err(TrainError::Config(e)),
            None => Ok(()),
        }
    }
}

/// The launch state and the hooks that drive it.
pub(crate) struct Launcher {
    /// Dropped first: no hook runs once the state goes.
    hooks: GradHooks,
    state: Arc<Mutex<Launch>>,
}

impl Launcher {
    /// Hooks `flat`'s variables; `kept` holds ZeRO-1's kept buckets.
    pub fn new(
        flat: &FlatParams,
        buckets: &[Bucket],
        kind: OpKind,
        kept: Option<Vec<Vec<f32>>>,
        submitter: Submitter,
    ) -> Result<Self, TrainError> {
        let n = flat.slots().len();
        let mut slot_buckets = vec![Vec::new(); n];
        let mut slots_per_bucket = Vec::with_capacity(buckets.len());
        for (k, b) in buckets.iter().enumerate() {
            let mut slots: Vec<usize> = b.segs.iter().flat_map(|s| flat.slots_in(s)).collect();
            slots.sort_unstable();
            slots.dedup();
            for &s in &slots {
                slot_buckets[s].push(k);
            }
            slots_per_bucket.push(slots.len());
        }
        let state = Arc::new(Mutex::new(Launch {
            flat: flat.shallow_clone(),
            segs: buckets.iter().map(|b| (b.segs.clone(), b.len)).collect(),
            slot_buckets,
            pending: slots_per_bucket.clone(),
            slots_per_bucket,
            fired: vec![false; n],
            started: vec![false; buckets.len()],
            next: 0,
            armed: false,
            in_backward: 0,
            kind,
            kept,
            pool: Vec::new(),
            in_flight: 0,
            submitter,
            pack: Duration::ZERO,
            error: None,
        }));
        let s = state.clone();
        let hooks = GradHooks::install(&flat.tensors(), move |slot| {
            s.lock().unwrap_or_else(|e| e.into_inner()).fired(slot);
        })
        .map_err(|e| {
            TrainError::Config(format!(
                "installing the gradient hook of parameter {}: {} (is another DataParallel \
                 wrapping this VarStore?)",
                flat.slots()[e.index].name,
                e.reason
            ))
        })?;
        Ok(Launcher { hooks, state })
    }

    pub fn lock(&self) -> MutexGuard<'_, Launch> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Before the last micro-batch's backward pass: its hooks start buckets.
    pub fn arm(&self) -> Result<(), TrainError> {
        let mut st = self.lock();
        if st.next > 0 {
            return Err(TrainError::Config(
                "DataParallel::backward ran twice without a step between: run the backward \
                 passes of the micro-batches before the last with \
                 DataParallel::backward_no_sync"
                    .into(),
            ));
        }
        let st = &mut *st;
        st.pending.clone_from(&st.slots_per_bucket);
        st.fired.fill(false);
        st.armed = true;
        Ok(())
    }

    /// After that backward pass (whether or not it succeeded).
    pub fn disarm(&self) {
        self.lock().armed = false;
    }

    /// A panic the hooks' callback raised, as an error.
    pub fn check_hooks(&self) -> Result<(), TrainError> {
        match self.hooks.take_panic() {
            Some(p) => Err(TrainError::Config(format!(
                "the gradient hook failed during the backward pass: {p}"
            ))),
            None => Ok(()),
        }
    }
}

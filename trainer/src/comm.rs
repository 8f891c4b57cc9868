//! The communication thread of the host path: owns the [`Communicator`] and
//! runs the collectives the step hands it, in order, while the step's own
//! thread packs the next bucket, unpacks finished ones and runs the
//! optimizer.
//!
//! Buffers travel by value (a `Vec` goes over, the same `Vec` comes back), so
//! neither thread ever sees memory the other is writing. A [`Submitter`]
//! queues work from another thread too (the gradient hooks, during the
//! backward pass); results always come back to the [`CommThread`] handle.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cohort_collectives::{CommError, Communicator, OpKind, OpOptions, ReduceOp};

use crate::backend::run_host;

/// What a buffer holds, so its result can be unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// Gradient bucket `k`.
    Grads(usize),
    /// Parameter bucket `k`.
    Params(usize),
    /// A whole-space vector (start, restore), returned to the caller.
    Whole,
}

/// A finished collective: its buffer back, when it started and the time it
/// took, its result.
pub struct Done {
    pub kind: OpKind,
    pub tag: Tag,
    pub buf: Vec<f32>,
    pub started: Instant,
    pub busy: Duration,
    pub result: Result<(), CommError>,
}

type Job = Box<dyn FnOnce(&mut Communicator) + Send>;

/// Queues collectives on the communication thread; cloned for the
/// gradient hooks.
#[derive(Clone)]
pub struct Submitter {
    /// `None` tells the thread to stop.
    jobs: Sender<Option<Job>>,
    done_tx: Sender<Done>,
    opts: OpOptions,
}

impl Submitter {
    fn send(&self, job: Job) {
        self.jobs
            .send(Some(job))
            .expect("the communication thread outlives its handle");
    }

    /// Queues `kind` on `buf`; its [`Done`] comes back from [`CommThread::recv`].
    pub fn submit(&self, kind: OpKind, tag: Tag, mut buf: Vec<f32>) {
        let (done, opts) = (self.done_tx.clone(), self.opts.clone());
        self.send(Box::new(move |comm| {
            let started = Instant::now();
            let result = run_host(comm, kind, &mut buf, &opts);
            let _ = done.send(Done {
                kind,
                tag,
                buf,
                started,
                busy: started.elapsed(),
                result,
            });
        }));
    }
}

/// Handle to the communication thread.
pub struct CommThread {
    submitter: Submitter,
    done: Receiver<Done>,
    handle: Option<JoinHandle<()>>,
}

impl CommThread {
    pub fn spawn(mut comm: Communicator, opts: OpOptions) -> Self {
        let rank = comm.rank();
        let (jobs_tx, jobs_rx) = channel::<Option<Job>>();
        let (done_tx, done_rx) = channel::<Done>();
        let handle = std::thread::Builder::new()
            .name(format!("cohort-comm-{rank}"))
            .spawn(move || {
                while let Ok(Some(job)) = jobs_rx.recv() {
                    job(&mut comm);
                }
            })
            .expect("spawning the communication thread");
        CommThread {
            submitter: Submitter {
                jobs: jobs_tx,
                done_tx,
                opts,
            },
            done: done_rx,
            handle: Some(handle),
        }
    }

    /// A handle that queues work from another thread.
    pub fn submitter(&self) -> Submitter {
        self.submitter.clone()
    }

    /// Queues `kind` on `buf`; its [`Done`] comes back from [`CommThread::recv`].
    pub fn submit(&self, kind: OpKind, tag: Tag, buf: Vec<f32>) {
        self.submitter.submit(kind, tag, buf);
    }

    /// The next finished [`CommThread::submit`] (in submission order).
    pub fn recv(&self) -> Done {
        self.done
            .recv()
            .expect("the communication thread outlives its handle")
    }

    /// Sums `values` over the ranks (after everything queued before it),
    /// waiting for the result; also returns the time the collective took.
    pub fn sum_f64(&self, mut values: Vec<f64>) -> (Vec<f64>, Duration, Result<(), CommError>) {
        self.run(move |comm, opts| {
            let start = Instant::now();
            let r = comm.all_reduce(&mut values, ReduceOp::Sum, opts);
            (values, start.elapsed(), r)
        })
    }

    /// Runs `f` on the communicator after everything queued before it,
    /// without waiting for it.
    pub fn post(&self, f: impl FnOnce(&mut Communicator, &OpOptions) + Send + 'static) {
        let opts = self.submitter.opts.clone();
        self.submitter.send(Box::new(move |comm| f(comm, &opts)));
    }

    /// Runs `f` on the communicator (after everything queued before it),
    /// waiting for its result.
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Communicator, &OpOptions) -> R + Send + 'static,
    ) -> R {
        let (reply, result) = channel();
        let opts = self.submitter.opts.clone();
        self.submitter.send(Box::new(move |comm| {
            let _ = reply.send(f(comm, &opts));
        }));
        result
            .recv()
            .expect("the communication thread outlives its handle")
    }
}

impl Drop for CommThread {
    /// Stops the thread after the work queued (a [`Submitter`] clone may
    /// outlive this handle) and joins it.
    fn drop(&mut self) {
        let _ = self.submitter.jobs.send(None);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

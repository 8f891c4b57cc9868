//! The communication thread of the host path: owns the [`Communicator`] and
//! runs the collectives the step hands it, in order, while the step's own
//! thread packs the next bucket, unpacks finished ones and runs the
//! optimizer.
//!
//! Buffers travel by value (a `Vec` goes over, the same `Vec` comes back), so
//! neither thread ever sees memory the other is writing.

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

/// A finished collective: its buffer back, the time it took, its result.
pub struct Done {
    pub kind: OpKind,
    pub tag: Tag,
    pub buf: Vec<f32>,
    pub busy: Duration,
    pub result: Result<(), CommError>,
}

type Job = Box<dyn FnOnce(&mut Communicator) + Send>;

/// Handle to the communication thread.
pub struct CommThread {
    jobs: Option<Sender<Job>>,
    done_tx: Sender<Done>,
    done: Receiver<Done>,
    opts: OpOptions,
    handle: Option<JoinHandle<()>>,
}

impl CommThread {
    pub fn spawn(mut comm: Communicator, opts: OpOptions) -> Self {
        let rank = comm.rank();
        let (jobs_tx, jobs_rx) = channel::<Job>();
        let (done_tx, done_rx) = channel::<Done>();
        let handle = std::thread::Builder::new()
            .name(format!("cohort-comm-{rank}"))
            .spawn(move || {
                for job in jobs_rx {
                    job(&mut comm);
                }
            })
            .expect("spawning the communication thread");
        CommThread {
            jobs: Some(jobs_tx),
            done_tx,
            done: done_rx,
            opts,
            handle: Some(handle),
        }
    }

    fn send(&self, job: Job) {
        self.jobs
            .as_ref()
            .expect("jobs channel lives until drop")
            .send(job)
            .expect("the communication thread outlives its handle");
    }

    /// Queues `kind` on `buf`; its [`Done`] comes back from [`CommThread::recv`].
    pub fn submit(&self, kind: OpKind, tag: Tag, mut buf: Vec<f32>) {
        let (done, opts) = (self.done_tx.clone(), self.opts.clone());
        self.send(Box::new(move |comm| {
            let start = Instant::now();
            let result = run_host(comm, kind, &mut buf, &opts);
            let _ = done.send(Done {
                kind,
                tag,
                buf,
                busy: start.elapsed(),
                result,
            });
        }));
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
        let (reply, result) = channel();
        let opts = self.opts.clone();
        self.send(Box::new(move |comm| {
            let start = Instant::now();
            let r = comm.all_reduce(&mut values, ReduceOp::Sum, &opts);
            let _ = reply.send((values, start.elapsed(), r));
        }));
        result
            .recv()
            .expect("the communication thread outlives its handle")
    }
}

impl Drop for CommThread {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

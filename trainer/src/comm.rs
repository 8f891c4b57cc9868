//! The communication thread: owns the [`Communicator`] and runs the bucket
//! collectives the step hands it, in order, while the step's own thread packs
//! the next bucket, unpacks finished ones and runs the optimizer.
//!
//! Buffers travel by value (a `Vec` goes over, the same `Vec` comes back), so
//! neither thread ever sees memory the other is writing.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cohort_collectives::{CommError, Communicator, OpOptions, ReduceOp};

/// What to do with a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// All-reduce, average (DDP gradients).
    AllReduceAvg,
    /// Reduce-scatter, average (ZeRO gradients).
    ReduceScatterAvg,
    /// All-gather (ZeRO parameters).
    AllGather,
    /// All-reduce, sum, of f64 scalars (grad norm, loss).
    SumScalars,
    /// Broadcast from rank 0 (initial parameters).
    Broadcast,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::AllReduceAvg => "all_reduce of a gradient bucket",
            Op::ReduceScatterAvg => "reduce_scatter of a gradient bucket",
            Op::AllGather => "all_gather of a parameter bucket",
            Op::SumScalars => "all_reduce of the step's scalars",
            Op::Broadcast => "broadcast of the initial parameters",
        }
    }
}

/// A buffer of either element type.
pub enum Buf {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

struct Job {
    op: Op,
    tag: usize,
    buf: Buf,
}

/// A finished job: its buffer back, the time the collective took, and its result.
pub struct Done {
    pub op: Op,
    pub tag: usize,
    pub buf: Buf,
    pub busy: Duration,
    pub result: Result<(), CommError>,
}

/// Handle to the communication thread.
pub struct CommThread {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
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
                for Job { op, tag, mut buf } in jobs_rx {
                    let start = Instant::now();
                    let result = run(&mut comm, op, &mut buf, &opts);
                    let done = Done {
                        op,
                        tag,
                        buf,
                        busy: start.elapsed(),
                        result,
                    };
                    if done_tx.send(done).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the communication thread");
        CommThread {
            jobs: Some(jobs_tx),
            done: done_rx,
            handle: Some(handle),
        }
    }

    /// Queues `op` on `buf`; its [`Done`] comes back from [`CommThread::recv`].
    pub fn submit(&self, op: Op, tag: usize, buf: Buf) {
        self.jobs
            .as_ref()
            .expect("jobs channel lives until drop")
            .send(Job { op, tag, buf })
            .expect("the communication thread outlives its handle");
    }

    /// The next finished job (in submission order).
    pub fn recv(&self) -> Done {
        self.done
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

fn run(comm: &mut Communicator, op: Op, buf: &mut Buf, opts: &OpOptions) -> Result<(), CommError> {
    match (op, buf) {
        (Op::AllReduceAvg, Buf::F32(b)) => comm.all_reduce(b, ReduceOp::Avg, opts),
        (Op::ReduceScatterAvg, Buf::F32(b)) => {
            comm.reduce_scatter(b, ReduceOp::Avg, opts).map(drop)
        }
        (Op::AllGather, Buf::F32(b)) => comm.all_gather(b, opts),
        (Op::Broadcast, Buf::F32(b)) => comm.broadcast(b, 0, opts),
        (Op::SumScalars, Buf::F64(b)) => comm.all_reduce(b, ReduceOp::Sum, opts),
        (op, _) => unreachable!("{op:?} submitted with the wrong buffer type"),
    }
}

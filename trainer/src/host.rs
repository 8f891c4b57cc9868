//! The host path of data parallelism (CPU tensors): DDP and ZeRO-1/2 with
//! fp32 master parameters, gradients and optimizer state in host memory,
//! and a communication thread that overlaps the collectives with packing,
//! unpacking and the optimizer.
//!
//! The step itself is `step.rs`'s; what this path does at each of its
//! points, after the micro-batches' backward passes (tch accumulates their
//! gradients in the variables):
//!
//! 1. **Reduce gradients.** The flat gradient is cut into buckets
//!    (`parallel.bucket_mb`, 25 MiB as PyTorch DDP), started last first.
//!    Bucket *k* is packed from the variables' `.grad` and handed to the
//!    communication thread: during the last micro-batch's backward pass, from
//!    the gradient hooks, as soon as its last gradient has been accumulated
//!    (`overlap.rs`), or else in the step, while this thread packs the next
//!    bucket and unpacks the buckets that came back. DDP all-reduces
//!    (average) and keeps the whole gradient; ZeRO reduce-scatters (average)
//!    and keeps only the rank's own shard. Communication hidden is the part
//!    of the gradient buckets' reduction time that ran before the backward
//!    pass ended.
//! 2. **Global norm.** Each rank sums the squares of the gradient it owns; one
//!    small all-reduce gives the global norm (and the mean loss) on every rank.
//! 3. **Clip and step.** The optimizer runs on the owned part of the flat fp32
//!    parameters with the clip factor folded into its gradient read.
//! 4. **Parameters.** DDP writes its (full) parameters back into the model.
//!    ZeRO steps its shard bucket by bucket and all-gathers each bucket's
//!    parameters on the communication thread while it steps the next one.
//!
//! ZeRO buckets are laid out so that a reduce-scatter of bucket *k* lands
//! exactly on the rank's own global shard: bucket *k* holds, for each rank
//! *r* in order, the *k*-th chunk of `bucket/world` elements of *r*'s shard
//! `shard_range(total, world, r)`. The chunk lengths then follow the same
//! "first `len % world` ranks get one more" rule as `shard_range(bucket_len,
//! world, r)`, which is where the collective leaves each rank's result.
//!
//! Memory per rank (P = parameters, B = bucket, S = state vectors):
//! DDP: P master + P gradient + S·P state + the bucket buffers (3 when the
//! step starts the buckets; as many as the backward pass starts before the
//! step receives them, up to P, with the hooks);
//! ZeRO-1: P/N master + P/N gradient + S·P/N state + P (the reduced gradient
//! buckets, kept); ZeRO-2: as ZeRO-1 but the bucket buffers instead of the P.
//! (tch's own `.grad` tensors are full size in every mode: autograd writes them.)

use std::ops::Range;
use std::time::{Duration, Instant};

use cohort_collectives::{Communicator, OpKind};
use cohort_configs::{OptimConfig, ParallelConfig, ZeroStage};
use tch::nn::VarStore;

use crate::TrainError;
use crate::comm::{CommThread, Done, Tag};
use crate::flat::FlatParams;
use crate::optim::{Optimizer, StepParams};
use crate::overlap::Launcher;
use crate::plan::{Core, Plan, Timings};
use crate::step::Buffers;

/// Bucket buffers the step keeps in flight at once (DDP and ZeRO-2).
const PIPELINE: usize = 3;

/// The host path's buffers: master parameters, gradients and optimizer
/// state over the owned range, in host memory.
pub(crate) struct HostBuffers {
    /// fp32 master parameters over `owned`.
    params: Vec<f32>,
    /// Reduced gradient over `owned`.
    grads: Vec<f32>,
    /// The bucket buffers and the gradient buckets' start, shared with the
    /// gradient hooks. Dropped before `comm`.
    launch: Launcher,
    optimizer: Optimizer,
    comm: CommThread,
    timers: Timings,
    /// This step: each gradient bucket's squared norm (of its owned part),
    /// summed in bucket order whatever order they came back in.
    bucket_sq: Vec<f64>,
    /// When the last armed backward pass ended.
    backward_end: Option<Instant>,
}

impl HostBuffers {
    /// The core, plan and buffers of `vs` on the host; see
    /// [`crate::DataParallel::new`].
    pub fn new(
        vs: &VarStore,
        comm: Communicator,
        optim: &OptimConfig,
        parallel: &ParallelConfig,
    ) -> Result<(Core, Plan, Self), TrainError> {
        let (rank, world) = (comm.rank(), comm.world_size());
        let (core, plan) = Plan::new(FlatParams::new(vs)?, rank, world, optim, parallel)?;
        let owned = plan.owned.len();
        let kept = match core.stage {
            ZeroStage::Zero1 => Some(plan.buckets.iter().map(|b| vec![0.0; b.len]).collect()),
            _ => None,
        };
        let decay = core.flat.decay_runs(plan.owned.clone());
        let comm = CommThread::spawn(comm, plan.opts.clone());
        let launch = Launcher::new(
            &core.flat,
            &plan.buckets,
            core.grad_collective(),
            kept,
            comm.submitter(),
        )?;
        let buffers = HostBuffers {
            optimizer: Optimizer::new(optim, owned, &decay),
            params: vec![0.0; owned],
            grads: vec![0.0; owned],
            launch,
            comm,
            timers: Timings::default(),
            bucket_sq: vec![0.0; plan.buckets.len()],
            backward_end: None,
        };
        Ok((core, plan, buffers))
    }

    /// Bytes of optimizer state this rank holds.
    pub fn optimizer_state_bytes(&self) -> usize {
        self.optimizer.state_bytes()
    }

    /// Names of the optimizer's per-element state vectors.
    pub fn optimizer_state_names(&self) -> &'static [&'static str] {
        self.optimizer.state_names()
    }

    /// Before the last micro-batch's backward pass: its gradient hooks
    /// start the buckets.
    pub fn arm(&mut self) -> Result<(), TrainError> {
        self.launch.arm()
    }

    /// After that backward pass.
    pub fn disarm(&mut self) {
        self.launch.disarm();
        self.backward_end = Some(Instant::now());
    }

    /// After a peer failed: the step in flight is dropped (its gradients
    /// and buckets), and the collectives go to `comm` (the next epoch's)
    /// from now on. Parameters and optimizer state are kept. The old
    /// communication thread stops once the work queued on it has failed on
    /// its broken communicator.
    pub fn reconnect(&mut self, core: &Core, plan: &Plan, comm: Communicator) {
        let thread = CommThread::spawn(comm, plan.opts.clone());
        self.launch.lock().reset(thread.submitter());
        self.comm = thread;
        core.flat.zero_grads();
        self.timers = Timings::default();
        self.bucket_sq.fill(0.0);
        self.backward_end = None;
    }

    /// Copies the master parameters, then each optimizer state vector,
    /// into consecutive `slot`-element parts of `out` (each part's tail past
    /// the owned length is left as it is).
    pub fn pack_master(&self, slot: usize, out: &mut [f32]) {
        let vectors = std::iter::once(self.params.as_slice())
            .chain(self.optimizer.states().iter().map(Vec::as_slice));
        for (k, v) in vectors.enumerate() {
            out[k * slot..k * slot + v.len()].copy_from_slice(v);
        }
    }

    /// Runs `f` on the communicator after the work queued, not waiting.
    pub fn post(
        &self,
        f: impl FnOnce(&mut Communicator, &cohort_collectives::OpOptions) + Send + 'static,
    ) {
        self.comm.post(f);
    }

    /// Runs `f` on the communicator, waiting for it.
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Communicator, &cohort_collectives::OpOptions) -> R + Send + 'static,
    ) -> R {
        self.comm.run(f)
    }

    /// The whole state (the master parameters and every optimizer state
    /// vector over the owned range) broadcast from `root` and installed,
    /// also into the model; returns the bytes that came over. Every rank
    /// holds the whole space (DDP) and calls it.
    pub fn broadcast_state(
        &mut self,
        core: &Core,
        plan: &Plan,
        root: usize,
    ) -> Result<u64, TrainError> {
        debug_assert_eq!(plan.owned.len(), core.flat.total());
        let mut vectors = vec![std::mem::take(&mut self.params)];
        vectors.extend(self.optimizer.states().iter().cloned());
        let mut bytes = 0;
        let mut back = Vec::with_capacity(vectors.len());
        for mut v in vectors {
            bytes += (v.len() * std::mem::size_of::<f32>()) as u64;
            let (v, result) = self.comm.run(move |comm, opts| {
                let r = comm.broadcast(&mut v, root, opts);
                (v, r)
            });
            result.map_err(TrainError::comm(
                core.rank,
                "broadcast of the state to a replaced rank",
            ))?;
            back.push(v);
        }
        let mut back = back.into_iter();
        self.params = back.next().expect("the parameters");
        self.optimizer
            .set_states(back.collect())
            .map_err(TrainError::Config)?;
        core.flat.write_params(plan.owned.clone(), &self.params);
        Ok(bytes)
    }

    /// A buffer for bucket `k`: ZeRO-1's kept one, else a free one from the
    /// pool, unpacking an in-flight bucket first when the pipeline is full.
    fn take_buffer(&mut self, core: &Core, plan: &Plan, k: usize) -> Result<Vec<f32>, TrainError> {
        let full = {
            let st = self.launch.lock();
            st.kept.is_none() && st.pool.is_empty() && st.in_flight >= PIPELINE
        };
        if full {
            let done = self.recv();
            self.unpack(core, plan, done)?;
        }
        Ok(self.launch.lock().take_free(k))
    }

    /// Unpacks every bucket in flight.
    fn drain(&mut self, core: &Core, plan: &Plan) -> Result<(), TrainError> {
        while self.launch.lock().in_flight > 0 {
            let done = self.recv();
            self.unpack(core, plan, done)?;
        }
        Ok(())
    }

    fn recv(&mut self) -> Done {
        let t = Instant::now();
        let done = self.comm.recv();
        self.timers.wait += t.elapsed();
        self.timers.comm += done.busy;
        if let Tag::Grads(_) = done.tag {
            self.timers.grad_comm += done.busy;
            // The part that ran while the last backward pass was running.
            let before_end = self.backward_end.map_or(Duration::ZERO, |end| {
                end.saturating_duration_since(done.started)
            });
            self.timers.grad_hidden += before_end.min(done.busy);
        }
        if done.tag != Tag::Whole {
            self.launch.lock().in_flight -= 1;
        }
        done
    }

    /// Unpacks a finished bucket and returns its buffer to the pool (or,
    /// ZeRO-1, to the kept gradient buckets).
    fn unpack(&mut self, core: &Core, plan: &Plan, done: Done) -> Result<(), TrainError> {
        let Done {
            kind,
            tag,
            buf,
            result,
            ..
        } = done;
        result.map_err(TrainError::comm(core.rank, describe(kind, tag)))?;
        let t = Instant::now();
        match tag {
            Tag::Grads(k) => {
                let b = &plan.buckets[k];
                let part = &buf[b.own_at..b.own_at + b.own.len()];
                self.grads[plan.local(&b.own)].copy_from_slice(part);
                self.bucket_sq[k] = part
                    .iter()
                    .map(|&g| f64::from(g) * f64::from(g))
                    .sum::<f64>();
            }
            Tag::Params(k) => {
                let mut at = 0;
                for seg in &plan.buckets[k].segs {
                    core.flat
                        .write_params(seg.clone(), &buf[at..at + seg.len()]);
                    at += seg.len();
                }
            }
            Tag::Whole => {}
        }
        self.timers.pack += t.elapsed();
        if let Tag::Grads(k) | Tag::Params(k) = tag {
            self.launch.lock().give_back(k, buf);
        }
        Ok(())
    }
}

/// What a host collective was, for an error.
fn describe(kind: OpKind, tag: Tag) -> &'static str {
    match (kind, tag) {
        (OpKind::ReduceScatter, Tag::Grads(_)) => "reduce_scatter of a gradient bucket",
        (_, Tag::Grads(_)) => "all_reduce of a gradient bucket",
        (_, Tag::Params(_)) => "all_gather of a parameter bucket",
        (_, Tag::Whole) => "collective of the whole parameter space",
    }
}

impl Buffers for HostBuffers {
    type Loss = f64;
    type Flat = Vec<f32>;

    fn begin_step(&mut self, _core: &Core) {
        self.timers = Timings::default();
        self.bucket_sq.fill(0.0);
    }

    /// Bucket `k` unless the backward pass started it: packed from the
    /// variables' `.grad` while earlier buckets are being reduced on the
    /// communication thread.
    fn reduce_grads(
        &mut self,
        core: &Core,
        plan: &Plan,
        k: usize,
        kind: OpKind,
    ) -> Result<(), TrainError> {
        debug_assert_eq!(kind, core.grad_collective());
        if self.launch.lock().started[k] {
            return Ok(());
        }
        let buf = self.take_buffer(core, plan, k)?;
        self.launch.lock().start(k, buf);
        Ok(())
    }

    fn grads_reduced(&mut self, core: &Core, plan: &Plan) -> Result<(), TrainError> {
        let hooks = self.launch.check_hooks();
        let misuse = {
            let mut st = self.launch.lock();
            self.timers.pack += st.pack;
            self.timers.in_backward = st.in_backward;
            st.end_of_reduction()
        };
        let drained = self.drain(core, plan);
        self.backward_end = None;
        hooks.and(misuse).and(drained)
    }

    fn sum_norm_and_loss(
        &mut self,
        core: &Core,
        _plan: &Plan,
        count_norm: bool,
        loss: Option<&f64>,
    ) -> Result<[f64; 2], TrainError> {
        let sq = if count_norm {
            self.bucket_sq.iter().fold(0.0, |sum, b| sum + b)
        } else {
            0.0
        };
        let mut values = [sq, loss.copied().unwrap_or(0.0)];
        self.sum_f64(core, &mut values)?;
        Ok(values)
    }

    fn update(&mut self, _plan: &Plan, local: Range<usize>, sp: StepParams) {
        self.optimizer.update(
            local.clone(),
            &mut self.params[local.clone()],
            &self.grads[local],
            sp,
        );
    }

    fn write_back_params(&mut self, core: &Core, plan: &Plan) {
        let t = Instant::now();
        core.flat.write_params(plan.owned.clone(), &self.params);
        self.timers.pack += t.elapsed();
    }

    /// Packs this rank's updated part of bucket `k` and all-gathers it on
    /// the communication thread while the next bucket is stepped.
    fn gather_params(&mut self, core: &Core, plan: &Plan, k: usize) -> Result<(), TrainError> {
        let mut buf = self.take_buffer(core, plan, k)?;
        let b = &plan.buckets[k];
        buf.resize(b.len, 0.0);
        buf[b.own_at..b.own_at + b.own.len()].copy_from_slice(&self.params[plan.local(&b.own)]);
        self.launch
            .lock()
            .submit(OpKind::AllGather, Tag::Params(k), buf);
        Ok(())
    }

    fn finish_step(&mut self, core: &Core, plan: &Plan) -> Result<Timings, TrainError> {
        self.drain(core, plan)?;
        Ok(self.timers)
    }

    fn zero_grads(&mut self, core: &Core) {
        core.flat.zero_grads();
    }

    fn model_params(&mut self, core: &Core) -> Vec<f32> {
        let total = core.flat.total();
        let mut all = vec![0.0; total];
        core.flat.read_params(0..total, &mut all);
        all
    }

    fn placed(&mut self, core: &Core, part: &[f32]) -> Vec<f32> {
        let mut full = vec![0.0; core.flat.total()];
        full[core.shard()].copy_from_slice(part);
        full
    }

    fn upload(&mut self, part: &[f32]) -> Vec<f32> {
        part.to_vec()
    }

    /// Runs on the communication thread and waits for it (nothing else is
    /// in flight outside a step).
    fn collective(
        &mut self,
        core: &Core,
        kind: OpKind,
        flat: &mut Vec<f32>,
        what: &'static str,
    ) -> Result<(), TrainError> {
        self.comm.submit(kind, Tag::Whole, std::mem::take(flat));
        let done = self.recv();
        *flat = done.buf;
        done.result.map_err(TrainError::comm(core.rank, what))
    }

    fn wait(&mut self, _core: &Core, _what: &'static str) -> Result<(), TrainError> {
        Ok(())
    }

    fn install_params(&mut self, core: &Core, plan: &Plan, full: Vec<f32>) {
        self.params.copy_from_slice(&full[plan.owned.clone()]);
        core.flat.write_params(0..full.len(), &full);
    }

    fn set_states(&mut self, states: Vec<Vec<f32>>) -> Result<(), String> {
        self.optimizer.set_states(states)
    }

    fn read_master(&mut self, _plan: &Plan, local: Range<usize>) -> (Vec<f32>, Vec<Vec<f32>>) {
        let params = self.params[local.clone()].to_vec();
        let states = self
            .optimizer
            .states()
            .iter()
            .map(|s| s[local.clone()].to_vec())
            .collect();
        (params, states)
    }

    fn sum_f64(&mut self, core: &Core, values: &mut [f64]) -> Result<(), TrainError> {
        let t = Instant::now();
        let (sums, busy, result) = self.comm.sum_f64(values.to_vec());
        self.timers.wait += t.elapsed();
        self.timers.comm += busy;
        result.map_err(TrainError::comm(
            core.rank,
            "all_reduce of the step's scalars",
        ))?;
        values.copy_from_slice(&sums);
        Ok(())
    }
}

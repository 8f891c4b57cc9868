//! Data parallelism must not change the result: N ranks with per-rank batch
//! B train the same model as one process with batch N·B (up to float
//! summation order), ZeRO-1/2 match DDP, gradient accumulation over
//! micro-batches matches one big batch, and the device path (flat buffers,
//! tensor optimizer: what CUDA runs) matches the host path, checkpoints
//! included, and gradient buckets reduced during the backward pass (the
//! gradient hooks) give the same bits as buckets reduced by the step.
//! Ranks are threads over the in-process transport.

use std::sync::{Arc, Mutex};

use cohort_collectives::Communicator;
use cohort_configs::{
    DataConfig, ModelConfig, ModelKind, OptimConfig, OptimKind, ParallelConfig, ZeroStage,
};
use cohort_trainer::data::{Dataset, Loader};
use cohort_trainer::{DataParallel, StepReport, model};
use tch::{Device, nn::VarStore};

/// Building a model reads the global torch RNG: one at a time.
static BUILD: Mutex<()> = Mutex::new(());

#[derive(Clone)]
struct Setup {
    world: usize,
    batch: usize,
    accum: usize,
    stage: u8,
    steps: usize,
    optim: OptimConfig,
    model: ModelConfig,
    /// Run the device path (on CPU tensors) instead of the host path.
    device_path: bool,
    /// Backward passes through `DataParallel::backward_no_sync` and, the
    /// last micro-batch's, `DataParallel::backward` (buckets reduced during
    /// it), instead of `loss.backward()`.
    overlap: bool,
    /// `parallel.bucket_mb`.
    bucket_mb: f64,
}

impl Setup {
    fn new(world: usize, batch: usize) -> Self {
        Setup {
            world,
            batch,
            accum: 1,
            stage: 0,
            steps: 4,
            optim: OptimConfig {
                lr: 3e-3,
                warmup_steps: 1,
                ..OptimConfig::default()
            },
            model: ModelConfig {
                kind: ModelKind::Gpt,
                n_layer: 2,
                n_head: 2,
                n_embd: 16,
                block_size: 8,
                vocab_size: 0,
                dropout: 0.0,
                path: None,
            },
            device_path: false,
            overlap: false,
            bucket_mb: 0.01,
        }
    }
}

struct Outcome {
    /// Final flat parameters of every rank.
    params: Vec<Vec<f32>>,
    losses: Vec<f64>,
    state_bytes: Vec<usize>,
    /// Every rank's step reports.
    reports: Vec<Vec<StepReport>>,
}

/// One rank's model (built from the shared seed, one build at a time) and
/// its `DataParallel` on the path and stage `s` asks for, with buckets of a
/// few KiB so the pipeline and the bucket layout are exercised.
fn rank_setup(
    s: &Setup,
    data: &Dataset,
    comm: Communicator,
) -> (VarStore, Box<dyn model::LanguageModel>, DataParallel) {
    let (vs, net) = {
        let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(7);
        let vs = VarStore::new(Device::Cpu);
        let net = model::build(
            &vs.root(),
            &s.model,
            data.vocab_size(),
            model::Precision::Fp32,
        )
        .unwrap();
        (vs, net)
    };
    let parallel = ParallelConfig {
        zero_stage: ZeroStage::try_from(u64::from(s.stage)).expect("stage 0, 1 or 2"),
        bucket_mb: s.bucket_mb,
        ..ParallelConfig::default()
    };
    let dp = if s.device_path {
        DataParallel::new_device_path(&vs, comm, &s.optim, &parallel).unwrap()
    } else {
        DataParallel::new(&vs, comm, &s.optim, &parallel).unwrap()
    };
    (vs, net, dp)
}

fn train(s: &Setup) -> Outcome {
    tch::set_num_threads(1);
    let data = Arc::new(Dataset::open(&DataConfig::default(), s.model.block_size, 0, 7).unwrap());
    let handles: Vec<_> = Communicator::mem_group(s.world)
        .into_iter()
        .map(|comm| {
            let (s, data) = (s.clone(), data.clone());
            std::thread::spawn(move || {
                let rank = comm.rank();
                let (_vs, net, mut dp) = rank_setup(&s, &data, comm);
                let mut loader = Loader::new(data, 7, rank, s.world, s.batch);
                let mut losses = Vec::new();
                let mut reports = Vec::new();
                for _ in 0..s.steps {
                    let mut sum = 0.0;
                    for micro in 0..s.accum {
                        let b = loader.next_batch(Device::Cpu);
                        let loss = net.loss(&b.inputs, &b.targets, true).unwrap() / s.accum as f64;
                        match (s.overlap, micro + 1 == s.accum) {
                            (false, _) => loss.backward(),
                            (true, false) => dp.backward_no_sync(&loss).unwrap(),
                            (true, true) => dp.backward(&loss).unwrap(),
                        }
                        sum += loss.double_value(&[]);
                    }
                    let report = dp.step_with_loss(sum).unwrap();
                    losses.push(report.loss.unwrap());
                    reports.push(report);
                }
                let total = dp.flat().total();
                let mut params = vec![0.0; total];
                dp.flat().read_params(0..total, &mut params);
                (params, losses, dp.optimizer_state_bytes(), reports)
            })
        })
        .collect();
    let mut out = Outcome {
        params: Vec::new(),
        losses: Vec::new(),
        state_bytes: Vec::new(),
        reports: Vec::new(),
    };
    for h in handles {
        let (p, l, b, r) = h.join().expect("rank thread panicked");
        out.params.push(p);
        out.losses = l;
        out.state_bytes.push(b);
        out.reports.push(r);
    }
    out
}

/// ‖a − b‖ / ‖b‖.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let n: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (d / n).sqrt()
}

fn assert_close(what: &str, a: &Outcome, b: &Outcome) {
    for (r, p) in a.params.iter().enumerate() {
        assert_eq!(p, &a.params[0], "{what}: rank {r} disagrees with rank 0");
    }
    let rel = rel_diff(&a.params[0], &b.params[0]);
    assert!(
        rel < 1e-5,
        "{what}: parameters differ by {rel:e} (relative)"
    );
    // The model must have moved, or the comparison proves nothing.
    let init = {
        let mut s = Setup::new(1, 1);
        s.steps = 0;
        train(&s)
    };
    assert!(
        rel_diff(&init.params[0], &b.params[0]) > 1e-3,
        "{what}: training did not move the parameters"
    );
    for (x, y) in a.losses.iter().zip(&b.losses) {
        assert!(
            (x - y).abs() < 1e-4 * y.abs(),
            "{what}: losses {:?} vs {:?}",
            a.losses,
            b.losses
        );
    }
}

/// SGD with momentum: unlike Adam, its update scales with the gradient, so
/// a sum where a mean belongs does not go unnoticed.
fn sgd(mut s: Setup) -> Setup {
    s.optim.kind = OptimKind::Sgd;
    s.optim.lr = 0.05;
    s.optim.nesterov = true;
    s
}

#[test]
fn ddp_on_n_ranks_equals_one_process_with_n_times_the_batch() {
    for n in [2, 3, 4] {
        let one = train(&Setup::new(1, 2 * n));
        let ddp = train(&Setup::new(n, 2));
        assert_close(&format!("DDP on {n} ranks"), &ddp, &one);
        let one = train(&sgd(Setup::new(1, 2 * n)));
        let ddp = train(&sgd(Setup::new(n, 2)));
        assert_close(&format!("DDP with SGD on {n} ranks"), &ddp, &one);
    }
}

#[test]
fn zero1_and_zero2_equal_ddp() {
    for (world, kind) in [(3, OptimKind::Adamw), (2, OptimKind::Sgd)] {
        let s = match kind {
            OptimKind::Adamw => Setup::new(world, 2),
            OptimKind::Sgd => sgd(Setup::new(world, 2)),
        };
        let ddp = train(&s);
        for stage in [1, 2] {
            let zero = train(&Setup { stage, ..s.clone() });
            assert_close(
                &format!("ZeRO-{stage} {kind:?} on {world} ranks"),
                &zero,
                &ddp,
            );
        }
    }
}

#[test]
fn accumulating_four_quarter_batches_equals_one_batch() {
    for world in [1, 2] {
        for opt in [|s| s, sgd] {
            let whole = train(&opt(Setup::new(world, 8)));
            let accum = train(&opt(Setup {
                accum: 4,
                ..Setup::new(world, 2)
            }));
            assert_close(&format!("accumulation on {world} ranks"), &accum, &whole);
        }
    }
}

#[test]
fn zero1_keeps_a_world_th_of_the_optimizer_state() {
    let world = 4;
    let ddp = train(&Setup {
        steps: 1,
        ..Setup::new(world, 1)
    });
    let zero = train(&Setup {
        steps: 1,
        stage: 1,
        ..Setup::new(world, 1)
    });
    let full = ddp.state_bytes[0];
    assert!(full > 0);
    for (rank, &bytes) in zero.state_bytes.iter().enumerate() {
        assert_eq!(ddp.state_bytes[rank], full);
        // Shards differ by at most one element (two f32 AdamW states).
        let ideal = full as f64 / world as f64;
        assert!(
            (bytes as f64 - ideal).abs() <= 8.0,
            "rank {rank}: {bytes} bytes of state under ZeRO-1, DDP holds {full}"
        );
    }
    assert_eq!(zero.state_bytes.iter().sum::<usize>(), full);
}

#[test]
fn the_device_path_equals_the_host_path() {
    for (world, stage, sgd_on) in [
        (1, 0, false),
        (2, 0, false),
        (3, 1, false),
        (2, 2, true),
        (3, 0, true),
    ] {
        let mut s = Setup::new(world, 2);
        s.stage = stage;
        if sgd_on {
            s = sgd(s);
        }
        let host = train(&s);
        let device = train(&Setup {
            device_path: true,
            ..s.clone()
        });
        assert_close(
            &format!("device path, world {world}, stage {stage}, sgd {sgd_on}"),
            &device,
            &host,
        );
        assert_eq!(device.state_bytes, host.state_bytes);
    }
    // Accumulation on the device path: gradients add up in the flat buffer.
    let whole = train(&Setup {
        device_path: true,
        ..Setup::new(2, 8)
    });
    let accum = train(&Setup {
        device_path: true,
        accum: 4,
        ..Setup::new(2, 2)
    });
    assert_close("device path accumulation", &accum, &whole);
}

/// A checkpoint shard written by one path restores on the other to the same
/// parameters and optimizer state (what lets a job resume on a GPU from a
/// CPU run, or the reverse).
#[test]
fn checkpoints_move_between_the_paths() {
    use cohort_checkpoint::Shard;
    // Trains 3 steps on `world` ranks (or restores `from` and trains none);
    // returns every rank's params and checkpoint shard.
    fn run(device_path: bool, stage: u8, from: Option<Vec<Shard>>) -> (Vec<Vec<f32>>, Vec<Shard>) {
        let world = 2;
        let data = Arc::new(Dataset::open(&DataConfig::default(), 8, 0, 7).unwrap());
        let s = Setup::new(world, 2);
        let handles: Vec<_> = Communicator::mem_group(world)
            .into_iter()
            .map(|comm| {
                let (s, data, from) = (s.clone(), data.clone(), from.clone());
                std::thread::spawn(move || {
                    let rank = comm.rank();
                    let s = Setup {
                        stage,
                        device_path,
                        ..s
                    };
                    let (_vs, net, mut dp) = rank_setup(&s, &data, comm);
                    match from {
                        Some(shards) => {
                            let Shard { params, states, .. } = shards[rank].clone();
                            dp.restore(3, params, states).unwrap();
                        }
                        None => {
                            let mut loader = Loader::new(data, 7, rank, world, 2);
                            for _ in 0..3 {
                                let b = loader.next_batch(Device::Cpu);
                                let loss = net.loss(&b.inputs, &b.targets, true).unwrap();
                                loss.backward();
                                dp.step_with_loss(loss.double_value(&[])).unwrap();
                            }
                        }
                    }
                    let total = dp.flat().total();
                    let mut params = vec![0.0; total];
                    dp.flat().read_params(0..total, &mut params);
                    (params, dp.checkpoint_shard().unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).unzip()
    }
    for (src_device, src_stage, dst_stage) in [(true, 1, 0), (false, 0, 2), (true, 2, 1)] {
        let (params, shards) = run(src_device, src_stage, None);
        let (restored, reshards) = run(!src_device, dst_stage, Some(shards.clone()));
        let what = format!("device path {src_device} stage {src_stage} -> stage {dst_stage}");
        assert_eq!(restored, params, "{what}: parameters");
        for (a, b) in reshards.iter().zip(&shards) {
            assert_eq!(a.range, b.range, "{what}: shard ranges");
            assert_eq!(a.params, b.params, "{what}: shard parameters");
            assert_eq!(a.states, b.states, "{what}: optimizer state");
        }
    }
}

/// The buckets the step started, on every rank, of every step.
fn in_backward(o: &Outcome) -> Vec<usize> {
    o.reports
        .iter()
        .flat_map(|r| r.iter().map(|s| s.buckets_in_backward))
        .collect()
}

#[test]
fn buckets_reduced_during_backward_give_the_same_bits() {
    for (world, stage, accum, sgd_on) in [
        (2, 0, 1, false),
        (2, 0, 3, true),
        (3, 0, 2, false),
        (2, 1, 2, false),
        (3, 2, 1, true),
    ] {
        let mut s = Setup::new(world, 2);
        (s.stage, s.accum) = (stage, accum);
        if sgd_on {
            s = sgd(s);
        }
        let what = format!("world {world}, stage {stage}, {accum} micro-batches, sgd {sgd_on}");
        let step = train(&s);
        let hooked = train(&Setup {
            overlap: true,
            ..s.clone()
        });
        // (Not assert_eq: the vectors are too long to print.)
        let first = hooked
            .params
            .iter()
            .flatten()
            .zip(step.params.iter().flatten())
            .position(|(a, b)| a != b);
        assert_eq!(first, None, "{what}: the first flat parameter that differs");
        assert_eq!(hooked.losses, step.losses, "{what}: losses");
        let grad_norms =
            |o: &Outcome| -> Vec<f64> { o.reports[0].iter().map(|r| r.grad_norm).collect() };
        assert_eq!(grad_norms(&hooked), grad_norms(&step), "{what}: grad norms");
        // Every parameter of these models is used, so the backward pass
        // started every bucket (there are several); a plain backward none.
        let counts = in_backward(&hooked);
        assert!(
            counts.iter().all(|&c| c == counts[0]) && counts[0] >= 3,
            "{what}: buckets started during backward {counts:?}"
        );
        assert!(in_backward(&step).iter().all(|&c| c == 0), "{what}");
        for r in hooked.reports.iter().chain(&step.reports).flatten() {
            assert!(r.grad_comm_hidden_s <= r.grad_comm_s, "{what}: {r:?}");
        }
        assert!(
            step.reports
                .iter()
                .flatten()
                .all(|r| r.grad_comm_hidden_s == 0.0),
            "{what}: nothing hides behind a backward pass the step did not overlap"
        );
    }
}

/// With a backward pass long enough to hide behind, the reduction time
/// measured as hidden is there, and is part of the reduction time.
#[test]
fn the_communication_hidden_is_measured_behind_the_backward_pass() {
    let mut s = Setup::new(2, 8);
    s.model.n_embd = 64;
    s.model.block_size = 32;
    s.steps = 3;
    s.overlap = true;
    let out = train(&s);
    let reports: Vec<&StepReport> = out.reports.iter().flatten().collect();
    let hidden: f64 = reports.iter().map(|r| r.grad_comm_hidden_s).sum();
    let total: f64 = reports.iter().map(|r| r.grad_comm_s).sum();
    assert!(
        hidden > 0.0 && hidden <= total,
        "hidden {hidden} of {total} s"
    );
    assert!(reports.iter().all(|r| r.hidden_comm_fraction() <= 1.0));
}

/// A parameter the forward pass never uses never fires its hook: its
/// bucket (and those after it in launch order) are started by the step,
/// with the same result.
#[test]
fn a_bucket_with_an_unused_parameter_is_started_by_the_step() {
    use cohort_configs::OptimConfig;
    use tch::nn::{self, Module};
    use tch::{Kind, Tensor};

    fn run(overlap: bool) -> (Vec<Vec<f32>>, Vec<usize>) {
        let handles: Vec<_> = Communicator::mem_group(2)
            .into_iter()
            .map(|comm| {
                std::thread::spawn(move || {
                    let rank = comm.rank();
                    let (vs, net) = {
                        let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
                        tch::manual_seed(11);
                        let vs = VarStore::new(Device::Cpu);
                        let p = vs.root();
                        let l0 = nn::linear(&p / "l0", 8, 600, Default::default());
                        // Between the layers in the flat space, in no forward pass.
                        let _unused = p.randn("unused", &[700], 0.0, 1.0);
                        let l1 = nn::linear(&p / "l1", 600, 4, Default::default());
                        let net = nn::seq().add(l0).add_fn(|x| x.relu()).add(l1);
                        (vs, net)
                    };
                    let parallel = ParallelConfig {
                        bucket_mb: 0.004, // 1,048 elements
                        ..ParallelConfig::default()
                    };
                    let optim = OptimConfig {
                        lr: 1e-2,
                        ..OptimConfig::default()
                    };
                    let mut dp = DataParallel::new(&vs, comm, &optim, &parallel).unwrap();
                    let mut started = Vec::new();
                    for step in 0..3 {
                        let x = {
                            // The global RNG, as the other tests' builds use it.
                            let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
                            tch::manual_seed(100 + step * 2 + rank as i64);
                            Tensor::randn([4, 8], (Kind::Float, Device::Cpu))
                        };
                        let loss = net.forward(&x).square().mean(Kind::Float);
                        if overlap {
                            dp.backward(&loss).unwrap();
                        } else {
                            loss.backward();
                        }
                        started.push(dp.step().unwrap().buckets_in_backward);
                    }
                    let total = dp.flat().total();
                    let mut params = vec![0.0; total];
                    dp.flat().read_params(0..total, &mut params);
                    (params, started)
                })
            })
            .collect();
        let (params, started): (Vec<_>, Vec<_>) =
            handles.into_iter().map(|h| h.join().unwrap()).unzip();
        (params, started.concat())
    }
    let (plain, none) = run(false);
    let (hooked, started) = run(true);
    assert_eq!(hooked, plain);
    assert!(none.iter().all(|&c| c == 0));
    // Flat space: l0 (0..5,400), unused (5,400..6,100), l1 (6,100..8,504),
    // in 9 buckets of 1,048. Launched last first, buckets 8, 7 and 6 hold
    // only l1 and start during backward; bucket 5 holds `unused`, so it and
    // every bucket after it in launch order wait for the step.
    assert!(
        started.iter().all(|&c| c == 3),
        "buckets started during backward {started:?}"
    );
}

#[test]
fn a_backward_after_the_synchronizing_one_is_an_error_not_stale_gradients() {
    let s = Setup::new(1, 2);
    let data = Arc::new(Dataset::open(&DataConfig::default(), s.model.block_size, 0, 7).unwrap());
    let comm = Communicator::mem_group(1).pop().unwrap();
    let (_vs, net, mut dp) = rank_setup(&s, &data, comm);
    let mut loader = Loader::new(data, 7, 0, 1, 2);
    let mut loss = || {
        let b = loader.next_batch(Device::Cpu);
        net.loss(&b.inputs, &b.targets, true).unwrap()
    };
    // Two synchronizing backward passes in one step.
    dp.backward(&loss()).unwrap();
    let err = dp.backward(&loss()).unwrap_err().to_string();
    assert!(err.contains("backward_no_sync"), "{err}");
    // A backward after the synchronizing one, outside DataParallel.
    loss().backward();
    let err = dp.step().unwrap_err().to_string();
    assert!(
        err.contains("after the step's gradient reduction had started"),
        "{err}"
    );
    // The next step is clean again.
    dp.backward_no_sync(&loss()).unwrap();
    dp.backward(&loss()).unwrap();
    dp.step().unwrap();
}

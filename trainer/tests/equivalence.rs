//! Data parallelism must not change the result: N ranks with per-rank batch
//! B train the same model as one process with batch N·B (up to float
//! summation order), ZeRO-1/2 match DDP, and gradient accumulation over
//! micro-batches matches one big batch. Ranks are threads over the
//! in-process transport.

use std::sync::{Arc, Mutex};

use cohort_collectives::Communicator;
use cohort_configs::{DataConfig, ModelConfig, ModelKind, OptimConfig, OptimKind, ParallelConfig};
use cohort_trainer::data::{Dataset, Loader};
use cohort_trainer::{DataParallel, model};
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
            },
        }
    }
}

struct Outcome {
    /// Final flat parameters of every rank.
    params: Vec<Vec<f32>>,
    losses: Vec<f64>,
    state_bytes: Vec<usize>,
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
                let (vs, net) = {
                    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
                    tch::manual_seed(7);
                    let vs = VarStore::new(Device::Cpu);
                    let net = model::build(&vs.root(), &s.model, data.vocab_size());
                    (vs, net)
                };
                let parallel = ParallelConfig {
                    zero_stage: s.stage,
                    // A few KiB: many buckets, so the pipeline and the bucket
                    // layout are exercised.
                    bucket_mb: 0.01,
                    ..ParallelConfig::default()
                };
                let mut dp = DataParallel::new(&vs, comm, &s.optim, &parallel).unwrap();
                let mut loader = Loader::new(data, 7, rank, s.world, s.batch);
                let mut losses = Vec::new();
                for _ in 0..s.steps {
                    let mut sum = 0.0;
                    for _ in 0..s.accum {
                        let b = loader.next_batch(Device::Cpu);
                        let loss = net.loss(&b.inputs, &b.targets, true) / s.accum as f64;
                        loss.backward();
                        sum += loss.double_value(&[]);
                    }
                    losses.push(dp.step_with_loss(sum).unwrap().loss.unwrap());
                }
                let total = dp.flat().total();
                let mut params = vec![0.0; total];
                dp.flat().read_params(0..total, &mut params);
                (params, losses, dp.optimizer_state_bytes())
            })
        })
        .collect();
    let mut out = Outcome {
        params: Vec::new(),
        losses: Vec::new(),
        state_bytes: Vec::new(),
    };
    for h in handles {
        let (p, l, b) = h.join().expect("rank thread panicked");
        out.params.push(p);
        out.losses = l;
        out.state_bytes.push(b);
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

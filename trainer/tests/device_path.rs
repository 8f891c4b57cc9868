//! The device path (flat buffers, what CUDA runs; here on CPU tensors)
//! against what a program using the public `DataParallel` API may do: set
//! the gradients to none between steps, as `tch::nn::Optimizer::zero_grad`
//! does (libtorch's `set_to_none`). The next backward then allocates fresh
//! gradients that no longer alias the flat buffer the step reduces; the
//! step must notice, not step on zeros.

use std::sync::Arc;

use cohort_collectives::Communicator;
use cohort_configs::{DataConfig, ModelConfig, ModelKind, OptimConfig, ParallelConfig, ZeroStage};
use cohort_trainer::data::{Dataset, Loader};
use cohort_trainer::{DataParallel, model};
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, nn::VarStore};

/// Models are built from the global torch RNG: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A one-layer GPT on CPU tensors, from a fixed seed, and its data.
fn small_gpt() -> (Arc<Dataset>, VarStore, Box<dyn model::LanguageModel>) {
    let cfg = ModelConfig {
        kind: ModelKind::Gpt,
        n_layer: 1,
        n_head: 2,
        n_embd: 16,
        block_size: 8,
        vocab_size: 0,
        dropout: 0.0,
        path: None,
    };
    let data = Arc::new(Dataset::open(&DataConfig::default(), cfg.block_size, 0, 7).unwrap());
    tch::manual_seed(7);
    let vs = VarStore::new(Device::Cpu);
    let net = model::build(&vs.root(), &cfg, data.vocab_size(), model::Precision::Fp32).unwrap();
    (data, vs, net)
}

/// Final parameters and per-step losses and grad norms of 4 steps on one
/// rank, calling `Optimizer::zero_grad` before each backward or not.
fn run(stage: u8, zero_grad_to_none: bool) -> (Vec<f32>, Vec<(f64, f64)>) {
    tch::set_num_threads(1);
    let (data, vs, net) = small_gpt();
    let parallel = ParallelConfig {
        zero_stage: ZeroStage::try_from(u64::from(stage)).expect("stage 0, 1 or 2"),
        ..ParallelConfig::default()
    };
    let comm = Communicator::mem_group(1).remove(0);
    let mut dp =
        DataParallel::new_device_path(&vs, comm, &OptimConfig::default(), &parallel).unwrap();
    // A second optimizer over the same variables, used only for zero_grad.
    let mut other = tch::nn::Sgd::default().build(&vs, 0.0).unwrap();
    let mut loader = Loader::new(data, 7, 0, 1, 4);
    let mut history = Vec::new();
    for _ in 0..4 {
        if zero_grad_to_none {
            other.zero_grad();
        }
        let b = loader.next_batch(Device::Cpu);
        let loss = net.loss(&b.inputs, &b.targets, true).unwrap();
        loss.backward();
        let r = dp
            .step_with_loss_tensor(&loss.to_kind(Kind::Double))
            .unwrap();
        history.push((r.loss.unwrap(), r.grad_norm));
    }
    let total = dp.flat().total();
    let mut params = vec![0.0; total];
    dp.flat().read_params(0..total, &mut params);
    (params, history)
}

#[test]
fn gradients_set_to_none_between_steps_are_realiased_not_lost() {
    let _one = serial();
    for stage in [0, 2] {
        let (want_params, want) = run(stage, false);
        let (params, got) = run(stage, true);
        assert!(
            got.iter().all(|&(_, norm)| norm > 0.0),
            "zero stage {stage}: a step ran on zeroed gradients: {got:?}"
        );
        assert_eq!(got, want, "zero stage {stage}: losses and grad norms");
        assert_eq!(params, want_params, "zero stage {stage}: final parameters");
    }
}

/// Every collective the device path enqueues is waited for under the
/// watchdog before the host reads device memory: the initial broadcast at
/// once, the gradient collectives by the step's scalar read, the ZeRO
/// all-gathers by the next wait (a checkpoint, an evaluation, the next
/// step), a restore's all-gathers before it returns.
#[test]
fn every_collective_is_waited_for_under_the_watchdog() {
    let _one = serial();
    let (data, vs, net) = small_gpt();
    let parallel = ParallelConfig {
        zero_stage: ZeroStage::Zero2,
        bucket_mb: 0.01,
        ..ParallelConfig::default()
    };
    let comm = Communicator::mem_group(1).remove(0);
    let mut dp =
        DataParallel::new_device_path(&vs, comm, &OptimConfig::default(), &parallel).unwrap();
    assert_eq!(dp.collectives_in_flight(), 0, "the initial broadcast");
    let mut loader = Loader::new(data, 7, 0, 1, 4);
    let b = loader.next_batch(Device::Cpu);
    net.loss(&b.inputs, &b.targets, true).unwrap().backward();
    dp.step().unwrap();
    assert!(
        dp.collectives_in_flight() > 0,
        "the ZeRO all-gathers run on"
    );
    let shard = dp.checkpoint_shard().unwrap();
    assert_eq!(dp.collectives_in_flight(), 0, "a checkpoint waits for them");
    dp.restore(1, shard.params.clone(), shard.states.clone())
        .unwrap();
    assert_eq!(
        dp.collectives_in_flight(),
        0,
        "a restore waits for its all-gathers"
    );
    net.loss(&b.inputs, &b.targets, true).unwrap().backward();
    dp.step().unwrap();
    dp.wait_for_collectives().unwrap();
    assert_eq!(dp.collectives_in_flight(), 0);
}

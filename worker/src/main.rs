//! `cohort-worker`: the process `cohort launch` starts for every rank, and the
//! only cohort binary that links libtorch.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cohort-worker",
    version,
    about = "cohort's training worker (started by `cohort launch`)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print what libtorch this process loaded, and its CUDA devices, as JSON (used by `cohort doctor`).
    Probe,
    /// Train a small MLP in this one process and print the falling loss.
    DemoMlp {
        /// Optimizer steps.
        #[arg(long, default_value_t = 300)]
        steps: usize,
    },
    /// Train the job a resolved config describes, as one rank of it (the
    /// rank and world come from the launcher's env contract; without it,
    /// a single process).
    Train {
        /// The job config (`cohort launch` passes the resolved one from the job's log dir).
        #[arg(long)]
        config: std::path::PathBuf,
        /// The config file as the user named it, for errors [default: --config].
        #[arg(long)]
        source: Option<String>,
    },
}

fn main() -> ExitCode {
    // SIGPIPE stays ignored (Rust's default): the worker talks gRPC to the
    // coordinator's store, and a vectored write (writev) to a connection
    // the coordinator has closed would otherwise kill it with SIGPIPE. If
    // its launcher is gone, its next println! fails and it exits.
    // A SIGSEGV or SIGBUS sent to it kills it the first time.
    cohort_launcher::fatal::default_for_sent_signals();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Probe => probe(),
        Command::DemoMlp { steps } => demo_mlp(steps),
        Command::Train { config, source } => train(&config, source.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            if is_permanent(&e) {
                ExitCode::from(cohort_contract::exit::PERMANENT_FAILURE as u8)
            } else if e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<cohort_trainer::TrainError>(),
                    Some(cohort_trainer::TrainError::RecoveryFailed(_))
                )
            }) {
                ExitCode::from(cohort_contract::exit::RECOVERY_FAILED as u8)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `e` and its causes on one line, each cause once.
fn describe(e: &anyhow::Error) -> String {
    cohort_contract::error_chain(e.as_ref())
}

/// Whether `e` is a failure a restart can't fix (see
/// `cohort_contract::exit::PERMANENT_FAILURE`): a config that does not
/// load, or a trainer error on the job's configuration or input.
fn is_permanent(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.is::<cohort_configs::ConfigError>()
            || cause
                .downcast_ref::<cohort_trainer::TrainError>()
                .is_some_and(cohort_trainer::TrainError::is_permanent)
    }) || cohort_trainer::is_disk_full(e.as_ref())
}

/// One rank of a training job; the only place the worker reads its
/// environment ([`WorkerEnv::from_env`]), handing the values down. With
/// `WORLD_SIZE` > 1 the ranks find each other through the coordinator's
/// store, or through a directory shared by every rank when `COHORT_STORE_DIR`
/// is set (to run workers by hand, without `cohort launch`).
/// `COHORT_RESUME=auto|never|PATH` picks the checkpoint to resume from
/// (default auto: the newest in `checkpoint.dir` that verifies).
fn train(config: &std::path::Path, source: Option<&str>) -> anyhow::Result<()> {
    use anyhow::Context;
    use cohort_contract::WorkerEnv;
    use cohort_trainer::recover::Recovery;
    use cohort_trainer::train::run_recovering;

    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let job = cohort_configs::JobConfig::load(config, &[])?;
    let env = WorkerEnv::from_env()?;
    let store = cohort_launcher::worker_store(&env).context(
        "finding the other ranks (run under `cohort launch`, or set COHORT_STORE_DIR to a directory shared by every rank)",
    )?;
    let device = cohort_trainer::train::resolve_device(job.train.device, env.local_rank)?;
    // In-place recovery, for a job of several ranks (the failed rank's
    // agent writes the notices into their store).
    let mut recovery = match &store {
        Some(store) if job.recovery.mode == cohort_configs::RecoveryMode::Peer => Some(
            Recovery::new(store.clone(), &env, job.parallel.transport, &job.recovery),
        ),
        _ => None,
    };
    let comm = match &mut recovery {
        // A replacement joins the epoch the survivors moved to.
        Some(r) if r.is_replacement() => r.connect()?.into(),
        _ => {
            let (comm, why) = cohort_trainer::connect_backend(
                &env,
                store.as_deref(),
                job.parallel.backend,
                job.parallel.transport,
                device,
            )?;
            if env.rank == 0 {
                println!("collectives: {} ({why})", comm.backend());
            }
            comm
        }
    };
    let source = source.map_or_else(|| config.display().to_string(), str::to_owned);
    // No rank in the message: the launcher prefixes it, and shows an error
    // every rank hit alike once.
    let summary =
        run_recovering(&job, &env, comm, recovery).with_context(|| format!("training {source}"))?;
    if env.rank == 0 {
        println!(
            "done: {} steps, final loss {}{}",
            summary.steps,
            summary
                .final_loss
                .map_or("n/a".into(), |l| format!("{l:.4}")),
            summary
                .eval_loss
                .map_or(String::new(), |l| format!(", eval loss {l:.4}"))
        );
    }
    Ok(())
}

/// What `cohort doctor` reports about libtorch: the version of the library
/// this process actually loaded (read from the torch package it came from),
/// where it was loaded from, and the CUDA devices libtorch sees.
fn probe() -> anyhow::Result<()> {
    let lib = loaded_library("libtorch_cpu.so");
    let version = lib
        .as_ref()
        .and_then(|p| p.parent()?.parent().map(|torch| torch.join("version.py")))
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("__version__"))?;
            Some(line.split('\'').nth(1)?.to_owned())
        });
    let info = serde_json::json!({
        "libtorch_version": version,
        "libtorch_built_for": option_env!("COHORT_TORCH_VERSION"),
        "libtorch_path": lib,
        "cuda_available": tch::Cuda::is_available(),
        "cuda_devices": tch::Cuda::device_count(),
        "cudnn_available": tch::Cuda::cudnn_is_available(),
        "threads": tch::get_num_threads(),
    });
    println!("{info}");
    Ok(())
}

/// The path of a shared library mapped into this process, from /proc/self/maps.
fn loaded_library(name: &str) -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|path| path.rsplit('/').next() == Some(name))
        .map(std::path::PathBuf::from)
}

/// A single-process tch training: a 2-hidden-layer MLP learns to classify
/// points of three interleaved spirals (a task a linear model can't solve),
/// with Adam, printing the loss and accuracy as they improve.
fn demo_mlp(steps: usize) -> anyhow::Result<()> {
    use tch::nn::{self, Module, OptimizerConfig};
    use tch::{Device, Kind, Tensor};

    tch::manual_seed(0);
    let (classes, per_class) = (3i64, 400i64);
    let n = classes * per_class;
    let label = Tensor::arange(classes, (Kind::Int64, Device::Cpu))
        .repeat_interleave_self_int(per_class, 0, None);
    let radius =
        Tensor::linspace(0.05, 1.0, per_class, (Kind::Float, Device::Cpu)).repeat([classes]);
    let angle = label.to_kind(Kind::Float) * (2.0 * std::f64::consts::PI / classes as f64)
        + &radius * 4.0
        + Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.15;
    let x = Tensor::stack(&[&radius * angle.cos(), &radius * angle.sin()], 1);

    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let model = nn::seq()
        .add(nn::linear(&root / "fc1", 2, 64, Default::default()))
        .add_fn(|t| t.relu())
        .add(nn::linear(&root / "fc2", 64, 64, Default::default()))
        .add_fn(|t| t.relu())
        .add(nn::linear(&root / "fc3", 64, classes, Default::default()));
    let mut opt = nn::Adam::default().build(&vs, 1e-2)?;
    println!(
        "demo: {n} points of {classes} spirals, MLP 2-64-64-{classes}, Adam lr 1e-2, {steps} full-batch steps"
    );
    for step in 1..=steps {
        let logits = model.forward(&x);
        let loss = logits.cross_entropy_for_logits(&label);
        opt.backward_step(&loss);
        if step == 1 || step % 25 == 0 || step == steps {
            let acc = logits
                .argmax(1, false)
                .eq_tensor(&label)
                .to_kind(Kind::Float)
                .mean(Kind::Float);
            println!(
                "step {step:>4}  loss {:.4}  accuracy {:.1}%",
                loss.double_value(&[]),
                100.0 * acc.double_value(&[])
            );
        }
    }
    Ok(())
}

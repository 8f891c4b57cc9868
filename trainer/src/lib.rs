//! cohort trainer: data-parallel training on tch with DDP and ZeRO-1/2.
//!
//! Two ways in:
//! - the built-in trainer ([`train::run`]) that `cohort launch CONFIG.toml`
//!   runs through `cohort-worker train`: built-in models ([`model`]), data
//!   ([`data`]), metrics, checkpoints, all from a [`cohort_configs::JobConfig`];
//! - the library, for your own training program: read the env contract
//!   ([`WorkerEnv::from_env`]), [`connect`], wrap your `VarStore` in a
//!   [`DataParallel`], and call [`DataParallel::step`] once per step after
//!   your backward passes.
//!
//! ```no_run
//! use cohort_trainer::{DataParallel, WorkerEnv};
//! use cohort_configs::{OptimConfig, ParallelConfig, ZeroStage};
//! use tch::{nn, nn::Module, Device, Kind, Tensor};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Under `cohort launch -- my-program`, RANK, WORLD_SIZE and the job token
//! // come from the launcher, and the ranks find each other through the store
//! // of `cohort_launcher::worker_store(&env)?`; run alone, this is a world
//! // of one and no store is needed.
//! let env = WorkerEnv::from_env()?;
//! let comm = cohort_trainer::connect(&env, None)?;
//!
//! tch::manual_seed(0); // the same initial model on every rank
//! let vs = nn::VarStore::new(Device::Cpu);
//! let net = nn::seq()
//!     .add(nn::linear(vs.root() / "l1", 16, 64, Default::default()))
//!     .add_fn(|x| x.relu())
//!     .add(nn::linear(vs.root() / "l2", 64, 1, Default::default()));
//!
//! let optim = OptimConfig { lr: 1e-3, ..OptimConfig::default() };
//! // DDP, ZeRO-1 or ZeRO-2; gradient buckets of bucket_mb MiB.
//! let parallel = ParallelConfig { zero_stage: ZeroStage::Zero1, ..ParallelConfig::default() };
//! let mut dp = DataParallel::new(&vs, comm, &optim, &parallel)?;
//!
//! for _ in 0..100 {
//!     // Each rank feeds its own part of the global batch.
//!     let x = Tensor::randn([32, 16], (Kind::Float, Device::Cpu));
//!     let y = x.sum_dim_intlist(1, true, Kind::Float);
//!     let loss = net.forward(&x).mse_loss(&y, tch::Reduction::Mean);
//!     // backward, reduce gradients across ranks, clip, optimizer step,
//!     // parameters updated (and gathered, under ZeRO).
//!     let report = dp.backward_and_step(&loss)?;
//!     if dp.rank() == 0 {
//!         println!("step {} loss {:.4}", report.step, report.loss.unwrap_or(f64::NAN));
//!     }
//! }
//! # Ok(()) }
//! ```

mod backend;
mod checkpointer;
mod comm;
mod connect;
pub mod data;
mod device;
mod error;
pub mod flat;
pub mod hooks;
mod host;
mod metrics;
mod mirror;
pub mod model;
pub mod optim;
mod overlap;
mod parallel;
mod plan;
pub mod recover;
mod step;
pub mod train;

pub use backend::Collectives;
pub use cohort_contract::WorkerEnv;
pub(crate) use cohort_contract::error_chain as describe_error;
pub use connect::{connect, connect_backend, connect_in_epoch};
pub use error::{TrainError, is_disk_full};
pub use parallel::{DataParallel, Held, PeerState, StepReport, Synced, ZeroStage};
pub use tch;

//! The worker side of the launcher's env contract (see ARCHITECTURE.md):
//! `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `COHORT_RESTART_COUNT`,
//! `COHORT_LOG_DIR`, `COHORT_STATUS_FILE`. Without them a program runs as a
//! single process (world 1), so the same binary trains alone or in a job.

use std::path::PathBuf;

use cohort_collectives::backend::{self, Backend, BackendRequest};
use cohort_collectives::nccl::{self, NcclCommunicator};
use cohort_collectives::{Communicator, MemStore, Store, TcpConfig, collective_timeout_from_env};
use tch::Device;

use crate::{Collectives, TrainError};

/// Where this worker sits in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world: usize,
    /// Workers on this node (`LOCAL_WORLD_SIZE`; 1 when unset).
    pub local_world: usize,
    /// How many times the job has restarted (0 on the first run).
    pub restart_count: u64,
    /// The job's log directory (rank 0 writes `metrics.jsonl` there).
    pub log_dir: Option<PathBuf>,
    /// File the worker replaces with its progress every step.
    pub status_file: Option<PathBuf>,
}

impl DistEnv {
    /// Reads the env contract; a single process when `WORLD_SIZE` is unset.
    pub fn from_env() -> Result<Self, TrainError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`DistEnv::from_env`], reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, TrainError> {
        let num = |name: &'static str, default: u64| -> Result<u64, TrainError> {
            match get(name).filter(|v| !v.is_empty()) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|e: std::num::ParseIntError| TrainError::Env {
                        name,
                        value: v.clone(),
                        reason: format!("{e}: expected a non-negative integer"),
                    }),
            }
        };
        let world = num("WORLD_SIZE", 1)? as usize;
        let rank = num("RANK", 0)? as usize;
        if world == 0 || rank >= world {
            return Err(TrainError::Env {
                name: "RANK",
                value: rank.to_string(),
                reason: format!("must be below WORLD_SIZE={world} (and WORLD_SIZE at least 1)"),
            });
        }
        let path = |name: &str| get(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        Ok(DistEnv {
            rank,
            local_rank: num("LOCAL_RANK", rank as u64)? as usize,
            world,
            local_world: (num("LOCAL_WORLD_SIZE", 1)? as usize).max(1),
            restart_count: num("COHORT_RESTART_COUNT", 0)?,
            log_dir: path("COHORT_LOG_DIR"),
            status_file: path("COHORT_STATUS_FILE"),
        })
    }

    /// A communicator for this worker: an in-process one for world 1, else
    /// TCP bootstrapped through `store` (the launcher's
    /// `cohort_launcher::store_from_env()`, or a `FileStore`).
    pub fn connect(&self, store: Option<&dyn Store>) -> Result<Communicator, TrainError> {
        if self.world == 1 {
            return Ok(Communicator::mem_group(1).remove(0));
        }
        let store = store.ok_or_else(|| self.no_store())?;
        let cfg = TcpConfig::from_env().map_err(TrainError::comm(
            self.rank,
            "reading the TCP transport settings",
        ))?;
        Communicator::connect_tcp(store, self.rank, self.world, &cfg)
            .map_err(TrainError::comm(self.rank, "connecting to the other ranks"))
    }

    /// Why a world of more than one rank can't connect without a store.
    fn no_store(&self) -> TrainError {
        TrainError::Config(format!(
            "WORLD_SIZE={} needs a store to find the other ranks: run under `cohort launch`",
            self.world
        ))
    }

    /// The collectives for training on `device` with `parallel.backend` =
    /// `request` (see `cohort_collectives::backend::choose`), connected; and
    /// why that backend. NCCL ranks bootstrap through `store` (a world of
    /// one needs none) and use the op timeout `COHORT_COLLECTIVE_TIMEOUT_S`.
    pub fn connect_backend(
        &self,
        store: Option<&dyn Store>,
        request: &str,
        device: Device,
    ) -> Result<(Collectives, String), TrainError> {
        let request: BackendRequest = request
            .parse()
            .map_err(|e| TrainError::Config(format!("parallel.backend: {e}")))?;
        let cuda = matches!(device, Device::Cuda(_));
        let gpus = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
        let usable = if !cuda {
            Err("not needed".into())
        } else if self.local_world > gpus {
            Err(format!(
                "{} workers on this node share {gpus} GPU(s), and NCCL needs one GPU per rank",
                self.local_world
            ))
        } else {
            nccl::probe().map(|r| r.nccl.version)
        };
        let (backend, why) =
            backend::choose(request, cuda, usable.as_deref().map_err(String::as_str))
                .map_err(TrainError::Config)?;
        let comm = match (backend, device) {
            (Backend::Nccl, Device::Cuda(ordinal)) => {
                let timeout = collective_timeout_from_env().map_err(TrainError::comm(
                    self.rank,
                    "reading the collective timeout",
                ))?;
                let own;
                let store = match store {
                    Some(s) => s,
                    None if self.world == 1 => {
                        own = MemStore::new();
                        &own
                    }
                    None => return Err(self.no_store()),
                };
                NcclCommunicator::connect(store, self.rank, self.world, ordinal, timeout)
                    .map_err(TrainError::comm(self.rank, "joining the NCCL communicator"))?
                    .into()
            }
            _ => self.connect(store)?.into(),
        };
        Ok((comm, why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU `auto` and `tcp` connect over TCP (here a world of one,
    /// in-process); `nccl` is refused with the reason before anything starts.
    #[test]
    fn backends_for_cpu_training() {
        let env = DistEnv::from_lookup(|_| None).unwrap();
        for request in ["auto", "tcp"] {
            let (comm, why) = env.connect_backend(None, request, Device::Cpu).unwrap();
            assert_eq!(comm.backend(), Backend::Tcp, "{why}");
        }
        let err = env
            .connect_backend(None, "nccl", Device::Cpu)
            .err()
            .expect("nccl on the CPU is refused")
            .to_string();
        assert!(err.contains("needs CUDA tensors"), "{err}");
        let err = env
            .connect_backend(None, "gloo", Device::Cpu)
            .err()
            .expect("an unknown backend is refused")
            .to_string();
        assert!(
            err.contains("parallel.backend") && err.contains("gloo"),
            "{err}"
        );
    }

    #[test]
    fn no_env_is_a_single_process() {
        let env = DistEnv::from_lookup(|_| None).unwrap();
        assert_eq!((env.rank, env.world, env.restart_count), (0, 1, 0));
        assert!(env.log_dir.is_none());
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = DistEnv::from_lookup(|n| (n == "WORLD_SIZE").then(|| "two".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("WORLD_SIZE=\"two\""), "{err}");
        let err = DistEnv::from_lookup(|n| match n {
            "WORLD_SIZE" => Some("2".into()),
            "RANK" => Some("2".into()),
            _ => None,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("below WORLD_SIZE=2"), "{err}");
    }
}

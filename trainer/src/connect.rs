//! Connecting a worker to the other ranks of its job, from its
//! [`WorkerEnv`] (the launcher's env contract, read by the worker binary
//! or your own program with `WorkerEnv::from_env`) and the store they
//! bootstrap through (`cohort_launcher::worker_store`).

use cohort_collectives::backend::{self, Backend, BackendRequest};
use cohort_collectives::nccl::{self, NcclCommunicator};
use cohort_collectives::{Communicator, MemStore, PrefixStore, Store, TcpConfig, TransportKind};
use cohort_configs::{BackendChoice, TransportChoice};
use cohort_contract::WorkerEnv;
use tch::Device;

use crate::{Collectives, TrainError};

/// A communicator for this worker: an in-process one for a world of one,
/// else bootstrapped through `store` (`cohort_launcher::worker_store`, or a
/// `FileStore`) and authenticated with the job token: shared memory with
/// the ranks on this host, TCP with the others.
pub fn connect(env: &WorkerEnv, store: Option<&dyn Store>) -> Result<Communicator, TrainError> {
    connect_over(env, store, TransportKind::Auto)
}

/// As [`connect`], reaching the other ranks over `transport`.
fn connect_over(
    env: &WorkerEnv,
    store: Option<&dyn Store>,
    transport: TransportKind,
) -> Result<Communicator, TrainError> {
    if env.world == 1 {
        return Ok(Communicator::mem_group(1).remove(0));
    }
    let store = store.ok_or_else(|| no_store(env))?;
    let cfg = tcp_config(env, transport)?;
    Communicator::connect_tcp(store, env.rank, env.world, &cfg)
        .map_err(TrainError::comm(env.rank, "connecting to the other ranks"))
}

/// A host-memory communicator for communicator epoch `epoch` (see
/// `cohort_contract::recovery`): bootstrapped under the epoch's prefix of
/// `store` (epoch 0: none), over `transport`, waiting up to `timeout` for
/// the other ranks.
pub fn connect_in_epoch(
    env: &WorkerEnv,
    store: &std::sync::Arc<dyn Store>,
    epoch: u64,
    transport: TransportChoice,
    timeout: std::time::Duration,
) -> Result<Communicator, TrainError> {
    let cfg = TcpConfig {
        connect_timeout: timeout,
        ..tcp_config(env, transport_kind(transport))?
    };
    let what = "connecting to the other ranks of the new epoch";
    if epoch == 0 {
        return Communicator::connect_tcp(store, env.rank, env.world, &cfg)
            .map_err(TrainError::comm(env.rank, what));
    }
    let scoped = PrefixStore::new(
        cohort_contract::recovery::epoch_prefix(epoch),
        store.clone(),
    )
    .map_err(|e| TrainError::Config(format!("the store prefix of epoch {epoch}: {e}")))?;
    Communicator::connect_tcp(&scoped, env.rank, env.world, &cfg)
        .map_err(TrainError::comm(env.rank, what))
}

/// The TCP config of `env`'s collectives (token, host, op timeout) over
/// `transport`.
fn tcp_config(env: &WorkerEnv, transport: TransportKind) -> Result<TcpConfig, TrainError> {
    let comm = &env.comm;
    Ok(TcpConfig {
        transport,
        ..TcpConfig::new(
            comm.token()?.as_bytes(),
            comm.host.as_deref(),
            comm.op_timeout(),
        )
    })
}

fn transport_kind(choice: TransportChoice) -> TransportKind {
    match choice {
        TransportChoice::Auto => TransportKind::Auto,
        TransportChoice::Tcp => TransportKind::Tcp,
        TransportChoice::Shm => TransportKind::Shm,
    }
}

/// Why a world of more than one rank can't connect without a store.
fn no_store(env: &WorkerEnv) -> TrainError {
    TrainError::Config(format!(
        "WORLD_SIZE={} needs a store to find the other ranks: run under `cohort launch`",
        env.world
    ))
}

/// The collectives for training on `device` with `parallel.backend` =
/// `request` (see `cohort_collectives::backend::choose`), connected; and
/// why that backend. NCCL ranks bootstrap through `store` (a world of one
/// needs none) and use the op timeout of `env.comm`; host-memory ranks
/// reach each other over `parallel.transport` = `transport`.
pub fn connect_backend(
    env: &WorkerEnv,
    store: Option<&dyn Store>,
    request: BackendChoice,
    transport: TransportChoice,
    device: Device,
) -> Result<(Collectives, String), TrainError> {
    let request = match request {
        BackendChoice::Auto => BackendRequest::Auto,
        BackendChoice::Tcp => BackendRequest::Tcp,
        BackendChoice::Nccl => BackendRequest::Nccl,
    };
    let transport = transport_kind(transport);
    let cuda = matches!(device, Device::Cuda(_));
    let gpus = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
    let usable = if !cuda {
        Err("not needed".into())
    } else {
        // One GPU per rank (see `backend::cuda_device`), then NCCL itself.
        backend::cuda_device(env.local_rank, env.local_world, gpus)
            .and_then(|(_, one_per_rank)| one_per_rank)
            .and_then(|()| nccl::probe().map(|r| r.nccl.version))
    };
    let (backend, why) = backend::choose(request, cuda, usable.as_deref().map_err(String::as_str))
        .map_err(TrainError::Config)?;
    let comm = match (backend, device) {
        (Backend::Nccl, Device::Cuda(ordinal)) => {
            let own;
            let store = match store {
                Some(s) => s,
                None if env.world == 1 => {
                    own = MemStore::new();
                    &own
                }
                None => return Err(no_store(env)),
            };
            NcclCommunicator::connect(store, env.rank, env.world, ordinal, env.comm.op_timeout())
                .map_err(TrainError::comm(env.rank, "joining the NCCL communicator"))?
                .into()
        }
        _ => connect_over(env, store, transport)?.into(),
    };
    Ok((comm, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU `auto` and `tcp` connect over TCP (here a world of one,
    /// in-process); `nccl` is refused with the reason before anything starts.
    #[test]
    fn backends_for_cpu_training() {
        let env = WorkerEnv::default();
        for request in [BackendChoice::Auto, BackendChoice::Tcp] {
            let (comm, why) =
                connect_backend(&env, None, request, TransportChoice::Auto, Device::Cpu).unwrap();
            assert_eq!(comm.backend(), Backend::Tcp, "{why}");
        }
        let err = connect_backend(
            &env,
            None,
            BackendChoice::Nccl,
            TransportChoice::Auto,
            Device::Cpu,
        )
        .err()
        .expect("nccl on the CPU is refused")
        .to_string();
        assert!(err.contains("needs CUDA tensors"), "{err}");
    }
}

//! Which collective backend a job's ranks use: `tcp` (host memory: shared
//! memory within a host and TCP between hosts, the fallback that always
//! works; see `parallel.transport`) or `nccl` (CUDA device memory through
//! NVIDIA's NCCL). A pure function of what the config asks for, where the
//! training tensors live and whether NCCL is usable here, so `cohort doctor`,
//! `cohort launch` and the worker agree, and tests need no GPU.

use std::fmt;
use std::str::FromStr;

/// The backend a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Host memory: shared memory within a host, TCP between hosts (CUDA
    /// tensors are staged through host memory).
    Tcp,
    /// CUDA device memory through NCCL.
    Nccl,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Tcp => "tcp",
            Backend::Nccl => "nccl",
        })
    }
}

/// `parallel.backend` as a config writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendRequest {
    /// NCCL when the tensors are on a GPU and NCCL is usable, else TCP.
    #[default]
    Auto,
    Tcp,
    Nccl,
}

impl FromStr for BackendRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendRequest::Auto),
            "tcp" => Ok(BackendRequest::Tcp),
            "nccl" => Ok(BackendRequest::Nccl),
            other => Err(format!("unknown backend {other:?}: use auto, tcp or nccl")),
        }
    }
}

/// The backend for `requested`, and why; or why `requested` can't be had.
///
/// `cuda`: the training tensors live on a CUDA device. `nccl`: NCCL's
/// version when NCCL and a CUDA driver with a device are usable here, else
/// what is missing (see [`crate::nccl::probe`]).
pub fn choose(
    requested: BackendRequest,
    cuda: bool,
    nccl: Result<&str, &str>,
) -> Result<(Backend, String), String> {
    match (requested, cuda, nccl) {
        (BackendRequest::Auto, true, Ok(v)) => Ok((
            Backend::Nccl,
            format!("CUDA tensors, and NCCL {v} is usable"),
        )),
        (BackendRequest::Auto, true, Err(why)) => Ok((
            Backend::Tcp,
            format!(
                "CUDA tensors, but NCCL is not usable ({why}): tensors are staged through host memory over TCP"
            ),
        )),
        (BackendRequest::Auto, false, _) => Ok((
            Backend::Tcp,
            "CPU tensors: NCCL needs CUDA tensors, so collectives run in host memory: \
             shared memory on one host, TCP between hosts"
                .into(),
        )),
        (BackendRequest::Tcp, cuda, _) => Ok((
            Backend::Tcp,
            if cuda {
                "parallel.backend = \"tcp\": CUDA tensors are staged through host memory".into()
            } else {
                "parallel.backend = \"tcp\"".into()
            },
        )),
        (BackendRequest::Nccl, false, _) => Err(
            "parallel.backend = \"nccl\" needs CUDA tensors, but the job trains on the CPU \
             (train.device = \"cpu\", or no CUDA device is visible): set train.device = \"cuda\", \
             or use backend \"auto\" or \"tcp\""
                .into(),
        ),
        (BackendRequest::Nccl, true, Err(why)) => Err(format!(
            "parallel.backend = \"nccl\" but NCCL is not usable here: {why}; \
             use backend \"auto\" to fall back to TCP (see `cohort doctor`)"
        )),
        (BackendRequest::Nccl, true, Ok(v)) => Ok((
            Backend::Nccl,
            format!("parallel.backend = \"nccl\" (NCCL {v})"),
        )),
    }
}

/// The CUDA device a worker trains on, and whether NCCL can have one GPU
/// per rank on this host: local rank `local_rank` of `local_world` with
/// `visible` devices visible to the process.
///
/// - One visible device: ordinal 0, usable by NCCL. That is how schedulers
///   give each process its GPU (`CUDA_VISIBLE_DEVICES` per worker); if the
///   workers really share it, NCCL's own duplicate-GPU check says so.
/// - At least one device per local rank: ordinal `local_rank`.
/// - Fewer devices than local ranks (but more than one): ranks share GPUs,
///   `local_rank % visible`; NCCL is not usable (one GPU per rank), and
///   the reason is given.
pub fn cuda_device(
    local_rank: usize,
    local_world: usize,
    visible: usize,
) -> Result<(usize, Result<(), String>), String> {
    match visible {
        0 => Err("no CUDA device is visible to this process".into()),
        1 => Ok((0, Ok(()))),
        n if n >= local_world => Ok((local_rank, Ok(()))),
        n => Ok((
            local_rank % n,
            Err(format!(
                "{local_world} workers on this node share {n} GPUs, and NCCL needs one GPU per rank"
            )),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One GPU visible per process, as schedulers set CUDA_VISIBLE_DEVICES
    /// per worker: every rank uses its device 0 and NCCL is usable.
    #[test]
    fn a_single_visible_device_is_ordinal_zero_for_every_rank() {
        for rank in 0..8 {
            assert_eq!(cuda_device(rank, 8, 1), Ok((0, Ok(()))));
        }
        assert_eq!(cuda_device(3, 8, 8), Ok((3, Ok(()))));
        assert_eq!(cuda_device(1, 2, 4), Ok((1, Ok(()))));
        let (dev, nccl) = cuda_device(3, 4, 2).unwrap();
        assert_eq!(dev, 1);
        assert!(
            nccl.unwrap_err()
                .contains("4 workers on this node share 2 GPUs")
        );
        assert!(cuda_device(0, 1, 0).unwrap_err().contains("no CUDA device"));
    }

    #[test]
    fn auto_takes_nccl_only_for_cuda_tensors_with_nccl_usable() {
        let (b, why) = choose(BackendRequest::Auto, true, Ok("2.28.9")).unwrap();
        assert_eq!(b, Backend::Nccl);
        assert!(why.contains("2.28.9"), "{why}");
        let (b, why) = choose(BackendRequest::Auto, false, Ok("2.28.9")).unwrap();
        assert_eq!(b, Backend::Tcp);
        assert!(why.contains("CPU tensors"), "{why}");
        let (b, why) = choose(BackendRequest::Auto, true, Err("no CUDA driver")).unwrap();
        assert_eq!(b, Backend::Tcp);
        assert!(
            why.contains("no CUDA driver") && why.contains("staged"),
            "{why}"
        );
    }

    #[test]
    fn an_explicit_nccl_that_cannot_run_is_an_error_saying_why() {
        let err = choose(BackendRequest::Nccl, false, Ok("2.28.9")).unwrap_err();
        assert!(err.contains("needs CUDA tensors"), "{err}");
        let err = choose(BackendRequest::Nccl, true, Err("libnccl.so: not found")).unwrap_err();
        assert!(
            err.contains("libnccl.so: not found") && err.contains("auto"),
            "{err}"
        );
        assert_eq!(
            choose(BackendRequest::Nccl, true, Ok("2.28.9")).unwrap().0,
            Backend::Nccl
        );
        assert_eq!(
            choose(BackendRequest::Tcp, true, Ok("2.28.9")).unwrap().0,
            Backend::Tcp
        );
    }

    #[test]
    fn requests_parse_and_unknown_ones_are_named() {
        assert_eq!("nccl".parse::<BackendRequest>(), Ok(BackendRequest::Nccl));
        let err = "gloo".parse::<BackendRequest>().unwrap_err();
        assert!(
            err.contains("\"gloo\"") && err.contains("auto, tcp or nccl"),
            "{err}"
        );
    }
}

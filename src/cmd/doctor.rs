//! `cohort doctor`: what this host offers a cohort job, and the collective
//! backend `cohort launch` would pick on it, with the reason.
//!
//! libtorch is probed in a child process (`cohort-worker probe`), because the
//! worker is the binary that links it: when libtorch can't be loaded the child
//! fails to start, and doctor says so and what to do instead of dying itself.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use cohort_collectives::backend::{self, BackendRequest};
use cohort_collectives::nccl::probe as nccl_probe;
use serde::Serialize;

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// What `cohort-worker probe` reports.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Libtorch {
    libtorch_version: Option<String>,
    libtorch_built_for: Option<String>,
    libtorch_path: Option<PathBuf>,
    cuda_available: bool,
    cuda_devices: i64,
    cudnn_available: bool,
    threads: i64,
}

#[derive(Debug, Serialize)]
struct Nccl {
    version: Option<String>,
    path: Option<PathBuf>,
    error: Option<String>,
}

/// The NVIDIA driver as the nccl backend sees it (loaded at run time).
#[derive(Debug, Serialize)]
struct CudaDriver {
    version: Option<String>,
    devices: usize,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    cohort_version: &'static str,
    libtorch: Option<Libtorch>,
    libtorch_error: Option<String>,
    nccl: Nccl,
    cuda_driver: CudaDriver,
    cores: usize,
    cores_available: usize,
    memory_total_bytes: Option<u64>,
    memory_available_bytes: Option<u64>,
    shm_total_bytes: Option<u64>,
    shm_free_bytes: Option<u64>,
    /// What `parallel.backend = "auto"` picks for a job on `train.device =
    /// "auto"` here.
    backend: String,
    backend_reason: String,
}

pub fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let libtorch = probe_libtorch();
    let nccl = match nccl_probe::nccl_library() {
        Ok(n) => Nccl {
            version: Some(n.version),
            path: n.path,
            error: None,
        },
        Err(e) => Nccl {
            version: None,
            path: None,
            error: Some(e),
        },
    };
    let cuda_driver = match nccl_probe::cuda_driver() {
        Ok(d) => CudaDriver {
            version: Some(d.version),
            devices: d.devices,
            error: None,
        },
        Err(e) => CudaDriver {
            version: None,
            devices: 0,
            error: Some(e),
        },
    };
    // train.device = "auto" trains on CUDA when libtorch sees a device.
    let cuda_tensors = libtorch.as_ref().is_ok_and(|l| l.cuda_devices > 0);
    let usable = nccl_probe::probe().map(|r| r.nccl.version);
    let (backend, backend_reason) = backend::choose(
        BackendRequest::Auto,
        cuda_tensors,
        usable.as_deref().map_err(String::as_str),
    )
    .map(|(b, why)| (b.to_string(), why))
    .unwrap_or_else(|why| ("none".into(), why));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let shm = statvfs(Path::new("/dev/shm"));
    let (libtorch, libtorch_error) = match libtorch {
        Ok(l) => (Some(l), None),
        Err(e) => (None, Some(e)),
    };
    let report = Report {
        cohort_version: env!("CARGO_PKG_VERSION"),
        libtorch,
        libtorch_error,
        nccl,
        cuda_driver,
        cores: online_cores(),
        cores_available: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_total_bytes: meminfo_kib(&meminfo, "MemTotal").map(|k| k * 1024),
        memory_available_bytes: meminfo_kib(&meminfo, "MemAvailable").map(|k| k * 1024),
        shm_total_bytes: shm.map(|s| s.0),
        shm_free_bytes: shm.map(|s| s.1),
        backend,
        backend_reason,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(match &report.libtorch_error {
        None => ExitCode::SUCCESS,
        Some(e) => {
            eprintln!("error: libtorch can't be loaded: {e}");
            ExitCode::FAILURE
        }
    })
}

fn print_table(r: &Report) {
    println!("cohort {}", r.cohort_version);
    match &r.libtorch {
        Some(l) => {
            let version = l.libtorch_version.as_deref().unwrap_or("unknown version");
            let path = l
                .libtorch_path
                .as_deref()
                .map_or("an unknown path".into(), |p| p.display().to_string());
            println!("libtorch {version} (loaded from {path})");
            if let Some(built) = &l.libtorch_built_for
                && !version.starts_with(built.as_str())
            {
                println!(
                    "  warning: cohort-worker was built for libtorch {built}; run `make setup build`"
                );
            }
            println!("torch threads: {}", l.threads);
            if l.cuda_available {
                println!(
                    "CUDA: available, {} device(s), cuDNN {}",
                    l.cuda_devices,
                    if l.cudnn_available { "yes" } else { "no" }
                );
            } else {
                println!("CUDA: not available (no CUDA device or driver visible to libtorch)");
            }
        }
        None => {
            println!("libtorch: NOT LOADABLE (see the error below)");
            println!("CUDA: unknown (needs libtorch)");
        }
    }
    match (&r.nccl.version, &r.nccl.path) {
        (Some(v), path) => println!(
            "NCCL {v} (loads from {})",
            path.as_deref()
                .map_or("the library path".into(), |p| p.display().to_string())
        ),
        (None, _) => println!(
            "NCCL: not loadable: {}",
            r.nccl.error.as_deref().unwrap_or("unknown error")
        ),
    }
    match &r.cuda_driver.version {
        Some(v) => println!(
            "CUDA driver: supports CUDA {v}, {} device(s)",
            r.cuda_driver.devices
        ),
        None => println!(
            "CUDA driver: {}",
            r.cuda_driver.error.as_deref().unwrap_or("unknown error")
        ),
    }
    println!(
        "cores: {} online, {} available to this process",
        r.cores, r.cores_available
    );
    println!(
        "memory: {} total, {} available",
        gib(r.memory_total_bytes),
        gib(r.memory_available_bytes)
    );
    println!(
        "/dev/shm: {} total, {} free",
        gib(r.shm_total_bytes),
        gib(r.shm_free_bytes)
    );
    println!(
        "collective backend (auto): {}, because {}",
        r.backend, r.backend_reason
    );
}

fn gib(bytes: Option<u64>) -> String {
    bytes.map_or("unknown".into(), |b| {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    })
}

/// Runs `cohort-worker probe` (next to this binary) and parses its JSON.
fn probe_libtorch() -> Result<Libtorch, String> {
    let worker = super::worker_binary().map_err(|e| format!("{e:#}"))?;
    let out = Command::new(&worker)
        .arg("probe")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", worker.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let detail = stderr
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        return Err(format!(
            "{} failed ({}): {detail}. libtorch comes from the project's venv: \
             run `make setup` (installs torch into .venv) and `make build`",
            worker.display(),
            out.status
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "{} printed something that is not a probe report ({e}); rebuild with `make build`",
            worker.display()
        )
    })
}

fn online_cores() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// (total, free) bytes of the filesystem holding `path`.
fn statvfs(path: &Path) -> Option<(u64, u64)> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid path string and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_parsed() {
        let text = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_kib(text, "MemTotal"), Some(24_576_000));
        assert_eq!(meminfo_kib(text, "MemAvailable"), Some(20_000_000));
        assert_eq!(meminfo_kib(text, "Swap"), None);
    }

    #[test]
    fn statvfs_of_root_is_nonzero() {
        let (total, free) = statvfs(Path::new("/")).unwrap();
        assert!(total > 0 && free <= total);
        assert_eq!(statvfs(Path::new("/no/such/path")), None);
    }
}

//! Which collective backend a job uses when its config says `backend = "auto"`:
//! NCCL when there are CUDA devices and NCCL loads, otherwise the TCP fallback
//! that always works. A pure function, so doctor and launch agree and tests
//! need no GPU.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Tcp,
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

/// The backend `auto` picks, and why. `nccl` is NCCL's version if it loads,
/// or the loader's error (if any) if it doesn't.
pub fn choose_auto(cuda_devices: i64, nccl: Result<&str, Option<&str>>) -> (Backend, String) {
    match (cuda_devices, nccl) {
        (n, Ok(version)) if n > 0 => (
            Backend::Nccl,
            format!("{n} CUDA device(s) and NCCL {version} loads"),
        ),
        (n, Err(why)) if n > 0 => (
            Backend::Tcp,
            format!(
                "{n} CUDA device(s) but NCCL does not load ({}); tensors are staged through host memory",
                why.unwrap_or("unknown error")
            ),
        ),
        (_, _) => (
            Backend::Tcp,
            "no CUDA device: NCCL needs GPUs, so CPU tensors go over TCP".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_nccl_only_with_gpus_and_nccl() {
        assert_eq!(choose_auto(2, Ok("2.28.9")).0, Backend::Nccl);
        let (b, why) = choose_auto(0, Ok("2.28.9"));
        assert_eq!(b, Backend::Tcp);
        assert!(why.contains("no CUDA device"), "{why}");
        let (b, why) = choose_auto(1, Err(Some("libnccl.so: cannot open")));
        assert_eq!(b, Backend::Tcp);
        assert!(why.contains("libnccl.so: cannot open"), "{why}");
    }
}

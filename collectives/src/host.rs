//! Which ranks share this host, how many cores they share, and whether this
//! rank has a core of its own.
//!
//! Ranks compare host identities published in the store. Hostnames alone
//! don't tell hosts apart: hosts made of network namespaces on one machine
//! share a kernel, a hostname and `/dev/shm` but not their network, and
//! two containers may carry one hostname. So the identity is the hostname,
//! the kernel's boot id (one per booted machine) and the inode of this
//! process's network namespace.

use std::os::unix::fs::MetadataExt;

/// This process's host identity: `hostname/boot-id/netns-inode`, without
/// whitespace.
pub(crate) fn identity() -> String {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let netns = std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino().to_string())
        .unwrap_or_default();
    let id = format!(
        "{}/{}/{netns}",
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/random/boot_id")
    );
    id.split_whitespace().collect()
}

/// Cores the ranks of this host share: those this process may run on, or,
/// when it is bound to a single core (`pinned`), every online core (its
/// peers are bound to the others).
pub(crate) fn cores() -> usize {
    let mine = std::thread::available_parallelism().map_or(1, usize::from);
    if pinned() {
        // SAFETY: sysconf has no preconditions.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        usize::try_from(online).unwrap_or(1).max(mine)
    } else {
        mine
    }
}

/// This thread may run on one core only (bound, as `mpirun` binds ranks by
/// default or `taskset -c` does).
pub(crate) fn pinned() -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid, empty set; the call fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0
            && libc::CPU_COUNT(&set) == 1
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn identity_names_the_network_namespace() {
        let id = super::identity();
        let netns = id.rsplit('/').next().unwrap();
        assert!(netns.parse::<u64>().is_ok(), "{id}");
        assert_eq!(id, super::identity());
        assert!(!id.contains(char::is_whitespace), "{id}");
    }
}

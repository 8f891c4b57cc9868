//! Helpers shared by the collectives tests: groups over each transport, and
//! running one closure per rank on its own thread.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use cohort_collectives::{Communicator, MemStore, PrefixStore, Store, TcpConfig, TransportKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Mem,
    Tcp,
    Shm,
}

/// A config for TCP between every pair of ranks (also on this host).
pub fn tcp_config(token: &[u8]) -> TcpConfig {
    TcpConfig {
        token: token.to_vec(),
        bind_host: "127.0.0.1".into(),
        advertise_host: "127.0.0.1".into(),
        connect_timeout: Duration::from_secs(30),
        default_timeout: Duration::from_secs(60),
        transport: TransportKind::Tcp,
        host_id: None,
    }
}

/// A TCP group of `world` ranks in this process, bootstrapped through a
/// `MemStore`.
pub fn tcp_group(world: usize) -> Vec<Communicator> {
    process_group(world, TransportKind::Tcp, |_| None)
}

/// A group of `world` ranks in this process over `transport`, rank `r`
/// claiming the host identity `host(r)` (`None`: this process's), so one
/// process can look like several hosts.
pub fn process_group(
    world: usize,
    transport: TransportKind,
    host: impl Fn(usize) -> Option<String>,
) -> Vec<Communicator> {
    let store: Arc<dyn Store> =
        Arc::new(PrefixStore::new("test", Arc::new(MemStore::new())).unwrap());
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let store = store.clone();
            let cfg = TcpConfig {
                transport,
                host_id: host(rank),
                ..tcp_config(b"test-token")
            };
            std::thread::spawn(move || Communicator::connect_tcp(store.as_ref(), rank, world, &cfg))
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("bootstrap thread"))
        .collect();
    if results.iter().any(Result::is_err) {
        let errors: Vec<String> = results
            .iter()
            .enumerate()
            .filter_map(|(r, res)| res.as_ref().err().map(|e| format!("rank {r}: {e}")))
            .collect();
        panic!("{transport} bootstrap failed:\n{}", errors.join("\n"));
    }
    results.into_iter().map(Result::unwrap).collect()
}

pub fn group(kind: Kind, world: usize) -> Vec<Communicator> {
    match kind {
        Kind::Mem => Communicator::mem_group(world),
        Kind::Tcp => tcp_group(world),
        Kind::Shm => process_group(world, TransportKind::Shm, |_| None),
    }
}

/// Runs `f` once per rank, each on its own (small-stack) thread, and returns
/// the results in rank order along with the communicators.
pub fn each_rank<R: Send>(
    comms: &mut [Communicator],
    f: impl Fn(&mut Communicator) -> R + Sync,
) -> Vec<R> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter_mut()
            .map(|comm| {
                let f = &f;
                std::thread::Builder::new()
                    .stack_size(256 << 10)
                    .spawn_scoped(s, move || f(comm))
                    .expect("spawn rank thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

//! Helpers shared by the collectives tests: groups over each transport, and
//! running one closure per rank on its own thread.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use cohort_collectives::{Communicator, MemStore, PrefixStore, Store, TcpConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Mem,
    Tcp,
}

pub fn tcp_config(token: &[u8]) -> TcpConfig {
    TcpConfig {
        token: token.to_vec(),
        bind_host: "127.0.0.1".into(),
        advertise_host: "127.0.0.1".into(),
        connect_timeout: Duration::from_secs(30),
        default_timeout: Duration::from_secs(60),
    }
}

/// A TCP group of `world` ranks in this process, bootstrapped through a
/// `MemStore`.
pub fn tcp_group(world: usize) -> Vec<Communicator> {
    let store: Arc<dyn Store> =
        Arc::new(PrefixStore::new("test", Arc::new(MemStore::new())).unwrap());
    let cfg = tcp_config(b"test-token");
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (store, cfg) = (store.clone(), cfg.clone());
            std::thread::spawn(move || Communicator::connect_tcp(store.as_ref(), rank, world, &cfg))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("bootstrap thread").expect("tcp bootstrap"))
        .collect()
}

pub fn group(kind: Kind, world: usize) -> Vec<Communicator> {
    match kind {
        Kind::Mem => Communicator::mem_group(world),
        Kind::Tcp => tcp_group(world),
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

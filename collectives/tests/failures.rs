//! Desync, timeout, dead peer, wrong token, and the broken state after an
//! error, on every transport.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cohort_collectives::{
    Algorithm, CommError, Communicator, MemStore, OpOptions, ReduceOp, Store, TcpConfig,
};
use common::{Kind, each_rank, group, tcp_config};

fn opts(timeout_ms: u64) -> OpOptions {
    OpOptions {
        timeout: Some(Duration::from_millis(timeout_ms)),
        ..OpOptions::default()
    }
}

#[test]
fn desync_fails_every_rank_naming_both_calls() {
    for kind in [Kind::Mem, Kind::Tcp, Kind::Shm] {
        for odd in ["count", "kind", "dtype"] {
            let mut comms = group(kind, 3);
            let started = Instant::now();
            let errors = each_rank(&mut comms, |comm| {
                let o = opts(20_000);
                let mut buf = vec![1.0f32; 10];
                let result = if comm.rank() < 2 {
                    comm.all_reduce(&mut buf, ReduceOp::Sum, &o)
                } else {
                    match odd {
                        "count" => comm.all_reduce(&mut [1.0f32; 11], ReduceOp::Sum, &o),
                        "kind" => comm.broadcast(&mut buf, 0, &o),
                        _ => comm.all_reduce(&mut [1i32; 10], ReduceOp::Sum, &o),
                    }
                };
                let err = result.expect_err("a desynced op must fail").to_string();
                // The communicator is now broken.
                let again = comm.barrier(&o).expect_err("broken").to_string();
                assert!(again.contains("rebuild"), "{again}");
                err
            });
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "desync took {:?}",
                started.elapsed()
            );
            for (rank, err) in errors.iter().enumerate() {
                assert!(err.contains("desync"), "{kind:?} {odd}: rank {rank}: {err}");
            }
            let theirs = match odd {
                "count" => "all_reduce(f32, count 11",
                "kind" => "broadcast(f32, count 10",
                _ => "all_reduce(i32, count 10",
            };
            assert!(
                errors
                    .iter()
                    .any(|e| e.contains("all_reduce(f32, count 10, sum") && e.contains(theirs)),
                "{kind:?} {odd}: no error names both calls: {errors:#?}"
            );
        }
    }
}

/// A desync that makes a cycle of three waits (rank 0 folded into rank 1's
/// recursive doubling waits on 1, 1 waits on its partner 2, and 2, in a
/// tree broadcast, waits on its parent 0) is found as fast as a two-rank
/// one: every rank also checks what waits from the peers it is not
/// receiving from.
#[test]
fn a_desync_in_a_cycle_of_three_is_found_fast() {
    for kind in [Kind::Mem, Kind::Tcp, Kind::Shm] {
        let mut comms = group(kind, 3);
        let started = Instant::now();
        let errors = each_rank(&mut comms, |comm| {
            let mut buf = vec![1.0f32; 10];
            let o = |algorithm| OpOptions {
                algorithm,
                timeout: Some(Duration::from_secs(20)),
            };
            let result = if comm.rank() < 2 {
                comm.all_reduce(&mut buf, ReduceOp::Sum, &o(Algorithm::Doubling))
            } else {
                comm.broadcast(&mut buf, 0, &o(Algorithm::Tree))
            };
            result.expect_err("a desynced op must fail").to_string()
        });
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{kind:?}: desync took {:?}",
            started.elapsed()
        );
        assert!(
            errors.iter().any(|e| e.contains("desync")
                && e.contains("all_reduce(f32, count 10, sum, doubling)")
                && e.contains("broadcast(f32, count 10, root 0, tree)")),
            "{kind:?}: {errors:#?}"
        );
    }
}

#[test]
fn timeout_names_op_and_peer_then_breaks() {
    for kind in [Kind::Mem, Kind::Tcp, Kind::Shm] {
        let mut comms = group(kind, 2);
        let done = Barrier::new(2);
        let results = each_rank(&mut comms, |comm| {
            if comm.rank() == 1 {
                // Alive but never joins the op.
                done.wait();
                return None;
            }
            let started = Instant::now();
            let err = comm
                .all_reduce(&mut [0.5f64; 4], ReduceOp::Max, &opts(300))
                .expect_err("must time out");
            let took = started.elapsed();
            let again = comm
                .all_reduce(&mut [0.5f64; 4], ReduceOp::Max, &opts(300))
                .unwrap_err();
            let record = comm.flight_record();
            done.wait();
            Some((err, took, again, record))
        });
        let (err, took, again, record) = results.into_iter().flatten().next().unwrap();
        assert!(
            matches!(err, CommError::Timeout { peer: 1, .. }),
            "{kind:?}: {err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("all_reduce(f64, count 4, max") && text.contains("rank 1"),
            "{text}"
        );
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "{took:?}"
        );
        assert!(matches!(again, CommError::Broken { .. }), "{again}");
        assert_eq!(record.len(), 1);
        let line = record[0].to_string();
        assert!(
            line.contains("seq 0 all_reduce(f64, count 4") && line.contains("FAILED with rank 1"),
            "{line}"
        );
    }
}

#[test]
fn dead_peer_fails_survivors_quickly() {
    for kind in [Kind::Mem, Kind::Tcp, Kind::Shm] {
        let comms = group(kind, 3);
        let mut iter = comms.into_iter();
        let (a, b, c) = (
            iter.next().unwrap(),
            iter.next().unwrap(),
            iter.next().unwrap(),
        );
        let started = Instant::now();
        let survivors: Vec<_> = [a, b]
            .into_iter()
            .map(|mut comm| {
                std::thread::spawn(move || {
                    let mut buf = vec![1.0f32; 1 << 20];
                    comm.all_reduce(&mut buf, ReduceOp::Sum, &opts(30_000))
                })
            })
            .collect();
        // Rank 2 goes away (its sockets close, as when its process dies).
        drop(c);
        for s in survivors {
            let err = s.join().unwrap().expect_err("a dead peer must fail the op");
            let text = err.to_string();
            assert!(
                matches!(
                    err,
                    CommError::PeerClosed { .. } | CommError::PeerAborted { .. }
                ),
                "{kind:?}: {text}"
            );
            assert!(text.contains("rank"), "{text}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
}

/// Rank 1 of 2 bootstrapping through `store` on its own thread, and the TCP
/// address it listens on once it has published it.
fn listening_rank_1(
    store: &Arc<dyn Store>,
    cfg: &TcpConfig,
) -> (
    std::thread::JoinHandle<Result<Communicator, CommError>>,
    String,
) {
    let rank = {
        let (store, cfg) = (store.clone(), cfg.clone());
        std::thread::spawn(move || Communicator::connect_tcp(store.as_ref(), 1, 2, &cfg))
    };
    let entry = store
        .wait(&["addr/1".into()], Duration::from_secs(10))
        .unwrap()
        .remove(0);
    let entry = String::from_utf8(entry).unwrap();
    let addr = entry.split_whitespace().next().unwrap().to_owned();
    (rank, addr)
}

#[test]
fn strangers_and_wrong_tokens_are_dropped() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let (listener_rank, addr) = listening_rank_1(&store, &tcp_config(b"right"));

    // A stranger speaking garbage is dropped.
    let mut stranger = TcpStream::connect(&addr).unwrap();
    stranger.write_all(&[0xAB; 64]).unwrap();
    stranger
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut sink = [0u8; 16];
    let n = stranger.read(&mut sink).unwrap_or(0);
    assert_eq!(n, 0, "the stranger must be disconnected without a reply");

    // A rank with the wrong token can't join, and learns why.
    let wrong = Communicator::connect_tcp(store.as_ref(), 0, 2, &tcp_config(b"wrong")).unwrap_err();
    assert!(matches!(wrong, CommError::Auth { .. }), "{wrong}");
    assert!(wrong.to_string().contains("COHORT_TOKEN"), "{wrong}");

    // The real rank 0 still gets in, and the pair works.
    let mut zero = Communicator::connect_tcp(store.as_ref(), 0, 2, &tcp_config(b"right")).unwrap();
    let mut one = listener_rank.join().unwrap().unwrap();
    let t = std::thread::spawn(move || {
        let mut v = [2u8; 3];
        one.all_reduce(&mut v, ReduceOp::Prod, &OpOptions::default())
            .map(|()| v)
    });
    let mut v = [3u8; 3];
    zero.all_reduce(&mut v, ReduceOp::Prod, &OpOptions::default())
        .unwrap();
    assert_eq!(v, [6; 3]);
    assert_eq!(t.join().unwrap().unwrap(), [6; 3]);
}

/// Idle connections to a listening rank (a port scan, a health check, a
/// half-open connection) cost the real ranks nothing: with a 5 s bootstrap
/// timeout the group still forms, where handshakes taken one at a time
/// gave each stranger up to 10 s.
#[test]
fn idle_strangers_do_not_hold_up_the_bootstrap() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let mut cfg = tcp_config(b"tok");
    cfg.connect_timeout = Duration::from_secs(5);
    let (listener_rank, addr) = listening_rank_1(&store, &cfg);
    let idle: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(&addr).unwrap()).collect();

    let started = Instant::now();
    let mut zero = Communicator::connect_tcp(store.as_ref(), 0, 2, &cfg)
        .expect("rank 0 joins despite the idle connections");
    let mut one = listener_rank
        .join()
        .unwrap()
        .expect("rank 1 accepts rank 0 despite the idle connections");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "bootstrap took {took:?}");
    let t = std::thread::spawn(move || {
        let mut v = [1i64; 3];
        one.all_reduce(&mut v, ReduceOp::Sum, &OpOptions::default())
            .map(|()| v)
    });
    let mut v = [2i64; 3];
    zero.all_reduce(&mut v, ReduceOp::Sum, &OpOptions::default())
        .unwrap();
    assert_eq!(v, [3; 3]);
    assert_eq!(t.join().unwrap().unwrap(), [3; 3]);
    drop(idle);
}

/// A rank that read another group's store entry (another job, or an
/// earlier generation whose port was reused) is refused before any proof,
/// and told why; the listener's own group is not disturbed.
#[test]
fn a_rank_of_another_group_is_refused_with_the_reason() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let cfg = tcp_config(b"tok");
    // As if rank 0 had published its address and not connected yet: rank 1
    // has every address and waits for rank 0's connection.
    store
        .set(
            "addr/0",
            format!("127.0.0.1:1 listener={} host=h", "00".repeat(16)).as_bytes(),
        )
        .unwrap();
    let (listener_rank, addr) = listening_rank_1(&store, &cfg);
    // The other group's store holds the same address under another listener.
    let other: Arc<dyn Store> = Arc::new(MemStore::new());
    other
        .set(
            "addr/1",
            format!("{addr} listener={} host=h", "ab".repeat(16)).as_bytes(),
        )
        .unwrap();
    let err = Communicator::connect_tcp(other.as_ref(), 0, 2, &cfg).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, CommError::Auth { .. }) && text.contains("refused us"),
        "{text}"
    );
    assert!(text.contains("looking for listener abab"), "{text}");
    Communicator::connect_tcp(store.as_ref(), 0, 2, &cfg).unwrap();
    listener_rank.join().unwrap().unwrap();
}

#[test]
fn invalid_arguments_leave_the_communicator_usable() {
    let mut comms = Communicator::mem_group(2);
    each_rank(&mut comms, |comm| {
        let err = comm
            .broadcast(&mut [1u8], 2, &OpOptions::default())
            .unwrap_err();
        assert!(matches!(err, CommError::InvalidArgument { .. }), "{err}");
        assert!(err.to_string().contains("root 2"), "{err}");
        let mut v = [comm.rank() as i32 * 2 - 7];
        comm.all_reduce(&mut v, ReduceOp::Avg, &OpOptions::default())
            .unwrap();
        // (-7 + -5) / 2
        assert_eq!(v, [-6]);
    });
}

//! The abort handle, on every transport: another thread ends the op in
//! flight at once (whether the rank spins or sleeps in it), the
//! communicator stays broken, and its peer learns of it instead of waiting
//! out its timeout.

mod common;

use std::time::{Duration, Instant};

use cohort_collectives::{CommError, Communicator, OpOptions, ReduceOp};
use common::{Kind, group};

/// Far longer than any wait the tests allow: only an abort ends an op early.
const OP_TIMEOUT: Duration = Duration::from_secs(60);
/// The most an aborted op, or the peer's next one, may take to fail.
const PROMPT: Duration = Duration::from_secs(2);
const REASON: &str = "rank 1 failed (was killed by SIGKILL)";
/// Elements of the all-reduce: several pipeline segments, so rank 0 can
/// only have sent the first before it waits on rank 1.
const COUNT: usize = 1 << 20;

fn opts() -> OpOptions {
    OpOptions {
        timeout: Some(OP_TIMEOUT),
        ..OpOptions::default()
    }
}

/// Rank 0 is inside an all-reduce that rank 1 never enters; another thread
/// aborts rank 0 once it is past the probe (`PROBE_AFTER`, 250 ms), when a
/// rank that does not spin sleeps in `poll(2)` until the op's deadline.
/// With `spin`, rank 0 never stops spinning, so only the flag read on
/// every pass can end the op. Rank 1 then enters the op: it fails on the
/// segment rank 0 never sent.
fn aborts_the_op_in_flight(kind: Kind, spin: bool) {
    let case = format!("{kind:?}, spin {spin}");
    let mut comms = group(kind, 2);
    let mut peer = comms.pop().expect("rank 1");
    let mut comm = comms.pop().expect("rank 0");
    if spin {
        comm.set_spin(Duration::from_secs(30));
    }
    let handle = comm.abort_handle();
    assert!(!handle.is_aborted());
    let rank0 = std::thread::spawn(move || {
        let mut buf = vec![1.0f32; COUNT];
        let err = comm
            .all_reduce(&mut buf, ReduceOp::Sum, &opts())
            .expect_err("rank 1 never joins: only the abort can end the op");
        let returned = Instant::now();
        let again = comm.barrier(&opts()).expect_err("broken after the abort");
        (err, returned, again, returned.elapsed(), comm)
    });
    std::thread::sleep(Duration::from_millis(500));
    let aborted_at = Instant::now();
    handle.abort(REASON);
    handle.abort("a second reason, ignored");
    assert!(handle.is_aborted());
    let (err, returned, again, again_took, comm) = rank0.join().expect("rank 0's thread");
    assert!(
        returned >= aborted_at,
        "{case}: the op ended before the abort: {err}"
    );
    let latency = returned - aborted_at;
    assert!(
        latency < PROMPT,
        "{case}: the op ended {latency:?} after the abort"
    );
    match &err {
        CommError::Aborted { rank, op, reason } => {
            assert_eq!(*rank, 0, "{case}");
            assert!(
                op.starts_with(&format!("all_reduce(f32, count {COUNT}, sum")),
                "{case}: {op}"
            );
            assert_eq!(reason, REASON, "{case}");
        }
        other => panic!("{case}: not Aborted: {other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("on rank 0 was aborted: rank 1 failed") && text.contains("rebuild"),
        "{case}: {text}"
    );
    assert!(
        matches!(&again, CommError::Broken { cause, .. } if cause.contains(REASON)),
        "{case}: {again}"
    );
    assert!(
        again_took < Duration::from_millis(100),
        "{case}: {again_took:?}"
    );

    // Rank 1 now enters: rank 0 told it (or, mid-message, closed the
    // connection), so it fails at once too.
    let started = Instant::now();
    let seen = peer
        .all_reduce(&mut vec![1.0f32; COUNT], ReduceOp::Sum, &opts())
        .expect_err("rank 0 is broken");
    let took = started.elapsed();
    assert!(
        took < PROMPT,
        "{case}: rank 1 failed after {took:?}: {seen}"
    );
    assert!(
        match &seen {
            CommError::PeerAborted {
                peer: 0, reason, ..
            } => reason.contains(REASON),
            CommError::PeerClosed { peer: 0, .. } => kind != Kind::Mem,
            _ => false,
        },
        "{case}: rank 1: {seen}"
    );
    drop(comm);
    handle.abort("after the communicator is gone");
}

#[test]
fn the_handle_goes_to_other_threads() {
    fn shareable<T: Clone + Send + Sync + std::fmt::Debug + 'static>() {}
    shareable::<cohort_collectives::AbortHandle>();
}

#[test]
fn abort_ends_a_blocked_op_at_once_and_tells_the_peer() {
    for kind in [Kind::Mem, Kind::Tcp, Kind::Shm] {
        aborts_the_op_in_flight(kind, false);
    }
}

#[test]
fn abort_ends_a_spinning_op_at_once() {
    for kind in [Kind::Tcp, Kind::Shm] {
        aborts_the_op_in_flight(kind, true);
    }
}

/// An abort before any op fails the next op at once, also where the op
/// moves no bytes (one rank, zero elements), and tells the peer.
#[test]
fn abort_before_an_op_fails_the_next_one_at_once() {
    for kind in [Kind::Mem, Kind::Tcp, Kind::Shm] {
        let mut comms = group(kind, 2);
        let mut peer = comms.pop().expect("rank 1");
        let mut comm = comms.pop().expect("rank 0");
        let handle = comm.abort_handle();
        handle.clone().abort(REASON);
        assert!(format!("{handle:?}").contains(REASON), "{handle:?}");
        let started = Instant::now();
        let err = comm
            .all_reduce(&mut [0u8; 0], ReduceOp::Sum, &opts())
            .expect_err("aborted");
        assert!(started.elapsed() < Duration::from_millis(100), "{kind:?}");
        assert!(
            matches!(&err, CommError::Aborted { reason, .. } if reason == REASON),
            "{kind:?}: {err}"
        );
        let seen = peer.barrier(&opts()).expect_err("rank 0 is broken");
        assert!(started.elapsed() < PROMPT, "{kind:?}: {seen}");
        assert!(
            matches!(&seen, CommError::PeerAborted { peer: 0, .. }),
            "{kind:?}: {seen}"
        );
    }
    let mut alone = Communicator::mem_group(1).pop().expect("one rank");
    alone.abort_handle().abort(REASON);
    let err = alone.barrier(&opts()).expect_err("aborted");
    assert!(matches!(err, CommError::Aborted { .. }), "{err}");
}

//! Every algorithm × transport (mem, tcp, shm) × world 1..8 × counts {0, 1, 7,
//! 1000} × every dtype and reduce op, against a plain reference; the
//! node-aware algorithm on n × k topologies (threads, and ranks that claim
//! hosts: shared memory within one, TCP across), and bit for bit against the
//! flat ring; a representative subset at 1,000,003 elements; and 1,024 ranks
//! on `mem`.

mod common;

use cohort_collectives::TransportKind;
use cohort_collectives::{Algorithm, Communicator, Element, OpOptions, ReduceOp, shard_range};
use common::{Kind, each_rank, group, process_group};
use half::{bf16, f16};

/// Test-side arithmetic, independent of the crate's kernels.
trait TestElem: Element + PartialEq + std::fmt::Debug {
    fn from_i64(x: i64) -> Self;
    fn combine(a: Self, b: Self, op: ReduceOp) -> Self;
    fn div(a: Self, world: usize) -> Self;
    /// Values of rank `rank` at element `i`: small integers whose sums and
    /// products stay exact in every float type.
    fn value(rank: usize, i: usize, op: ReduceOp) -> Self {
        let v = if op == ReduceOp::Prod {
            [1, 2, -1][(i + rank) % 3]
        } else {
            ((i * 7 + rank * 13) % 19) as i64 - 9
        };
        Self::from_i64(v)
    }
}

macro_rules! float_elem {
    ($t:ty, $to:expr, $from:expr) => {
        impl TestElem for $t {
            fn from_i64(x: i64) -> Self {
                $from(x as f32)
            }
            fn combine(a: Self, b: Self, op: ReduceOp) -> Self {
                let (a, b): (f32, f32) = ($to(a), $to(b));
                $from(match op {
                    ReduceOp::Sum | ReduceOp::Avg => a + b,
                    ReduceOp::Prod => a * b,
                    ReduceOp::Min => a.min(b),
                    ReduceOp::Max => a.max(b),
                })
            }
            fn div(a: Self, world: usize) -> Self {
                $from($to(a) / world as f32)
            }
        }
    };
}

float_elem!(f32, |x: f32| x, |x: f32| x);
float_elem!(f16, |x: f16| x.to_f32(), f16::from_f32);
float_elem!(bf16, |x: bf16| x.to_f32(), bf16::from_f32);

impl TestElem for f64 {
    fn from_i64(x: i64) -> Self {
        x as f64
    }
    fn combine(a: Self, b: Self, op: ReduceOp) -> Self {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => a + b,
            ReduceOp::Prod => a * b,
            ReduceOp::Min => a.min(b),
            ReduceOp::Max => a.max(b),
        }
    }
    fn div(a: Self, world: usize) -> Self {
        a / world as f64
    }
}

macro_rules! int_elem {
    ($t:ty) => {
        impl TestElem for $t {
            fn from_i64(x: i64) -> Self {
                x as $t
            }
            fn combine(a: Self, b: Self, op: ReduceOp) -> Self {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => a.wrapping_add(b),
                    ReduceOp::Prod => a.wrapping_mul(b),
                    ReduceOp::Min => a.min(b),
                    ReduceOp::Max => a.max(b),
                }
            }
            fn div(a: Self, world: usize) -> Self {
                a / world as $t
            }
        }
    };
}

int_elem!(i32);
int_elem!(i64);
int_elem!(u8);

fn expected<T: TestElem>(world: usize, i: usize, op: ReduceOp) -> T {
    let mut acc = T::value(0, i, op);
    for r in 1..world {
        acc = T::combine(acc, T::value(r, i, op), op);
    }
    if op == ReduceOp::Avg {
        acc = T::div(acc, world);
    }
    acc
}

fn fill<T: TestElem>(rank: usize, count: usize, op: ReduceOp) -> Vec<T> {
    (0..count).map(|i| T::value(rank, i, op)).collect()
}

fn check<T: TestElem>(
    what: &str,
    got: &[T],
    want: impl Fn(usize) -> T,
    range: std::ops::Range<usize>,
) {
    for i in range {
        let w = want(i);
        assert!(
            got[i] == w,
            "{what}: element {i} is {:?}, expected {w:?}",
            got[i]
        );
    }
}

/// Runs every collective of dtype `T` on `comm` for `count` elements.
fn ops_for<T: TestElem>(comm: &mut Communicator, algo: Algorithm, count: usize, label: &str) {
    let (rank, world) = (comm.rank(), comm.world_size());
    let opts = OpOptions {
        algorithm: algo,
        ..OpOptions::default()
    };
    let ty = T::DTYPE;
    for op in ReduceOp::ALL {
        let what = format!("{label} all_reduce {ty} {op} count {count} rank {rank}");
        let mut buf = fill::<T>(rank, count, op);
        comm.all_reduce(&mut buf, op, &opts)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        check(&what, &buf, |i| expected::<T>(world, i, op), 0..count);

        let what = format!("{label} reduce_scatter {ty} {op} count {count} rank {rank}");
        let mut buf = fill::<T>(rank, count, op);
        let shard = comm
            .reduce_scatter(&mut buf, op, &opts)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(shard, shard_range(count, world, rank), "{what}");
        check(&what, &buf, |i| expected::<T>(world, i, op), shard);
    }

    let what = format!("{label} all_gather {ty} count {count} rank {rank}");
    let owner = |i: usize| {
        (0..world)
            .find(|&r| shard_range(count, world, r).contains(&i))
            .unwrap()
    };
    let mut buf: Vec<T> = vec![T::from_i64(99); count];
    for i in shard_range(count, world, rank) {
        buf[i] = T::value(rank, i, ReduceOp::Sum);
    }
    comm.all_gather(&mut buf, &opts)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    check(
        &what,
        &buf,
        |i| T::value(owner(i), i, ReduceOp::Sum),
        0..count,
    );

    let root = (count + 1) % world;
    let what = format!("{label} broadcast {ty} root {root} count {count} rank {rank}");
    let mut buf = fill::<T>(rank, count, ReduceOp::Sum);
    comm.broadcast(&mut buf, root, &opts)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    check(&what, &buf, |i| T::value(root, i, ReduceOp::Sum), 0..count);
}

/// Every collective of every dtype on `comm` for `count` elements.
fn ops_for_every_dtype(comm: &mut Communicator, algo: Algorithm, count: usize, label: &str) {
    ops_for::<f32>(comm, algo, count, label);
    ops_for::<f64>(comm, algo, count, label);
    ops_for::<f16>(comm, algo, count, label);
    ops_for::<bf16>(comm, algo, count, label);
    ops_for::<i32>(comm, algo, count, label);
    ops_for::<i64>(comm, algo, count, label);
    ops_for::<u8>(comm, algo, count, label);
}

fn full_matrix(kind: Kind) {
    for world in 1..=8 {
        let mut comms = group(kind, world);
        for comm in &mut comms {
            // Small segments: count 1000 takes the multi-segment paths.
            comm.set_max_segment_bytes(96);
        }
        each_rank(&mut comms, |comm| {
            for algo in Algorithm::ALL {
                for count in [0, 1, 7, 1000] {
                    let label = format!("{kind:?} world {world} {algo}");
                    ops_for_every_dtype(comm, algo, count, &label);
                }
            }
            comm.barrier(&OpOptions::default()).unwrap();
        });
    }
}

#[test]
fn matrix_mem() {
    full_matrix(Kind::Mem);
}

#[test]
fn matrix_tcp() {
    full_matrix(Kind::Tcp);
}

#[test]
fn matrix_shm() {
    full_matrix(Kind::Shm);
}

/// n × k topologies, as each rank's host: contiguous ranks per node (as
/// `cohort launch` numbers them) and interleaved ones.
const TOPOLOGIES: &[&[usize]] = &[
    &[0, 0, 1, 1],
    &[0, 1, 0, 1],
    &[0, 0, 0, 1, 1, 1],
    &[0, 0, 1, 1, 2, 2],
    &[0, 0, 0, 0, 1, 1, 1, 1],
    &[0, 1, 2, 3, 0, 1, 2, 3],
];

fn node_aware_ops(comms: &mut [Communicator], label: &str) {
    for comm in comms.iter_mut() {
        // Small segments: count 1000 takes the multi-segment paths.
        comm.set_max_segment_bytes(96);
    }
    each_rank(comms, |comm| {
        for count in [0, 1, 7, 1000] {
            let label = format!("{label} hierarchical");
            ops_for_every_dtype(comm, Algorithm::Hierarchical, count, &label);
        }
        comm.barrier(&OpOptions::default()).unwrap();
    });
}

#[test]
fn matrix_node_aware_mem() {
    for hosts in TOPOLOGIES {
        let mut comms = Communicator::mem_group_on_hosts(hosts);
        node_aware_ops(&mut comms, &format!("mem hosts {hosts:?}"));
    }
}

#[test]
fn matrix_node_aware_processes() {
    for hosts in [TOPOLOGIES[1], TOPOLOGIES[3]] {
        let mut comms = process_group(hosts.len(), TransportKind::Auto, |r| {
            Some(format!("host-{}", hosts[r]))
        });
        node_aware_ops(&mut comms, &format!("auto hosts {hosts:?}"));
    }
}

/// Where the summation order can't matter (integers, min, max, copies),
/// the node-aware algorithm gives the flat ring's bits exactly, on data
/// that is not small integers; float sums add within the node first and
/// agree to rounding.
#[test]
fn node_aware_equals_the_flat_ring_bit_for_bit_where_the_order_is_free() {
    const COUNT: usize = 10_007;
    for hosts in [TOPOLOGIES[0], TOPOLOGIES[5]] {
        let mut comms = Communicator::mem_group_on_hosts(hosts);
        each_rank(&mut comms, |comm| {
            let rank = comm.rank();
            let noise = |i: usize| {
                let x = (i as u64 * 2_654_435_761 + rank as u64 * 40_503) % 1_000_003;
                x as f64 / 1_000_003.0 - 0.5
            };
            let with = |algorithm| OpOptions {
                algorithm,
                ..OpOptions::default()
            };
            let (flat, node) = (with(Algorithm::Ring), with(Algorithm::Hierarchical));
            for op in ReduceOp::ALL {
                let ints: Vec<i64> = (0..COUNT).map(|i| (noise(i) * 1e12) as i64).collect();
                let (mut a, mut b) = (ints.clone(), ints);
                comm.all_reduce(&mut a, op, &flat).unwrap();
                comm.all_reduce(&mut b, op, &node).unwrap();
                assert_eq!(a, b, "i64 {op} hosts {hosts:?}");

                let floats: Vec<f32> = (0..COUNT).map(|i| noise(i) as f32).collect();
                let (mut a, mut b) = (floats.clone(), floats.clone());
                comm.all_reduce(&mut a, op, &flat).unwrap();
                comm.all_reduce(&mut b, op, &node).unwrap();
                if matches!(op, ReduceOp::Min | ReduceOp::Max) {
                    assert_eq!(a, b, "f32 {op} hosts {hosts:?}");
                } else {
                    // Every |value| <= 0.5: a few roundings of sums of at
                    // most `world` of them.
                    let tolerance = 4.0 * f32::EPSILON * hosts.len() as f32;
                    for (x, y) in a.iter().zip(&b) {
                        assert!((x - y).abs() <= tolerance, "{op}: {x} vs {y}");
                    }
                    if op == ReduceOp::Sum {
                        // The other order really ran.
                        assert!(a != b, "node-aware sums in the flat ring's order");
                    }
                }
                let (mut a, mut b) = (floats.clone(), floats);
                let shard = comm.reduce_scatter(&mut a, ReduceOp::Max, &flat).unwrap();
                comm.reduce_scatter(&mut b, ReduceOp::Max, &node).unwrap();
                assert_eq!(a[shard.clone()], b[shard], "reduce_scatter max");
            }
            let mine: Vec<f64> = (0..COUNT).map(noise).collect();
            let (mut a, mut b) = (mine.clone(), mine);
            comm.all_gather(&mut a, &flat).unwrap();
            comm.all_gather(&mut b, &node).unwrap();
            assert_eq!(a, b, "all_gather");
            comm.broadcast(&mut a, 3, &flat).unwrap();
            comm.broadcast(&mut b, 3, &node).unwrap();
            assert_eq!(a, b, "broadcast");
        });
    }
}

/// `auto` takes the node-aware algorithm for large ops on n × k nodes, and
/// not on one node or uneven ones.
#[test]
fn auto_goes_node_aware_on_n_by_k() {
    for (hosts, node_aware) in [
        (&[0, 0, 1, 1][..], true),
        (&[0, 0, 0, 0][..], false),
        (&[0, 0, 1][..], false),
    ] {
        let mut comms = Communicator::mem_group_on_hosts(hosts);
        let algos = each_rank(&mut comms, |comm| {
            let mut big = vec![1.0f32; 1 << 20];
            comm.all_reduce(&mut big, ReduceOp::Sum, &OpOptions::default())
                .unwrap();
            let mut small = vec![1.0f32; 16];
            comm.all_reduce(&mut small, ReduceOp::Sum, &OpOptions::default())
                .unwrap();
            let record = comm.flight_record();
            (record[0].algorithm, record[1].algorithm)
        });
        for (big, small) in algos {
            assert_eq!(big == Algorithm::Hierarchical, node_aware, "{hosts:?}");
            assert_eq!(small, Algorithm::Doubling, "{hosts:?}");
        }
    }
}

/// Chunks differ in length by at most one element, so with a segment that
/// divides the shorter chunks exactly the first chunk has one segment more:
/// the ring's last slice then has steps that only send or only receive.
#[test]
fn chunks_with_one_segment_more() {
    for kind in [Kind::Mem, Kind::Tcp, Kind::Shm] {
        for world in 2..=5 {
            let mut comms = group(kind, world);
            for comm in &mut comms {
                // 24 f32 or 12 f64 elements per segment.
                comm.set_max_segment_bytes(96);
            }
            each_rank(&mut comms, |comm| {
                let count = 24 * comm.world_size() + 1;
                let label = format!("{kind:?} world {world} ring, one segment more");
                ops_for::<f32>(comm, Algorithm::Ring, count, &label);
                ops_for::<f64>(comm, Algorithm::Ring, count, &label);
            });
        }
    }
}

#[test]
fn large_counts() {
    const COUNT: usize = 1_000_003;
    for (kind, world) in [
        (Kind::Mem, 5),
        (Kind::Tcp, 3),
        (Kind::Tcp, 4),
        (Kind::Shm, 2),
        (Kind::Shm, 3),
    ] {
        let mut comms = group(kind, world);
        each_rank(&mut comms, |comm| {
            let (rank, world) = (comm.rank(), comm.world_size());
            for algo in [Algorithm::Ring, Algorithm::Tree, Algorithm::Doubling] {
                let opts = OpOptions {
                    algorithm: algo,
                    ..OpOptions::default()
                };
                let what = format!("{kind:?} world {world} {algo} rank {rank}");
                let mut buf = fill::<f32>(rank, COUNT, ReduceOp::Sum);
                comm.all_reduce(&mut buf, ReduceOp::Sum, &opts).unwrap();
                check(
                    &what,
                    &buf,
                    |i| expected::<f32>(world, i, ReduceOp::Sum),
                    0..COUNT,
                );

                let mut buf = fill::<bf16>(rank, COUNT, ReduceOp::Avg);
                let shard = comm.reduce_scatter(&mut buf, ReduceOp::Avg, &opts).unwrap();
                check(
                    &what,
                    &buf,
                    |i| expected::<bf16>(world, i, ReduceOp::Avg),
                    shard,
                );

                let mut buf = fill::<i64>(rank, COUNT, ReduceOp::Max);
                comm.all_reduce(&mut buf, ReduceOp::Max, &opts).unwrap();
                check(
                    &what,
                    &buf,
                    |i| expected::<i64>(world, i, ReduceOp::Max),
                    0..COUNT,
                );
            }
            ops_for::<f16>(
                comm,
                Algorithm::Auto,
                COUNT,
                &format!("{kind:?} world {world}"),
            );
        });
    }
}

#[test]
fn thousand_ranks_on_mem() {
    const WORLD: usize = 1024;
    let mut comms = Communicator::mem_group(WORLD);
    each_rank(&mut comms, |comm| {
        let rank = comm.rank();
        for (algo, count) in [
            (Algorithm::Tree, 3000),
            (Algorithm::Ring, 2500),
            (Algorithm::Doubling, 100),
        ] {
            let opts = OpOptions {
                algorithm: algo,
                ..OpOptions::default()
            };
            let what = format!("1024 ranks {algo} rank {rank}");
            let mut buf = fill::<i64>(rank, count, ReduceOp::Sum);
            comm.all_reduce(&mut buf, ReduceOp::Sum, &opts).unwrap();
            check(
                &what,
                &buf,
                |i| expected::<i64>(WORLD, i, ReduceOp::Sum),
                0..count,
            );
        }
        let mut buf = fill::<f32>(rank, 100, ReduceOp::Sum);
        comm.broadcast(&mut buf, 700, &OpOptions::default())
            .unwrap();
        check(
            "1024 ranks broadcast",
            &buf,
            |i| f32::value(700, i, ReduceOp::Sum),
            0..100,
        );
        comm.barrier(&OpOptions::default()).unwrap();
    });
}

/// `shift`: every rank's buffer lands on the rank `offset` after it, over
/// every transport, for messages of one segment and of many, and for every
/// offset of the world.
#[test]
fn shift_moves_each_rank_buffer_to_the_rank_offset_after_it() {
    for kind in [Kind::Mem, Kind::Tcp, Kind::Shm] {
        let world = 3;
        let mut comms = group(kind, world);
        for len in [5usize, 300_000] {
            for offset in 0..=world {
                let got = each_rank(&mut comms, |c| {
                    let send: Vec<f32> = (0..len)
                        .map(|i| (c.rank() * 1_000_000 + i) as f32)
                        .collect();
                    let mut recv = vec![-1.0f32; len];
                    c.shift(&send, &mut recv, offset, &OpOptions::default())
                        .map(|()| recv)
                });
                for (rank, recv) in got.into_iter().enumerate() {
                    let recv = recv.unwrap_or_else(|e| panic!("{kind:?} rank {rank}: {e}"));
                    let from = (rank + world - offset % world) % world;
                    assert!(
                        recv.iter()
                            .enumerate()
                            .all(|(i, &x)| x == (from * 1_000_000 + i) as f32),
                        "{kind:?}: rank {rank} of {world}, offset {offset}, {len} elements: not rank {from}'s"
                    );
                }
            }
        }
        // Buffers of different lengths are refused before anything moves.
        let err = comms[0]
            .shift(&[1.0f32; 3], &mut [0.0f32; 2], 1, &OpOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("as long"), "{err}");
    }
}

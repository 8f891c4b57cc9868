//! The element types, reduction operators and algorithm choices of the
//! public API.

use std::fmt;
use std::str::FromStr;

/// The element type of a buffer, as carried in every message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    I32,
    I64,
    U8,
}

impl DType {
    /// Every dtype, in wire-code order.
    pub const ALL: [DType; 7] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::I64,
        DType::U8,
    ];

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// The name used on the command line and in messages ("f32", ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }

    pub(crate) fn code(self) -> u8 {
        self as u8
    }

    pub(crate) fn from_code(code: u8) -> Option<DType> {
        DType::ALL.get(usize::from(code)).copied()
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error of the `FromStr` impls of [`DType`], [`ReduceOp`], [`Algorithm`]
/// and [`TransportKind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {got:?}: expected one of {expected}")]
pub struct ParseError {
    what: &'static str,
    got: String,
    expected: &'static str,
}

impl FromStr for DType {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DType::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| ParseError {
                what: "dtype",
                got: s.to_owned(),
                expected: "f32, f64, f16, bf16, i32, i64, u8",
            })
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
    impl Sealed for u8 {}
}

/// A type the collectives can move and reduce. Implemented for `f32`, `f64`,
/// `half::f16`, `half::bf16`, `i32`, `i64` and `u8`; sealed, because the
/// reduction kernels are chosen by [`Element::DTYPE`].
pub trait Element: bytemuck::Pod + Send + Sync + 'static + sealed::Sealed {
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for f64 {
    const DTYPE: DType = DType::F64;
}
impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
impl Element for i64 {
    const DTYPE: DType = DType::I64;
}
impl Element for u8 {
    const DTYPE: DType = DType::U8;
}

/// How `all_reduce` and `reduce_scatter` combine the ranks' values.
///
/// - Integer `Sum` and `Prod` wrap on overflow (two's complement), as in NCCL.
/// - `Avg` is `Sum` divided by the world size. On integer dtypes the division
///   truncates toward zero (`-7 / 2 == -3`), after a wrapping sum. On f16 and
///   bf16 the division is done in f32.
/// - `Min`/`Max` on floats follow `f32::min`/`f32::max`: a NaN loses against
///   a number.
/// - f16 and bf16 are reduced in f32 and rounded back after each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Avg,
    Min,
    Max,
    Prod,
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Avg,
        ReduceOp::Min,
        ReduceOp::Max,
        ReduceOp::Prod,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
            ReduceOp::Prod => "prod",
        }
    }

    pub(crate) fn code(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ReduceOp {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReduceOp::ALL
            .into_iter()
            .find(|o| o.name() == s)
            .ok_or_else(|| ParseError {
                what: "reduce op",
                got: s.to_owned(),
                expected: "sum, avg, min, max, prod",
            })
    }
}

/// Which algorithm runs a collective.
///
/// - `Ring`: bandwidth-optimal; each rank sends and receives about
///   2(n-1)/n of the buffer for an all-reduce, in 2(n-1) steps. For
///   `broadcast`, a pipelined chain.
/// - `Tree`: a pipelined binary tree, about 2·log2(n) steps: lower latency for
///   small messages and large worlds.
/// - `Doubling`: recursive doubling, log2(n) exchanges of the whole buffer
///   (one round trip at 2 ranks): the lowest latency for small messages.
///   For `broadcast`, a binomial tree.
/// - `Hierarchical`: node-aware, for n hosts of k ranks each: rings within
///   each host (shared memory) and k rings across hosts, each carrying 1/k
///   of the data. Where the ranks are not n × k with n, k > 1, the ring.
/// - `Auto` (the default) picks from the message size and world size, with
///   crossovers measured on TCP (see `algorithms::choose`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Algorithm {
    #[default]
    Auto,
    Ring,
    Tree,
    Doubling,
    Hierarchical,
}

impl Algorithm {
    /// Every algorithm, in wire-code order.
    pub const ALL: [Algorithm; 5] = [
        Algorithm::Auto,
        Algorithm::Ring,
        Algorithm::Tree,
        Algorithm::Doubling,
        Algorithm::Hierarchical,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Auto => "auto",
            Algorithm::Ring => "ring",
            Algorithm::Tree => "tree",
            Algorithm::Doubling => "doubling",
            Algorithm::Hierarchical => "hierarchical",
        }
    }

    pub(crate) fn code(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Algorithm {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| ParseError {
                what: "algorithm",
                got: s.to_owned(),
                expected: "auto, ring, tree, doubling, hierarchical",
            })
    }
}

/// How a rank reaches its peers (`parallel.transport`).
///
/// - `Auto` (the default): shared memory with peers on this host (same
///   hostname, boot and network namespace), TCP with the others.
/// - `Tcp`: TCP with every peer, also on this host.
/// - `Shm`: shared memory with every peer; an error if one is on another
///   host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TransportKind {
    #[default]
    Auto,
    Tcp,
    Shm,
}

impl TransportKind {
    pub const ALL: [TransportKind; 3] =
        [TransportKind::Auto, TransportKind::Tcp, TransportKind::Shm];

    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Auto => "auto",
            TransportKind::Tcp => "tcp",
            TransportKind::Shm => "shm",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TransportKind {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TransportKind::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| ParseError {
                what: "transport",
                got: s.to_owned(),
                expected: "auto, tcp, shm",
            })
    }
}

/// The collective an operation runs, as carried in message headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
    Barrier,
    /// Every rank sends to the rank `offset` after it and receives from
    /// the rank `offset` before it (`Communicator::shift`).
    Shift,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::AllReduce => "all_reduce",
            OpKind::ReduceScatter => "reduce_scatter",
            OpKind::AllGather => "all_gather",
            OpKind::Broadcast => "broadcast",
            OpKind::Barrier => "barrier",
            OpKind::Shift => "shift",
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Rank `rank`'s shard of a buffer of `len` elements: where
/// `reduce_scatter` leaves each rank's result and `all_gather` expects each
/// rank's part. The rule is the worker contract's, shared with checkpoints.
pub use cohort_contract::shard_range;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.to_string().parse::<DType>().unwrap(), d);
            assert_eq!(DType::from_code(d.code()), Some(d));
        }
        for o in ReduceOp::ALL {
            assert_eq!(o.to_string().parse::<ReduceOp>().unwrap(), o);
        }
        for a in Algorithm::ALL {
            assert_eq!(a.to_string().parse::<Algorithm>().unwrap(), a);
        }
        for t in TransportKind::ALL {
            assert_eq!(t.to_string().parse::<TransportKind>().unwrap(), t);
        }
        let err = "rdma".parse::<TransportKind>().unwrap_err().to_string();
        assert!(err.contains("rdma") && err.contains("shm"), "{err}");
        let err = "f31".parse::<DType>().unwrap_err().to_string();
        assert!(err.contains("f31") && err.contains("bf16"), "{err}");
    }
}

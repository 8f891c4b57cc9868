//! cohort's collectives: all-reduce, reduce-scatter, all-gather, broadcast and
//! barrier over typed slices, with transport-agnostic algorithms (ring, tree)
//! and point-to-point transports (tcp, mem). No libtorch, no gRPC.

pub mod store;

pub use store::{FileStore, MemStore, PrefixStore, Store, StoreError};

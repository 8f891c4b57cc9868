//! cohort's collectives: all-reduce, reduce-scatter, all-gather, broadcast and
//! barrier over typed slices, with transport-agnostic algorithms (ring, tree,
//! doubling) and point-to-point transports (tcp, shm, mem). No libtorch, no
//! gRPC.
//!
//! Layers, as in Gloo:
//! - [`Communicator`] (the front): validates, numbers ops, picks the
//!   algorithm, applies timeouts, records ops, breaks on failure; its
//!   [`AbortHandle`] fails the op in flight from another thread;
//! - `algorithms`: ring, tree, chain, doubling; they move bytes through a
//!   point-to-point `Transport` and never name one;
//! - `transport`: between processes, a pipe per peer (`tcp`, or `shm` for a
//!   peer on this host) driven by one loop; `mem` (threads);
//! - `wire`: the header checked on every message (desync detection);
//! - `auth`: the HMAC handshake with the job token;
//! - `store`: bootstrap key-value stores;
//! - [`nccl`]: the NCCL backend for CUDA device memory (its own
//!   communicator: NCCL runs its own algorithms on the GPU), loaded at run
//!   time, and [`backend`]: which of the two a job uses.
//!
//! ```
//! use cohort_collectives::{Communicator, OpOptions, ReduceOp};
//!
//! let handles: Vec<_> = Communicator::mem_group(3)
//!     .into_iter()
//!     .map(|mut comm| {
//!         std::thread::spawn(move || {
//!             let mut grads = vec![comm.rank() as f32; 5];
//!             comm.all_reduce(&mut grads, ReduceOp::Sum, &OpOptions::default())
//!                 .unwrap();
//!             grads
//!         })
//!     })
//!     .collect();
//! for h in handles {
//!     assert_eq!(h.join().unwrap(), vec![3.0; 5]);
//! }
//! ```

mod abort;
mod algorithms;
mod auth;
pub mod backend;
mod communicator;
mod error;
mod host;
pub mod nccl;
mod reduce;
pub mod store;
mod transport;
mod types;
mod wire;

pub use abort::AbortHandle;
pub use backend::{Backend, BackendRequest};
pub use communicator::{Communicator, OpOptions, OpRecord};
pub use error::CommError;
pub use store::{FileStore, MemStore, PrefixStore, Store, StoreError};
pub use transport::tcp::TcpConfig;
pub use types::{
    Algorithm, DType, Element, OpKind, ParseError, ReduceOp, TransportKind, shard_range,
};

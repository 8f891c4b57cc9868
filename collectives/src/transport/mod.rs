//! Point-to-point transports.
//!
//! An algorithm speaks to its peers only through [`Transport::exchange`]: a
//! batch of sends and receives, each to or from one peer, that the transport
//! drives concurrently until all are complete. Running them together is what
//! lets a ring send to its right neighbour while it receives from its left one
//! without either side blocking the other, whatever the message size.
//!
//! Every message is a [`Header`] followed by its payload. A receive names the
//! header it expects; the transport checks the one that arrives
//! (`Header::check`) before touching the payload, so a desync becomes an
//! error instead of garbage.
//!
//! Between processes ([`links`]), every peer is reached through one
//! [`pipe::Pipe`], a non-blocking byte stream, and one loop drives all the
//! transfers of an exchange over whichever kinds of pipe they use:
//!
//! - [`tcp`]: a TCP connection (the kernel copies the bytes);
//! - [`shm`]: for a peer on this host, rings in shared memory that the
//!   sender copies into and the receiver reads (and reduces) straight out of;
//! - [`bootstrap`] finds the peers through the store, decides per peer, and
//!   connects and authenticates them.
//!
//! [`mem`] is in-process mailboxes, for tests and for simulating thousands
//! of ranks as threads.

use std::time::Instant;

use crate::error::CommError;
use crate::types::{DType, ReduceOp};
use crate::wire::Header;

pub(crate) mod bootstrap;
pub(crate) mod links;
pub(crate) mod mem;
pub(crate) mod pipe;
pub(crate) mod shm;
pub(crate) mod tcp;

/// One half of a message exchange.
pub(crate) enum Xfer<'a> {
    /// Send `header` (whose `len` is `data.len()`) and `data` to `peer`.
    Send {
        peer: usize,
        header: Header,
        data: &'a [u8],
    },
    /// Receive a message from `peer` that must carry exactly `header` (whose
    /// `len` is `buf.len()`) into `buf`.
    Recv {
        peer: usize,
        header: Header,
        buf: &'a mut [u8],
    },
    /// Receive such a message and combine it into `dst` element by element
    /// (`dst[i] = dst[i] op msg[i]`, elements of `dtype`). A transport that
    /// can read the payload in place (shared memory) reduces straight from
    /// it; others land it first.
    RecvReduce {
        peer: usize,
        header: Header,
        dst: &'a mut [u8],
        dtype: DType,
        op: ReduceOp,
    },
    /// Nothing: lets algorithms pass fixed-size arrays of transfers.
    Idle,
}

impl Xfer<'_> {
    pub fn peer(&self) -> usize {
        match self {
            Xfer::Send { peer, .. } | Xfer::Recv { peer, .. } | Xfer::RecvReduce { peer, .. } => {
                *peer
            }
            Xfer::Idle => usize::MAX,
        }
    }

    pub fn header(&self) -> Option<&Header> {
        match self {
            Xfer::Send { header, .. }
            | Xfer::Recv { header, .. }
            | Xfer::RecvReduce { header, .. } => Some(header),
            Xfer::Idle => None,
        }
    }

    /// Names the peer by rank instead of by its position in `members`, and
    /// or-s `tag` into the message's `chunk`.
    pub fn regroup(&mut self, members: Option<&[usize]>, tag: u64) {
        let (peer, header) = match self {
            Xfer::Send { peer, header, .. }
            | Xfer::Recv { peer, header, .. }
            | Xfer::RecvReduce { peer, header, .. } => (peer, header),
            Xfer::Idle => return,
        };
        if let Some(m) = members {
            *peer = m[*peer];
        }
        header.chunk |= tag;
    }

    /// Whether this transfer receives.
    pub fn receives(&self) -> bool {
        matches!(self, Xfer::Recv { .. } | Xfer::RecvReduce { .. })
    }

    pub fn what(&self) -> &'static str {
        match self {
            Xfer::Send { .. } => "sending to it",
            Xfer::Recv { .. } | Xfer::RecvReduce { .. } => "receiving from it",
            Xfer::Idle => "idle",
        }
    }
}

/// A point-to-point transport between the `world` ranks of one communicator.
pub(crate) trait Transport: Send {
    /// Runs every transfer in `xfers` concurrently until all are complete.
    /// Fails with `Timeout` (naming the first peer still pending) when
    /// `deadline` passes, `PeerClosed` when a peer's connection ends,
    /// `PeerAborted` when a peer sends an abort notice, and `Desync` when a
    /// received header differs from the expected one.
    fn exchange(&mut self, xfers: &mut [Xfer<'_>], deadline: Instant) -> Result<(), CommError>;

    /// Best effort: tells every peer that this rank failed (with `reason`),
    /// then closes every connection. The transport is unusable afterwards.
    fn abort(&mut self, reason: &str);

    /// How long a wait polls before it blocks (for tuning; transports that
    /// never spin ignore it).
    fn set_spin(&mut self, _budget: std::time::Duration) {}
}

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
//! - [`tcp`]: one TCP connection per peer, non-blocking sockets driven by
//!   `poll(2)` (no spinning, no thread per peer, no copy of the payload).
//! - [`mem`]: in-process mailboxes, for tests and for simulating thousands of
//!   ranks as threads.

use std::time::Instant;

use crate::error::CommError;
use crate::wire::Header;

pub(crate) mod mem;
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
    /// Nothing: lets algorithms pass fixed-size arrays of transfers.
    Idle,
}

impl Xfer<'_> {
    pub fn peer(&self) -> usize {
        match self {
            Xfer::Send { peer, .. } | Xfer::Recv { peer, .. } => *peer,
            Xfer::Idle => usize::MAX,
        }
    }

    pub fn header(&self) -> Option<&Header> {
        match self {
            Xfer::Send { header, .. } | Xfer::Recv { header, .. } => Some(header),
            Xfer::Idle => None,
        }
    }

    pub fn what(&self) -> &'static str {
        match self {
            Xfer::Send { .. } => "sending to it",
            Xfer::Recv { .. } => "receiving from it",
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

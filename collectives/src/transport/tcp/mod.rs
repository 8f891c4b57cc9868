//! The TCP transport: one connection per pair of ranks, authenticated with
//! the job token, driven without threads by non-blocking sockets and
//! `poll(2)`.
//!
//! Bootstrap: every rank listens on an ephemeral port and publishes
//! `addr/<rank>` = `host:port listener=ID` in the store, waits for every
//! rank's address, connects to every higher rank, then accepts one
//! connection from every lower rank (every handshake concurrently, each
//! under its own deadline). Connecting upward first cannot deadlock: the highest rank only
//! accepts, and every rank's connect phase waits only on higher ranks.
//!
//! Tuning, for bandwidth: `TCP_NODELAY` (a header and a small payload leave
//! at once), 4 MiB socket buffers (a sender runs ahead of a neighbour that
//! is busy reducing or, with more ranks than cores, not scheduled: measured
//! better than 0.5-2 MiB and than autotuning with 4 ranks on 2 cores; the
//! kernel caps the request at `net.core.wmem_max`/`rmem_max`), and one `sendmsg`
//! with two iovecs per message (header and payload in one system call, the
//! payload never copied in user space). Receives go straight into the
//! destination slice.
//!
//! Rooms: [`config`] (what a rank is told), `bootstrap` (the store, connecting, accepting,
//! handshakes), `socket` (socket options and one peer's connection state),
//! `poll` (the exchange loop that drives every transfer).

mod bootstrap;
mod config;
mod poll;
mod socket;

pub use config::TcpConfig;

use std::time::Duration;

use poll::Progress;
use socket::Conn;

/// One rank's connections to its peers.
pub(crate) struct TcpTransport {
    rank: usize,
    conns: Vec<Option<Conn>>,
    progress: Vec<Progress>,
    pollfds: Vec<libc::pollfd>,
    /// Some system call of the current pass moved bytes.
    moved: bool,
    /// How long to keep polling without blocking once nothing moves.
    spin: Duration,
}

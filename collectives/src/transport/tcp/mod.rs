//! The TCP pipe: one connection per peer on another host (or, with
//! `parallel.transport = "tcp"`, on this one), authenticated with the job
//! token at bootstrap and then driven by the exchange loop (`links`)
//! through non-blocking system calls.
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
//! Rooms: [`config`] (what a rank is told), `socket` (socket options and
//! the pipe itself).

mod config;
mod socket;

pub use config::TcpConfig;
pub(crate) use socket::{TcpPipe, tune};

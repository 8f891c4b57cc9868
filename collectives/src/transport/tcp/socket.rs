//! One peer's socket: the options set on it, waiting on it with `poll(2)`,
//! and the state of the frames written to it.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Instant;

use crate::wire::HEADER_LEN;

/// Socket send and receive buffer size requested from the kernel.
const SOCKET_BUFFER: libc::c_int = 4 << 20;
/// Most bytes a waiting receive asks to arrive before it is woken. A rank
/// blocked on a receive is woken once the rest of the message (up to this
/// much) is in its socket instead of at the first byte: with more ranks
/// than cores every wake-up is a context switch, and a wake-up that finds a
/// whole segment to copy does more work per switch. The kernel caps it at
/// half the receive buffer; a peer's abort or close (FIN) wakes it anyway,
/// and after `PROBE_AFTER` it drops to 1 so a probe is read at once.
const RCVLOWAT_MAX: usize = 256 << 10;

pub(super) fn setsockopt(
    stream: &TcpStream,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) {
    // SAFETY: a valid fd, and a pointer to a c_int with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(
            "setsockopt({level}, {name}) failed: {}",
            io::Error::last_os_error()
        );
    }
}

pub(super) fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    setsockopt(stream, libc::SOL_SOCKET, libc::SO_SNDBUF, SOCKET_BUFFER);
    setsockopt(stream, libc::SOL_SOCKET, libc::SO_RCVBUF, SOCKET_BUFFER);
    Ok(())
}

pub(super) fn poll_one(
    fd: libc::c_int,
    events: libc::c_short,
    deadline: Instant,
) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    match rc {
        r if r < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

pub(super) struct Conn {
    pub(super) stream: TcpStream,
    /// A message to this peer is partly written: the stream is mid-frame.
    pub(super) mid_send: bool,
    /// A probe frame waiting to be written (bytes `ctrl_done..ctrl_len`).
    pub(super) ctrl: [u8; HEADER_LEN],
    pub(super) ctrl_done: usize,
    pub(super) ctrl_len: usize,
    /// The socket's `SO_RCVLOWAT` as last set.
    pub(super) lowat: usize,
}

impl Conn {
    pub(super) fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            mid_send: false,
            ctrl: [0; HEADER_LEN],
            ctrl_done: 0,
            ctrl_len: 0,
            lowat: 1,
        }
    }

    /// Asks the kernel not to report the socket readable before `bytes`
    /// bytes have arrived (see `RCVLOWAT_MAX`).
    pub(super) fn set_lowat(&mut self, bytes: usize) {
        let bytes = bytes.clamp(1, RCVLOWAT_MAX);
        if bytes != self.lowat {
            self.lowat = bytes;
            setsockopt(
                &self.stream,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                bytes as libc::c_int,
            );
        }
    }

    pub(super) fn ctrl_pending(&self) -> bool {
        self.ctrl_done < self.ctrl_len
    }

    /// No frame is partly written.
    pub(super) fn at_boundary(&self) -> bool {
        !self.mid_send && (self.ctrl_done == 0 || !self.ctrl_pending())
    }

    /// Writes what it can of the pending probe; `Ok(true)` once none is left.
    pub(super) fn flush_ctrl(&mut self) -> io::Result<bool> {
        while self.ctrl_pending() {
            let left = &self.ctrl[self.ctrl_done..self.ctrl_len];
            // SAFETY: a live slice, only read.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    left.as_ptr().cast(),
                    left.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(false),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            self.ctrl_done += n as usize;
        }
        self.ctrl_done = 0;
        self.ctrl_len = 0;
        Ok(true)
    }
}

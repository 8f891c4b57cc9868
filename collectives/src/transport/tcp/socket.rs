//! One peer's socket: the options set on it, and the pipe over it.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};

use crate::transport::pipe::Pipe;

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

fn setsockopt(stream: &TcpStream, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
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

pub(crate) fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    setsockopt(stream, libc::SOL_SOCKET, libc::SO_SNDBUF, SOCKET_BUFFER);
    setsockopt(stream, libc::SOL_SOCKET, libc::SO_RCVBUF, SOCKET_BUFFER);
    Ok(())
}

/// A TCP connection to one peer, non-blocking.
pub(crate) struct TcpPipe {
    stream: TcpStream,
    /// The socket's `SO_RCVLOWAT` as last set.
    lowat: usize,
}

impl TcpPipe {
    pub fn new(stream: TcpStream) -> io::Result<TcpPipe> {
        stream.set_nonblocking(true)?;
        Ok(TcpPipe { stream, lowat: 1 })
    }

    /// Asks the kernel not to report the socket readable before `bytes`
    /// bytes have arrived (see `RCVLOWAT_MAX`).
    fn set_lowat(&mut self, bytes: usize) {
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

    fn recv_flags(&mut self, dst: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
        loop {
            // SAFETY: dst is a live, writable slice of dst.len() bytes.
            let n = unsafe {
                libc::recv(
                    self.stream.as_raw_fd(),
                    dst.as_mut_ptr().cast(),
                    dst.len(),
                    flags | libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                return Ok(n as usize);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                ));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(0),
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
    }
}

impl Pipe for TcpPipe {
    fn send(&mut self, head: &[u8], body: &[u8]) -> io::Result<usize> {
        let mut iov = [
            libc::iovec {
                iov_base: head.as_ptr() as *mut libc::c_void,
                iov_len: head.len(),
            },
            libc::iovec {
                iov_base: body.as_ptr() as *mut libc::c_void,
                iov_len: body.len(),
            },
        ];
        let skip = usize::from(head.is_empty());
        // SAFETY: msghdr is plain data; zeroed is a valid empty value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov[skip..].as_mut_ptr();
        msg.msg_iovlen = (2 - skip) as _;
        loop {
            // SAFETY: the iovecs point into live slices that are only read.
            let n = unsafe {
                libc::sendmsg(
                    self.stream.as_raw_fd(),
                    &msg,
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(0),
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
    }

    fn recv(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        self.recv_flags(dst, 0)
    }

    fn peek(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        self.recv_flags(dst, libc::MSG_PEEK)
    }

    fn wait_on(&mut self, write: bool, want: usize) -> (RawFd, libc::c_short) {
        if write {
            (self.stream.as_raw_fd(), libc::POLLOUT)
        } else {
            self.set_lowat(want);
            (self.stream.as_raw_fd(), libc::POLLIN)
        }
    }

    fn abort(&mut self, notice: &[u8], at_boundary: bool) {
        if at_boundary {
            // SAFETY: a live slice, only read.
            let _ = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    notice.as_ptr().cast(),
                    notice.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
        }
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

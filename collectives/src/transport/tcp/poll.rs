//! The exchange loop: every transfer of an exchange moved forward with
//! non-blocking system calls, and `poll(2)` on the sockets when none can
//! move; probes after `PROBE_AFTER`, timeouts, aborts.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::TcpTransport;
use super::socket::{Conn, poll_one};
use crate::error::CommError;
use crate::transport::{Transport, Xfer};
use crate::wire::{self, Bystander, Frame, HEADER_LEN, Header, PROBE_AFTER};

/// Most bytes one send or receive system call moves. Bounded calls
/// alternate between the directions of an exchange, so both keep flowing
/// and each piece is still in cache when the peer copies it out.
const MAX_IO: usize = 256 << 10;
/// Longest abort reason read from a peer.
const MAX_REASON: u64 = 4096;

#[derive(Clone, Copy)]
pub(super) struct Progress {
    hdr: [u8; HEADER_LEN],
    hdr_done: usize,
    data_done: usize,
    done: bool,
}

impl TcpTransport {
    fn peer_closed(&self, peer: usize, header: &Header, detail: impl Into<String>) -> CommError {
        CommError::PeerClosed {
            rank: self.rank,
            peer,
            op: header.describe(),
            detail: detail.into(),
        }
    }

    fn conn(&mut self, peer: usize, header: &Header) -> Result<&mut Conn, CommError> {
        let rank = self.rank;
        self.conns
            .get_mut(peer)
            .and_then(Option::as_mut)
            .ok_or_else(|| CommError::PeerClosed {
                rank,
                peer,
                op: header.describe(),
                detail: String::from("no connection to that rank"),
            })
    }

    /// Moves one transfer forward without blocking; `Ok(true)` when complete.
    fn advance(&mut self, i: usize, xfer: &mut Xfer<'_>) -> Result<bool, CommError> {
        let mut p = self.progress[i];
        let before = (p.hdr_done, p.data_done);
        let result = match xfer {
            Xfer::Send { peer, header, data } => self.advance_send(*peer, header, data, &mut p),
            Xfer::Recv { peer, header, buf } => self.advance_recv(*peer, header, buf, &mut p),
            Xfer::Idle => Ok(true),
        };
        p.done = matches!(result, Ok(true));
        self.moved |= (p.hdr_done, p.data_done) != before;
        self.progress[i] = p;
        result
    }

    fn advance_send(
        &mut self,
        peer: usize,
        header: &Header,
        data: &[u8],
        p: &mut Progress,
    ) -> Result<bool, CommError> {
        let rank = self.rank;
        let conn = self.conn(peer, header)?;
        match conn.flush_ctrl() {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(e) => {
                return Err(CommError::PeerClosed {
                    rank,
                    peer,
                    op: header.describe(),
                    detail: format!("send failed: {e}"),
                });
            }
        }
        let fd = conn.stream.as_raw_fd();
        loop {
            let hdr_left = &p.hdr[p.hdr_done..];
            let data_left = &data[p.data_done..];
            if hdr_left.is_empty() && data_left.is_empty() {
                conn.mid_send = false;
                return Ok(true);
            }
            let mut iov = [
                libc::iovec {
                    iov_base: hdr_left.as_ptr() as *mut libc::c_void,
                    iov_len: hdr_left.len(),
                },
                libc::iovec {
                    iov_base: data_left.as_ptr() as *mut libc::c_void,
                    iov_len: data_left.len().min(MAX_IO),
                },
            ];
            let skip = usize::from(hdr_left.is_empty());
            // SAFETY: msghdr is plain data; zeroed is a valid empty value.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov[skip..].as_mut_ptr();
            msg.msg_iovlen = (2 - skip) as _;
            // SAFETY: the iovecs point into live slices that are only read.
            let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(false),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(self.peer_closed(peer, header, format!("send failed: {e}"))),
                }
            }
            conn.mid_send = true;
            let mut n = n as usize;
            let h = n.min(hdr_left.len());
            p.hdr_done += h;
            n -= h;
            p.data_done += n;
            if p.hdr_done == HEADER_LEN && p.data_done == data.len() {
                conn.mid_send = false;
                return Ok(true);
            }
            return Ok(false);
        }
    }

    fn advance_recv(
        &mut self,
        peer: usize,
        header: &Header,
        buf: &mut [u8],
        p: &mut Progress,
    ) -> Result<bool, CommError> {
        let rank = self.rank;
        let fd = self.conn(peer, header)?.stream.as_raw_fd();
        loop {
            let (dst, is_hdr) = if p.hdr_done < HEADER_LEN {
                (&mut p.hdr[p.hdr_done..], true)
            } else if p.data_done < buf.len() {
                let end = buf.len().min(p.data_done + MAX_IO);
                (&mut buf[p.data_done..end], false)
            } else {
                return Ok(true);
            };
            // SAFETY: dst is a live, writable slice of dst.len() bytes.
            let n =
                unsafe { libc::recv(fd, dst.as_mut_ptr().cast(), dst.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(false),
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        return Err(self.peer_closed(peer, header, format!("receive failed: {e}")));
                    }
                }
            }
            if n == 0 {
                return Err(self.peer_closed(peer, header, "the peer closed the connection"));
            }
            if !is_hdr {
                p.data_done += n as usize;
                return Ok(p.data_done == buf.len());
            }
            p.hdr_done += n as usize;
            if p.hdr_done < HEADER_LEN {
                continue;
            }
            let frame = wire::decode(&p.hdr).map_err(|e| {
                self.peer_closed(peer, header, format!("unreadable message header: {e}"))
            })?;
            if let Frame::Probe(probe) = frame {
                header.check_probe(&probe, rank, peer)?;
                p.hdr_done = 0;
                continue;
            }
            if let Frame::Abort { len } = frame {
                let reason = self.read_reason(peer, len);
                return Err(CommError::PeerAborted {
                    rank,
                    peer,
                    op: header.describe(),
                    reason,
                });
            }
            header.check(&frame, rank, peer)?;
        }
    }

    /// Stages a probe (see `wire`) to every peer a pending receive waits on.
    fn probe(&mut self, xfers: &[Xfer<'_>]) {
        for (xfer, p) in xfers.iter().zip(&self.progress) {
            let Xfer::Recv { peer, header, .. } = xfer else {
                continue;
            };
            if p.done {
                continue;
            }
            if let Some(conn) = self.conns.get_mut(*peer).and_then(Option::as_mut) {
                if conn.at_boundary() && !conn.ctrl_pending() {
                    conn.ctrl = header.encode_probe();
                    conn.ctrl_done = 0;
                    conn.ctrl_len = HEADER_LEN;
                }
            }
        }
    }

    /// Checks the first frame waiting from every peer in `watch` (those this
    /// exchange receives nothing from; see "Bystanders" in `wire`): a probe
    /// is read, a desync or an abort notice is the error, and a peer whose
    /// next frame is for later (or whose connection ended: it may have
    /// finished) is no longer watched.
    fn check_bystanders(&mut self, op: &Header, watch: &mut [bool]) -> Result<(), CommError> {
        for (peer, watched) in watch.iter_mut().enumerate() {
            while *watched {
                let Some(fd) = self.conns[peer].as_ref().map(|c| c.stream.as_raw_fd()) else {
                    *watched = false;
                    break;
                };
                let mut hdr = [0u8; HEADER_LEN];
                // SAFETY: a live, writable buffer of HEADER_LEN bytes.
                let n = unsafe {
                    libc::recv(
                        fd,
                        hdr.as_mut_ptr().cast(),
                        HEADER_LEN,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                };
                if n == 0
                    || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock)
                {
                    *watched = false;
                }
                if n < HEADER_LEN as isize {
                    break;
                }
                let frame = wire::decode(&hdr).map_err(|e| {
                    self.peer_closed(peer, op, format!("unreadable message header: {e}"))
                })?;
                match op.check_bystander(&frame, self.rank, peer)? {
                    Bystander::Later => *watched = false,
                    verdict => {
                        // SAFETY: as above; reads the header just peeked.
                        unsafe {
                            libc::recv(fd, hdr.as_mut_ptr().cast(), HEADER_LEN, libc::MSG_DONTWAIT)
                        };
                        if let Bystander::Aborted { len } = verdict {
                            return Err(CommError::PeerAborted {
                                rank: self.rank,
                                peer,
                                op: op.describe(),
                                reason: self.read_reason(peer, len),
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads the text of an abort notice (best effort, at most one second).
    fn read_reason(&mut self, peer: usize, len: u64) -> String {
        let Some(conn) = self.conns.get_mut(peer).and_then(Option::as_mut) else {
            return String::from("(no reason given)");
        };
        let mut text = vec![0u8; len.min(MAX_REASON) as usize];
        let deadline = Instant::now() + Duration::from_secs(1);
        let fd = conn.stream.as_raw_fd();
        let mut got = 0;
        while got < text.len() {
            // SAFETY: a live, writable slice.
            let n = unsafe {
                libc::recv(
                    fd,
                    text[got..].as_mut_ptr().cast(),
                    text.len() - got,
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                got += n as usize;
            } else if n == 0
                || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock
                || !matches!(poll_one(fd, libc::POLLIN, deadline), Ok(true))
            {
                break;
            }
        }
        text.truncate(got);
        String::from_utf8_lossy(&text).into_owned()
    }
}

impl Transport for TcpTransport {
    fn exchange(&mut self, xfers: &mut [Xfer<'_>], deadline: Instant) -> Result<(), CommError> {
        let started = Instant::now();
        self.progress.clear();
        for xfer in xfers.iter() {
            let hdr = match xfer {
                Xfer::Send { header, .. } => header.encode(),
                Xfer::Recv { .. } | Xfer::Idle => [0; HEADER_LEN],
            };
            self.progress.push(Progress {
                hdr,
                hdr_done: 0,
                data_done: 0,
                done: matches!(xfer, Xfer::Idle),
            });
        }
        let mut probed = false;
        let mut idle_since = started;
        // Peers watched as bystanders once probing (see `check_bystanders`).
        let mut watch = vec![false; self.conns.len()];
        loop {
            for conn in self.conns.iter_mut().flatten() {
                if conn.ctrl_pending() {
                    // A failure shows up on the next transfer on this peer.
                    let _ = conn.flush_ctrl();
                }
            }
            let mut pending = false;
            self.moved = false;
            for (i, xfer) in xfers.iter_mut().enumerate() {
                if !self.progress[i].done && !self.advance(i, xfer)? {
                    pending = true;
                }
            }
            if !pending {
                return Ok(());
            }
            if self.moved {
                idle_since = Instant::now();
                continue;
            }
            // Spin before blocking: a peer's message usually arrives within
            // microseconds, while a wake-up from poll(2) costs a context
            // switch and, on an idle core of a VM, tens of microseconds.
            // Yielding between tries lets a peer that shares this core run.
            if idle_since.elapsed() < self.spin {
                std::thread::yield_now();
                continue;
            }
            self.pollfds.clear();
            for (i, xfer) in xfers.iter().enumerate() {
                let p = self.progress[i];
                if p.done {
                    continue;
                }
                let (peer, events) = match xfer {
                    Xfer::Send { peer, .. } => (*peer, libc::POLLOUT),
                    Xfer::Recv { peer, buf, .. } => {
                        let left = if probed {
                            1
                        } else {
                            HEADER_LEN - p.hdr_done + buf.len() - p.data_done
                        };
                        if let Some(c) = self.conns.get_mut(*peer).and_then(Option::as_mut) {
                            c.set_lowat(left);
                        }
                        (*peer, libc::POLLIN)
                    }
                    Xfer::Idle => continue,
                };
                let (fd, events) = match self.conns[peer].as_ref() {
                    Some(c) if c.ctrl_pending() => (c.stream.as_raw_fd(), events | libc::POLLOUT),
                    Some(c) => (c.stream.as_raw_fd(), events),
                    None => (-1, events),
                };
                self.pollfds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
            }
            let now = Instant::now();
            if !probed && now >= started + PROBE_AFTER {
                probed = true;
                self.probe(xfers);
                for (peer, w) in watch.iter_mut().enumerate() {
                    *w = self.conns[peer].is_some()
                        && !xfers
                            .iter()
                            .any(|x| matches!(x, Xfer::Recv { .. }) && x.peer() == peer);
                }
                continue;
            }
            if probed {
                if let Some(op) = xfers.iter().find_map(Xfer::header).copied() {
                    self.check_bystanders(&op, &mut watch)?;
                }
                for (peer, _) in watch.iter().enumerate().filter(|(_, w)| **w) {
                    if let Some(c) = self.conns[peer].as_mut() {
                        c.set_lowat(1);
                        self.pollfds.push(libc::pollfd {
                            fd: c.stream.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        });
                    }
                }
            }
            if now >= deadline {
                let stuck = xfers
                    .iter()
                    .zip(&self.progress)
                    .find_map(|(x, p)| (!p.done).then_some(x))
                    .expect("a transfer is pending");
                return Err(CommError::Timeout {
                    rank: self.rank,
                    peer: stuck.peer(),
                    op: stuck.header().map(Header::describe).unwrap_or_default(),
                    what: stuck.what(),
                    waited: now - started,
                });
            }
            let wake = if probed {
                deadline
            } else {
                deadline.min(started + PROBE_AFTER)
            };
            let ms = (wake - now).as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
            // SAFETY: pollfds is a live array of pollfd of the given length.
            let rc = unsafe { libc::poll(self.pollfds.as_mut_ptr(), self.pollfds.len() as _, ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(CommError::io("poll on peer sockets", e));
                }
            }
        }
    }

    fn set_spin(&mut self, budget: Duration) {
        self.spin = budget;
    }

    fn abort(&mut self, reason: &str) {
        let text = &reason.as_bytes()[..reason.len().min(MAX_REASON as usize)];
        for conn in self.conns.iter_mut().filter_map(Option::take) {
            if conn.at_boundary() {
                let mut msg = wire::encode_abort(text.len()).to_vec();
                msg.extend_from_slice(text);
                // SAFETY: a live slice, only read.
                let _ = unsafe {
                    libc::send(
                        conn.stream.as_raw_fd(),
                        msg.as_ptr().cast(),
                        msg.len(),
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                };
            }
            let _ = conn.stream.shutdown(Shutdown::Write);
        }
    }
}

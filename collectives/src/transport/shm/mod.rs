//! The shared-memory pipe, for a peer on this host.
//!
//! Each rank has one segment (see [`segment`]) with one ring to each
//! same-host peer. Sending copies the bytes into this rank's ring to the
//! peer; receiving copies them out of the peer's ring to this rank, or, for
//! a receive-and-reduce, reduces straight from it (`Pipe::lend`): no socket,
//! no system call, and one copy fewer than through the kernel.
//!
//! Setup, after the peers found each other through the store: they connect
//! over an abstract Unix socket (per network namespace, like the host
//! identity that sent them there), run the same HMAC handshake as TCP
//! (`auth`), and only then exchange their segments and doorbells as
//! descriptors (`SCM_RIGHTS`): a process without the job token never maps
//! anything. The socket stays open as the pair's control channel: an abort
//! notice travels on it, and its end is how a rank learns that its peer
//! died (the kernel closes it with the process), so a dead peer is an
//! error naming it at once, never a hang.
//!
//! Waking. A rank that has found nothing to do for its spin budget sets its
//! "sleeping" flag, looks once more, and blocks in `poll(2)` on its
//! doorbell (an eventfd) and its peers' control sockets. A writer checks
//! the reader's flag after publishing (a full fence on both sides orders
//! the flag against the data, so no wake-up is lost) and only then writes
//! the doorbell: a rank that spins costs its peers no system call.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use super::pipe::Pipe;
use crate::wire::{self, Frame, HEADER_LEN};

pub(crate) mod fds;
pub(crate) mod segment;

use segment::{Ring, Segment};

/// What a rank learns when its peer's end of the control socket closes.
const GONE: &str = "its process ended: the shared-memory pipe's control socket closed";
/// Longest abort reason read from the control socket.
const MAX_REASON: usize = 4096;

/// This rank's side of shared memory: its segment and its doorbell.
pub(crate) struct Local {
    seg: Arc<Segment>,
    bell: OwnedFd,
}

impl Local {
    /// A segment with `rings` rings (one per same-host peer) and a doorbell.
    pub fn create(rank: usize, rings: usize) -> io::Result<Local> {
        Ok(Local {
            seg: Segment::create(rank, rings)?,
            bell: segment::eventfd()?,
        })
    }

    /// The doorbell of this rank's exchange loop.
    pub fn doorbell(&self) -> io::Result<Doorbell> {
        Ok(Doorbell {
            seg: self.seg.clone(),
            bell: self.bell.try_clone()?,
        })
    }

    /// After the handshake with rank `peer` on `ctrl`: sends this rank's
    /// segment and doorbell (and which of its rings, `ring`, carries bytes
    /// to the peer), receives the peer's, and maps them. The connecting side
    /// (`first`) sends first.
    pub fn join(
        &self,
        ctrl: UnixStream,
        rank: usize,
        peer: usize,
        ring: usize,
        first: bool,
        deadline: Instant,
    ) -> Result<ShmPipe, String> {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| String::from("timed out before exchanging segments"))?;
        ctrl.set_nonblocking(false)
            .and_then(|()| ctrl.set_read_timeout(Some(left)))
            .and_then(|()| ctrl.set_write_timeout(Some(left)))
            .map_err(|e| format!("socket options: {e}"))?;
        let mut ours = [0u8; 8];
        ours[..4].copy_from_slice(&(ring as u32).to_le_bytes());
        ours[4..].copy_from_slice(&(rank as u32).to_le_bytes());
        let send = || {
            fds::send(
                &ctrl,
                &ours,
                &[self.seg.fd().as_raw_fd(), self.bell.as_raw_fd()],
            )
            .map_err(|e| format!("sending our segment: {e}"))
        };
        if first {
            send()?;
        }
        let mut theirs = [0u8; 8];
        let mut got = fds::recv(&ctrl, &mut theirs, 2)
            .map_err(|e| format!("receiving the peer's segment: {e}"))?;
        if !first {
            send()?;
        }
        let their_ring = u32::from_le_bytes(theirs[..4].try_into().expect("4 bytes")) as usize;
        let their_rank = u32::from_le_bytes(theirs[4..].try_into().expect("4 bytes")) as usize;
        if their_rank != peer {
            return Err(format!("the peer says it is rank {their_rank}"));
        }
        let peer_bell = got.pop().expect("two descriptors");
        let peer_seg = Segment::open(got.pop().expect("two descriptors"), peer)?;
        let inc = peer_seg
            .ring(their_ring)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("its segment has no ring {their_ring}"))?;
        let out = self
            .seg
            .ring(ring)
            .map_err(|e| e.to_string())?
            .expect("this rank's segment has a ring per same-host peer");
        ctrl.set_nonblocking(true)
            .and_then(|()| ctrl.set_read_timeout(None))
            .map_err(|e| format!("socket options: {e}"))?;
        Ok(ShmPipe {
            out,
            inc,
            peer_seg,
            peer_bell,
            ctrl,
            closed: false,
        })
    }
}

/// Wakes this rank's exchange loop when a shared-memory peer writes.
pub(crate) struct Doorbell {
    seg: Arc<Segment>,
    bell: OwnedFd,
}

impl Doorbell {
    /// Before blocking: peers that publish from now on ring the doorbell.
    /// The caller looks once more for work before it blocks.
    pub fn arm(&self) {
        self.seg.sleeping().store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// After blocking: peers stop ringing; a pending ring is cleared.
    pub fn disarm(&self) {
        self.seg.sleeping().store(0, Ordering::Relaxed);
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer from a non-blocking
        // eventfd (EAGAIN when nobody rang).
        let _ = unsafe { libc::read(self.bell.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
    }

    pub fn fd(&self) -> RawFd {
        self.bell.as_raw_fd()
    }
}

/// A pipe to one peer on this host, through two rings.
pub(crate) struct ShmPipe {
    /// In this rank's segment: written here, read by the peer.
    out: Ring,
    /// In the peer's segment: written by the peer, read here.
    inc: Ring,
    peer_seg: Arc<Segment>,
    peer_bell: OwnedFd,
    ctrl: UnixStream,
    /// The peer's control socket ended (it exited or aborted).
    closed: bool,
}

fn corrupt() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "the shared-memory ring's positions are inconsistent (memory corrupted)",
    )
}

impl ShmPipe {
    /// Rings the peer's doorbell if it sleeps (after publishing).
    fn wake_peer(&self) {
        fence(Ordering::SeqCst);
        if self.peer_seg.sleeping().load(Ordering::Relaxed) != 0 {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to an eventfd.
            let _ = unsafe { libc::write(self.peer_bell.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }

    /// Bytes waiting in the incoming ring and the read position.
    fn arrived(&self) -> io::Result<(usize, u64)> {
        let tail = self.inc.tail().load(Ordering::Relaxed);
        let head = self.inc.head().load(Ordering::Acquire);
        let n = head.wrapping_sub(tail);
        if n > self.inc.cap() as u64 {
            return Err(corrupt());
        }
        if n == 0 && self.closed {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, GONE));
        }
        Ok((n as usize, tail))
    }

    fn read_reason(&mut self, len: u64) -> String {
        let mut text = vec![0u8; (len as usize).min(MAX_REASON)];
        let _ = self.ctrl.set_nonblocking(false);
        let _ = self.ctrl.set_read_timeout(Some(Duration::from_secs(1)));
        let n = io::Read::read(&mut self.ctrl, &mut text).unwrap_or(0);
        text.truncate(n);
        String::from_utf8_lossy(&text).into_owned()
    }
}

impl Pipe for ShmPipe {
    fn send(&mut self, head: &[u8], body: &[u8]) -> io::Result<usize> {
        if self.closed {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, GONE));
        }
        let pos = self.out.head().load(Ordering::Relaxed);
        let used = pos.wrapping_sub(self.out.tail().load(Ordering::Acquire));
        if used > self.out.cap() as u64 {
            return Err(corrupt());
        }
        let n = (self.out.cap() - used as usize).min(head.len() + body.len());
        if n == 0 {
            return Ok(0);
        }
        let h = n.min(head.len());
        // SAFETY: positions pos..pos+n are free (past head, within cap of
        // tail), so only this writer touches them; the sources are live.
        unsafe {
            let dst = self.out.bytes(pos, n);
            std::ptr::copy_nonoverlapping(head.as_ptr(), dst, h);
            std::ptr::copy_nonoverlapping(body.as_ptr(), dst.add(h), n - h);
        }
        self.out.head().store(pos + n as u64, Ordering::Release);
        self.wake_peer();
        Ok(n)
    }

    fn recv(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        let n = self.peek(dst)?;
        self.consume(n);
        Ok(n)
    }

    fn peek(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        let (avail, tail) = self.arrived()?;
        let n = avail.min(dst.len());
        // SAFETY: tail..tail+n holds bytes the peer published, which only
        // this reader touches until it advances tail.
        unsafe { std::ptr::copy_nonoverlapping(self.inc.bytes(tail, n), dst.as_mut_ptr(), n) };
        Ok(n)
    }

    fn lend(&mut self, max: usize) -> Option<io::Result<&[u8]>> {
        Some(self.arrived().map(|(avail, tail)| {
            let n = avail.min(max);
            // SAFETY: as in `peek`; the slice lives until `consume`, which
            // needs `&mut self`.
            unsafe { std::slice::from_raw_parts(self.inc.bytes(tail, n), n) }
        }))
    }

    fn consume(&mut self, n: usize) {
        if n > 0 {
            let tail = self.inc.tail().load(Ordering::Relaxed);
            self.inc.tail().store(tail + n as u64, Ordering::Release);
            self.wake_peer();
        }
    }

    fn wait_on(&mut self, _write: bool, _want: usize) -> (RawFd, libc::c_short) {
        (self.ctrl.as_raw_fd(), libc::POLLIN)
    }

    fn rings_doorbell(&self) -> bool {
        true
    }

    fn notice(&mut self) -> Option<String> {
        if self.closed {
            return None;
        }
        let mut hdr = [0u8; HEADER_LEN];
        match io::Read::read(&mut self.ctrl, &mut hdr) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Ok(n) if n == HEADER_LEN => {
                self.closed = true;
                match wire::decode(&hdr) {
                    Ok(Frame::Abort { len }) => Some(self.read_reason(len)),
                    _ => Some(String::from(
                        "(an unreadable notice on the shared-memory control socket)",
                    )),
                }
            }
            // The end of the socket: the peer's process exited.
            _ => {
                self.closed = true;
                None
            }
        }
    }

    fn abort(&mut self, notice: &[u8], _at_boundary: bool) {
        // SAFETY: a live slice, only read.
        let _ = unsafe {
            libc::send(
                self.ctrl.as_raw_fd(),
                notice.as_ptr().cast(),
                notice.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        let _ = self.ctrl.shutdown(std::net::Shutdown::Write);
        self.closed = true;
    }
}

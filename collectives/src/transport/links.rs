//! The transport between processes: one [`Pipe`] per peer (TCP, or shared
//! memory for a peer on this host), message framing on top of it, and the
//! loop that drives every transfer of an exchange.
//!
//! Framing is the same on every pipe: a message is its [`Header`] and its
//! payload; a probe is a header alone, written only at a frame boundary;
//! an abort notice is a header and its reason, in band (TCP) or on the
//! pipe's own control channel (shared memory). Receives go straight into
//! the destination; a receive-and-reduce reduces straight from the pipe
//! when it lends its bytes in place (shared memory), else from a landing
//! buffer as the bytes arrive.
//!
//! The loop moves every transfer forward with non-blocking calls. When
//! nothing moves it first spins for up to `spin` (a peer's message usually
//! comes within microseconds, while a wake-up from `poll(2)` costs a context
//! switch and, on an idle core of a VM, tens of microseconds), yielding the
//! core between passes unless the rank has a core of its own, then blocks
//! in `poll(2)` on what each pending transfer waits on. A shared-memory peer writes memory, not
//! a descriptor, so before blocking on one this process arms its doorbell
//! (a flag the peer checks after every write), makes one more pass so no
//! wake-up is lost, and polls the doorbell too. After `PROBE_AFTER` it
//! probes the peers it waits on and watches the others (see `wire`).
//!
//! Every pass reads the abort flag of the communicator's handle (one load),
//! and every blocking poll also waits on the eventfd the handle writes, so
//! an abort ends the exchange at once whether it spins or sleeps.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pipe::Pipe;
use super::shm::{Doorbell, segment};
use super::{Transport, Xfer};
use crate::abort::AbortSignal;
use crate::error::CommError;
use crate::reduce;
use crate::types::{DType, ReduceOp};
use crate::wire::{self, Bystander, Frame, HEADER_LEN, Header, PROBE_AFTER};

/// Most bytes one call moves. Bounded calls alternate between the
/// directions of an exchange, so both keep flowing and each piece is still
/// in cache when the peer copies it out.
const MAX_IO: usize = 256 << 10;
/// Longest abort reason read from a peer.
const MAX_REASON: u64 = 4096;
/// A `polled` entry that is the doorbell, not a peer.
const DOORBELL: usize = usize::MAX;
/// A `polled` entry that is the abort eventfd, not a peer.
const ABORT: usize = usize::MAX - 1;

/// One peer: its pipe and the state of the frames on it.
pub(crate) struct Conn {
    pipe: Box<dyn Pipe>,
    /// A message to this peer is partly written: the stream is mid-frame.
    mid_send: bool,
    /// A probe frame waiting to be written (bytes `ctrl_done..ctrl_len`).
    ctrl: [u8; HEADER_LEN],
    ctrl_done: usize,
    ctrl_len: usize,
    /// Where a receive-and-reduce lands on a pipe that can't lend in place.
    landing: Vec<u64>,
}

impl Conn {
    pub fn new(pipe: Box<dyn Pipe>) -> Conn {
        Conn {
            pipe,
            mid_send: false,
            ctrl: [0; HEADER_LEN],
            ctrl_done: 0,
            ctrl_len: 0,
            landing: Vec::new(),
        }
    }

    fn ctrl_pending(&self) -> bool {
        self.ctrl_done < self.ctrl_len
    }

    /// No frame is partly written.
    fn at_boundary(&self) -> bool {
        !self.mid_send && (self.ctrl_done == 0 || !self.ctrl_pending())
    }

    /// Writes what it can of the pending probe; `Ok(true)` once none is left.
    fn flush_ctrl(&mut self) -> io::Result<bool> {
        while self.ctrl_pending() {
            let n = self
                .pipe
                .send(&self.ctrl[self.ctrl_done..self.ctrl_len], &[])?;
            if n == 0 {
                return Ok(false);
            }
            self.ctrl_done += n;
        }
        self.ctrl_done = 0;
        self.ctrl_len = 0;
        Ok(true)
    }
}

#[derive(Clone, Copy)]
struct Progress {
    hdr: [u8; HEADER_LEN],
    hdr_done: usize,
    data_done: usize,
    /// Payload bytes already combined into the destination.
    reduced: usize,
    done: bool,
}

/// Where a receive's payload goes.
enum Target<'x> {
    Copy(&'x mut [u8]),
    Reduce {
        dst: &'x mut [u8],
        dtype: DType,
        op: ReduceOp,
    },
}

/// How a rank waits before it blocks: for up to `budget` it keeps passing
/// over its pipes, between passes yielding its core (`yield_core`) or only
/// pausing the CPU.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Spin {
    pub budget: Duration,
    pub yield_core: bool,
}

/// One rank's pipes to its peers.
pub(crate) struct HostTransport {
    rank: usize,
    conns: Vec<Option<Conn>>,
    progress: Vec<Progress>,
    pollfds: Vec<libc::pollfd>,
    /// The peer of each `pollfds` entry (or `DOORBELL`).
    polled: Vec<usize>,
    /// Some call of the current pass moved bytes.
    moved: bool,
    /// Per peer and direction, whether an earlier transfer of this pass is
    /// still pending (see `pass`).
    busy: Vec<bool>,
    /// Per peer, whether this exchange watches it as a bystander.
    watch: Vec<bool>,
    /// How to wait once nothing moves, before blocking.
    spin: Spin,
    /// This process's doorbell, when it has shared-memory peers.
    bell: Option<Doorbell>,
    /// Set by the communicator's abort handle, which then writes `abort_fd`.
    abort: Arc<AbortSignal>,
    abort_fd: Arc<OwnedFd>,
}

impl HostTransport {
    /// Fails only if no eventfd can be created (for `abort`).
    pub fn new(
        rank: usize,
        conns: Vec<Option<Conn>>,
        spin: Spin,
        bell: Option<Doorbell>,
        abort: Arc<AbortSignal>,
    ) -> Result<Self, CommError> {
        let abort_fd =
            Arc::new(segment::eventfd().map_err(|e| {
                CommError::io(format!("rank {rank}: creating the abort eventfd"), e)
            })?);
        let weak = Arc::downgrade(&abort_fd);
        abort.on_abort(move || {
            if let Some(fd) = weak.upgrade() {
                let one = 1u64.to_ne_bytes();
                // SAFETY: writes 8 bytes from a live buffer to an eventfd
                // this closure holds open. It is never read: once written,
                // every later poll on it returns at once.
                let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
            }
        });
        Ok(HostTransport {
            rank,
            conns,
            progress: Vec::new(),
            pollfds: Vec::new(),
            polled: Vec::new(),
            moved: false,
            busy: Vec::new(),
            watch: Vec::new(),
            spin,
            bell,
            abort,
            abort_fd,
        })
    }

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

    /// One pass over every pending transfer; `Ok(true)` while any is left.
    ///
    /// Several transfers of one exchange may go the same way on one pipe
    /// (a pipelined algorithm sends a peer several messages at once): they
    /// move in the order given, each only once the ones before it are done,
    /// so frames never interleave and the peer receives them in the order
    /// it expects them.
    fn pass(&mut self, xfers: &mut [Xfer<'_>]) -> Result<bool, CommError> {
        let mut pending = false;
        self.moved = false;
        self.busy.clear();
        self.busy.resize(2 * self.conns.len(), false);
        for (i, xfer) in xfers.iter_mut().enumerate() {
            if self.progress[i].done {
                continue;
            }
            let lane = 2 * xfer.peer() + usize::from(xfer.receives());
            if self.busy.get(lane) == Some(&true) {
                pending = true;
                continue;
            }
            if !self.advance(i, xfer)? {
                pending = true;
                if let Some(b) = self.busy.get_mut(lane) {
                    *b = true;
                }
            }
        }
        Ok(pending)
    }

    /// Moves one transfer forward without blocking; `Ok(true)` when complete.
    fn advance(&mut self, i: usize, xfer: &mut Xfer<'_>) -> Result<bool, CommError> {
        let mut p = self.progress[i];
        let before = (p.hdr_done, p.data_done);
        let result = match xfer {
            Xfer::Send { peer, header, data } => self.advance_send(*peer, header, data, &mut p),
            Xfer::Recv { peer, header, buf } => {
                self.advance_recv(*peer, header, Target::Copy(buf), &mut p)
            }
            Xfer::RecvReduce {
                peer,
                header,
                dst,
                dtype,
                op,
            } => {
                let target = Target::Reduce {
                    dst,
                    dtype: *dtype,
                    op: *op,
                };
                self.advance_recv(*peer, header, target, &mut p)
            }
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
        let conn = self.conn(peer, header)?;
        let sent = match conn.flush_ctrl() {
            Ok(false) => return Ok(false),
            Ok(true) => {
                let hdr_left = &p.hdr[p.hdr_done..];
                let data_left = &data[p.data_done..];
                conn.pipe
                    .send(hdr_left, &data_left[..data_left.len().min(MAX_IO)])
            }
            Err(e) => Err(e),
        };
        let mut n = match sent {
            Ok(n) => n,
            Err(e) => return Err(self.peer_closed(peer, header, format!("send failed: {e}"))),
        };
        if n == 0 {
            return Ok(false);
        }
        let h = n.min(HEADER_LEN - p.hdr_done);
        p.hdr_done += h;
        n -= h;
        p.data_done += n;
        let complete = p.hdr_done == HEADER_LEN && p.data_done == data.len();
        self.conn(peer, header)?.mid_send = !complete;
        Ok(complete)
    }

    fn advance_recv(
        &mut self,
        peer: usize,
        header: &Header,
        mut target: Target<'_>,
        p: &mut Progress,
    ) -> Result<bool, CommError> {
        let rank = self.rank;
        let recv_err = |t: &Self, e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                t.peer_closed(peer, header, "the peer closed the connection")
            } else {
                t.peer_closed(peer, header, format!("receive failed: {e}"))
            }
        };
        while p.hdr_done < HEADER_LEN {
            let conn = self.conn(peer, header)?;
            let n = match conn.pipe.recv(&mut p.hdr[p.hdr_done..]) {
                Ok(n) => n,
                Err(e) => return Err(recv_err(self, e)),
            };
            if n == 0 {
                return Ok(false);
            }
            p.hdr_done += n;
            if p.hdr_done < HEADER_LEN {
                continue;
            }
            let frame = wire::decode(&p.hdr).map_err(|e| {
                self.peer_closed(peer, header, format!("unreadable message header: {e}"))
            })?;
            match frame {
                Frame::Probe(probe) => {
                    header.check_probe(&probe, rank, peer)?;
                    p.hdr_done = 0;
                }
                Frame::Abort { len } => {
                    return Err(CommError::PeerAborted {
                        rank,
                        peer,
                        op: header.describe(),
                        reason: self.read_reason(peer, len),
                    });
                }
                Frame::Msg(_) => header.check(&frame, rank, peer)?,
            }
        }
        let conn = self.conn(peer, header)?;
        let result = match &mut target {
            Target::Copy(buf) => {
                let end = buf.len().min(p.data_done + MAX_IO);
                if p.data_done == buf.len() {
                    return Ok(true);
                }
                conn.pipe.recv(&mut buf[p.data_done..end]).map(|n| {
                    p.data_done += n;
                    p.data_done == buf.len()
                })
            }
            Target::Reduce { dst, dtype, op } => {
                reduce_arrived(conn, dst, *dtype, *op, p).map(|()| p.reduced == dst.len())
            }
        };
        result.map_err(|e| recv_err(self, e))
    }

    /// Stages a probe (see `wire`) to every peer a pending receive waits on.
    fn probe(&mut self, xfers: &[Xfer<'_>]) {
        for (xfer, p) in xfers.iter().zip(&self.progress) {
            let Some(header) = xfer.header().filter(|_| xfer.receives() && !p.done) else {
                continue;
            };
            if let Some(conn) = self.conns.get_mut(xfer.peer()).and_then(Option::as_mut) {
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
                let Some(conn) = self.conns[peer].as_mut() else {
                    *watched = false;
                    break;
                };
                if let Some(reason) = conn.pipe.notice() {
                    return Err(CommError::PeerAborted {
                        rank: self.rank,
                        peer,
                        op: op.describe(),
                        reason,
                    });
                }
                let mut hdr = [0u8; HEADER_LEN];
                let n = match conn.pipe.peek(&mut hdr) {
                    Ok(n) => n,
                    Err(_) => {
                        *watched = false;
                        break;
                    }
                };
                if n < HEADER_LEN {
                    break;
                }
                let frame = wire::decode(&hdr).map_err(|e| {
                    self.peer_closed(peer, op, format!("unreadable message header: {e}"))
                })?;
                match op.check_bystander(&frame, self.rank, peer)? {
                    Bystander::Later => *watched = false,
                    verdict => {
                        let conn = self.conns[peer].as_mut().expect("watched above");
                        let _ = conn.pipe.recv(&mut hdr);
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

    /// Reads the text of an in-band abort notice (best effort, at most one
    /// second).
    fn read_reason(&mut self, peer: usize, len: u64) -> String {
        let Some(conn) = self.conns.get_mut(peer).and_then(Option::as_mut) else {
            return String::from("(no reason given)");
        };
        let mut text = vec![0u8; len.min(MAX_REASON) as usize];
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut got = 0;
        while got < text.len() {
            match conn.pipe.recv(&mut text[got..]) {
                Ok(0) => {
                    let (fd, events) = conn.pipe.wait_on(false, 1);
                    if !matches!(poll_one(fd, events, deadline), Ok(true)) {
                        break;
                    }
                }
                Ok(n) => got += n,
                Err(_) => break,
            }
        }
        text.truncate(got);
        String::from_utf8_lossy(&text).into_owned()
    }

    /// Adds what the pending transfers (and the watched peers) wait on to
    /// `pollfds`; whether any waits on the doorbell.
    fn wait_set(&mut self, xfers: &[Xfer<'_>], probed: bool, watch: &[bool]) -> bool {
        self.pollfds.clear();
        self.polled.clear();
        let mut bell = false;
        let mut add = |this: &mut Self, peer: usize, write: bool, want: usize| {
            if let Some(c) = this.conns.get_mut(peer).and_then(Option::as_mut) {
                let (fd, events) = c.pipe.wait_on(write, want);
                bell |= c.pipe.rings_doorbell();
                this.pollfds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
                this.polled.push(peer);
                if c.ctrl_pending() && !write {
                    let (fd, events) = c.pipe.wait_on(true, 0);
                    this.pollfds.push(libc::pollfd {
                        fd,
                        events,
                        revents: 0,
                    });
                    this.polled.push(peer);
                }
            }
        };
        for (i, xfer) in xfers.iter().enumerate() {
            let p = self.progress[i];
            if p.done {
                continue;
            }
            let rest = match xfer {
                Xfer::Recv { buf, .. } => buf.len(),
                Xfer::RecvReduce { dst, .. } => dst.len(),
                Xfer::Send { .. } | Xfer::Idle => 0,
            };
            let want = if probed || !xfer.receives() {
                1
            } else {
                HEADER_LEN - p.hdr_done + rest - p.data_done
            };
            add(self, xfer.peer(), !xfer.receives(), want);
        }
        for (peer, _) in watch.iter().enumerate().filter(|(_, w)| **w) {
            add(self, peer, false, 1);
        }
        bell
    }
}

/// Combines what has arrived of a receive-and-reduce's payload into `dst`:
/// in place from a pipe that lends its bytes, else through the landing
/// buffer, whole elements as they complete.
fn reduce_arrived(
    conn: &mut Conn,
    dst: &mut [u8],
    dtype: DType,
    op: ReduceOp,
    p: &mut Progress,
) -> io::Result<()> {
    let es = dtype.size();
    let left = dst.len() - p.data_done;
    if left == 0 {
        return Ok(());
    }
    if let Some(lent) = conn.pipe.lend(left.min(MAX_IO)) {
        let lent = lent?;
        let m = lent.len() / es * es;
        if m > 0 {
            reduce::reduce_into(
                dtype,
                op,
                &mut dst[p.data_done..p.data_done + m],
                &lent[..m],
            );
        }
        conn.pipe.consume(m);
        p.data_done += m;
        p.reduced = p.data_done;
        return Ok(());
    }
    let words = dst.len().div_ceil(8);
    if conn.landing.len() < words {
        conn.landing.resize(words, 0);
    }
    let landing: &mut [u8] = bytemuck::cast_slice_mut(conn.landing.as_mut_slice());
    let end = dst.len().min(p.data_done + MAX_IO);
    let n = conn.pipe.recv(&mut landing[p.data_done..end])?;
    p.data_done += n;
    let upto = p.data_done / es * es;
    if upto > p.reduced {
        reduce::reduce_into(
            dtype,
            op,
            &mut dst[p.reduced..upto],
            &landing[p.reduced..upto],
        );
        p.reduced = upto;
    }
    Ok(())
}

/// Waits until `fd` has `events` or `deadline` passes; `Ok(true)` if ready.
pub(crate) fn poll_one(fd: RawFd, events: libc::c_short, deadline: Instant) -> io::Result<bool> {
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

impl Transport for HostTransport {
    fn exchange(&mut self, xfers: &mut [Xfer<'_>], deadline: Instant) -> Result<(), CommError> {
        let started = Instant::now();
        self.progress.clear();
        for xfer in xfers.iter() {
            let hdr = match xfer {
                Xfer::Send { header, .. } => header.encode(),
                _ => [0; HEADER_LEN],
            };
            self.progress.push(Progress {
                hdr,
                hdr_done: 0,
                data_done: 0,
                reduced: 0,
                done: matches!(xfer, Xfer::Idle),
            });
        }
        // Peers watched as bystanders once probing (see `check_bystanders`).
        let mut watch = std::mem::take(&mut self.watch);
        watch.clear();
        watch.resize(self.conns.len(), false);
        let result = self.drive(xfers, deadline, started, &mut watch);
        self.watch = watch;
        result
    }

    fn set_spin(&mut self, budget: Duration) {
        self.spin.budget = budget;
    }

    fn abort(&mut self, reason: &str) {
        let text = &reason.as_bytes()[..reason.len().min(MAX_REASON as usize)];
        let mut notice = wire::encode_abort(text.len()).to_vec();
        notice.extend_from_slice(text);
        for mut conn in self.conns.iter_mut().filter_map(Option::take) {
            let at_boundary = conn.at_boundary();
            conn.pipe.abort(&notice, at_boundary);
        }
    }
}

impl HostTransport {
    /// The exchange loop (see the module's doc).
    fn drive(
        &mut self,
        xfers: &mut [Xfer<'_>],
        deadline: Instant,
        started: Instant,
        watch: &mut [bool],
    ) -> Result<(), CommError> {
        let op = xfers.iter().find_map(Xfer::header).copied();
        let mut probed = false;
        let mut idle_since = started;
        loop {
            if self.abort.is_aborted() {
                return Err(CommError::Aborted {
                    rank: self.rank,
                    op: op.as_ref().map(Header::describe).unwrap_or_default(),
                    reason: self.abort.reason().unwrap_or_default().to_owned(),
                });
            }
            for conn in self.conns.iter_mut().flatten() {
                if conn.ctrl_pending() {
                    // A failure shows up on the next transfer on this peer.
                    let _ = conn.flush_ctrl();
                }
            }
            if !self.pass(xfers)? {
                return Ok(());
            }
            if self.moved {
                idle_since = Instant::now();
                continue;
            }
            if idle_since.elapsed() < self.spin.budget {
                if self.spin.yield_core {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            let now = Instant::now();
            if !probed && now >= started + PROBE_AFTER {
                probed = true;
                self.probe(xfers);
                for (peer, w) in watch.iter_mut().enumerate() {
                    *w = self.conns[peer].is_some()
                        && !xfers.iter().any(|x| x.receives() && x.peer() == peer);
                }
                continue;
            }
            if let (true, Some(op)) = (probed, &op) {
                self.check_bystanders(op, watch)?;
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
            let bell = self.wait_set(xfers, probed, watch) && self.bell.is_some();
            if bell {
                let b = self.bell.as_ref().expect("checked above");
                b.arm();
                let fd = b.fd();
                // A peer that wrote before seeing the flag rang nobody.
                let pending = self.pass(xfers);
                if !matches!(pending, Ok(true)) || self.moved {
                    if let Some(b) = &self.bell {
                        b.disarm();
                    }
                    if !pending? {
                        return Ok(());
                    }
                    idle_since = Instant::now();
                    continue;
                }
                self.pollfds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
                self.polled.push(DOORBELL);
            }
            self.pollfds.push(libc::pollfd {
                fd: self.abort_fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            self.polled.push(ABORT);
            let wake = if probed {
                deadline
            } else {
                deadline.min(started + PROBE_AFTER)
            };
            let ms = wake
                .saturating_duration_since(now)
                .as_millis()
                .clamp(1, i32::MAX as u128) as libc::c_int;
            // SAFETY: pollfds is a live array of pollfd of the given length.
            let rc = unsafe { libc::poll(self.pollfds.as_mut_ptr(), self.pollfds.len() as _, ms) };
            if let (true, Some(b)) = (bell, &self.bell) {
                b.disarm();
            }
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(CommError::io("poll on peer links", e));
                }
            }
            for k in 0..self.pollfds.len() {
                let peer = self.polled[k];
                if self.pollfds[k].revents == 0 || peer == DOORBELL || peer == ABORT {
                    continue;
                }
                let notice = self.conns[peer].as_mut().and_then(|c| c.pipe.notice());
                if let Some(reason) = notice {
                    return Err(CommError::PeerAborted {
                        rank: self.rank,
                        peer,
                        op: op.as_ref().map(Header::describe).unwrap_or_default(),
                        reason,
                    });
                }
            }
        }
    }
}

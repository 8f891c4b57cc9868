//! The TCP transport: one connection per pair of ranks, authenticated with
//! the job token, driven without threads by non-blocking sockets and
//! `poll(2)`.
//!
//! Bootstrap: every rank listens on an ephemeral port and publishes
//! `addr/<rank>` = `host:port` in the store, waits for every rank's address,
//! connects to every higher rank, then accepts one connection from every
//! lower rank. Connecting upward first cannot deadlock: the highest rank only
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

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::{Transport, Xfer};
use crate::auth;
use crate::error::CommError;
use crate::store::Store;
use crate::wire::{self, Frame, HEADER_LEN, Header, PROBE_AFTER};

/// Socket send and receive buffer size requested from the kernel.
const SOCKET_BUFFER: libc::c_int = 4 << 20;
/// Most bytes one send or receive system call moves. Bounded calls
/// alternate between the directions of an exchange, so both keep flowing
/// and each piece is still in cache when the peer copies it out.
const MAX_IO: usize = 256 << 10;
/// Most bytes a waiting receive asks to arrive before it is woken. A rank
/// blocked on a receive is woken once the rest of the message (up to this
/// much) is in its socket instead of at the first byte: with more ranks
/// than cores every wake-up is a context switch, and a wake-up that finds a
/// whole segment to copy does more work per switch. The kernel caps it at
/// half the receive buffer; a peer's abort or close (FIN) wakes it anyway,
/// and after `PROBE_AFTER` it drops to 1 so a probe is read at once.
const RCVLOWAT_MAX: usize = 256 << 10;
/// Longest abort reason read from a peer.
const MAX_REASON: u64 = 4096;
/// Longest time one stranger can hold the accept loop.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a rank of a TCP communicator finds and authenticates its peers.
#[derive(Clone)]
pub struct TcpConfig {
    /// The job secret every rank proves on connect.
    pub token: Vec<u8>,
    /// The address the listener binds.
    pub bind_host: String,
    /// The address published to peers.
    pub advertise_host: String,
    /// How long bootstrap (store wait, connect, handshakes) may take.
    pub connect_timeout: Duration,
    /// Timeout of an op whose `OpOptions::timeout` is `None`.
    pub default_timeout: Duration,
}

impl std::fmt::Debug for TcpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConfig")
            .field("token", &"<redacted>")
            .field("bind_host", &self.bind_host)
            .field("advertise_host", &self.advertise_host)
            .field("connect_timeout", &self.connect_timeout)
            .field("default_timeout", &self.default_timeout)
            .finish()
    }
}

impl TcpConfig {
    /// A rank that proves `token` to its peers. With `host` (the address
    /// other hosts reach this one at) it binds `0.0.0.0` and advertises
    /// `host`; without, it binds and advertises `127.0.0.1` (one host).
    /// `timeout` is the default op timeout and the bootstrap timeout.
    pub fn new(token: &[u8], host: Option<&str>, timeout: Duration) -> TcpConfig {
        let (bind_host, advertise_host) = match host {
            Some(host) => (String::from("0.0.0.0"), host.to_owned()),
            None => (String::from("127.0.0.1"), String::from("127.0.0.1")),
        };
        TcpConfig {
            token: token.to_vec(),
            bind_host,
            advertise_host,
            connect_timeout: timeout,
            default_timeout: timeout,
        }
    }
}

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

fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    setsockopt(stream, libc::SOL_SOCKET, libc::SO_SNDBUF, SOCKET_BUFFER);
    setsockopt(stream, libc::SOL_SOCKET, libc::SO_RCVBUF, SOCKET_BUFFER);
    Ok(())
}

fn poll_one(fd: libc::c_int, events: libc::c_short, deadline: Instant) -> io::Result<bool> {
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

/// One rank's connections to its peers.
pub(crate) struct TcpTransport {
    rank: usize,
    conns: Vec<Option<Conn>>,
    progress: Vec<Progress>,
    pollfds: Vec<libc::pollfd>,
    /// Some system call of the current pass moved bytes.
    moved: bool,
}

struct Conn {
    stream: TcpStream,
    /// A message to this peer is partly written: the stream is mid-frame.
    mid_send: bool,
    /// A probe frame waiting to be written (bytes `ctrl_done..ctrl_len`).
    ctrl: [u8; HEADER_LEN],
    ctrl_done: usize,
    ctrl_len: usize,
    /// The socket's `SO_RCVLOWAT` as last set.
    lowat: usize,
}

impl Conn {
    fn new(stream: TcpStream) -> Conn {
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

#[derive(Clone, Copy)]
struct Progress {
    hdr: [u8; HEADER_LEN],
    hdr_done: usize,
    data_done: usize,
    done: bool,
}

impl TcpTransport {
    /// Bootstraps the connections of `rank` through `store`.
    pub fn connect(
        store: &dyn Store,
        rank: usize,
        world: usize,
        cfg: &TcpConfig,
    ) -> Result<TcpTransport, CommError> {
        let deadline = Instant::now() + cfg.connect_timeout;
        let mut conns: Vec<Option<Conn>> = (0..world).map(|_| None).collect();
        if world > 1 {
            let listener = TcpListener::bind((cfg.bind_host.as_str(), 0)).map_err(|e| {
                CommError::io(format!("rank {rank}: listening on {}:0", cfg.bind_host), e)
            })?;
            let port = listener
                .local_addr()
                .map_err(|e| CommError::io("reading the listener's address", e))?
                .port();
            let addr = format!("{}:{port}", cfg.advertise_host);
            store.set(&format!("addr/{rank}"), addr.as_bytes())?;
            let keys: Vec<String> = (0..world).map(|r| format!("addr/{r}")).collect();
            let addrs = store.wait(&keys, cfg.connect_timeout)?;
            for (peer, addr) in addrs.iter().enumerate().skip(rank + 1) {
                let addr = String::from_utf8_lossy(addr).into_owned();
                let stream = connect_peer(&addr, &cfg.token, world, rank, peer, deadline)?;
                conns[peer] = Some(Conn::new(stream));
            }
            accept_peers(&listener, &cfg.token, world, rank, deadline, &mut conns)?;
        }
        for conn in conns.iter().flatten() {
            conn.stream
                .set_nonblocking(true)
                .map_err(|e| CommError::io("making a socket non-blocking", e))?;
        }
        Ok(TcpTransport {
            rank,
            conns,
            progress: Vec::new(),
            pollfds: Vec::new(),
            moved: false,
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
                continue;
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

fn connect_peer(
    addr: &str,
    token: &[u8],
    world: usize,
    rank: usize,
    peer: usize,
    deadline: Instant,
) -> Result<TcpStream, CommError> {
    let resolved = addr
        .to_socket_addrs()
        .map_err(|e| {
            CommError::io(
                format!("rank {rank}: resolving rank {peer}'s address {addr:?}"),
                e,
            )
        })?
        .next()
        .ok_or_else(|| {
            CommError::Config(format!(
                "rank {peer}'s address {addr:?} resolves to nothing"
            ))
        })?;
    let mut pause = Duration::from_millis(5);
    let mut stream = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(CommError::io(
                format!("rank {rank}: connecting to rank {peer} at {addr}"),
                io::Error::new(io::ErrorKind::TimedOut, "timed out"),
            ));
        }
        match TcpStream::connect_timeout(&resolved, left) {
            Ok(s) => break s,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Err(e) => {
                return Err(CommError::io(
                    format!("rank {rank}: connecting to rank {peer} at {addr}"),
                    e,
                ));
            }
        }
    };
    tune(&stream).map_err(|e| CommError::io("setting socket options", e))?;
    auth::connect(&mut stream, token, world, rank, peer, deadline).map_err(|reason| {
        CommError::Auth {
            peer: format!("rank {peer} at {addr}"),
            reason,
        }
    })?;
    Ok(stream)
}

fn accept_peers(
    listener: &TcpListener,
    token: &[u8],
    world: usize,
    rank: usize,
    deadline: Instant,
    conns: &mut [Option<Conn>],
) -> Result<(), CommError> {
    listener
        .set_nonblocking(true)
        .map_err(|e| CommError::io("making the listener non-blocking", e))?;
    let mut strangers: HashMap<String, usize> = HashMap::new();
    while conns[..rank].iter().any(Option::is_none) {
        let (mut stream, from) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..rank).filter(|&r| conns[r].is_none()).collect();
                    return Err(CommError::io(
                        format!(
                            "rank {rank}: waiting for ranks {missing:?} to connect \
                             (are they running, and can they reach this host?)"
                        ),
                        io::Error::new(io::ErrorKind::TimedOut, "timed out"),
                    ));
                }
                poll_one(listener.as_raw_fd(), libc::POLLIN, deadline)
                    .map_err(|e| CommError::io("polling the listener", e))?;
                continue;
            }
            Err(e) => {
                return Err(CommError::io(
                    format!("rank {rank}: accepting a connection"),
                    e,
                ));
            }
        };
        let set_up = stream.set_nonblocking(false).and_then(|()| tune(&stream));
        let result = match set_up {
            Ok(()) => {
                let hs_deadline = deadline.min(Instant::now() + HANDSHAKE_TIMEOUT);
                auth::accept(&mut stream, token, world, rank, hs_deadline).and_then(|peer| {
                    if conns[peer].is_some() {
                        Err(format!("rank {peer} is already connected"))
                    } else {
                        Ok(peer)
                    }
                })
            }
            Err(e) => Err(format!("socket options: {e}")),
        };
        match result {
            Ok(peer) => conns[peer] = Some(Conn::new(stream)),
            Err(reason) => {
                let count = strangers.entry(from.ip().to_string()).or_default();
                *count += 1;
                tracing::warn!(
                    "rank {rank}: dropped a connection from {from} that failed authentication: \
                     {reason} (attempt {count} from this host; is COHORT_TOKEN the same for every rank?)"
                );
            }
        }
    }
    Ok(())
}

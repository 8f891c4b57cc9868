//! Bootstrap: find the peers through the store, pick each one's pipe,
//! connect and authenticate.
//!
//! 1. Every rank listens on an ephemeral TCP port and, unless
//!    `transport = "tcp"`, on an abstract Unix socket named after a random
//!    listener id; it publishes `addr/<rank>` = `HOST:PORT listener=ID
//!    host=HOSTID shm=0|1` and waits for every rank's entry.
//! 2. Each pair decides the same way from the two entries: shared memory
//!    when both offer it and their host identities (`crate::host`: hostname,
//!    boot id, network namespace) are equal, else TCP. With `transport =
//!    "shm"` every peer must be on this host.
//! 3. Every rank connects to every higher rank (TCP, or the peer's Unix
//!    socket), then accepts one connection from every lower rank.
//!    Connecting upward first cannot deadlock: the highest rank only
//!    accepts, and every rank's connect phase waits only on higher ranks.
//!    Every connection runs the HMAC handshake (`auth`); a shared-memory
//!    pair then exchanges its segments over the authenticated socket.
//!
//! Accepting is one poll loop over both listeners and every connection
//! still in its handshake: each handshake moves whenever its own socket is
//! ready and has its own deadline ([`HANDSHAKE_TIMEOUT`] from its accept),
//! so a stranger (an idle or half-open connection, a port scan, a rank with
//! the wrong token, a rank of another job) costs the ranks of this group
//! nothing. Every refused connection is logged with what arrived; those
//! still pending when every rank has joined are closed and logged too.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::links::{Conn, HostTransport, Spin};
use super::shm::Local;
use super::tcp::{TcpConfig, TcpPipe, tune};
use crate::abort::AbortSignal;
use crate::auth::{self, Acceptor, ListenerId, Me, Refusal, Target};
use crate::error::CommError;
use crate::host;
use crate::store::Store;
use crate::types::TransportKind;

/// Longest time one connection may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a waiting rank passes over its pipes (yielding the core
/// between passes) before it blocks; see [`spin_budget`].
const SPIN: Duration = Duration::from_micros(100);
/// Most connections in their handshake at once; beyond it the oldest is
/// dropped (a flood of strangers can't exhaust file descriptors).
const MAX_PENDING: usize = 256;

/// What a rank publishes in the store under `addr/<rank>`.
struct Entry {
    addr: String,
    listener: ListenerId,
    /// The rank's host identity (see `crate::host`).
    host: String,
    /// It listens on its abstract Unix socket for same-host peers.
    shm: bool,
}

impl Entry {
    fn encode(&self) -> String {
        format!(
            "{} listener={} host={} shm={}",
            self.addr,
            auth::hex(&self.listener),
            self.host,
            u8::from(self.shm)
        )
    }

    fn parse(rank: usize, value: &[u8]) -> Result<Entry, CommError> {
        let text = String::from_utf8_lossy(value);
        let field = |name: &str| {
            text.split_whitespace()
                .skip(1)
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
        };
        let addr = text
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        match (field("listener").and_then(auth::unhex), field("host")) {
            (Some(listener), Some(host)) if !addr.is_empty() => Ok(Entry {
                addr,
                listener,
                host: host.to_owned(),
                shm: field("shm") == Some("1"),
            }),
            _ => Err(CommError::Config(format!(
                "rank {rank}'s store entry {text:?} is not `HOST:PORT listener=HEX host=ID`: a \
                 rank of another cohort release, or a store shared with something else"
            ))),
        }
    }

    /// The abstract Unix socket of this entry's rank.
    fn unix_addr(&self) -> io::Result<SocketAddr> {
        unix_addr(&self.listener)
    }
}

fn unix_addr(listener: &ListenerId) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("cohort-collectives/{}", auth::hex(listener)))
}

/// How long a waiting rank polls its pipes before it blocks in `poll(2)`,
/// and whether it yields its core between polls; see `links`. With more
/// ranks on this host than cores, a spinning rank would only keep its peers
/// off the cores they need, so it blocks at once. A rank bound to a core of
/// its own holds it (a peer can't be waiting for that core); any other
/// yields, so a peer the scheduler put on the same core can run.
fn spin_budget(local_ranks: usize, cores: usize, pinned: bool) -> Spin {
    Spin {
        budget: if local_ranks > cores {
            Duration::ZERO
        } else {
            SPIN
        },
        yield_core: !pinned,
    }
}

/// Bootstraps the pipes of `rank` through `store`; also every rank's host
/// identity.
pub(crate) fn connect(
    store: &dyn Store,
    rank: usize,
    world: usize,
    cfg: &TcpConfig,
    abort: Arc<AbortSignal>,
) -> Result<(HostTransport, Vec<String>), CommError> {
    let deadline = Instant::now() + cfg.connect_timeout;
    let mut conns: Vec<Option<Conn>> = (0..world).map(|_| None).collect();
    if world == 1 {
        let transport = HostTransport::new(rank, conns, Spin::default(), None, abort)?;
        return Ok((transport, vec![String::new()]));
    }
    let tcp = TcpListener::bind((cfg.bind_host.as_str(), 0))
        .map_err(|e| CommError::io(format!("rank {rank}: listening on {}:0", cfg.bind_host), e))?;
    let port = tcp
        .local_addr()
        .map_err(|e| CommError::io("reading the listener's address", e))?
        .port();
    let listener: ListenerId = rand::random();
    let unix = match cfg.transport {
        TransportKind::Tcp => None,
        kind => match unix_addr(&listener).and_then(|a| UnixListener::bind_addr(&a)) {
            Ok(l) => Some(l),
            Err(e) if kind == TransportKind::Shm => {
                return Err(CommError::io(
                    format!("rank {rank}: listening on a Unix socket for shared memory"),
                    e,
                ));
            }
            Err(e) => {
                tracing::info!(
                    "rank {rank}: no shared memory (listening on a Unix socket: {e}); TCP only"
                );
                None
            }
        },
    };
    let me = Entry {
        addr: format!("{}:{port}", cfg.advertise_host),
        listener,
        host: cfg.host_id.clone().unwrap_or_else(host::identity),
        shm: unix.is_some(),
    };
    store.set(&format!("addr/{rank}"), me.encode().as_bytes())?;
    let keys: Vec<String> = (0..world).map(|r| format!("addr/{r}")).collect();
    let entries = store
        .wait(&keys, cfg.connect_timeout)?
        .iter()
        .enumerate()
        .map(|(r, value)| Entry::parse(r, value))
        .collect::<Result<Vec<_>, _>>()?;
    let shm_peer = |p: usize| p != rank && me.shm && entries[p].shm && entries[p].host == me.host;
    if cfg.transport == TransportKind::Shm {
        if let Some(p) = (0..world).find(|&p| p != rank && !shm_peer(p)) {
            let why = if entries[p].host == me.host {
                String::from("does not offer shared memory (its transport is \"tcp\"?)")
            } else {
                format!(
                    "is on another host ({}; this rank: {})",
                    entries[p].host, me.host
                )
            };
            return Err(CommError::Config(format!(
                "transport \"shm\" needs every rank on one host, but rank {p} {why}: use \
                 transport \"auto\" (shared memory within a host, TCP between hosts)"
            )));
        }
    }
    let shm_peers: Vec<usize> = (0..world).filter(|&p| shm_peer(p)).collect();
    let local = if shm_peers.is_empty() {
        None
    } else {
        Some(Local::create(rank, shm_peers.len()).map_err(|e| {
            CommError::io(
                format!("rank {rank}: creating its shared-memory segment"),
                e,
            )
        })?)
    };
    let ring_of = |p: usize| shm_peers.iter().position(|&q| q == p);
    let local_ranks = entries.iter().filter(|e| e.host == me.host).count();
    let spin = spin_budget(local_ranks, host::cores(), host::pinned());

    for (peer, entry) in entries.iter().enumerate().skip(rank + 1) {
        let target = Target {
            token: &cfg.token,
            world,
            rank,
            peer,
            listener: &entry.listener,
        };
        let pipe: Box<dyn super::pipe::Pipe> = match (&local, ring_of(peer)) {
            (Some(local), Some(ring)) => {
                let stream = connect_unix(entry, &target, deadline)?;
                Box::new(
                    local
                        .join(stream, rank, peer, ring, true, deadline)
                        .map_err(|reason| shm_failed(rank, peer, reason))?,
                )
            }
            _ => {
                let stream = connect_tcp(&entry.addr, &target, deadline)?;
                Box::new(
                    TcpPipe::new(stream)
                        .map_err(|e| CommError::io("making a socket non-blocking", e))?,
                )
            }
        };
        conns[peer] = Some(Conn::new(pipe));
    }

    let me = Me {
        token: &cfg.token,
        world,
        rank,
        listener: &me.listener,
    };
    let mut accepted = Accepted {
        local: local.as_ref(),
        ring_of: &ring_of,
        deadline,
        conns: &mut conns,
    };
    accept_peers(&tcp, unix.as_ref(), &me, &mut accepted)?;
    let bell = match &local {
        Some(l) => Some(
            l.doorbell()
                .map_err(|e| CommError::io("duplicating the doorbell", e))?,
        ),
        None => None,
    };
    let hosts = entries.into_iter().map(|e| e.host).collect();
    Ok((HostTransport::new(rank, conns, spin, bell, abort)?, hosts))
}

fn shm_failed(rank: usize, peer: usize, reason: String) -> CommError {
    CommError::Io {
        context: format!("rank {rank}: setting up shared memory with rank {peer}"),
        source: io::Error::other(reason),
    }
}

/// Retries `attempt` while the peer's listener refuses (it may not be
/// listening yet, or its backlog is full) until `deadline`.
fn with_retries<S>(
    what: impl Fn() -> String,
    deadline: Instant,
    attempt: impl Fn(Duration) -> io::Result<S>,
) -> Result<S, CommError> {
    let mut pause = Duration::from_millis(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(CommError::io(
                what(),
                io::Error::new(io::ErrorKind::TimedOut, "timed out"),
            ));
        }
        match attempt(left) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::WouldBlock
                ) =>
            {
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Err(e) => return Err(CommError::io(what(), e)),
        }
    }
}

fn connect_tcp(addr: &str, t: &Target<'_>, deadline: Instant) -> Result<TcpStream, CommError> {
    let (rank, peer) = (t.rank, t.peer);
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
    let mut stream = with_retries(
        || format!("rank {rank}: connecting to rank {peer} at {addr}"),
        deadline,
        |left| TcpStream::connect_timeout(&resolved, left),
    )?;
    tune(&stream).map_err(|e| CommError::io("setting socket options", e))?;
    auth::connect(&mut stream, t, deadline).map_err(|reason| CommError::Auth {
        peer: format!("rank {peer} at {addr}"),
        reason,
    })?;
    Ok(stream)
}

fn connect_unix(entry: &Entry, t: &Target<'_>, deadline: Instant) -> Result<UnixStream, CommError> {
    let (rank, peer) = (t.rank, t.peer);
    let addr = entry
        .unix_addr()
        .map_err(|e| CommError::io("naming a Unix socket", e))?;
    let mut stream = with_retries(
        || format!("rank {rank}: connecting to rank {peer} on this host (Unix socket)"),
        deadline,
        |_| UnixStream::connect_addr(&addr),
    )?;
    auth::connect(&mut stream, t, deadline).map_err(|reason| CommError::Auth {
        peer: format!("rank {peer} on this host"),
        reason,
    })?;
    Ok(stream)
}

/// A connection being accepted: over TCP from anywhere, or over the Unix
/// socket from this host.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connection in its handshake.
struct Pending {
    stream: Stream,
    /// Where it came from, for the log.
    from: String,
    since: Instant,
    handshake: Acceptor,
}

/// Where accepted peers go.
struct Accepted<'a> {
    local: Option<&'a Local>,
    ring_of: &'a dyn Fn(usize) -> Option<usize>,
    deadline: Instant,
    conns: &'a mut [Option<Conn>],
}

impl Accepted<'_> {
    /// Turns an authenticated connection from `peer` into its pipe.
    fn take(&mut self, rank: usize, peer: usize, stream: Stream) -> Result<(), Refusal> {
        let pipe: Box<dyn super::pipe::Pipe> = match (stream, self.local, (self.ring_of)(peer)) {
            (Stream::Unix(s), Some(local), Some(ring)) => Box::new(
                local
                    .join(s, rank, peer, ring, false, self.deadline)
                    .map_err(|why| Refusal::Broken(format!("rank {peer}'s segment: {why}")))?,
            ),
            (Stream::Tcp(s), _, None) => Box::new(
                TcpPipe::new(s).map_err(|e| Refusal::Broken(format!("socket options: {e}")))?,
            ),
            (Stream::Tcp(_), _, Some(_)) => {
                return Err(Refusal::OtherGroup(format!(
                    "it claims rank {peer}, which shares this host and connects over shared memory"
                )));
            }
            (Stream::Unix(_), _, _) => {
                return Err(Refusal::OtherGroup(format!(
                    "it claims rank {peer}, which is not a shared-memory peer of this rank"
                )));
            }
        };
        self.conns[peer] = Some(Conn::new(pipe));
        Ok(())
    }
}

/// The pid and uid of the process at the other end of a Unix socket.
fn peer_process(s: &UnixStream) -> String {
    // SAFETY: ucred is plain data; zeroed is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a valid fd and an out-buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        format!("pid {} (uid {}) on this host", cred.pid, cred.uid)
    } else {
        String::from("a process on this host")
    }
}

/// Accepts and authenticates one connection from every rank below
/// `me.rank`, every handshake concurrently under its own deadline.
fn accept_peers(
    tcp: &TcpListener,
    unix: Option<&UnixListener>,
    me: &Me<'_>,
    accepted: &mut Accepted<'_>,
) -> Result<(), CommError> {
    let (rank, deadline) = (me.rank, accepted.deadline);
    tcp.set_nonblocking(true)
        .and_then(|()| unix.map_or(Ok(()), |u| u.set_nonblocking(true)))
        .map_err(|e| CommError::io("making the listeners non-blocking", e))?;
    let mut pending: Vec<Pending> = Vec::new();
    let mut refused: HashMap<String, usize> = HashMap::new();
    let mut refuse = |from: &str, why: Refusal| {
        let host = from.rsplit_once(':').map_or(from, |(h, _)| h);
        let count = refused.entry(host.to_owned()).or_default();
        *count += 1;
        tracing::warn!(
            "rank {rank}: dropped a connection from {from}: {why} (connection {count} refused \
             from this host)"
        );
    };
    let mut pollfds: Vec<libc::pollfd> = Vec::new();
    let missing = |conns: &[Option<Conn>]| (0..rank).filter(|&r| conns[r].is_none()).count();
    while missing(accepted.conns) > 0 {
        loop {
            let next = match tcp.accept() {
                Ok((s, from)) => Ok((Stream::Tcp(s), from.to_string())),
                Err(e) => match unix.map(UnixListener::accept) {
                    Some(Ok((s, _))) => {
                        let from = peer_process(&s);
                        Ok((Stream::Unix(s), from))
                    }
                    Some(Err(ue)) if ue.kind() != io::ErrorKind::WouldBlock => Err(ue),
                    _ => Err(e),
                },
            };
            let (stream, from) = match next {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(CommError::io(
                        format!("rank {rank}: accepting a connection"),
                        e,
                    ));
                }
            };
            let set_up = match &stream {
                Stream::Tcp(s) => s.set_nonblocking(true).and_then(|()| tune(s)),
                Stream::Unix(s) => s.set_nonblocking(true),
            };
            if let Err(e) = set_up {
                tracing::warn!("rank {rank}: dropped a connection from {from}: {e}");
                continue;
            }
            if pending.len() == MAX_PENDING {
                let oldest = pending.remove(0);
                let why = oldest.handshake.timed_out(oldest.since.elapsed());
                refuse(&oldest.from, why);
            }
            pending.push(Pending {
                stream,
                from,
                since: Instant::now(),
                handshake: Acceptor::default(),
            });
        }
        let now = Instant::now();
        let mut i = 0;
        while i < pending.len() {
            let p = &mut pending[i];
            let outcome = match p.handshake.advance(&mut p.stream, me) {
                Ok(Some(peer)) if accepted.conns[peer].is_some() => Err(Refusal::OtherGroup(
                    format!("it claims rank {peer}, which is already connected"),
                )),
                Ok(None) if now >= (p.since + HANDSHAKE_TIMEOUT).min(deadline) => {
                    Err(p.handshake.timed_out(now - p.since))
                }
                other => other,
            };
            match outcome {
                Ok(None) => i += 1,
                Ok(Some(peer)) => {
                    let p = pending.swap_remove(i);
                    match accepted.take(rank, peer, p.stream) {
                        Ok(()) => {}
                        Err(Refusal::Broken(detail)) => return Err(shm_failed(rank, peer, detail)),
                        Err(why) => refuse(&p.from, why),
                    }
                }
                Err(why) => {
                    let p = pending.swap_remove(i);
                    refuse(&p.from, why);
                }
            }
        }
        if missing(accepted.conns) == 0 {
            break;
        }
        if now >= deadline {
            let missing: Vec<usize> = (0..rank).filter(|&r| accepted.conns[r].is_none()).collect();
            return Err(CommError::io(
                format!(
                    "rank {rank}: waiting for ranks {missing:?} to connect \
                     (are they running, and can they reach this host?)"
                ),
                io::Error::new(io::ErrorKind::TimedOut, "timed out"),
            ));
        }
        pollfds.clear();
        for fd in std::iter::once(tcp.as_raw_fd()).chain(unix.map(AsRawFd::as_raw_fd)) {
            pollfds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let mut wake = deadline;
        for p in &pending {
            let events = if p.handshake.wants_write() {
                libc::POLLOUT
            } else {
                libc::POLLIN
            };
            pollfds.push(libc::pollfd {
                fd: p.stream.fd(),
                events,
                revents: 0,
            });
            wake = wake.min(p.since + HANDSHAKE_TIMEOUT);
        }
        let ms = wake
            .saturating_duration_since(now)
            .as_millis()
            .clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: pollfds is a live array of pollfd of the given length.
        let rc = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as _, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(CommError::io("polling the listeners", e));
            }
        }
    }
    for p in &pending {
        tracing::warn!(
            "rank {rank}: closed a connection from {} once every rank had joined: {}",
            p.from,
            p.handshake.timed_out(p.since.elapsed())
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;
    use crate::transport::shm::fds;

    fn config(token: &[u8]) -> TcpConfig {
        TcpConfig {
            token: token.to_vec(),
            bind_host: "127.0.0.1".into(),
            advertise_host: "127.0.0.1".into(),
            connect_timeout: Duration::from_secs(20),
            default_timeout: Duration::from_secs(20),
            transport: TransportKind::Shm,
            host_id: None,
        }
    }

    /// A process on this host that can't prove the job token gets no
    /// descriptor: the segment goes only over an authenticated socket.
    #[test]
    fn a_stranger_on_this_host_is_given_no_segment() {
        let store = Arc::new(MemStore::new());
        // As if rank 0 had published its entry and not connected yet: rank
        // 1 has every entry and waits for rank 0's connection.
        let early = Entry {
            addr: "127.0.0.1:1".into(),
            listener: [0; auth::LISTENER_ID],
            host: host::identity(),
            shm: true,
        };
        store.set("addr/0", early.encode().as_bytes()).unwrap();
        let listener_rank = {
            let store = store.clone();
            std::thread::spawn(move || {
                connect(store.as_ref(), 1, 2, &config(b"right"), Arc::default())
            })
        };
        let entry = store
            .wait(&["addr/1".into()], Duration::from_secs(20))
            .unwrap()
            .remove(0);
        let entry = Entry::parse(1, &entry).unwrap();
        assert!(entry.shm);
        let addr = entry.unix_addr().unwrap();

        // Garbage, then a wrong token: both dropped, neither given anything.
        let mut garbage = UnixStream::connect_addr(&addr).unwrap();
        garbage.write_all(&[0xAB; 80]).unwrap();
        let mut wrong = UnixStream::connect_addr(&addr).unwrap();
        let target = Target {
            token: b"wrong",
            world: 2,
            rank: 0,
            peer: 1,
            listener: &entry.listener,
        };
        let refused = auth::connect(
            &mut wrong,
            &target,
            Instant::now() + Duration::from_secs(20),
        );
        assert!(
            refused
                .unwrap_err()
                .contains("could not prove the job token")
        );
        wrong.shutdown(std::net::Shutdown::Write).unwrap();
        wrong
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut data = [0u8; 8];
        let got = fds::recv(&wrong, &mut data, 2);
        assert!(got.is_err(), "a stranger was sent descriptors");
        let mut sink = [0u8; 16];
        garbage
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        assert_eq!(garbage.read(&mut sink).unwrap_or(0), 0);

        connect(store.as_ref(), 0, 2, &config(b"right"), Arc::default()).unwrap();
        listener_rank.join().unwrap().unwrap();
    }

    #[test]
    fn shm_refuses_a_peer_on_another_host() {
        let store = Arc::new(MemStore::new());
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let cfg = TcpConfig {
                        host_id: Some(format!("host{rank}")),
                        ..config(b"t")
                    };
                    connect(store.as_ref(), rank, 2, &cfg, Arc::default()).map(|_| ())
                })
            })
            .collect();
        for (rank, r) in ranks.into_iter().enumerate() {
            let err = r.join().unwrap().unwrap_err().to_string();
            assert!(
                err.contains("needs every rank on one host")
                    && err.contains("on another host (host")
                    && err.contains("transport \"auto\""),
                "rank {rank}: {err}"
            );
        }
    }
}

//! Bootstrap: listen, publish the address in the store, connect to every
//! higher rank, accept every lower one, each connection authenticated with
//! the job token.
//!
//! Accepting is one poll loop over the listener and every connection still
//! in its handshake: each handshake moves whenever its own socket is ready
//! and has its own deadline ([`HANDSHAKE_TIMEOUT`] from its accept), so a
//! stranger (an idle or half-open connection, a port scan, a rank with the
//! wrong token, a rank of another job) costs the ranks of this group
//! nothing. Every refused connection is logged with what arrived; those
//! still pending when every rank has joined are closed and logged too.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::TcpTransport;
use super::config::TcpConfig;
use super::socket::{Conn, tune};
use crate::auth::{self, Acceptor, ListenerId, Me, Refusal, Target};
use crate::error::CommError;
use crate::host;
use crate::store::Store;

/// Longest time one connection may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// See [`spin_budget`].
const SPIN: Duration = Duration::from_micros(100);
/// Most connections in their handshake at once; beyond it the oldest is
/// dropped (a flood of strangers can't exhaust file descriptors).
const MAX_PENDING: usize = 256;

/// What a rank publishes in the store under `addr/<rank>`:
/// `HOST:PORT listener=HEX host=ID`.
struct Entry {
    addr: String,
    listener: ListenerId,
    /// The rank's host identity (see `crate::host`).
    host: String,
}

impl Entry {
    fn encode(&self) -> String {
        format!(
            "{} listener={} host={}",
            self.addr,
            auth::hex(&self.listener),
            self.host
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
            }),
            _ => Err(CommError::Config(format!(
                "rank {rank}'s store entry {text:?} is not `HOST:PORT listener=HEX host=ID`: a \
                 rank of another cohort release, or a store shared with something else"
            ))),
        }
    }
}

/// How long a waiting rank polls its sockets (yielding the core between
/// tries) before it blocks in `poll(2)`; see `poll`. With more ranks on
/// this host than cores, a spinning rank would only keep its peers off
/// the cores they need, so it blocks at once.
fn spin_budget(local_ranks: usize, cores: usize) -> Duration {
    if local_ranks > cores {
        Duration::ZERO
    } else {
        SPIN
    }
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
        let mut spin = Duration::ZERO;
        if world > 1 {
            let listener = TcpListener::bind((cfg.bind_host.as_str(), 0)).map_err(|e| {
                CommError::io(format!("rank {rank}: listening on {}:0", cfg.bind_host), e)
            })?;
            let port = listener
                .local_addr()
                .map_err(|e| CommError::io("reading the listener's address", e))?
                .port();
            let me = Entry {
                addr: format!("{}:{port}", cfg.advertise_host),
                listener: rand::random(),
                host: host::identity(),
            };
            store.set(&format!("addr/{rank}"), me.encode().as_bytes())?;
            let keys: Vec<String> = (0..world).map(|r| format!("addr/{r}")).collect();
            let entries = store
                .wait(&keys, cfg.connect_timeout)?
                .iter()
                .enumerate()
                .map(|(r, value)| Entry::parse(r, value))
                .collect::<Result<Vec<_>, _>>()?;
            let local = entries.iter().filter(|e| e.host == me.host).count();
            spin = spin_budget(local, host::cores());
            for (peer, entry) in entries.iter().enumerate().skip(rank + 1) {
                let target = Target {
                    token: &cfg.token,
                    world,
                    rank,
                    peer,
                    listener: &entry.listener,
                };
                let stream = connect_peer(&entry.addr, &target, deadline)?;
                conns[peer] = Some(Conn::new(stream));
            }
            let me = Me {
                token: &cfg.token,
                world,
                rank,
                listener: &me.listener,
            };
            accept_peers(&listener, &me, deadline, &mut conns)?;
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
            spin,
        })
    }
}

fn connect_peer(addr: &str, t: &Target<'_>, deadline: Instant) -> Result<TcpStream, CommError> {
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
    auth::connect(&mut stream, t, deadline).map_err(|reason| CommError::Auth {
        peer: format!("rank {peer} at {addr}"),
        reason,
    })?;
    Ok(stream)
}

/// A connection in its handshake.
struct Pending {
    stream: TcpStream,
    from: SocketAddr,
    since: Instant,
    handshake: Acceptor,
}

/// Accepts and authenticates one connection from every rank below `me.rank`
/// into `conns`, every handshake concurrently under its own deadline.
fn accept_peers(
    listener: &TcpListener,
    me: &Me<'_>,
    deadline: Instant,
    conns: &mut [Option<Conn>],
) -> Result<(), CommError> {
    let rank = me.rank;
    listener
        .set_nonblocking(true)
        .map_err(|e| CommError::io("making the listener non-blocking", e))?;
    let mut pending: Vec<Pending> = Vec::new();
    let mut refused: HashMap<std::net::IpAddr, usize> = HashMap::new();
    let mut refuse = |p: &Pending, why: Refusal| {
        let count = refused.entry(p.from.ip()).or_default();
        *count += 1;
        tracing::warn!(
            "rank {rank}: dropped a connection from {}: {why} (connection {count} refused \
             from this host)",
            p.from
        );
    };
    let mut pollfds: Vec<libc::pollfd> = Vec::new();
    while conns[..rank].iter().any(Option::is_none) {
        loop {
            match listener.accept() {
                Ok((stream, from)) => {
                    if let Err(e) = stream.set_nonblocking(true).and_then(|()| tune(&stream)) {
                        tracing::warn!("rank {rank}: dropped a connection from {from}: {e}");
                        continue;
                    }
                    if pending.len() == MAX_PENDING {
                        let oldest = pending.remove(0);
                        let why = oldest.handshake.timed_out(oldest.since.elapsed());
                        refuse(&oldest, why);
                    }
                    pending.push(Pending {
                        stream,
                        from,
                        since: Instant::now(),
                        handshake: Acceptor::default(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(CommError::io(
                        format!("rank {rank}: accepting a connection"),
                        e,
                    ));
                }
            }
        }
        let now = Instant::now();
        let mut i = 0;
        while i < pending.len() {
            let p = &mut pending[i];
            let outcome = match p.handshake.advance(&mut p.stream, me) {
                Ok(Some(peer)) if conns[peer].is_some() => Err(Refusal::OtherGroup(format!(
                    "it claims rank {peer}, which is already connected"
                ))),
                Ok(None) if now >= (p.since + HANDSHAKE_TIMEOUT).min(deadline) => {
                    Err(p.handshake.timed_out(now - p.since))
                }
                other => other,
            };
            match outcome {
                Ok(None) => i += 1,
                Ok(Some(peer)) => {
                    let p = pending.swap_remove(i);
                    conns[peer] = Some(Conn::new(p.stream));
                }
                Err(why) => {
                    let p = pending.swap_remove(i);
                    refuse(&p, why);
                }
            }
        }
        if conns[..rank].iter().all(Option::is_some) {
            break;
        }
        if now >= deadline {
            let missing: Vec<usize> = (0..rank).filter(|&r| conns[r].is_none()).collect();
            return Err(CommError::io(
                format!(
                    "rank {rank}: waiting for ranks {missing:?} to connect \
                     (are they running, and can they reach this host?)"
                ),
                io::Error::new(io::ErrorKind::TimedOut, "timed out"),
            ));
        }
        pollfds.clear();
        pollfds.push(libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        let mut wake = deadline;
        for p in &pending {
            let events = if p.handshake.wants_write() {
                libc::POLLOUT
            } else {
                libc::POLLIN
            };
            pollfds.push(libc::pollfd {
                fd: p.stream.as_raw_fd(),
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
                return Err(CommError::io("polling the listener", e));
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

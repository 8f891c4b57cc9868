//! Bootstrap: listen, publish the address in the store, connect to every
//! higher rank, accept every lower one, each connection authenticated with
//! the job token.

use std::collections::HashMap;
use std::io;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::TcpTransport;
use super::config::TcpConfig;
use super::socket::{Conn, poll_one, tune};
use crate::auth;
use crate::error::CommError;
use crate::store::Store;

/// Longest time one stranger can hold the accept loop.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

//! Mutual authentication of a new connection with the job token.
//!
//! Both sides prove they know the token without sending it, with HMAC-SHA256
//! over fresh random nonces from both sides (so a recorded exchange can't be
//! replayed), both ranks, the world size and the listener's id (so a proof
//! for one link can't be used on another):
//!
//! ```text
//! connector -> acceptor  HELLO   magic, version, world, rank_c, listener, nonce_c
//! acceptor  -> connector REPLY   magic, rank_a, nonce_a,
//!                                HMAC(token, "accept"  | world | rank_c | rank_a | listener | nonce_c | nonce_a)
//!                     or REFUSE  magic "CHRN", length, reason (then the acceptor closes)
//! connector -> acceptor  PROOF   HMAC(token, "connect" | world | rank_c | rank_a | listener | nonce_c | nonce_a)
//! acceptor  -> connector ACK     1 byte
//! ```
//!
//! `listener` is the random id the acceptor published in the store next to
//! its address, so the acceptor tells a rank of its own group from one that
//! read another group's store (another job, or an earlier generation of
//! this one that found this port reused) before anything secret is
//! involved, and refuses it with a reason. The acceptor answers with its
//! own proof first, but learns nothing useful from a stranger's HELLO.
//!
//! The connecting side blocks ([`connect`]: it talks to one known peer).
//! The accepting side is a state machine ([`Acceptor`]) driven by the
//! listener's poll loop on a non-blocking socket, so one stranger that sends
//! nothing holds up nobody but itself.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

const MAGIC: [u8; 4] = *b"CHRA";
const REFUSE: [u8; 4] = *b"CHRN";
const VERSION: u32 = 2;
const NONCE: usize = 32;
const MAC: usize = 32;
/// Length of the random id a listener publishes next to its address.
pub(crate) const LISTENER_ID: usize = 16;
const HELLO_LEN: usize = 4 + 4 + 8 + 8 + LISTENER_ID + NONCE;
const REPLY_LEN: usize = 4 + 8 + NONCE + MAC;
/// Longest refusal reason sent or read.
const MAX_REFUSAL: usize = 512;

/// Why a connecting handshake failed, as a sentence.
pub(crate) type Reason = String;

/// The random id of one listener (one bootstrap of one rank).
pub(crate) type ListenerId = [u8; LISTENER_ID];

#[allow(clippy::too_many_arguments)]
fn mac(
    token: &[u8],
    label: &[u8],
    world: u64,
    rc: u64,
    ra: u64,
    listener: &[u8],
    nc: &[u8],
    na: &[u8],
) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(token).expect("HMAC takes keys of any length");
    m.update(b"cohort-collectives/");
    m.update(label);
    m.update(&world.to_le_bytes());
    m.update(&rc.to_le_bytes());
    m.update(&ra.to_le_bytes());
    m.update(listener);
    m.update(nc);
    m.update(na);
    m
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// A blocking stream whose reads and writes can be given a time limit.
pub(crate) trait Stream: Read + Write {
    fn set_timeouts(&self, limit: Option<Duration>) -> io::Result<()>;
}

impl Stream for TcpStream {
    fn set_timeouts(&self, limit: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(limit)?;
        self.set_write_timeout(limit)
    }
}

impl Stream for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, limit: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(limit)?;
        self.set_write_timeout(limit)
    }
}

fn set_deadline(stream: &impl Stream, deadline: Instant) -> Result<(), Reason> {
    let left = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| String::from("timed out during the handshake"))?;
    stream
        .set_timeouts(Some(left))
        .map_err(|e| format!("socket options: {e}"))
}

fn read_exact(
    stream: &mut impl Stream,
    buf: &mut [u8],
    deadline: Instant,
    what: &str,
) -> Result<(), Reason> {
    set_deadline(stream, deadline)?;
    stream.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("timed out waiting for the {what}")
        }
        io::ErrorKind::UnexpectedEof => format!("connection closed before the {what}"),
        _ => format!("reading the {what}: {e}"),
    })
}

fn write_all(
    stream: &mut impl Stream,
    buf: &[u8],
    deadline: Instant,
    what: &str,
) -> Result<(), Reason> {
    set_deadline(stream, deadline)?;
    stream
        .write_all(buf)
        .map_err(|e| format!("sending the {what}: {e}"))
}

/// What a connector knows of the listener it wants.
pub(crate) struct Target<'a> {
    pub token: &'a [u8],
    pub world: usize,
    pub rank: usize,
    pub peer: usize,
    pub listener: &'a ListenerId,
}

/// The connecting side: proves the token to rank `t.peer` and checks its
/// proof. The stream is left with its time limits cleared.
pub(crate) fn connect(
    stream: &mut impl Stream,
    t: &Target<'_>,
    deadline: Instant,
) -> Result<(), Reason> {
    let (world, rc, ra) = (t.world as u64, t.rank as u64, t.peer as u64);
    let nonce_c: [u8; NONCE] = rand::random();
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&world.to_le_bytes());
    hello.extend_from_slice(&rc.to_le_bytes());
    hello.extend_from_slice(t.listener);
    hello.extend_from_slice(&nonce_c);
    write_all(stream, &hello, deadline, "hello")?;

    let mut reply = [0u8; REPLY_LEN];
    read_exact(stream, &mut reply[..4], deadline, "reply to our hello")?;
    if reply[0..4] == REFUSE {
        let mut len = [0u8; 4];
        read_exact(stream, &mut len, deadline, "refusal")?;
        let len = (u32::from_le_bytes(len) as usize).min(MAX_REFUSAL);
        let mut text = vec![0u8; len];
        read_exact(stream, &mut text, deadline, "refusal")?;
        return Err(format!(
            "the listener refused us: {}",
            String::from_utf8_lossy(&text)
        ));
    }
    if reply[0..4] != MAGIC {
        return Err(String::from("the peer does not speak the cohort handshake"));
    }
    read_exact(stream, &mut reply[4..], deadline, "reply to our hello")?;
    if u64_at(&reply, 4) != ra {
        return Err(format!(
            "the listener at this address is rank {}, not rank {}",
            u64_at(&reply, 4),
            t.peer
        ));
    }
    let nonce_a = &reply[12..12 + NONCE];
    let key = |label| mac(t.token, label, world, rc, ra, t.listener, &nonce_c, nonce_a);
    key(b"accept")
        .verify_slice(&reply[12 + NONCE..])
        .map_err(|_| String::from("the peer could not prove the job token"))?;

    write_all(
        stream,
        &key(b"connect").finalize().into_bytes(),
        deadline,
        "proof",
    )?;
    let mut ack = [0u8; 1];
    read_exact(
        stream,
        &mut ack,
        deadline,
        "acknowledgement (the peer rejected our proof)",
    )?;
    if ack[0] != 1 {
        return Err(String::from("the peer rejected our proof of the job token"));
    }
    stream
        .set_timeouts(None)
        .map_err(|e| format!("socket options: {e}"))
}

/// Why an accepting handshake refused a connection: what arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Nothing arrived: the connection closed, or no byte came in `waited`.
    Silent { waited: Option<Duration> },
    /// Bytes that are not a cohort handshake.
    NotCohort(String),
    /// A cohort rank, but of another group: another job, an earlier
    /// generation of this one, another world size or release.
    OtherGroup(String),
    /// A rank of this group that could not prove the job token.
    BadToken(String),
    /// A handshake that started and then broke off.
    Broken(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Silent { waited: None } => {
                f.write_str("it closed without sending anything (a port scan or health check?)")
            }
            Refusal::Silent { waited: Some(w) } => write!(
                f,
                "it sent nothing in {w:.1?} (an idle or half-open connection, not a rank)"
            ),
            Refusal::NotCohort(d) => write!(f, "it does not speak the cohort handshake: {d}"),
            Refusal::OtherGroup(d) => write!(
                f,
                "it is a rank of another job or of an earlier generation of this one: {d}"
            ),
            Refusal::BadToken(d) => write!(
                f,
                "it failed authentication: {d} (is COHORT_TOKEN the same for every rank of the job?)"
            ),
            Refusal::Broken(d) => write!(f, "its handshake broke off: {d}"),
        }
    }
}

/// Who a listener is.
pub(crate) struct Me<'a> {
    pub token: &'a [u8],
    pub world: usize,
    pub rank: usize,
    pub listener: &'a ListenerId,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Hello,
    Reply,
    Proof,
    Ack,
}

/// The accepting side of one handshake, moved forward without blocking by
/// [`Acceptor::advance`] whenever its socket is ready (see
/// [`Acceptor::wants_write`]).
pub(crate) struct Acceptor {
    step: Step,
    io: [u8; REPLY_LEN],
    len: usize,
    done: usize,
    rc: u64,
    nonce_c: [u8; NONCE],
    nonce_a: [u8; NONCE],
}

impl Default for Acceptor {
    fn default() -> Self {
        Acceptor {
            step: Step::Hello,
            io: [0; REPLY_LEN],
            len: HELLO_LEN,
            done: 0,
            rc: 0,
            nonce_c: [0; NONCE],
            nonce_a: [0; NONCE],
        }
    }
}

impl Acceptor {
    /// Whether the next step writes (else it reads).
    pub fn wants_write(&self) -> bool {
        matches!(self.step, Step::Reply | Step::Ack)
    }

    /// What to report when the handshake's time is up after `waited`.
    pub fn timed_out(&self, waited: Duration) -> Refusal {
        match (self.step, self.done) {
            (Step::Hello, 0) => Refusal::Silent {
                waited: Some(waited),
            },
            (Step::Hello, n) => Refusal::Broken(format!(
                "{n} bytes of a hello, then nothing for the rest of {waited:.1?}"
            )),
            _ => Refusal::Broken(format!(
                "it stopped answering during the handshake (waited {waited:.1?})"
            )),
        }
    }

    /// Moves the handshake forward as far as the socket allows:
    /// `Ok(Some(rank))` once the peer proved the token, `Ok(None)` when it
    /// must wait for the socket, `Err` when the connection is refused (the
    /// caller closes it).
    pub fn advance(
        &mut self,
        stream: &mut (impl Read + Write),
        me: &Me<'_>,
    ) -> Result<Option<usize>, Refusal> {
        loop {
            while self.done < self.len {
                let r = if self.wants_write() {
                    stream.write(&self.io[self.done..self.len])
                } else {
                    stream.read(&mut self.io[self.done..self.len])
                };
                match r {
                    Ok(0) => return Err(self.closed()),
                    Ok(n) => self.done += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if self.step == Step::Hello && self.done == 0 => {
                        tracing::debug!("a connection failed before its hello: {e}");
                        return Err(Refusal::Silent { waited: None });
                    }
                    Err(e) => return Err(Refusal::Broken(format!("{e}"))),
                }
            }
            match self.step {
                Step::Hello => self.on_hello(stream, me)?,
                Step::Reply => self.expect(Step::Proof, MAC),
                Step::Proof => {
                    let (world, ra) = (me.world as u64, me.rank as u64);
                    mac(
                        me.token,
                        b"connect",
                        world,
                        self.rc,
                        ra,
                        me.listener,
                        &self.nonce_c,
                        &self.nonce_a,
                    )
                    .verify_slice(&self.io[..MAC])
                    .map_err(|_| {
                        Refusal::BadToken(format!(
                            "the peer claiming rank {} sent a wrong proof of the job token",
                            self.rc
                        ))
                    })?;
                    self.io[0] = 1;
                    self.expect(Step::Ack, 1);
                }
                Step::Ack => return Ok(Some(self.rc as usize)),
            }
        }
    }

    fn expect(&mut self, step: Step, len: usize) {
        self.step = step;
        self.len = len;
        self.done = 0;
    }

    fn closed(&self) -> Refusal {
        match (self.step, self.done) {
            (Step::Hello, 0) => Refusal::Silent { waited: None },
            (Step::Hello, n) => Refusal::NotCohort(format!(
                "it closed after {n} bytes, short of a hello ({HELLO_LEN} bytes)"
            )),
            (Step::Proof, _) => Refusal::BadToken(format!(
                "the peer claiming rank {} closed the connection instead of proving the job \
                 token: it could not verify our proof, so it holds a different token",
                self.rc
            )),
            _ => Refusal::Broken(String::from("it closed the connection mid-handshake")),
        }
    }

    /// Checks a complete HELLO and stages the REPLY (or refuses).
    fn on_hello(&mut self, stream: &mut impl Write, me: &Me<'_>) -> Result<(), Refusal> {
        let hello = &self.io[..HELLO_LEN];
        if hello[0..4] != MAGIC {
            return Err(Refusal::NotCohort(format!(
                "its first bytes are \"{}\"",
                hello[0..8].escape_ascii()
            )));
        }
        let version = u32::from_le_bytes(hello[4..8].try_into().expect("4 bytes"));
        let (their_world, rc) = (u64_at(hello, 8), u64_at(hello, 16));
        let listener = &hello[24..24 + LISTENER_ID];
        let wrong = if version != VERSION {
            Some(format!(
                "its handshake is version {version}, this rank's {VERSION} (another cohort release)"
            ))
        } else if listener != me.listener {
            Some(format!(
                "it was looking for listener {} and this is {} (it read another group's store, \
                 or an old address of this rank)",
                hex(listener),
                hex(me.listener)
            ))
        } else if their_world != me.world as u64 {
            Some(format!(
                "it has world size {their_world}, this rank {}",
                me.world
            ))
        } else if rc >= me.rank as u64 {
            Some(format!(
                "it claims rank {rc}, but only ranks below {} connect here",
                me.rank
            ))
        } else {
            None
        };
        if let Some(why) = wrong {
            // Best effort: the refused side learns why before the close.
            let text = &why.as_bytes()[..why.len().min(MAX_REFUSAL)];
            let mut msg = REFUSE.to_vec();
            msg.extend_from_slice(&(text.len() as u32).to_le_bytes());
            msg.extend_from_slice(text);
            let _ = stream.write(&msg);
            return Err(Refusal::OtherGroup(why));
        }
        self.rc = rc;
        self.nonce_c.copy_from_slice(&hello[24 + LISTENER_ID..]);
        self.nonce_a = rand::random();
        let ra = me.rank as u64;
        let ours = mac(
            me.token,
            b"accept",
            me.world as u64,
            rc,
            ra,
            me.listener,
            &self.nonce_c,
            &self.nonce_a,
        )
        .finalize();
        let mut reply = [0u8; REPLY_LEN];
        reply[0..4].copy_from_slice(&MAGIC);
        reply[4..12].copy_from_slice(&ra.to_le_bytes());
        reply[12..12 + NONCE].copy_from_slice(&self.nonce_a);
        reply[12 + NONCE..].copy_from_slice(&ours.into_bytes());
        self.io = reply;
        self.expect(Step::Reply, REPLY_LEN);
        Ok(())
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses what [`hex`] wrote into exactly `N` bytes.
pub(crate) fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn me<'a>(token: &'a [u8], listener: &'a ListenerId) -> Me<'a> {
        Me {
            token,
            world: 3,
            rank: 2,
            listener,
        }
    }

    /// Runs an acceptor on `b` (blocking) while `connect_side` runs on `a`.
    fn handshake(
        token_c: &[u8],
        listener_c: ListenerId,
        rank_c: usize,
    ) -> (Result<(), Reason>, Result<Option<usize>, Refusal>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let token_c = token_c.to_vec();
        let connector = std::thread::spawn(move || {
            let target = Target {
                token: &token_c,
                world: 3,
                rank: rank_c,
                peer: 2,
                listener: &listener_c,
            };
            connect(&mut a, &target, Instant::now() + Duration::from_secs(10))
        });
        let listener = [7u8; LISTENER_ID];
        let mut acceptor = Acceptor::default();
        let mut result = acceptor.advance(&mut b, &me(b"right", &listener));
        if result.is_err() {
            drop(b);
        }
        let connected = connector.join().unwrap();
        if let Ok(None) = result {
            result = Err(Refusal::Broken("did not finish".into()));
        }
        (connected, result)
    }

    #[test]
    fn the_right_token_gets_in() {
        let (c, a) = handshake(b"right", [7; LISTENER_ID], 1);
        assert_eq!(c, Ok(()));
        assert_eq!(a, Ok(Some(1)));
    }

    #[test]
    fn refusals_say_what_arrived() {
        let (c, a) = handshake(b"wrong", [7; LISTENER_ID], 1);
        assert!(c.unwrap_err().contains("could not prove the job token"));
        let a = a.unwrap_err();
        assert!(matches!(a, Refusal::BadToken(_)), "{a}");
        assert!(a.to_string().contains("failed authentication"), "{a}");

        let (c, a) = handshake(b"right", [8; LISTENER_ID], 1);
        let c = c.unwrap_err();
        assert!(c.contains("refused us") && c.contains("listener"), "{c}");
        assert!(matches!(a, Err(Refusal::OtherGroup(_))), "{a:?}");

        let (_, a) = handshake(b"right", [7; LISTENER_ID], 2);
        assert!(
            a.unwrap_err().to_string().contains("claims rank 2"),
            "ranks connect upward only"
        );

        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        drop(a);
        let mut acceptor = Acceptor::default();
        let listener = [7u8; LISTENER_ID];
        let r = acceptor.advance(&mut b, &me(b"t", &listener)).unwrap_err();
        assert!(matches!(r, Refusal::NotCohort(_)), "{r}");

        let (a, mut b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut acceptor = Acceptor::default();
        assert_eq!(acceptor.advance(&mut b, &me(b"t", &listener)), Ok(None));
        let late = acceptor.timed_out(Duration::from_secs(10));
        assert!(late.to_string().contains("sent nothing in 10.0s"), "{late}");
        drop(a);
        assert_eq!(
            acceptor.advance(&mut b, &me(b"t", &listener)),
            Err(Refusal::Silent { waited: None })
        );
    }

    #[test]
    fn hex_round_trips() {
        let id: ListenerId = rand::random();
        assert_eq!(unhex::<LISTENER_ID>(&hex(&id)), Some(id));
        assert_eq!(unhex::<2>("zz00"), None);
        assert_eq!(unhex::<2>("00"), None);
    }
}

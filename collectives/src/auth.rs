//! Mutual authentication of a new connection with the job token.
//!
//! Both sides prove they know the token without sending it, with HMAC-SHA256
//! over fresh random nonces from both sides (so a recorded exchange can't be
//! replayed) and both ranks and the world size (so a proof for one link
//! can't be used on another):
//!
//! ```text
//! connector -> acceptor  HELLO  magic, version, world, rank_c, nonce_c
//! acceptor  -> connector REPLY  magic, rank_a, nonce_a,
//!                               HMAC(token, "accept"  | world | rank_c | rank_a | nonce_c | nonce_a)
//! connector -> acceptor  PROOF  HMAC(token, "connect" | world | rank_c | rank_a | nonce_c | nonce_a)
//! acceptor  -> connector ACK    1 byte
//! ```
//! The acceptor answers with its own proof first, but it learns nothing
//! useful from a stranger's HELLO; a connection that fails any step is
//! dropped by the acceptor and logged, before any algorithm sees it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use hmac::{Hmac, Mac};
use sha2::Sha256;

const MAGIC: [u8; 4] = *b"CHRA";
const VERSION: u32 = 1;
const NONCE: usize = 32;
const MAC: usize = 32;
const HELLO_LEN: usize = 4 + 4 + 8 + 8 + NONCE;
const REPLY_LEN: usize = 4 + 8 + NONCE + MAC;

/// Why a handshake failed, as a sentence.
pub(crate) type Reason = String;

fn mac(
    token: &[u8],
    label: &[u8],
    world: u64,
    rc: u64,
    ra: u64,
    nc: &[u8],
    na: &[u8],
) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(token).expect("HMAC takes keys of any length");
    m.update(b"cohort-collectives/");
    m.update(label);
    m.update(&world.to_le_bytes());
    m.update(&rc.to_le_bytes());
    m.update(&ra.to_le_bytes());
    m.update(nc);
    m.update(na);
    m
}

fn set_deadline(stream: &TcpStream, deadline: Instant) -> Result<(), Reason> {
    let left = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| String::from("timed out during the handshake"))?;
    stream
        .set_read_timeout(Some(left))
        .and_then(|()| stream.set_write_timeout(Some(left)))
        .map_err(|e| format!("socket options: {e}"))
}

fn read_exact(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    what: &str,
) -> Result<(), Reason> {
    set_deadline(stream, deadline)?;
    stream.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("timed out waiting for the {what}")
        }
        std::io::ErrorKind::UnexpectedEof => format!("connection closed before the {what}"),
        _ => format!("reading the {what}: {e}"),
    })
}

fn write_all(
    stream: &mut TcpStream,
    buf: &[u8],
    deadline: Instant,
    what: &str,
) -> Result<(), Reason> {
    set_deadline(stream, deadline)?;
    stream
        .write_all(buf)
        .map_err(|e| format!("sending the {what}: {e}"))
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// The connecting side: proves the token to rank `peer` and checks its proof.
pub(crate) fn connect(
    stream: &mut TcpStream,
    token: &[u8],
    world: usize,
    rank: usize,
    peer: usize,
    deadline: Instant,
) -> Result<(), Reason> {
    let (world, rc, ra) = (world as u64, rank as u64, peer as u64);
    let nonce_c: [u8; NONCE] = rand::random();
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&world.to_le_bytes());
    hello.extend_from_slice(&rc.to_le_bytes());
    hello.extend_from_slice(&nonce_c);
    write_all(stream, &hello, deadline, "hello")?;

    let mut reply = [0u8; REPLY_LEN];
    read_exact(stream, &mut reply, deadline, "reply to our hello")?;
    if reply[0..4] != MAGIC {
        return Err(String::from("the peer does not speak the cohort handshake"));
    }
    if u64_at(&reply, 4) != ra {
        return Err(format!(
            "the listener at this address is rank {}, not rank {peer}",
            u64_at(&reply, 4)
        ));
    }
    let nonce_a = &reply[12..12 + NONCE];
    mac(token, b"accept", world, rc, ra, &nonce_c, nonce_a)
        .verify_slice(&reply[12 + NONCE..])
        .map_err(|_| String::from("the peer could not prove the job token"))?;

    let proof = mac(token, b"connect", world, rc, ra, &nonce_c, nonce_a).finalize();
    write_all(stream, &proof.into_bytes(), deadline, "proof")?;
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
    Ok(())
}

/// The accepting side: checks a connector's proof; returns its rank, which
/// must be below `rank` (lower ranks connect to higher ones).
pub(crate) fn accept(
    stream: &mut TcpStream,
    token: &[u8],
    world: usize,
    rank: usize,
    deadline: Instant,
) -> Result<usize, Reason> {
    let mut hello = [0u8; HELLO_LEN];
    read_exact(stream, &mut hello, deadline, "hello")?;
    if hello[0..4] != MAGIC {
        return Err(String::from("not a cohort handshake"));
    }
    let version = u32::from_le_bytes(hello[4..8].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(format!("handshake version {version}, expected {VERSION}"));
    }
    let (their_world, rc) = (u64_at(&hello, 8), u64_at(&hello, 16));
    if their_world != world as u64 {
        return Err(format!(
            "peer has world size {their_world}, this rank {world}"
        ));
    }
    if rc >= rank as u64 {
        return Err(format!(
            "peer claims rank {rc}, but only ranks below {rank} connect here"
        ));
    }
    let (world, ra) = (world as u64, rank as u64);
    let nonce_c = &hello[24..24 + NONCE];
    let nonce_a: [u8; NONCE] = rand::random();
    let ours = mac(token, b"accept", world, rc, ra, nonce_c, &nonce_a).finalize();
    let mut reply = Vec::with_capacity(REPLY_LEN);
    reply.extend_from_slice(&MAGIC);
    reply.extend_from_slice(&ra.to_le_bytes());
    reply.extend_from_slice(&nonce_a);
    reply.extend_from_slice(&ours.into_bytes());
    write_all(stream, &reply, deadline, "reply")?;

    let mut proof = [0u8; MAC];
    read_exact(stream, &mut proof, deadline, "proof")?;
    mac(token, b"connect", world, rc, ra, nonce_c, &nonce_a)
        .verify_slice(&proof)
        .map_err(|_| format!("peer claiming rank {rc} failed to prove the job token"))?;
    write_all(stream, &[1], deadline, "acknowledgement")?;
    Ok(rc as usize)
}

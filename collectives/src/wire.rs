//! The message header every transport puts in front of every payload.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "CHRT"
//!      4     1  kind      (1 + OpKind, or 0xFF for an abort)
//!      5     1  dtype     (DType code)
//!      6     1  reduce op (ReduceOp code)
//!      7     1  algorithm (Algorithm code, as resolved by the sender)
//!      8     8  seq       (the communicator's op sequence number)
//!     16     8  count     (element count of the whole op)
//!     24     8  chunk     (index of this message on its link within the op)
//!     32     4  root      (broadcast root, else 0)
//!     36     4  reserved
//!     40     8  len       (payload bytes that follow)
//! ```
//! All little-endian. The receiver knows what it expects and checks every
//! field: a difference in (seq, kind, dtype, op, algorithm, count, root) means
//! the ranks called different collectives, and becomes a
//! [`CommError::Desync`] naming both calls.
//!
//! Probes. Two ranks in different collectives can each wait to *receive*
//! from the other (a tree all-reduce's root waits on a child that is in a
//! broadcast, waiting on the root): no message would ever cross and reveal
//! the desync before the timeout. So a transport that has waited
//! [`PROBE_AFTER`] on a peer sends it a probe: a header-only frame (kind
//! byte 0xFE) describing the op it is in. The receiver reads it where it
//! expects a header and checks it with [`Header::check_probe`]: a probe of
//! the same op, or of an op it has already finished, is skipped; any other
//! is a desync.
//!
//! Bystanders. Probes break a wait between two ranks; a desync can also
//! make a longer cycle (with three ranks: 0 waits on 1, 1 on 2, 2 on 0,
//! each in a different collective), where every rank's probe goes to a
//! peer that is not reading from it. So a transport that has waited
//! `PROBE_AFTER` also looks at the first frame waiting from every peer it
//! is not receiving from ([`Header::check_bystander`]): a message of this
//! op's sequence number but of another op is a desync; an abort notice
//! means that peer failed; anything else is left for later.

use crate::error::CommError;
use crate::types::{Algorithm, DType, OpKind, ReduceOp};

pub(crate) const HEADER_LEN: usize = 48;
const MAGIC: [u8; 4] = *b"CHRT";
const ABORT: u8 = 0xFF;
const PROBE: u8 = 0xFE;

/// How long a transport waits on a peer before probing it.
pub(crate) const PROBE_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

/// What one message claims to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: OpKind,
    pub dtype: DType,
    pub op: ReduceOp,
    pub algo: Algorithm,
    pub seq: u64,
    pub count: u64,
    pub chunk: u64,
    pub root: u32,
    pub len: u64,
}

/// A decoded header: a message of an op, or a peer's abort notice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    Msg(Header),
    /// A peer failed and sends its reason (`len` bytes of UTF-8) before closing.
    Abort {
        len: u64,
    },
    /// A peer waiting on this rank says which op it is in (no payload).
    Probe(Header),
}

impl Header {
    /// "all_reduce(f32, count 1000, sum, ring) seq 5", as used in errors.
    pub fn describe(&self) -> String {
        let mut s = format!("{}({}, count {}", self.kind, self.dtype, self.count);
        match self.kind {
            OpKind::AllReduce | OpKind::ReduceScatter => s.push_str(&format!(", {}", self.op)),
            OpKind::Broadcast => s.push_str(&format!(", root {}", self.root)),
            OpKind::Shift => s.push_str(&format!(", offset {}", self.root)),
            OpKind::AllGather | OpKind::Barrier => {}
        }
        s.push_str(&format!(", {}) seq {}", self.algo, self.seq));
        s
    }

    /// The probe frame of the op this header belongs to.
    pub fn encode_probe(&self) -> [u8; HEADER_LEN] {
        let mut b = Header {
            chunk: 0,
            len: 0,
            ..*self
        }
        .encode();
        b[4] = PROBE;
        b[5..8].copy_from_slice(&[self.kind as u8, self.dtype.code(), self.op.code()]);
        b[36] = self.algo.code();
        b
    }

    /// Checks a peer's probe against the message this rank expects from it:
    /// `Ok` (skip the probe) when it is from the same op or an older one.
    pub fn check_probe(&self, probe: &Header, rank: usize, peer: usize) -> Result<(), CommError> {
        let same_op = Header {
            chunk: self.chunk,
            len: self.len,
            ..*probe
        } == *self;
        if probe.seq < self.seq || same_op {
            return Ok(());
        }
        let theirs = if probe.seq > self.seq {
            format!(
                "{} (it has finished this op, which expects more from it)",
                probe.describe()
            )
        } else {
            probe.describe()
        };
        Err(CommError::Desync {
            rank,
            peer,
            ours: self.describe(),
            theirs,
        })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = 1 + self.kind as u8;
        b[5] = self.dtype.code();
        b[6] = self.op.code();
        b[7] = self.algo.code();
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.count.to_le_bytes());
        b[24..32].copy_from_slice(&self.chunk.to_le_bytes());
        b[32..36].copy_from_slice(&self.root.to_le_bytes());
        b[40..48].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Checks a received frame against what this rank expects; `Ok` only for
    /// a message identical to `self`.
    pub fn check(&self, got: &Frame, rank: usize, peer: usize) -> Result<(), CommError> {
        let got = match got {
            Frame::Msg(h) => h,
            Frame::Probe(probe) => return self.check_probe(probe, rank, peer),
            Frame::Abort { .. } => {
                return Err(CommError::PeerAborted {
                    rank,
                    peer,
                    op: self.describe(),
                    reason: String::from("(no reason given)"),
                });
            }
        };
        if got == self {
            return Ok(());
        }
        let same_call = Header {
            chunk: self.chunk,
            len: self.len,
            ..*got
        } == *self;
        let theirs = if same_call {
            // Same collective, different message: the ranks disagree on how
            // to split it (e.g. a different max segment size).
            format!(
                "{} but sent message {} of {} bytes where message {} of {} bytes was expected",
                got.describe(),
                got.chunk,
                got.len,
                self.chunk,
                self.len
            )
        } else {
            got.describe()
        };
        Err(CommError::Desync {
            rank,
            peer,
            ours: self.describe(),
            theirs,
        })
    }
}

/// What the first frame waiting from a peer that this rank is not
/// receiving from means (see "Bystanders" above).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bystander {
    /// A probe of this op or an older one: read it and go on.
    Consume,
    /// A frame for later (a message of this op for a later exchange, or of
    /// a later op; a probe of a later op): leave it where it is.
    Later,
    /// The peer aborted; `len` bytes of its reason follow the header.
    Aborted { len: u64 },
}

impl Header {
    /// Judges `frame`, the first one waiting from `peer`, which this rank is
    /// not receiving from in the op of `self` (see [`Bystander`]).
    pub fn check_bystander(
        &self,
        frame: &Frame,
        rank: usize,
        peer: usize,
    ) -> Result<Bystander, CommError> {
        let (h, probe) = match frame {
            Frame::Abort { len } => return Ok(Bystander::Aborted { len: *len }),
            Frame::Probe(h) => (h, true),
            Frame::Msg(h) => (h, false),
        };
        let same_op = Header {
            chunk: self.chunk,
            len: self.len,
            ..*h
        } == *self;
        if h.seq == self.seq && !same_op {
            return Err(CommError::Desync {
                rank,
                peer,
                ours: self.describe(),
                theirs: h.describe(),
            });
        }
        Ok(if probe && h.seq <= self.seq {
            Bystander::Consume
        } else {
            Bystander::Later
        })
    }
}

/// Encodes an abort notice carrying `reason_len` bytes of text.
pub(crate) fn encode_abort(reason_len: usize) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..4].copy_from_slice(&MAGIC);
    b[4] = ABORT;
    b[40..48].copy_from_slice(&(reason_len as u64).to_le_bytes());
    b
}

/// Decodes a header; `Err` carries a description of what was wrong.
pub(crate) fn decode(b: &[u8; HEADER_LEN]) -> Result<Frame, String> {
    if b[0..4] != MAGIC {
        return Err(format!(
            "bad magic {:02x?} (not a cohort collectives message: a stray connection \
             or a corrupted stream)",
            &b[0..4]
        ));
    }
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    if b[4] == ABORT {
        return Ok(Frame::Abort { len: u64_at(40) });
    }
    // A probe moves kind, dtype, op to bytes 5..8 and the algorithm to 36.
    let (probe, kind, dtype, op, algo) = if b[4] == PROBE {
        (true, b[5].wrapping_add(1), b[6], b[7], b[36])
    } else {
        (false, b[4], b[5], b[6], b[7])
    };
    let kind = match kind {
        1 => OpKind::AllReduce,
        2 => OpKind::ReduceScatter,
        3 => OpKind::AllGather,
        4 => OpKind::Broadcast,
        5 => OpKind::Barrier,
        6 => OpKind::Shift,
        k => return Err(format!("unknown op kind code {k}")),
    };
    let dtype = DType::from_code(dtype).ok_or_else(|| format!("unknown dtype code {dtype}"))?;
    let op = *ReduceOp::ALL
        .get(usize::from(op))
        .ok_or_else(|| format!("unknown reduce op code {op}"))?;
    let algo = *Algorithm::ALL
        .get(usize::from(algo))
        .ok_or_else(|| format!("unknown algorithm code {algo}"))?;
    let header = Header {
        kind,
        dtype,
        op,
        algo,
        seq: u64_at(8),
        count: u64_at(16),
        chunk: u64_at(24),
        root: u32::from_le_bytes(b[32..36].try_into().expect("4 bytes")),
        len: u64_at(40),
    };
    Ok(if probe {
        Frame::Probe(header)
    } else {
        Frame::Msg(header)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            kind: OpKind::AllReduce,
            dtype: DType::F32,
            op: ReduceOp::Sum,
            algo: Algorithm::Ring,
            seq: 5,
            count: 1000,
            chunk: 3,
            root: 0,
            len: 4000,
        }
    }

    #[test]
    fn round_trip_and_checks() {
        let h = header();
        let frame = decode(&h.encode()).unwrap();
        assert_eq!(frame, Frame::Msg(h));
        h.check(&frame, 0, 1).unwrap();

        let other = Header {
            kind: OpKind::Broadcast,
            ..h
        };
        let err = h.check(&Frame::Msg(other), 0, 1).unwrap_err().to_string();
        assert!(
            err.contains("this rank called all_reduce(f32, count 1000, sum, ring) seq 5")
                && err.contains("rank 1 called broadcast(f32, count 1000, root 0, ring) seq 5"),
            "{err}"
        );
        let seg = Header { chunk: 4, ..h };
        let err = h.check(&Frame::Msg(seg), 0, 1).unwrap_err().to_string();
        assert!(err.contains("message 4"), "{err}");

        assert_eq!(decode(&encode_abort(7)).unwrap(), Frame::Abort { len: 7 });

        let probe = decode(&h.encode_probe()).unwrap();
        assert_eq!(
            probe,
            Frame::Probe(Header {
                chunk: 0,
                len: 0,
                ..h
            })
        );
        h.check(&probe, 0, 1).unwrap();
        let Frame::Probe(p) = probe else {
            unreachable!()
        };
        let older = Header { seq: 6, ..h };
        older.check_probe(&p, 0, 1).unwrap();
        let other = Header {
            kind: OpKind::Broadcast,
            ..h
        };
        assert!(other.check_probe(&p, 0, 1).is_err());
        let behind = Header {
            seq: 4,
            kind: OpKind::Broadcast,
            ..h
        };
        let err = behind.check_probe(&p, 0, 1).unwrap_err().to_string();
        assert!(err.contains("it has finished"), "{err}");
        let b = |f: &Frame| h.check_bystander(f, 0, 1).unwrap();
        assert_eq!(b(&Frame::Probe(p)), Bystander::Consume);
        assert_eq!(b(&Frame::Msg(Header { chunk: 9, ..h })), Bystander::Later);
        assert_eq!(b(&Frame::Msg(Header { seq: 6, ..h })), Bystander::Later);
        assert_eq!(b(&Frame::Probe(Header { seq: 6, ..h })), Bystander::Later);
        assert_eq!(b(&Frame::Abort { len: 3 }), Bystander::Aborted { len: 3 });
        let other_op = Frame::Msg(Header {
            kind: OpKind::Broadcast,
            ..h
        });
        let err = h.check_bystander(&other_op, 0, 1).unwrap_err().to_string();
        assert!(err.contains("rank 1 called broadcast"), "{err}");

        let mut bad = h.encode();
        bad[0] = b'X';
        assert!(decode(&bad).unwrap_err().contains("bad magic"));
    }
}

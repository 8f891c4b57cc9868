//! What one kind of link gives the exchange loop: a non-blocking byte stream
//! to one peer, and how to wait on it.
//!
//! The loop (`links`) owns everything above the bytes: message framing,
//! header checks, probes, timeouts. A pipe only moves bytes, says which
//! descriptor to poll while it can't, and carries an abort notice.

use std::io;
use std::os::fd::RawFd;

/// A non-blocking byte stream to one peer.
pub(crate) trait Pipe: Send {
    /// Takes a prefix of `head` followed by `body` without blocking and
    /// returns how many bytes it took (0 when there is no room now).
    fn send(&mut self, head: &[u8], body: &[u8]) -> io::Result<usize>;

    /// Moves arrived bytes into `dst` without blocking and returns how many
    /// (0 when none have arrived). `UnexpectedEof` once the peer has closed
    /// its end and every byte it sent was read.
    fn recv(&mut self, dst: &mut [u8]) -> io::Result<usize>;

    /// As `recv`, but leaves the bytes to be read again.
    fn peek(&mut self, dst: &mut [u8]) -> io::Result<usize>;

    /// Lends up to `max` arrived bytes to be read in place (then
    /// [`Pipe::consume`]d), or `None` if this pipe can only copy them out.
    fn lend(&mut self, _max: usize) -> Option<io::Result<&[u8]>> {
        None
    }

    /// Drops the first `n` bytes lent by [`Pipe::lend`].
    fn consume(&mut self, _n: usize) {}

    /// The descriptor and `poll(2)` events to wait on while this pipe has no
    /// room (`write`) or fewer than `want` bytes to read.
    fn wait_on(&mut self, write: bool, want: usize) -> (RawFd, libc::c_short);

    /// Whether waiting on this pipe also needs this process's doorbell
    /// (the peer writes memory, not a descriptor, and rings it).
    fn rings_doorbell(&self) -> bool {
        false
    }

    /// Called when the descriptor of `wait_on` was ready: the peer's reason
    /// if it sent an abort notice out of band (shared memory's control
    /// socket); a pipe whose peer closed reports it from `recv`/`send`.
    fn notice(&mut self) -> Option<String> {
        None
    }

    /// Best effort: delivers `notice` (an abort frame and its reason) and
    /// closes this end. `at_boundary`: no frame is partly written (an
    /// in-band notice can only go there).
    fn abort(&mut self, notice: &[u8], at_boundary: bool);
}

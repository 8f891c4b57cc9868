//! A rank's shared-memory segment: a sealed memfd holding one ring per
//! same-host peer, and the views of it that a pipe reads and writes.
//!
//! ```text
//! page 0        header: magic "CHRS", version, rank, rings, ring bytes, page size;
//!               at byte 128 the owner's "sleeping" flag (see `Doorbell`)
//! then per ring one control page (head at byte 0, tail at byte 128: separate
//!               cache lines) and RING_BYTES of data
//! ```
//!
//! A ring carries bytes from the segment's owner to one peer: the owner
//! writes data and advances `head`, the peer reads and advances `tail`
//! (both count bytes since the start, so `head - tail` is what is in it).
//! Each side maps the ring's data twice, back to back, so any `len <=
//! RING_BYTES` bytes starting anywhere in it are contiguous in memory: a
//! message never has to be split at the end, and a reduction can read a
//! peer's payload in place.
//!
//! A memfd has no name in any file system: it goes away with the last
//! process that has it open or mapped, also after a SIGKILL, and nothing
//! is ever left in `/dev/shm`. It is sealed against shrinking before it is
//! shared, so a peer can't make this rank's mappings fault.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64};

const MAGIC: [u8; 4] = *b"CHRS";
const VERSION: u32 = 1;
/// Bytes of one ring: room for several 256 KiB pipeline segments, so a
/// sender runs ahead of a receiver busy reducing.
pub(crate) const RING_BYTES: usize = 1 << 20;
const SLEEPING_AT: usize = 128;
const TAIL_AT: usize = 128;
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096).max(4096)
}

fn size_of(rings: usize, page: usize) -> usize {
    page + rings * (page + RING_BYTES)
}

fn last_os_error(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A whole segment, mapped once (for the header and the control pages).
pub(crate) struct Segment {
    fd: OwnedFd,
    base: *mut u8,
    len: usize,
    page: usize,
    rings: usize,
}

// SAFETY: the mapping is process-shared memory touched only through atomics
// (flags, head, tail) and by the single writer or reader of each ring.
unsafe impl Send for Segment {}
// SAFETY: as above.
unsafe impl Sync for Segment {}

impl Segment {
    /// A new sealed segment of `rings` rings for rank `rank`.
    pub fn create(rank: usize, rings: usize) -> io::Result<Arc<Segment>> {
        let page = page();
        let len = size_of(rings, page);
        // SAFETY: a NUL-terminated name and valid flags.
        let fd = unsafe {
            libc::memfd_create(
                c"cohort-collectives".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(last_os_error("memfd_create"));
        }
        // SAFETY: fd was just created and is owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a valid fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(last_os_error("sizing the shared-memory segment"));
        }
        // SAFETY: a valid fd; F_ADD_SEALS takes an int.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } != 0 {
            return Err(last_os_error("sealing the shared-memory segment"));
        }
        let seg = Segment::map(fd, len, page, rings)?;
        // SAFETY: the header lies in the first page, which this rank owns.
        unsafe {
            let h = std::slice::from_raw_parts_mut(seg.base, 40);
            h[0..4].copy_from_slice(&MAGIC);
            h[4..8].copy_from_slice(&VERSION.to_le_bytes());
            h[8..16].copy_from_slice(&(rank as u64).to_le_bytes());
            h[16..24].copy_from_slice(&(rings as u64).to_le_bytes());
            h[24..32].copy_from_slice(&(RING_BYTES as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(page as u64).to_le_bytes());
        }
        Ok(Arc::new(seg))
    }

    /// Maps rank `rank`'s segment received as `fd`, after checking its
    /// seals, size and header.
    pub fn open(fd: OwnedFd, rank: usize) -> Result<Arc<Segment>, String> {
        // SAFETY: a valid fd.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) == 0 {
            return Err(String::from("its segment is not sealed against resizing"));
        }
        // SAFETY: an all-zero stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid fd and a valid out-pointer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(format!(
                "fstat of its segment: {}",
                io::Error::last_os_error()
            ));
        }
        let len = st.st_size as usize;
        let page = page();
        if len < page {
            return Err(format!("its segment has {len} bytes, less than a header"));
        }
        let file = std::fs::File::from(fd);
        let mut h = [0u8; 40];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut h, 0)
            .map_err(|e| format!("reading its segment's header: {e}"))?;
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        let (version, owner, rings) = (
            u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")),
            u64_at(8),
            u64_at(16) as usize,
        );
        if h[0..4] != MAGIC || version != VERSION {
            return Err(String::from(
                "its segment has no cohort header of this version",
            ));
        }
        if owner != rank as u64 || u64_at(24) != RING_BYTES as u64 || u64_at(32) != page as u64 {
            return Err(format!(
                "its segment belongs to rank {owner} with rings of {} bytes",
                u64_at(24)
            ));
        }
        if rings > 4096 || size_of(rings, page) != len {
            return Err(format!(
                "its segment's size {len} does not match {rings} rings"
            ));
        }
        Segment::map(OwnedFd::from(file), len, page, rings)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }

    fn map(fd: OwnedFd, len: usize, page: usize, rings: usize) -> io::Result<Segment> {
        // SAFETY: a fresh shared mapping of a valid fd; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(last_os_error("mapping a shared-memory segment"));
        }
        Ok(Segment {
            fd,
            base: base.cast(),
            len,
            page,
            rings,
        })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The owner's "sleeping" flag (see `Doorbell`).
    pub fn sleeping(&self) -> &AtomicU32 {
        // SAFETY: in the mapped first page, 4-aligned; shared memory is only
        // accessed atomically here.
        unsafe { &*self.base.add(SLEEPING_AT).cast::<AtomicU32>() }
    }

    /// A view of ring `i`; `None` if there is no such ring.
    pub fn ring(self: &Arc<Self>, i: usize) -> io::Result<Option<Ring>> {
        if i >= self.rings {
            return Ok(None);
        }
        let ctrl_off = self.page + i * (self.page + RING_BYTES);
        let data_off = ctrl_off + self.page;
        // SAFETY: reserves address space only; checked below.
        let area = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * RING_BYTES,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if area == libc::MAP_FAILED {
            return Err(last_os_error("reserving address space for a ring"));
        }
        let ring = Ring {
            _seg: self.clone(),
            // SAFETY: the control page of ring i is inside the mapping;
            // both offsets are 8-aligned.
            head: unsafe { self.base.add(ctrl_off).cast() },
            // SAFETY: as above.
            tail: unsafe { self.base.add(ctrl_off + TAIL_AT).cast() },
            data: area.cast(),
            cap: RING_BYTES,
        };
        for half in 0..2 {
            // SAFETY: replaces half of the reservation made above with the
            // ring's data pages (MAP_FIXED inside our own reservation).
            let got = unsafe {
                libc::mmap(
                    ring.data.add(half * RING_BYTES).cast(),
                    RING_BYTES,
                    libc::PROT_READ | libc::PROT_WRITE,
                    // Populated now: faulting the ring's pages in on first
                    // use cost the first lap of small messages a page fault
                    // each (256 of them for 4 KiB messages).
                    libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_POPULATE,
                    self.fd.as_raw_fd(),
                    data_off as libc::off_t,
                )
            };
            if got == libc::MAP_FAILED {
                return Err(last_os_error("mapping a ring"));
            }
        }
        Ok(Some(ring))
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: this segment's own mapping, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// One ring of a segment, its data mapped twice back to back.
pub(crate) struct Ring {
    /// Keeps the mapping of `head` and `tail` alive.
    _seg: Arc<Segment>,
    head: *const AtomicU64,
    tail: *const AtomicU64,
    data: *mut u8,
    cap: usize,
}

// SAFETY: see `Segment`; a ring has one writer and one reader process.
unsafe impl Send for Ring {}

impl Ring {
    pub fn head(&self) -> &AtomicU64 {
        // SAFETY: in the segment's control page, alive as long as `seg`.
        unsafe { &*self.head }
    }

    pub fn tail(&self) -> &AtomicU64 {
        // SAFETY: as above.
        unsafe { &*self.tail }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// `len <= cap` bytes of the ring starting at stream position `pos`.
    ///
    /// # Safety
    /// The caller is the only one touching those bytes: the writer for
    /// positions at or past `head`, the reader for those in `tail..head`.
    pub unsafe fn bytes(&self, pos: u64, len: usize) -> *mut u8 {
        debug_assert!(len <= self.cap);
        // SAFETY: the double mapping makes [start, start + cap) contiguous.
        unsafe { self.data.add((pos % self.cap as u64) as usize) }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the ring's own 2·cap area, unmapped once.
        unsafe { libc::munmap(self.data.cast(), 2 * self.cap) };
    }
}

/// A new non-blocking eventfd (a doorbell).
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: valid flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(last_os_error("eventfd"));
    }
    // SAFETY: fd was just created and is owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_wraps_contiguously_and_a_peer_sees_the_header() {
        let seg = Segment::create(3, 2).unwrap();
        let dup = seg.fd().try_clone().unwrap();
        let peer = Segment::open(dup, 3).unwrap();
        let w = seg.ring(1).unwrap().unwrap();
        let r = peer.ring(1).unwrap().unwrap();
        assert!(seg.ring(2).unwrap().is_none());
        // Write across the end of the ring; read it back in one piece.
        let pos = (w.cap() - 5) as u64;
        let msg = b"0123456789";
        // SAFETY: nothing else touches these rings.
        unsafe {
            std::ptr::copy_nonoverlapping(msg.as_ptr(), w.bytes(pos, msg.len()), msg.len());
            let got = std::slice::from_raw_parts(r.bytes(pos, msg.len()), msg.len());
            assert_eq!(got, msg);
            assert_eq!(*r.bytes(0, 1), b'5');
        }
        w.head().store(7, std::sync::atomic::Ordering::Release);
        assert_eq!(r.head().load(std::sync::atomic::Ordering::Acquire), 7);
        let err = Segment::open(seg.fd().try_clone().unwrap(), 4)
            .err()
            .unwrap();
        assert!(err.contains("belongs to rank 3"), "{err}");
    }
}

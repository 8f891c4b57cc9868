//! Passing descriptors over a Unix socket (`SCM_RIGHTS`), with a few bytes
//! of data alongside.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Most descriptors one message carries.
const MAX_FDS: usize = 4;

/// A message of one iovec and a control buffer of `space` bytes (kept in
/// `control`).
fn message(iov: &mut libc::iovec, control: &mut Vec<u64>, space: usize) -> libc::msghdr {
    control.resize(space.div_ceil(8), 0);
    // SAFETY: msghdr is plain data; zeroed is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    msg
}

/// Sends `data` (non-empty) and `fds` in one message.
pub(crate) fn send(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    assert!(!data.is_empty() && fds.len() <= MAX_FDS);
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = Vec::new();
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let msg = message(&mut iov, &mut control, space);
    // SAFETY: the control buffer holds CMSG_SPACE(fd_bytes) bytes, so the
    // first header and its data fit; the iovec points at live memory.
    let n = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize != data.len() => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write of a descriptor message",
        )),
        _ => Ok(()),
    }
}

/// Receives a message of exactly `data.len()` bytes carrying `nfds`
/// descriptors (blocking, within the socket's read timeout).
pub(crate) fn recv(sock: &UnixStream, data: &mut [u8], nfds: usize) -> io::Result<Vec<OwnedFd>> {
    assert!(nfds <= MAX_FDS);
    let fd_bytes = (MAX_FDS * std::mem::size_of::<RawFd>()) as u32;
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = Vec::new();
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut msg = message(&mut iov, &mut control, space);
    // SAFETY: buffers as described in msg, all live.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walks the control messages the kernel wrote into `control`;
    // each SCM_RIGHTS payload is an array of fds now owned by this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for k in 0..bytes / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(p.add(k).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if n as usize != data.len() || fds.len() != nfds || msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "expected {} bytes and {nfds} descriptors, got {n} bytes and {}",
                data.len(),
                fds.len()
            ),
        ));
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn descriptors_cross_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"hello").unwrap();
        send(&a, &[7, 8], &[file.as_raw_fd()]).unwrap();
        let mut data = [0u8; 2];
        let fds = recv(&b, &mut data, 1).unwrap();
        assert_eq!(data, [7, 8]);
        let mut got = std::fs::File::from(fds.into_iter().next().unwrap());
        got.rewind().unwrap();
        let mut text = String::new();
        got.read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello");
        send(&a, &[1], &[]).unwrap();
        let err = recv(&b, &mut [0u8; 1], 2).unwrap_err();
        assert!(err.to_string().contains("2 descriptors"), "{err}");
    }
}

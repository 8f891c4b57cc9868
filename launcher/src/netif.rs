//! Which network interface carries an address: what `GLOO_SOCKET_IFNAME`
//! and `NCCL_SOCKET_IFNAME` must name so a worker's sockets use the node's
//! address. Left to themselves, Gloo and NCCL look the host name up, which on
//! many machines (a Debian-style `127.0.1.1 HOSTNAME` line in /etc/hosts, or
//! a name that doesn't resolve at all) gives a loopback address, and the
//! other nodes' connections fail with `Gloo connectFullMesh failed ...
//! remote=[127.0.0.1]`.

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs};

/// The interface of this host that has address `host` (an IP address, or a
/// name resolved first); `None` when no interface has it.
pub fn interface_of(host: &str) -> Option<String> {
    let ip: IpAddr = match host.parse() {
        Ok(ip) => ip,
        Err(_) => (host, 0).to_socket_addrs().ok()?.next()?.ip(),
    };
    interfaces()
        .into_iter()
        .find(|(_, addr)| *addr == ip)
        .map(|(name, _)| name)
}

/// Every (interface, address) pair of this host (IPv4 and IPv6).
fn interfaces() -> Vec<(String, IpAddr)> {
    let mut found = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return found;
    }
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*entry };
        entry = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr of the family it names.
        let addr = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) };
        found.push((name.to_string_lossy().into_owned(), addr));
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_on_lo_and_an_address_of_no_interface_is_none() {
        assert_eq!(interface_of("127.0.0.1").as_deref(), Some("lo"));
        assert_eq!(interface_of("192.0.2.77"), None);
        assert_eq!(interface_of("no such host.invalid"), None);
    }
}

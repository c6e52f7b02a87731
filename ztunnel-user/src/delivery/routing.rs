//! The two routing entries that let the proxy deliver into a pod with the client's address.
//!
//! The proxy's delivery socket is bound (`IP_TRANSPARENT`) to the client's address, so the app's
//! replies are addressed to a host that is not in the pod. They carry the proxy's mark (the pod
//! netns sets `tcp_fwmark_accept`, so the app's socket inherits the SYN's mark), and a policy
//! rule sends marked packets to a table whose only route delivers everything locally, back to
//! the proxy's socket:
//!
//! ```text
//! ip rule add fwmark <delivery mark> lookup <table>
//! ip route add local 0.0.0.0/0 dev lo table <table>
//! ```
//!
//! The messages are built by hand: two fixed-size requests do not justify a netlink stack.

use crate::host::netns::Netns;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Routing table holding the local-delivery route (Istio's ztunnel uses the same number).
const DELIVERY_TABLE: u32 = 133;
/// Rule priority; below the default `main` rule (32766) so it wins.
const RULE_PRIORITY: u32 = 32764;

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTN_LOCAL: u8 = 2;
const RT_SCOPE_HOST: u8 = 254;
const RTPROT_STATIC: u8 = 4;
const RT_TABLE_UNSPEC: u8 = 0;

#[derive(Debug, thiserror::Error)]
#[error("{} delivery routing in {netns}: {source}", if *.installing { "setting up" } else { "removing" })]
pub(crate) struct RoutingError {
    installing: bool,
    netns: String,
    source: std::io::Error,
}

/// Installs the delivery routing in `netns` (entries already there are kept), for the address
/// families of `ips`, and the sysctls that mark the app's sockets like the SYNs they accept.
pub(crate) fn install(netns: &Netns, ips: &[IpAddr]) -> Result<(), RoutingError> {
    set(netns, ips, true)
}

/// Removes it again; entries already gone are fine.
pub(crate) fn remove(netns: &Netns, ips: &[IpAddr]) -> Result<(), RoutingError> {
    set(netns, ips, false)
}

fn set(netns: &Netns, ips: &[IpAddr], install: bool) -> Result<(), RoutingError> {
    let mark = ztunnel_common::ports::DELIVERY_MARK;
    let routing = || -> io::Result<()> {
        let mut socket = RouteSocket::open()?;
        for family in families(ips) {
            if install {
                socket.install_delivery_routing(family, mark)?;
            } else {
                socket.remove_delivery_routing(family, mark)?;
            }
        }
        if install {
            // Accepted sockets take the SYN's mark, so the app's replies to a transparent
            // delivery socket are marked and routed back to the proxy; the kernel's own
            // answers (a RST from a closed port) reflect the mark too, so a refused
            // delivery fails at once instead of the RST leaving the pod.
            std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1")?;
            std::fs::write("/proc/sys/net/ipv4/fwmark_reflect", "1")?;
        }
        Ok(())
    };
    let error = |source| RoutingError {
        installing: install,
        netns: netns.path().display().to_string(),
        source,
    };
    netns
        .run_in(routing)
        .map_err(|err| error(io::Error::other(err)))?
        .map_err(error)
}

/// The address families of `ips`, each once.
fn families(ips: &[IpAddr]) -> Vec<Family> {
    let mut families = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        families.push(Family::V4);
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        families.push(Family::V6);
    }
    families
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    fn af(self) -> u8 {
        match self {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }
}

/// A netlink route socket, bound to the netns of the thread that opened it.
struct RouteSocket {
    fd: OwnedFd,
    seq: u32,
}

impl RouteSocket {
    fn open() -> io::Result<RouteSocket> {
        // SAFETY: plain socket(2); the fd is owned right after.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(RouteSocket {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            seq: 0,
        })
    }

    /// Adds the rule and the route; entries that already exist are left as they are.
    fn install_delivery_routing(&mut self, family: Family, mark: u32) -> io::Result<()> {
        let create = NLM_F_CREATE | NLM_F_EXCL;
        ignore(
            self.request(RTM_NEWRULE, create, &rule_body(family, mark)),
            libc::EEXIST,
        )?;
        ignore(
            self.request(RTM_NEWROUTE, create, &route_body(family)),
            libc::EEXIST,
        )
    }

    /// Removes them; entries already gone are fine.
    fn remove_delivery_routing(&mut self, family: Family, mark: u32) -> io::Result<()> {
        ignore(
            self.request(RTM_DELRULE, 0, &rule_body(family, mark)),
            libc::ENOENT,
        )?;
        ignore(
            self.request(RTM_DELROUTE, 0, &route_body(family)),
            libc::ESRCH,
        )
    }

    fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        self.seq += 1;
        let mut msg = Vec::with_capacity(16 + body.len());
        msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: sending a buffer we own to the kernel (pid 0) on our socket.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        self.read_ack()
    }

    fn read_ack(&self) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: receiving into a buffer we own, of the length we pass.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let reply = &buf[..n as usize];
            if reply.len() < 20 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short netlink reply",
                ));
            }
            let kind = u16::from_ne_bytes([reply[4], reply[5]]);
            let seq = u32::from_ne_bytes([reply[8], reply[9], reply[10], reply[11]]);
            if kind != NLMSG_ERROR || seq != self.seq {
                continue;
            }
            let errno = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
            return if errno == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-errno))
            };
        }
    }
}

fn ignore(result: io::Result<()>, errno: i32) -> io::Result<()> {
    match result {
        Err(err) if err.raw_os_error() == Some(errno) => Ok(()),
        other => other,
    }
}

fn attr_u32(out: &mut Vec<u8>, kind: u16, value: u32) {
    out.extend_from_slice(&8u16.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&value.to_ne_bytes());
}

/// `struct fib_rule_hdr` + attributes: `fwmark <mark> lookup <table> priority <prio>`.
fn rule_body(family: Family, mark: u32) -> Vec<u8> {
    let mut body = vec![
        family.af(),
        0,
        0,
        0,
        RT_TABLE_UNSPEC,
        0,
        0,
        FR_ACT_TO_TBL,
        0,
        0,
        0,
        0,
    ];
    attr_u32(&mut body, FRA_FWMARK, mark);
    attr_u32(&mut body, FRA_TABLE, DELIVERY_TABLE);
    attr_u32(&mut body, FRA_PRIORITY, RULE_PRIORITY);
    body
}

/// `struct rtmsg` + attributes: `local default dev lo table <table>`.
fn route_body(family: Family) -> Vec<u8> {
    let mut body = vec![
        family.af(),
        0,
        0,
        0,
        RT_TABLE_UNSPEC,
        RTPROT_STATIC,
        RT_SCOPE_HOST,
        RTN_LOCAL,
        0,
        0,
        0,
        0,
    ];
    attr_u32(&mut body, RTA_TABLE, DELIVERY_TABLE);
    attr_u32(&mut body, RTA_OIF, ztunnel_common::ports::LOOPBACK_IFINDEX);
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_family_of_the_pod_once() {
        let ips: Vec<IpAddr> = vec![
            "10.244.1.2".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            "10.244.1.9".parse().unwrap(),
        ];
        assert_eq!(families(&ips), vec![Family::V4, Family::V6]);
        assert_eq!(families(&ips[..1]), vec![Family::V4]);
    }

    #[test]
    fn rule_message_layout() {
        let body = rule_body(Family::V4, 1337);
        assert_eq!(body.len(), 12 + 3 * 8);
        assert_eq!(body[0], libc::AF_INET as u8);
        assert_eq!(body[7], FR_ACT_TO_TBL);
        assert_eq!(&body[12..14], &8u16.to_ne_bytes());
        assert_eq!(&body[14..16], &FRA_FWMARK.to_ne_bytes());
        assert_eq!(&body[16..20], &1337u32.to_ne_bytes());
    }

    #[test]
    fn route_message_layout() {
        let body = route_body(Family::V6);
        assert_eq!(body[0], libc::AF_INET6 as u8);
        assert_eq!(body[1], 0, "default route: prefix length 0");
        assert_eq!((body[6], body[7]), (RT_SCOPE_HOST, RTN_LOCAL));
        assert_eq!(&body[22..24], &RTA_OIF.to_ne_bytes());
    }
}

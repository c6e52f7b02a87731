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
//! The messages are built by `netlink-packet-route` and sent on a plain netlink socket.

use crate::host::netns::Netns;
use libc::{RTM_DELROUTE, RTM_DELRULE, RTM_NEWROUTE, RTM_NEWRULE};
use netlink_packet_core::{
    DecodeError, Emitable, ErrorBuffer, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
    NLMSG_ERROR, NetlinkBuffer, NetlinkHeader,
};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use nix::sys::socket::{
    AddressFamily as SocketFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, socket,
};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

/// Routing table holding the local-delivery route (Istio's ztunnel uses the same number).
const DELIVERY_TABLE: u32 = 133;
/// Rule priority; below the default `main` rule (32766) so it wins.
const RULE_PRIORITY: u32 = 32764;

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
fn families(ips: &[IpAddr]) -> Vec<AddressFamily> {
    let mut families = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        families.push(AddressFamily::Inet);
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        families.push(AddressFamily::Inet6);
    }
    families
}

/// A netlink route socket, bound to the netns of the thread that opened it.
struct RouteSocket {
    fd: OwnedFd,
    seq: u32,
}

impl RouteSocket {
    fn open() -> io::Result<RouteSocket> {
        let fd = socket(
            SocketFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        Ok(RouteSocket { fd, seq: 0 })
    }

    /// Adds the rule and the route; entries that already exist are left as they are.
    fn install_delivery_routing(&mut self, family: AddressFamily, mark: u32) -> io::Result<()> {
        let create = NLM_F_CREATE | NLM_F_EXCL;
        ignore(
            self.request(RTM_NEWRULE, create, &rule(family, mark)),
            libc::EEXIST,
        )?;
        ignore(
            self.request(RTM_NEWROUTE, create, &route(family)),
            libc::EEXIST,
        )
    }

    /// Removes them; entries already gone are fine.
    fn remove_delivery_routing(&mut self, family: AddressFamily, mark: u32) -> io::Result<()> {
        ignore(
            self.request(RTM_DELRULE, 0, &rule(family, mark)),
            libc::ENOENT,
        )?;
        ignore(self.request(RTM_DELROUTE, 0, &route(family)), libc::ESRCH)
    }

    /// Sends a `kind` request carrying `body` and waits for the kernel's answer to it. The
    /// header is put together here rather than through netlink-packet-route's message enum,
    /// whose emitter would link in the code of every message the route family has.
    fn request(&mut self, kind: u16, flags: u16, body: &impl Emitable) -> io::Result<()> {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        let header_length = header.buffer_len();
        let length = header_length + body.buffer_len();
        header.length = length as u32;
        header.message_type = kind;
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.seq;
        let mut bytes = vec![0; length];
        header.emit(&mut bytes[..header_length]);
        body.emit(&mut bytes[header_length..]);
        send(self.fd.as_raw_fd(), &bytes, MsgFlags::empty())?;
        self.read_ack()
    }

    /// The acknowledgement of the last request: its errno, if it failed. Read as a bare
    /// netlink error message: parsing it as a route message would link in the parsers of
    /// every message the route family has.
    fn read_ack(&self) -> io::Result<()> {
        let invalid = |err: DecodeError| io::Error::new(io::ErrorKind::InvalidData, err);
        let mut buf = [0u8; 4096];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            let reply = NetlinkBuffer::new_checked(&buf[..n]).map_err(invalid)?;
            if reply.message_type() != NLMSG_ERROR || reply.sequence_number() != self.seq {
                continue;
            }
            let answer = ErrorBuffer::new_checked(reply.payload()).map_err(invalid)?;
            return match answer.code() {
                None => Ok(()),
                Some(errno) => Err(io::Error::from_raw_os_error(-errno.get())),
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

/// `fwmark <mark> lookup <table> priority <prio>`.
fn rule(family: AddressFamily, mark: u32) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = family;
    rule.header.action = RuleAction::ToTable;
    rule.attributes = vec![
        RuleAttribute::FwMark(mark),
        RuleAttribute::Table(DELIVERY_TABLE),
        RuleAttribute::Priority(RULE_PRIORITY),
    ];
    rule
}

/// `local default dev lo table <table>`.
fn route(family: AddressFamily) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = family;
    route.header.table = RouteHeader::RT_TABLE_UNSPEC;
    route.header.protocol = RouteProtocol::Static;
    route.header.scope = RouteScope::Host;
    route.header.kind = RouteType::Local;
    route.attributes = vec![
        RouteAttribute::Table(DELIVERY_TABLE),
        RouteAttribute::Oif(ztunnel_common::ports::LOOPBACK_IFINDEX),
    ];
    route
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
        assert_eq!(families(&ips), [AddressFamily::Inet, AddressFamily::Inet6]);
        assert_eq!(families(&ips[..1]), [AddressFamily::Inet]);
    }

    /// The bytes of a message, as the kernel reads them.
    fn bytes(message: &impl Emitable) -> Vec<u8> {
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        bytes
    }

    #[test]
    fn the_rule_is_fwmark_lookup_table() {
        let rule = bytes(&rule(AddressFamily::Inet, 0x111));
        // struct fib_rule_hdr, then three 8-byte attributes.
        assert_eq!(rule.len(), 12 + 3 * 8);
        assert_eq!(rule[0], libc::AF_INET as u8);
        // The kernel's numbers, from linux/fib_rules.h (libc does not have them).
        const FR_ACT_TO_TBL: u8 = 1;
        const FRA_PRIORITY: u16 = 6;
        const FRA_FWMARK: u16 = 10;
        const FRA_TABLE: u16 = 15;
        assert_eq!(rule[7], FR_ACT_TO_TBL);
        let attribute = |at: usize| {
            let kind = u16::from_ne_bytes([rule[at + 2], rule[at + 3]]);
            let value = u32::from_ne_bytes(rule[at + 4..at + 8].try_into().unwrap());
            (kind, value)
        };
        assert_eq!(attribute(12), (FRA_FWMARK, 0x111));
        assert_eq!(attribute(20), (FRA_TABLE, DELIVERY_TABLE));
        assert_eq!(attribute(28), (FRA_PRIORITY, RULE_PRIORITY));
    }

    #[test]
    fn the_route_is_local_default_via_lo() {
        let route = bytes(&route(AddressFamily::Inet6));
        // struct rtmsg: family, dst_len (0: the default route), src_len, tos, table,
        // protocol, scope, type.
        assert_eq!(route[0], libc::AF_INET6 as u8);
        assert_eq!(route[1], 0);
        assert_eq!(route[5], libc::RTPROT_STATIC);
        assert_eq!(route[6], libc::RT_SCOPE_HOST);
        assert_eq!(route[7], libc::RTN_LOCAL);
        let oif = u16::from_ne_bytes([route[22], route[23]]);
        assert_eq!(oif, libc::RTA_OIF);
    }
}

//! Delivery to an app that takes tunnel information itself (its workload's
//! `applicationTunnel`), as Istio's ztunnel does it: to the tunnel's port if it names one, and
//! for `PROXY`, a PROXY protocol v2 header first (haproxy's `proxy-protocol.txt`, section 2.2)
//! with the client's and the original destination's addresses and the client's SPIFFE identity
//! in a TLV of Istio's type 0xD0.

use crate::identity::Identity;
use crate::mesh::config::{ApplicationTunnel, MeshConfig, TunnelHeader};
use std::net::{IpAddr, SocketAddr};

/// What a delivery to an app with an application tunnel needs.
pub(crate) struct AppTunnel<'a> {
    asked: ApplicationTunnel,
    client: SocketAddr,
    identity: &'a Identity,
}

impl<'a> AppTunnel<'a> {
    /// The tunnel of the workload at `destination` for a connection of `identity` from
    /// `client`, if its workload asks for one.
    pub(crate) fn of(
        config: &MeshConfig,
        destination: SocketAddr,
        client: SocketAddr,
        identity: &'a Identity,
    ) -> Option<AppTunnel<'a>> {
        let asked = config
            .workload_by_ip(destination.ip())?
            .application_tunnel?;
        Some(AppTunnel {
            asked,
            client,
            identity,
        })
    }

    /// Where the app takes a connection made to `destination`.
    pub(super) fn port(&self, destination: SocketAddr) -> SocketAddr {
        SocketAddr::new(
            destination.ip(),
            self.asked.port.unwrap_or(destination.port()),
        )
    }

    /// What the app reads first, if anything.
    pub(super) fn preamble(&self, destination: SocketAddr) -> Option<Vec<u8>> {
        (self.asked.protocol == TunnelHeader::Proxy)
            .then(|| header(self.client, destination, self.identity))
    }
}

/// Every v2 header starts so.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY (the addresses are a proxied connection's).
const VERSION_2_PROXY: u8 = 0x21;
/// TCP over IPv4, TCP over IPv6.
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;
/// Istio's TLV type for the client's identity.
const IDENTITY_TLV: u8 = 0xD0;
const MAX_IDENTITY: usize = 2048;

/// The header for a connection from `client` to `destination` made by `identity`. Mixed
/// families are both written as IPv6 (an IPv4 address mapped).
fn header(client: SocketAddr, destination: SocketAddr, identity: &Identity) -> Vec<u8> {
    let identity = identity.to_string();
    // A SPIFFE id is at most 2048 bytes; this bounds the header whatever the identity.
    let identity = &identity.as_bytes()[..identity.len().min(MAX_IDENTITY)];
    let (family, addresses) = match (client.ip(), destination.ip()) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            (TCP4, [from.octets().as_slice(), &to.octets()].concat())
        }
        (from, to) => (TCP6, [v6(from).as_slice(), &v6(to)].concat()),
    };
    let length = addresses.len() + 4 + 3 + identity.len();
    let mut header = Vec::with_capacity(16 + length);
    header.extend_from_slice(&SIGNATURE);
    header.push(VERSION_2_PROXY);
    header.push(family);
    header.extend_from_slice(&(length as u16).to_be_bytes());
    header.extend_from_slice(&addresses);
    header.extend_from_slice(&client.port().to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    header.push(IDENTITY_TLV);
    header.extend_from_slice(&(identity.len() as u16).to_be_bytes());
    header.extend_from_slice(identity);
    header
}

fn v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        "spiffe://cluster.local/ns/demo/sa/sa-a".parse().unwrap()
    }

    #[test]
    fn an_ipv4_connection_with_its_identity() {
        let header = header(
            "10.244.1.2:40000".parse().unwrap(),
            "10.244.2.2:8080".parse().unwrap(),
            &identity(),
        );
        let id = b"spiffe://cluster.local/ns/demo/sa/sa-a";
        let mut expected = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
        expected.extend_from_slice(&(12 + 3 + id.len() as u16).to_be_bytes());
        expected.extend_from_slice(&[10, 244, 1, 2, 10, 244, 2, 2]);
        expected.extend_from_slice(&40000u16.to_be_bytes());
        expected.extend_from_slice(&8080u16.to_be_bytes());
        expected.push(0xD0);
        expected.extend_from_slice(&(id.len() as u16).to_be_bytes());
        expected.extend_from_slice(id);
        assert_eq!(header, expected);
    }

    #[test]
    fn ipv6_and_mixed_families_are_written_as_ipv6() {
        let mixed = header(
            "10.244.1.2:40000".parse().unwrap(),
            "[fd00::2]:8080".parse().unwrap(),
            &identity(),
        );
        assert_eq!(mixed[13], TCP6);
        let length = u16::from_be_bytes([mixed[14], mixed[15]]);
        assert_eq!(usize::from(length), mixed.len() - 16);
        assert_eq!(&mixed[16..32], &v6("10.244.1.2".parse().unwrap()));
        assert_eq!(&mixed[32..48], &v6("fd00::2".parse().unwrap()));
        assert_eq!(&mixed[48..52], &[0x9c, 0x40, 0x1f, 0x90]);
    }
}

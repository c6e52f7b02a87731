//! A reader of the PROXY protocol v2 header (haproxy's `proxy-protocol.txt`, section 2.2) for
//! the lab's server: an app behind an application tunnel reads one before the client's bytes.
//! Written from the specification, apart from the daemon's writer, so that each checks the
//! other.

use serde::{Deserialize, Serialize};
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Istio's TLV type for the client's SPIFFE identity.
const IDENTITY_TLV: u8 = 0xD0;

/// What a header said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyHeader {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// The TLV 0xD0, if present.
    pub identity: Option<String>,
}

/// Reads one header from `stream`, exactly its bytes.
pub fn read_header(stream: &mut impl Read) -> io::Result<ProxyHeader> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut fixed = [0u8; 16];
    stream.read_exact(&mut fixed)?;
    if &fixed[..12] != SIGNATURE {
        return Err(invalid("no PROXY v2 signature"));
    }
    if fixed[12] != 0x21 {
        return Err(invalid("not version 2 with command PROXY"));
    }
    let mut rest = vec![0u8; usize::from(u16::from_be_bytes([fixed[14], fixed[15]]))];
    stream.read_exact(&mut rest)?;
    let (source, destination, tlvs) = match fixed[13] {
        0x11 if rest.len() >= 12 => {
            let ip = |at: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    rest[at],
                    rest[at + 1],
                    rest[at + 2],
                    rest[at + 3],
                ))
            };
            let port = |at: usize| u16::from_be_bytes([rest[at], rest[at + 1]]);
            (
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
                &rest[12..],
            )
        }
        0x21 if rest.len() >= 36 => {
            let ip = |at: usize| {
                let octets: [u8; 16] = rest[at..at + 16].try_into().expect("16 bytes");
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |at: usize| u16::from_be_bytes([rest[at], rest[at + 1]]);
            (
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
                &rest[36..],
            )
        }
        _ => return Err(invalid("not TCP over IPv4 or IPv6, or too short")),
    };
    Ok(ProxyHeader {
        source,
        destination,
        identity: identity_of(tlvs).map_err(|()| invalid("a TLV runs past the header"))?,
    })
}

/// The identity TLV among `tlvs` (type, 2-byte length, value; repeated).
fn identity_of(mut tlvs: &[u8]) -> Result<Option<String>, ()> {
    while !tlvs.is_empty() {
        let [kind, high, low, ref rest @ ..] = *tlvs else {
            return Err(());
        };
        let length = usize::from(u16::from_be_bytes([high, low]));
        let value = rest.get(..length).ok_or(())?;
        if kind == IDENTITY_TLV {
            return Ok(Some(String::from_utf8_lossy(value).into_owned()));
        }
        tlvs = &rest[length..];
    }
    Ok(None)
}

//! One address type for both families, laid out as the kernel lays out `user_ip6`.

/// An IPv6 address, or an IPv4 address in its v4-mapped form (`::ffff:a.b.c.d`), as four
/// 32-bit words in network byte order, exactly as `bpf_sock_addr.user_ip6` holds it.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, PartialOrd, Ord)]
pub struct Addr {
    pub words: [u32; 4],
}

/// The third word of a v4-mapped address (`0000:ffff` in network byte order).
const V4_MAPPED_MARKER: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Addr {
    pub const UNSPECIFIED: Addr = Addr { words: [0; 4] };

    /// From an IPv4 address as the kernel holds it (`user_ip4`, network byte order).
    pub const fn from_ip4_be(ip4: u32) -> Addr {
        Addr {
            words: [0, 0, V4_MAPPED_MARKER, ip4],
        }
    }

    pub const fn from_ip6_be(words: [u32; 4]) -> Addr {
        Addr { words }
    }

    pub fn is_v4_mapped(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == V4_MAPPED_MARKER
    }

    /// The IPv4 address in network byte order, if this is a v4-mapped address.
    pub fn ip4_be(&self) -> Option<u32> {
        if self.is_v4_mapped() {
            Some(self.words[3])
        } else {
            None
        }
    }

    /// `::` or `0.0.0.0` (a connect to either reaches the local host).
    pub fn is_unspecified(&self) -> bool {
        self.words[3] == 0 && (self.words == [0; 4] || self.is_v4_mapped())
    }

    /// 127.0.0.0/8 or ::1.
    pub fn is_loopback(&self) -> bool {
        match self.ip4_be() {
            Some(ip4) => ip4.to_ne_bytes()[0] == 127,
            None => self.words == [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])],
        }
    }

    /// The address as 16 bytes in network order (the key of an LPM trie).
    pub fn octets(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let w = self.words[i].to_ne_bytes();
            out[i * 4] = w[0];
            out[i * 4 + 1] = w[1];
            out[i * 4 + 2] = w[2];
            out[i * 4 + 3] = w[3];
            i += 1;
        }
        out
    }
}

#[cfg(feature = "user")]
mod std_conversions {
    extern crate std;
    use super::Addr;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    impl From<IpAddr> for Addr {
        fn from(ip: IpAddr) -> Addr {
            let v6 = match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            Addr {
                words: [word(0), word(4), word(8), word(12)],
            }
        }
    }

    impl From<Addr> for IpAddr {
        fn from(addr: Addr) -> IpAddr {
            let v6 = Ipv6Addr::from(addr.octets());
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
    }

    impl From<Ipv4Addr> for Addr {
        fn from(ip: Ipv4Addr) -> Addr {
            IpAddr::V4(ip).into()
        }
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn ipv4_round_trips_through_the_mapped_form() {
        let ip: IpAddr = "10.244.1.7".parse().unwrap();
        let addr = Addr::from(ip);
        assert!(addr.is_v4_mapped());
        // user_ip4 holds the address in network byte order: the bytes in memory are 10.244.1.7.
        assert_eq!(addr.ip4_be().unwrap().to_ne_bytes(), [10, 244, 1, 7]);
        assert_eq!(IpAddr::from(addr), ip);
        assert_eq!(Addr::from_ip4_be(u32::from_ne_bytes([10, 244, 1, 7])), addr);
    }

    #[test]
    fn ipv6_round_trips() {
        let ip: IpAddr = "fd00:10:244::7".parse().unwrap();
        let addr = Addr::from(ip);
        assert!(!addr.is_v4_mapped());
        assert_eq!(IpAddr::from(addr), ip);
        assert_eq!(
            addr.octets(),
            match ip {
                IpAddr::V6(v6) => v6.octets(),
                IpAddr::V4(_) => unreachable!(),
            }
        );
    }

    #[test]
    fn loopback_in_both_families() {
        assert!(Addr::from("127.0.0.1".parse::<IpAddr>().unwrap()).is_loopback());
        assert!(Addr::from("127.9.9.9".parse::<IpAddr>().unwrap()).is_loopback());
        assert!(Addr::from("::1".parse::<IpAddr>().unwrap()).is_loopback());
        assert!(!Addr::from("10.0.0.1".parse::<IpAddr>().unwrap()).is_loopback());
        assert!(!Addr::from("::2".parse::<IpAddr>().unwrap()).is_loopback());
    }
}

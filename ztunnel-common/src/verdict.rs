//! The capture decisions, as pure functions of what the programs read from the kernel.

use crate::maps::PodInfo;
use crate::{Addr, Counter, ports};

/// What `cgroup/connect4|6` knows about a `connect()` from a pod.
#[derive(Clone, Copy, Debug)]
pub struct Connect {
    pub is_tcp: bool,
    /// The socket carries the proxy's `SO_MARK`.
    pub marked: bool,
    pub dst: Addr,
    /// Host byte order.
    pub dst_port: u16,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outbound {
    /// Rewrite the destination to `<to>:15001` and remember the original one.
    Capture { to: Addr },
    /// Leave the connection alone; the counter says why.
    Bypass(Counter),
    /// Refuse the `connect()` (EPERM); the counter says why.
    Refuse(Counter),
}

/// Decides whether a pod's `connect()` goes to the proxy.
///
/// `pod` is the calling netns's entry in `PODS`. The programs only run in the cgroups of
/// captured pods, and the entry is there before the first link and gone after the last, so a
/// missing one is state the daemon could not restore: fail closed. The map lookups for exclusions are closures so that they only run when the
/// cheap checks did not already decide.
pub fn outbound(
    connect: &Connect,
    pod: Option<&PodInfo>,
    port_excluded: impl FnOnce(u16) -> bool,
    cidr_excluded: impl FnOnce(&Addr) -> bool,
) -> Outbound {
    if !connect.is_tcp {
        return Outbound::Bypass(Counter::OutboundBypassNotTcp);
    }
    let Some(pod) = pod else {
        return Outbound::Refuse(Counter::OutboundRefusedNoPodEntry);
    };
    let dst = &connect.dst;
    if connect.marked {
        return Outbound::Bypass(Counter::OutboundBypassMarked);
    }
    if dst.is_loopback() || dst.is_unspecified() {
        return Outbound::Bypass(Counter::OutboundBypassLoopback);
    }
    if pod.owns(dst) {
        return Outbound::Bypass(Counter::OutboundBypassOwnIp);
    }
    if port_excluded(connect.dst_port) {
        return Outbound::Bypass(Counter::OutboundBypassExcludedPort);
    }
    if cidr_excluded(dst) {
        return Outbound::Bypass(Counter::OutboundBypassExcludedCidr);
    }
    // The proxy listens on the pod's address of the destination's family.
    match (dst.is_v4_mapped(), pod.has_ip4(), pod.has_ip6()) {
        (true, true, _) => Outbound::Capture { to: pod.ip4 },
        (false, _, true) => Outbound::Capture { to: pod.ip6 },
        _ => Outbound::Bypass(Counter::OutboundBypassNoPodAddress),
    }
}

/// What `sk_lookup` knows about a connection arriving in a pod netns.
#[derive(Clone, Copy, Debug)]
pub struct Lookup {
    pub is_tcp: bool,
    pub ingress_ifindex: u32,
    pub remote: Addr,
    pub local: Addr,
    /// Host byte order.
    pub local_port: u16,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Inbound {
    /// Assign the connection to the pod's 15006 listener (if one is registered).
    Steer,
    /// Let the normal socket lookup run; the counter says why.
    Pass(Counter),
}

/// Decides whether a connection arriving in a pod netns is steered to the proxy.
///
/// Two kinds of connection must never be steered, or they would loop back into the proxy:
/// the pod talking to itself (arriving on loopback, or between loopback or the pod's own
/// addresses: `ingress_ifindex` is not `lo` for a pod's own address, and kernels before 5.17
/// have no `ingress_ifindex`, which is then 0, so the addresses are compared too), and the proxy's
/// deliveries to the app, which come from a client's address and which the proxy announces
/// beforehand (`is_delivery`, consulted only when needed since it consumes the announcement).
pub fn inbound(
    lookup: &Lookup,
    port_excluded: impl FnOnce(u16) -> bool,
    is_delivery: impl FnOnce() -> bool,
) -> Inbound {
    if !lookup.is_tcp {
        return Inbound::Pass(Counter::InboundBypassNotTcp);
    }
    if lookup.ingress_ifindex == ports::LOOPBACK_IFINDEX
        || lookup.remote == lookup.local
        || lookup.remote.is_loopback()
        || lookup.local.is_loopback()
    {
        return Inbound::Pass(Counter::InboundBypassLocal);
    }
    // HBONE goes straight to the proxy's own 15008 listener; every other port is the app's.
    if lookup.local_port == ports::HBONE {
        return Inbound::Pass(Counter::InboundBypassHbone);
    }
    if port_excluded(lookup.local_port) {
        return Inbound::Pass(Counter::InboundBypassExcludedPort);
    }
    if is_delivery() {
        return Inbound::Pass(Counter::InboundBypassDelivery);
    }
    Inbound::Steer
}

/// Whether a pod's process may bind `port`: not the proxy's ports of the pod's netns, or it
/// could take the listener the proxy opens there (after a restart, say) and with it the pod's
/// captured or steered connections.
pub fn bind_allowed(port: u16) -> bool {
    !ports::is_pod_port(port)
}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;
    use super::*;
    use crate::maps::{POD_HAS_IP4, POD_HAS_IP6};
    use std::net::IpAddr;

    fn addr(s: &str) -> Addr {
        Addr::from(s.parse::<IpAddr>().unwrap())
    }

    fn pod_v4() -> PodInfo {
        PodInfo {
            ip4: addr("10.244.1.2"),
            flags: POD_HAS_IP4,
            ..Default::default()
        }
    }

    fn tcp_to(dst: &str, port: u16) -> Connect {
        Connect {
            is_tcp: true,
            marked: false,
            dst: addr(dst),
            dst_port: port,
        }
    }

    fn decide(connect: Connect, pod: Option<&PodInfo>) -> Outbound {
        outbound(&connect, pod, |p| p == 22, |a| *a == addr("10.96.0.10"))
    }

    #[test]
    fn captures_tcp_to_another_pod_on_the_pod_address() {
        let pod = pod_v4();
        assert_eq!(
            decide(tcp_to("10.244.2.2", 8080), Some(&pod)),
            Outbound::Capture { to: pod.ip4 }
        );
    }

    #[test]
    fn each_bypass_reason() {
        let pod = pod_v4();
        let cases = [
            (
                Connect {
                    is_tcp: false,
                    ..tcp_to("10.244.2.2", 53)
                },
                None,
                Counter::OutboundBypassNotTcp,
            ),
            (
                Connect {
                    marked: true,
                    ..tcp_to("10.244.2.2", 80)
                },
                Some(&pod),
                Counter::OutboundBypassMarked,
            ),
            (
                tcp_to("127.0.0.1", 80),
                Some(&pod),
                Counter::OutboundBypassLoopback,
            ),
            (
                tcp_to("::1", 80),
                Some(&pod),
                Counter::OutboundBypassLoopback,
            ),
            (
                tcp_to("0.0.0.0", 80),
                Some(&pod),
                Counter::OutboundBypassLoopback,
            ),
            (
                tcp_to("10.244.1.2", 80),
                Some(&pod),
                Counter::OutboundBypassOwnIp,
            ),
            (
                tcp_to("10.244.2.2", 22),
                Some(&pod),
                Counter::OutboundBypassExcludedPort,
            ),
            (
                tcp_to("10.96.0.10", 443),
                Some(&pod),
                Counter::OutboundBypassExcludedCidr,
            ),
            (
                tcp_to("fd00::5", 80),
                Some(&pod),
                Counter::OutboundBypassNoPodAddress,
            ),
        ];
        for (connect, pod, expected) in cases {
            assert_eq!(
                decide(connect, pod),
                Outbound::Bypass(expected),
                "{connect:?}"
            );
        }
    }

    #[test]
    fn tcp_from_a_captured_cgroup_without_its_pod_entry_is_refused() {
        assert_eq!(
            decide(tcp_to("10.244.2.2", 80), None),
            Outbound::Refuse(Counter::OutboundRefusedNoPodEntry)
        );
    }

    #[test]
    fn ipv6_destinations_land_on_the_pod_ipv6_address() {
        let pod = PodInfo {
            ip4: addr("10.244.1.2"),
            ip6: addr("fd00:244:1::2"),
            flags: POD_HAS_IP4 | POD_HAS_IP6,
            pod_index: 0,
        };
        assert_eq!(
            decide(tcp_to("fd00:244:2::2", 80), Some(&pod)),
            Outbound::Capture { to: pod.ip6 }
        );
        assert_eq!(
            decide(tcp_to("fd00:244:1::2", 80), Some(&pod)),
            Outbound::Bypass(Counter::OutboundBypassOwnIp)
        );
        // A dual-stack socket connecting to a v4-mapped address goes to the IPv4 listener.
        assert_eq!(
            decide(tcp_to("::ffff:10.244.2.2", 80), Some(&pod)),
            Outbound::Capture { to: pod.ip4 }
        );
    }

    #[test]
    fn exclusion_lookups_run_only_when_needed() {
        let pod = pod_v4();
        let verdict = outbound(
            &tcp_to("127.0.0.1", 80),
            Some(&pod),
            |_| panic!("port looked up"),
            |_| panic!("cidr looked up"),
        );
        assert_eq!(verdict, Outbound::Bypass(Counter::OutboundBypassLoopback));
    }

    #[test]
    fn inbound_decisions() {
        let pod = addr("10.244.2.2");
        let lookup = |is_tcp, ingress_ifindex, remote: &str, local_port| Lookup {
            is_tcp,
            ingress_ifindex,
            remote: addr(remote),
            local: pod,
            local_port,
        };
        let decide = |l: Lookup, delivery: bool| inbound(&l, |p| p == 9090, || delivery);
        assert_eq!(
            decide(lookup(true, 2, "10.244.1.2", 8080), false),
            Inbound::Steer
        );
        let passes = [
            (
                lookup(false, 2, "10.244.1.2", 8080),
                false,
                Counter::InboundBypassNotTcp,
            ),
            (
                lookup(true, 1, "10.244.1.2", 8080),
                false,
                Counter::InboundBypassLocal,
            ),
            (
                lookup(true, 2, "10.244.2.2", 8080),
                false,
                Counter::InboundBypassLocal,
            ),
            (
                lookup(true, 2, "127.0.0.1", 8080),
                false,
                Counter::InboundBypassLocal,
            ),
            (
                lookup(true, 2, "10.244.1.2", 15008),
                false,
                Counter::InboundBypassHbone,
            ),
            (
                lookup(true, 2, "10.244.1.2", 9090),
                false,
                Counter::InboundBypassExcludedPort,
            ),
            (
                lookup(true, 2, "10.244.1.2", 8080),
                true,
                Counter::InboundBypassDelivery,
            ),
        ];
        for (l, delivery, expected) in passes {
            assert_eq!(decide(l, delivery), Inbound::Pass(expected), "{l:?}");
        }
        // Without ingress_ifindex (before Linux 5.17: 0), the pod's own traffic over lo is
        // still known by its addresses: to its own address, from or to loopback.
        let no_ifindex = |remote: &str, local: &str| Lookup {
            is_tcp: true,
            ingress_ifindex: 0,
            remote: addr(remote),
            local: addr(local),
            local_port: 8080,
        };
        for (remote, local) in [
            ("10.244.2.2", "10.244.2.2"),
            ("127.0.0.1", "127.0.0.1"),
            ("10.244.2.2", "127.0.0.1"),
            ("::1", "::1"),
        ] {
            let decided = decide(no_ifindex(remote, local), false);
            assert_eq!(
                decided,
                Inbound::Pass(Counter::InboundBypassLocal),
                "{remote} -> {local}"
            );
        }
        assert_eq!(
            decide(no_ifindex("10.244.1.2", "10.244.2.2"), false),
            Inbound::Steer
        );
    }

    #[test]
    fn only_hbone_and_the_proxys_own_traffic_skip_capture() {
        let pod = pod_v4();
        // An app's port that happens to be one of the proxy's elsewhere is the app's here.
        for port in [15000, 15001, 15008, 15020, 15021, 15053] {
            let verdict = outbound(
                &tcp_to("10.244.2.2", port),
                Some(&pod),
                |_| false,
                |_| false,
            );
            assert!(
                matches!(verdict, Outbound::Capture { .. }),
                "{port}: {verdict:?}"
            );
        }
        let lookup = |local_port| Lookup {
            is_tcp: true,
            ingress_ifindex: 2,
            remote: addr("10.244.1.2"),
            local: addr("10.244.2.2"),
            local_port,
        };
        for port in [15000, 15001, 15006, 15020, 15021] {
            assert_eq!(
                inbound(&lookup(port), |_| false, || false),
                Inbound::Steer,
                "{port}"
            );
        }
        assert_eq!(
            inbound(&lookup(15008), |_| false, || false),
            Inbound::Pass(Counter::InboundBypassHbone)
        );
        for port in [15001, 15006, 15008] {
            assert!(!bind_allowed(port), "{port}");
        }
        for port in [80, 8080, 15000, 15020, 15021, 15053] {
            assert!(bind_allowed(port), "{port}");
        }
    }

    #[test]
    fn a_delivery_announcement_is_only_consumed_for_app_ports() {
        let l = Lookup {
            is_tcp: true,
            ingress_ifindex: 2,
            remote: addr("10.244.1.2"),
            local: addr("10.244.2.2"),
            local_port: 15008,
        };
        assert_eq!(
            inbound(&l, |_| false, || panic!("consumed")),
            Inbound::Pass(Counter::InboundBypassHbone)
        );
    }
}

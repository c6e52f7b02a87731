//! The iptables baseline (`ztunnel run --capture iptables`): the same proxy behind NAT
//! REDIRECT rules in each pod's netns instead of eBPF. The benchmark compares the two, so the
//! baseline must carry the same traffic the same way: cross node over HBONE, same node
//! straight into the other pod, plaintext inbound with the client's address kept.

mod support;

use std::net::SocketAddr;
use support::*;
use ztunnel_lab::{DaemonOptions, send_from};
use ztunnel_user::api::Direction;

#[test]
fn iptables_capture_carries_every_path_without_ebpf() {
    let s = LabSession::start_with(&DaemonOptions {
        iptables_capture: true,
        ..DaemonOptions::default()
    });
    let b1 = serve("b1", APP_PORT);
    let a2 = serve("a2", APP_PORT);
    for (client, server, pod) in [("a1", &b1, "b1"), ("a1", &a2, "a2"), ("u1", &b1, "b1")] {
        let report = send(client, s.addr(pod, APP_PORT), 8 * MIB);
        let seen = next_report(server);
        assert_eq!(
            seen.peer.ip(),
            s.ip(client),
            "{client} -> {pod}: the client's address"
        );
        assert_eq!(seen.sha256, report.sent_sha256, "{client} -> {pod}");
    }
    // a1's connections were captured by the rules and carried by the proxy: to b1 over HBONE,
    // to a2 on the same node.
    let outbound = closed_connections(&s.lab, "node1", Direction::Outbound);
    let destinations: Vec<_> = outbound.iter().map(|c| c.original_destination).collect();
    assert_eq!(
        destinations,
        [
            SocketAddr::from(s.addr("b1", APP_PORT)),
            SocketAddr::from(s.addr("a2", APP_PORT))
        ]
    );
    assert!(outbound.iter().all(|c| c.error.is_none()), "{outbound:?}");
    let at_b1 = closed_connections(&s.lab, "node2", Direction::Inbound);
    let from_a1 = at_b1.iter().find(|c| c.source.ip() == s.ip("a1")).unwrap();
    assert_eq!(
        from_a1.source_identity,
        "spiffe://cluster.local/ns/demo/sa/sa-a"
    );
    let from_u1 = at_b1.iter().find(|c| c.source.ip() == s.ip("u1")).unwrap();
    assert_eq!(
        from_u1.source_identity, "unknown",
        "plaintext, redirected to 15006"
    );

    // No eBPF program saw any of it, and the pods carry no links.
    for node in NODES {
        let kernel = counters(&s.lab, node);
        assert_eq!(
            kernel["outbound_captured"] + kernel["inbound_steered"],
            0,
            "{node}"
        );
        assert!(status(&s.lab, node).pods.iter().all(|p| p.links.is_empty()));
    }
    // Each of our rules once: the jumps into our chains, and the redirects.
    let assert_rules_once = || {
        let rules = run_in("a1", &["iptables", "-t", "nat", "-S"]);
        for rule in [
            "-A OUTPUT -p tcp -j ZTUNNEL_OUTPUT",
            "-A PREROUTING -p tcp -j ZTUNNEL_PREROUTING",
            "-j REDIRECT --to-ports 15001",
            "-j REDIRECT --to-ports 15006",
        ] {
            assert_eq!(rules.matches(rule).count(), 1, "{rule} in {rules}");
        }
    };
    assert_rules_once();

    // Across a restart of node1's daemon the rules stay: a1's connections are refused while
    // it is down (never sent around the proxy), and carried again once it has taken a1 over,
    // by the same rules, not a second set.
    ztunnel_lab::stop_daemon("node1").unwrap();
    let refused = send_from("a1", s.addr("b1", APP_PORT), KIB, None, QUICK)
        .expect_err("a1's connection while node1's daemon is down");
    assert!(
        refused.to_string().contains("Connection refused"),
        "{refused}"
    );
    ztunnel_lab::start_daemon("node1").unwrap();
    let report = send("a1", s.addr("b1", APP_PORT), KIB);
    assert_eq!(next_report(&b1).peer, report.local);
    let outbound = closed_connections(&s.lab, "node1", Direction::Outbound);
    assert_eq!(
        outbound.last().map(|c| c.source),
        Some(report.local),
        "carried by the restarted proxy"
    );
    assert_rules_once();

    // CNI DEL takes the rules away again.
    ztunnel_lab::cni_del("a1").unwrap();
    let left = run_in("a1", &["iptables", "-t", "nat", "-S"]);
    assert!(!left.contains("ZTUNNEL"), "{left}");
}

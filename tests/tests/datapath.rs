//! End to end on the lab: real pods (netns + cgroup) wired by the real CNI plugins, a real
//! daemon per node, real eBPF programs in the kernel. Run serially (`--test-threads=1`): every
//! test brings up its own lab and tears it down.

mod support;

use std::time::Duration;
use support::*;
use ztunnel_common::maps::{FlowKey, OrigDst, PodInfo, names};
use ztunnel_common::ports::DEFAULT_MARK;
use ztunnel_lab::send_from;
use ztunnel_user::api::Direction;

/// Checks a relayed transfer from `client` to `server_pod` on every side: what the server saw,
/// the client node's outbound record and the server node's inbound record.
fn assert_captured_transfer(
    s: &LabSession,
    client: &str,
    client_node: &str,
    server_pod: &str,
    server_node: &str,
    bytes: u64,
) {
    let server = serve(server_pod, APP_PORT);
    let report = send(client, s.addr(server_pod, APP_PORT), bytes);
    let seen = next_report(&server);
    assert_eq!(
        seen.peer, report.local,
        "the server sees the client's own address and port, as without the mesh"
    );
    assert_eq!(
        (seen.bytes, seen.sha256.as_str()),
        (bytes, report.sent_sha256.as_str())
    );

    let original = socket(s.ip(server_pod), APP_PORT);
    let outbound = closed_connections(&s.lab, client_node, Direction::Outbound);
    assert_eq!(
        outbound.len(),
        1,
        "exactly one captured connection on {client_node}: {outbound:?}"
    );
    let record = &outbound[0];
    assert_eq!(
        record.source, report.local,
        "the record names the client's socket"
    );
    assert_eq!(record.original_destination, original);
    assert_eq!((record.bytes_sent, record.error.as_deref()), (bytes, None));

    let inbound = closed_connections(&s.lab, server_node, Direction::Inbound);
    assert_eq!(
        inbound.len(),
        1,
        "exactly one steered connection on {server_node}: {inbound:?}"
    );
    assert_eq!(inbound[0].source, report.local);
    assert_eq!(inbound[0].original_destination, original);
    assert_eq!(inbound[0].bytes_sent, bytes);

    let kernel = counters(&s.lab, client_node);
    assert_eq!(kernel["outbound_captured"], 1);
    assert_eq!(kernel["orig_dst_recorded"], 1);
    assert_eq!(kernel["orig_dst_miss"], 0);
    // The proxy took (and deleted) the original destination.
    assert_eq!(
        pinned_map_len::<FlowKey, OrigDst>(&s.lab, client_node, names::ORIG_DST),
        0
    );
}

#[test]
fn cross_node_connection_is_captured_and_arrives_intact() {
    let s = LabSession::start();
    assert_captured_transfer(&s, "a1", "node1", "b1", "node2", 100 * MIB);
    let kernel = counters(&s.lab, "node2");
    // b1 is an HBONE workload: the connection arrived on 15008, not steered from port 8080.
    assert_eq!(kernel["inbound_steered"], 0);
    assert_eq!(
        kernel["inbound_bypass_delivery"], 1,
        "the delivery to the app was let through once"
    );
}

#[test]
fn same_node_connection_is_captured_and_arrives_intact() {
    let s = LabSession::start();
    assert_captured_transfer(&s, "a1", "node1", "a2", "node1", 100 * MIB);
}

#[test]
fn unenrolled_client_reaches_an_enrolled_pod_through_the_inbound_listener() {
    let s = LabSession::start();
    let server = serve("b1", APP_PORT);
    send("u1", s.addr("b1", APP_PORT), 10 * MIB);
    assert_eq!(next_report(&server).peer.ip(), s.ip("u1"));

    let inbound = closed_connections(&s.lab, "node2", Direction::Inbound);
    assert_eq!(inbound.len(), 1, "{inbound:?}");
    assert_eq!(inbound[0].source.ip(), s.ip("u1"));
    assert_eq!(
        inbound[0].original_destination,
        socket(s.ip("b1"), APP_PORT)
    );
    // u1 is not enrolled: its own connect() was never captured.
    assert_eq!(counters(&s.lab, "node2")["outbound_captured"], 0);
    assert!(closed_connections(&s.lab, "node2", Direction::Outbound).is_empty());
}

#[test]
fn unenrolled_pod_is_untouched() {
    let s = LabSession::start();
    let server = serve("u1", APP_PORT);
    send("a1", s.addr("u1", APP_PORT), MIB);
    assert_eq!(next_report(&server).peer.ip(), s.ip("a1"));

    // Node2's daemon never saw the connection, and u1 has none of our state.
    assert!(connections(&s.lab, "node2").is_empty());
    assert!(status(&s.lab, "node2").pods.iter().all(|p| p.name != "u1"));
    let listening = run_in("u1", &["ss", "-Htln"]);
    assert!(
        !listening.contains(":15001") && !listening.contains(":15006"),
        "{listening}"
    );
    assert!(!run_in("u1", &["ip", "rule"]).contains("0x111"));
    let u1 = s.lab.pod("u1").unwrap();
    assert!(
        !s.lab
            .node("node2")
            .unwrap()
            .bpffs
            .join("pods")
            .join(&u1.uid)
            .exists()
    );
}

#[test]
fn proxy_connections_are_never_captured_again() {
    let s = LabSession::start();
    let server = serve("b1", APP_PORT);
    for _ in 0..5 {
        send("a1", s.addr("b1", APP_PORT), 64 * 1024);
        next_report(&server);
    }
    // One capture per application connection: the proxy's upstream connections, made from
    // inside a1's netns, were not captured a second time.
    let kernel = counters(&s.lab, "node1");
    assert_eq!(kernel["outbound_captured"], 5);
    assert_eq!(
        closed_connections(&s.lab, "node1", Direction::Outbound).len(),
        5
    );
    assert_eq!(counters(&s.lab, "node2")["inbound_bypass_delivery"], 5);
    assert_eq!(
        closed_connections(&s.lab, "node2", Direction::Inbound).len(),
        5
    );

    // A socket carrying the proxy's mark bypasses capture.
    send_from(
        "a1",
        s.addr("b1", APP_PORT),
        1024,
        Some(DEFAULT_MARK),
        Duration::from_secs(30),
    )
    .expect("marked send");
    next_report(&server);
    let kernel = counters(&s.lab, "node1");
    assert_eq!(kernel["outbound_bypass_marked"], 1);
    assert_eq!(kernel["outbound_captured"], 5);
}

#[test]
fn cni_del_leaves_nothing_behind_and_add_captures_again() {
    let s = LabSession::start();
    let enrolled = 4; // a1, a2, b1, c1
    assert_eq!(our_link_count(), HOOKS_PER_POD * enrolled);
    assert_eq!(
        pinned_map_len::<u64, PodInfo>(&s.lab, "node1", names::PODS),
        2
    );

    // A connection of a1's that is open when the pod goes: DEL ends it, on both nodes.
    let server = serve("b1", APP_PORT);
    let to = s.addr("b1", APP_PORT);
    let open = send_pausing(
        "a1",
        to,
        MIB,
        Duration::from_secs(5),
        Duration::from_secs(10),
    );
    eventually("a1's transfer is open", || {
        ["node1", "node2"]
            .iter()
            .all(|node| connections(&s.lab, node).iter().any(|c| c.open))
    });

    ztunnel_lab::cni_del("a1").expect("CNI DEL of a1");
    eventually("a1's connections ended on both nodes", || {
        ["node1", "node2"]
            .iter()
            .all(|node| connections(&s.lab, node).iter().all(|c| !c.open))
    });
    assert!(
        open.join().unwrap().is_err(),
        "the transfer did not get through"
    );
    let a1 = s.lab.pod("a1").unwrap();
    assert!(status(&s.lab, "node1").pods.iter().all(|p| p.name != "a1"));
    let pins = s
        .lab
        .node("node1")
        .unwrap()
        .bpffs
        .join("pods")
        .join(&a1.uid);
    assert!(!pins.exists(), "a1's pins are gone");
    eventually("a1's links are released", || {
        our_link_count() == HOOKS_PER_POD * (enrolled - 1)
    });
    assert_eq!(
        pinned_map_len::<u64, PodInfo>(&s.lab, "node1", names::PODS),
        1
    );
    assert!(
        !run_in("a1", &["ip", "rule"]).contains("0x111"),
        "delivery rule removed"
    );
    let listening = run_in("a1", &["ss", "-Htln"]);
    assert!(
        !listening.contains(":15001") && !listening.contains(":15006"),
        "{listening}"
    );

    // A new sandbox for the pod (host-local gives it a new address) is captured again.
    let readded = ztunnel_lab::cni_add("a1").expect("CNI ADD of a1");
    send("a1", to, MIB);
    let mut peers = Vec::new();
    while let Ok(report) = server.next_report(Duration::from_secs(2)) {
        peers.push((report.peer.ip(), report.bytes));
    }
    assert_eq!(peers.last(), Some(&(readded.ip.into(), MIB)), "{peers:?}");
    let from_new = closed_connections(&s.lab, "node1", Direction::Outbound)
        .into_iter()
        .filter(|c| c.source.ip() == readded.ip)
        .count();
    assert_eq!(from_new, 1);
}

#[test]
fn disenrolled_pod_talks_directly_again() {
    let s = LabSession::start();
    let server = serve("b1", APP_PORT);
    send("a2", s.addr("b1", APP_PORT), MIB);
    next_report(&server);
    assert_eq!(counters(&s.lab, "node1")["outbound_captured"], 1);

    // What the plugin's DEL asks of the daemon, for a pod whose network stays up (as when a
    // pod leaves the mesh while it runs).
    let a2 = s.lab.pod("a2").unwrap();
    disenroll(&s.lab, "node1", &a2.uid, &a2.container_id);
    send("a2", s.addr("b1", APP_PORT), MIB);
    assert_eq!(next_report(&server).peer.ip(), s.ip("a2"));
    assert_eq!(
        counters(&s.lab, "node1")["outbound_captured"],
        1,
        "no longer captured"
    );
    assert_eq!(
        closed_connections(&s.lab, "node1", Direction::Outbound).len(),
        1
    );
}

#[test]
fn killed_daemons_fail_closed_and_lab_down_leaves_nothing() {
    let s = LabSession::start();
    let server = serve("b1", APP_PORT);
    ztunnel_lab::kill_daemon("node1").expect("kill node1 daemon");
    ztunnel_lab::kill_daemon("node2").expect("kill node2 daemon");

    // The pinned links outlive the daemons: a1's connection is refused (its connect rewritten
    // to a 15001 nothing listens on), never sent direct, and u1's SYN to b1 is dropped by
    // sk_lookup, which the kernel answers with a reset: refused too, at once, not timed out.
    let quick = Duration::from_secs(3);
    for client in ["a1", "u1"] {
        let refused = send_from(client, s.addr("b1", APP_PORT), 1024, None, quick)
            .expect_err("carried with the daemons dead");
        assert!(
            refused.to_string().contains("Connection refused"),
            "{client}: {refused}"
        );
    }
    // Nothing reached the app.
    assert!(server.next_report(Duration::from_secs(1)).is_err());
    drop(server);

    ztunnel_lab::down().expect("lab down");
    assert_eq!(ztunnel_lab::leftovers(), Vec::<String>::new());
    eventually("no capture link remains in the kernel", || {
        our_link_count() == 0
    });
    eventually("no capture program remains in the kernel", || {
        our_program_count() == 0
    });
}

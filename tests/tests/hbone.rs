//! HBONE between the lab's nodes: what crosses the underlay, pooling, certificate rotation, and
//! both sides of the wire contract checked against the independent Python peer
//! (`tests/hbone_peer/peer.py`).

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::*;
use ztunnel_lab::capture::UnderlayCapture;
use ztunnel_lab::traffic::PseudoRandom;
use ztunnel_lab::{DaemonOptions, burst_from};
use ztunnel_user::api::Direction;

const GIB: u64 = 1024 * MIB;

#[test]
fn cross_node_traffic_crosses_the_underlay_only_inside_tls() {
    let s = LabSession::start();
    let server = serve("b1", APP_PORT);
    let pcap = std::env::temp_dir().join(format!("ztunnel-underlay-{}.pcap", std::process::id()));
    let capture = UnderlayCapture::start("node1", &pcap).expect("tcpdump on node1's underlay");
    let report = send("a1", s.addr("b1", APP_PORT), GIB);
    let seen = next_report(&server);
    let segments = capture.finish().expect("reading the capture");
    let _ = std::fs::remove_file(&pcap);

    assert_eq!(seen.peer.ip(), s.ip("a1"), "b1 sees a1's address");
    assert_eq!(
        (seen.bytes, seen.sha256.as_str()),
        (GIB, report.sent_sha256.as_str())
    );

    // Every pod-to-pod segment on the wire belongs to an HBONE connection (port 15008).
    let pod_segments: Vec<_> = segments
        .iter()
        .filter(|s| s.source.ip().octets()[..2] == [10, 244])
        .collect();
    assert!(
        pod_segments.len() > 100,
        "the capture saw the transfer ({} segments)",
        pod_segments.len()
    );
    let plain: Vec<_> = pod_segments
        .iter()
        .filter(|s| s.source.port() != 15008 && s.destination.port() != 15008)
        .collect();
    assert!(
        plain.is_empty(),
        "segments outside HBONE: {:?}",
        plain.first()
    );
    // The application's bytes never appear in clear.
    let mut marker = [0u8; 64];
    PseudoRandom::default().fill(&mut marker);
    assert!(
        !pod_segments
            .iter()
            .any(|s| s.payload.windows(marker.len()).any(|w| w == marker)),
        "plaintext on the underlay"
    );
    // What does appear: a TLS handshake, then TLS 1.3 application data records.
    assert!(
        pod_segments
            .iter()
            .any(|s| s.payload.starts_with(&[0x16, 0x03, 0x01])),
        "a TLS ClientHello"
    );
    assert!(
        pod_segments
            .iter()
            .filter(|s| s.payload.starts_with(&[0x17, 0x03, 0x03]))
            .count()
            > 10,
        "TLS records"
    );

    let outbound = closed_connections(&s.lab, "node1", Direction::Outbound);
    assert_eq!(outbound.len(), 1);
    assert_eq!(outbound[0].bytes_sent, GIB);
    let inbound = closed_connections(&s.lab, "node2", Direction::Inbound);
    assert_eq!(inbound.len(), 1);
    assert_eq!(
        inbound[0].source, report.local,
        "forwarded carries the application's client address"
    );
    assert_eq!(inbound[0].bytes_sent, GIB);
}

#[test]
fn a_thousand_connections_share_a_handful_of_hbone_connections() {
    let s = LabSession::start();
    let _server = serve("b1", APP_PORT);
    let burst = burst_from(
        "a1",
        s.addr("b1", APP_PORT),
        1000,
        4096,
        Duration::from_secs(120),
    )
    .expect("burst");
    assert_eq!(burst.succeeded, 1000, "{:?}", burst.failures);

    // Pooled connections stay open after use: count them in a1's netns.
    let established = run_in(
        "a1",
        &["ss", "-Htn", "state", "established", "( dport = :15008 )"],
    );
    let hbone_connections = established.lines().count();
    assert!(
        (1..=20).contains(&hbone_connections),
        "{hbone_connections} HBONE connections:\n{established}"
    );
    assert_eq!(counters(&s.lab, "node1")["outbound_captured"], 1000);
}

#[test]
fn same_node_traffic_skips_tls() {
    let s = LabSession::start();
    let server = serve("a2", APP_PORT);
    send("a1", s.addr("a2", APP_PORT), 10 * MIB);
    assert_eq!(next_report(&server).peer.ip(), s.ip("a1"));
    let established = run_in("a1", &["ss", "-Htn", "( dport = :15008 )"]);
    assert!(
        established.trim().is_empty(),
        "no HBONE connection for a same-node pod: {established}"
    );
    assert_eq!(
        closed_connections(&s.lab, "node1", Direction::Inbound).len(),
        1
    );
}

/// Certificates of two seconds: a transfer held open across their renewal finishes intact, and
/// once the first certificate has expired a new TLS connection (from a2: another pool key, so
/// not a1's pooled connection) can only have been made with a renewed one.
#[test]
fn certificate_rotation_keeps_open_transfers_and_new_handshakes_use_the_new_certificate() {
    let options = DaemonOptions {
        cert_lifetime_secs: Some(2),
        ..DaemonOptions::default()
    };
    let s = LabSession::start_with(&options);
    let server = serve("b1", APP_PORT);
    let first = certificate_expiries(&s.lab, "node1");
    let to = s.addr("b1", APP_PORT);
    let transfer = send_pausing("a1", to, 4 * MIB, Duration::from_secs(5), QUICK * 6);
    eventually_within("node1 renewed its certificate", QUICK, || {
        certificate_expiries(&s.lab, "node1") != first
    });
    let report = transfer
        .join()
        .unwrap()
        .expect("the transfer held across the renewal");
    assert_eq!(next_report(&server).sha256, report.sent_sha256);

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        first.iter().all(|(_, expiry)| *expiry < now),
        "the first certificates have not expired yet: {first:?}"
    );
    let client_connections = || {
        sample(
            &scrape("node1"),
            "ztunnel_hbone_open",
            &[("side", "client"), ("kind", "connections")],
        )
    };
    let pooled = client_connections();
    send("a2", to, MIB);
    assert_eq!(
        client_connections(),
        pooled + 1.0,
        "a2 reused a pooled connection"
    );
}

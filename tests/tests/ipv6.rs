//! IPv6 end to end: the lab is dual stack (every pod has an address of each family), and these
//! tests dial the IPv6 ones through the real daemons: captured outbound over HBONE and on the
//! same node, plaintext inbound, policies by IPv6 source, and services with IPv6 VIPs and
//! `ipFamilies`.

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use support::*;
use ztunnel_lab::mesh::MeshChanges;
use ztunnel_lab::traffic::SendReport;
use ztunnel_user::api::{ConnectionRecord, Direction};

/// The echo service's IPv6 VIP (`vips: [/fd00:96::10]`) and, for the dual-stack service, its
/// IPv4 one.
const VIP6: &str = "fd00:96::10";
const VIP4: &str = "10.96.0.10";
const CONNECTIONS: usize = 16;

/// The one record of `direction` on `node`, once closed.
fn only_record(s: &LabSession, node: &str, direction: Direction) -> ConnectionRecord {
    let records = closed_connections(&s.lab, node, direction);
    assert_eq!(
        records.len(),
        1,
        "one {direction:?} record on {node}: {records:?}"
    );
    records.into_iter().next().expect("one record")
}

/// `client` -> `server_pod`'s IPv6 address, captured by the client's proxy: the server sees the
/// client's IPv6 socket, and both proxies' records name the IPv6 ends.
fn assert_captured_v6_transfer(
    s: &LabSession,
    client: &str,
    client_node: &str,
    server_pod: &str,
    server_node: &str,
) {
    let server = serve(server_pod, APP_PORT);
    let to = s.addr6(server_pod, APP_PORT);
    let report = send(client, to, 4 * MIB);
    let seen = next_report(&server);
    assert_eq!(
        report.local.ip(),
        s.ip6(client),
        "the client dialled over IPv6"
    );
    assert_eq!(seen.local, to, "the app accepted on its IPv6 address");
    assert_eq!(
        seen.peer, report.local,
        "the server sees the client's own IPv6 address and port"
    );
    assert_eq!(seen.bytes, 4 * MIB);

    let outbound = only_record(s, client_node, Direction::Outbound);
    assert_eq!(outbound.source, report.local, "{outbound:?}");
    assert_eq!(outbound.original_destination, to, "{outbound:?}");
    assert_eq!(
        (outbound.bytes_sent, outbound.error.as_deref()),
        (4 * MIB, None)
    );
    let inbound = only_record(s, server_node, Direction::Inbound);
    assert_eq!(inbound.source, report.local, "{inbound:?}");
    assert_eq!(inbound.original_destination, to, "{inbound:?}");
    assert_eq!(
        inbound.source_identity, "spiffe://cluster.local/ns/demo/sa/sa-a",
        "carried with a1's identity: {inbound:?}"
    );
    let kernel = counters(&s.lab, client_node);
    assert_eq!(kernel["outbound_captured"], 1);
    assert_eq!(kernel["orig_dst_recorded"], 1);
    assert_eq!(kernel["orig_dst_miss"], 0);
}

#[test]
fn cross_node_connection_over_ipv6_is_carried_over_hbone() {
    let s = LabSession::start();
    assert_captured_v6_transfer(&s, "a1", "node1", "b1", "node2");
    let kernel = counters(&s.lab, "node2");
    // b1 is an HBONE workload: the connection arrived on 15008, not steered from 8080.
    assert_eq!(kernel["inbound_steered"], 0);
    assert_eq!(kernel["inbound_bypass_delivery"], 1);
    // The access log of b1's proxy names the IPv6 ends too (its writer thread may be a moment
    // behind the record).
    let (a1, b1) = (s.ip6("a1"), s.addr6("b1", APP_PORT));
    let line = format!("direction=inbound pod=demo/b1 src.addr=[{a1}]:");
    eventually("node2's access log has a1's connection over IPv6", || {
        daemon_log("node2")
            .lines()
            .any(|l| l.contains(&line) && l.contains(&format!("dst.addr={b1} ")))
    });
}

#[test]
fn same_node_connection_over_ipv6_is_delivered_directly() {
    let s = LabSession::start();
    assert_captured_v6_transfer(&s, "a1", "node1", "a2", "node1");
}

#[test]
fn plaintext_client_reaches_an_enrolled_pod_over_ipv6() {
    let s = LabSession::start();
    let server = serve("b1", APP_PORT);
    let to = s.addr6("b1", APP_PORT);
    let report = send("u1", to, MIB);
    let seen = next_report(&server);
    assert_eq!(seen.peer.ip(), s.ip6("u1"), "b1 sees u1's IPv6 address");
    assert_eq!(report.server.local, to);

    let inbound = only_record(&s, "node2", Direction::Inbound);
    assert_eq!(inbound.source.ip(), s.ip6("u1"), "{inbound:?}");
    assert_eq!(inbound.original_destination, to, "{inbound:?}");
    assert_eq!(inbound.source_identity, "unknown", "plaintext: {inbound:?}");
    let kernel = counters(&s.lab, "node2");
    assert_eq!(
        kernel["inbound_steered"], 1,
        "steered by sk_lookup to 15006"
    );
    // u1 is not enrolled: its own connect() was never captured.
    assert_eq!(kernel["outbound_captured"], 0);
}

#[test]
fn policies_match_ipv6_source_cidrs() {
    let s = LabSession::start();
    let b1_app = serve("b1", APP_PORT);
    // DENY u1's IPv6 address: refused in the kernel over IPv6, while its IPv4 address, which
    // the policy does not name, still gets through.
    let u1 = s.ip6("u1");
    let deny = format!(
        "policies:\n- {{name: no-u1-v6, namespace: demo, scope: Namespace, action: Deny, \
         rules: [[[{{sourceIps: [{u1}/128]}}]]]}}\n"
    );
    apply_mesh(
        &s.lab,
        &MeshChanges {
            sections: &deny,
            ..MeshChanges::default()
        },
    );
    let before = counters(&s.lab, "node2")["inbound_denied_by_policy"];
    let error = denied("u1", s.addr6("b1", APP_PORT));
    assert!(error.contains("refused"), "{error}");
    assert_eq!(
        counters(&s.lab, "node2")["inbound_denied_by_policy"],
        before + 1,
        "refused by the kernel's plaintext rules"
    );
    send("u1", s.addr("b1", APP_PORT), 64 * KIB);
    assert_eq!(next_report(&b1_app).peer.ip(), s.ip("u1"));
    // a1 over HBONE is not u1.
    send("a1", s.addr6("b1", APP_PORT), 64 * KIB);
    assert_eq!(next_report(&b1_app).peer.ip(), s.ip6("a1"));

    // ALLOW only node1's IPv6 pod range: a1 over IPv6 (HBONE, the peer's address checked) is
    // allowed; a1 over IPv4 and u1 over IPv6 match nothing and are denied.
    let allow = "policies:\n- {name: node1-v6-only, namespace: demo, scope: Namespace, \
                 action: Allow, rules: [[[{sourceIps: [fd00:10:244:1::/64]}]]]}\n";
    apply_mesh(
        &s.lab,
        &MeshChanges {
            sections: allow,
            ..MeshChanges::default()
        },
    );
    send("a1", s.addr6("b1", APP_PORT), 64 * KIB);
    assert_eq!(next_report(&b1_app).peer.ip(), s.ip6("a1"));
    denied("a1", s.addr("b1", APP_PORT));
    // With ALLOW policies that no identity-less client from u1 can match, the kernel refuses it.
    let refused = |s: &LabSession| {
        let kernel = counters(&s.lab, "node2");
        kernel["inbound_denied_needs_identity"] + kernel["inbound_denied_by_policy"]
    };
    let before = refused(&s);
    let error = denied("u1", s.addr6("b1", APP_PORT));
    assert!(error.contains("refused"), "{error}");
    assert_eq!(refused(&s), before + 1, "u1 refused in the kernel");
    assert!(
        b1_app.next_report(Duration::from_millis(500)).is_err(),
        "nothing denied reached b1"
    );
}

/// The lines that make a2 and b1 endpoints of the echo service.
const ENDPOINTS: [(&str, &str); 2] = [("a2", ECHO_ENDPOINT), ("b1", ECHO_ENDPOINT)];

#[test]
fn a_service_with_an_ipv6_vip_reaches_endpoints_on_both_nodes_over_ipv6() {
    let s = LabSession::start();
    let servers = [serve("a2", APP_PORT), serve("b1", APP_PORT)];
    let service = echo_service(VIP6, "");
    apply_mesh(
        &s.lab,
        &MeshChanges {
            workload_fields: &ENDPOINTS,
            sections: &service,
            ..MeshChanges::default()
        },
    );
    let vip: SocketAddr = format!("[{VIP6}]:{ECHO_PORT}").parse().expect("the VIP");
    let endpoints: BTreeSet<IpAddr> = [s.ip6("a2"), s.ip6("b1")].into();
    let mut reached = BTreeSet::new();
    for _ in 0..CONNECTIONS {
        let report = send("a1", vip, 16 * KIB);
        // The endpoint's IPv6 address, on the target port, from a1's IPv6 address.
        assert_eq!(report.server.peer.ip(), s.ip6("a1"), "{report:?}");
        assert_eq!(report.server.local.port(), APP_PORT);
        let endpoint = report.server.local.ip();
        assert!(endpoints.contains(&endpoint), "{report:?}");
        reached.insert(endpoint);
    }
    // Random choice: both endpoints are used (all 16 on one has probability 2^-15).
    assert_eq!(reached, endpoints);
    let records = closed_connections(&s.lab, "node1", Direction::Outbound);
    assert_eq!(records.len(), CONNECTIONS);
    assert!(
        records.iter().all(|r| r.original_destination == vip),
        "{records:?}"
    );
    drop(servers);
}

/// The echo service with a VIP of each family, and the `extra` fields given.
fn dual_stack_service(extra: &str) -> String {
    format!(
        "services:\n- name: echo\n  namespace: demo\n  hostname: echo.demo.svc.cluster.local\n  \
         vips: [/{VIP4}, /{VIP6}]\n  ports: {{{ECHO_PORT}: {APP_PORT}}}\n{extra}"
    )
}

/// Applies the dual-stack service with `extra` fields, `endpoints` its endpoints.
fn apply_dual_stack_service(s: &LabSession, endpoints: &[(&str, &str)], extra: &str) {
    let sections = dual_stack_service(extra);
    apply_mesh(
        &s.lab,
        &MeshChanges {
            workload_fields: endpoints,
            sections: &sections,
            ..MeshChanges::default()
        },
    );
}

/// The app at `to` accepted the connection, which came from `from`.
fn assert_reached(report: &SendReport, to: SocketAddr, from: IpAddr) {
    assert_eq!(report.server.local, to, "{report:?}");
    assert_eq!(report.server.peer.ip(), from, "{report:?}");
}

#[test]
fn ip_families_decides_the_family_a_dual_stack_service_is_reached_by() {
    let s = LabSession::start();
    let b1_app = serve("b1", APP_PORT);
    let endpoints = [("b1", ECHO_ENDPOINT)];
    let vip6: SocketAddr = format!("[{VIP6}]:{ECHO_PORT}").parse().expect("the VIP");
    let vip4: SocketAddr = format!("{VIP4}:{ECHO_PORT}").parse().expect("the VIP");

    // Without ipFamilies the dialled family wins: each VIP leads to b1's address of its family.
    apply_dual_stack_service(&s, &endpoints, "");
    let report = send("a1", vip6, 4 * KIB);
    assert_reached(&report, s.addr6("b1", APP_PORT), s.ip6("a1"));
    let report = send("a1", vip4, 4 * KIB);
    assert_reached(&report, s.addr("b1", APP_PORT).into(), s.ip("a1"));

    // ipFamilies: IPv4: the IPv6 VIP leads to b1's IPv4 address, carried from a1's IPv4 one.
    apply_dual_stack_service(&s, &endpoints, "  ipFamilies: IPv4\n");
    for _ in 0..4 {
        let report = send("a1", vip6, 4 * KIB);
        assert_reached(&report, s.addr("b1", APP_PORT).into(), s.ip("a1"));
    }
    let records = closed_connections(&s.lab, "node1", Direction::Outbound);
    let last = records.last().expect("a1's records");
    assert_eq!(last.original_destination, vip6, "{last:?}");
    // And IPv6 the other way round.
    apply_dual_stack_service(&s, &endpoints, "  ipFamilies: IPv6\n");
    let report = send("a1", vip4, 4 * KIB);
    assert_reached(&report, s.addr6("b1", APP_PORT), s.ip6("a1"));
    while b1_app.next_report(Duration::from_millis(200)).is_ok() {}
}

/// Same node, a family other than the one dialled: the delivery into a2 leaves from a1's
/// address of the app's family (a1 dialled from its IPv6 one), as a cross-node connection's
/// HBONE leg does.
#[test]
fn ip_families_ipv4_on_the_same_node() {
    let s = LabSession::start();
    let _a2_app = serve("a2", APP_PORT);
    apply_dual_stack_service(&s, &[("a2", ECHO_ENDPOINT)], "  ipFamilies: IPv4\n");
    let vip6: SocketAddr = format!("[{VIP6}]:{ECHO_PORT}").parse().expect("the VIP");
    let report = send("a1", vip6, 4 * KIB);
    assert_reached(&report, s.addr("a2", APP_PORT).into(), s.ip("a1"));
}

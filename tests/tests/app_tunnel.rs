//! Application tunnels: a workload whose app takes tunnel information itself
//! (`applicationTunnel`) gets its connections on the port it names, and with `PROXY`, a PROXY
//! protocol v2 header first that carries the client's address and SPIFFE identity, across nodes
//! (HBONE) and on the same node alike.

mod support;

use support::*;
use ztunnel_lab::PodServer;
use ztunnel_lab::mesh::MeshChanges;
use ztunnel_lab::proxy_protocol::ProxyHeader;
use ztunnel_lab::topology::TRUST_DOMAIN;

/// Where the tunnelled apps listen instead of the port the client dials.
const TUNNEL_PORT: u16 = 15088;

fn tunnel(protocol: &str) -> String {
    format!("  applicationTunnel: {{protocol: {protocol}, port: {TUNNEL_PORT}}}\n")
}

/// a1's identity, as the header must carry it.
fn a1_identity() -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/demo/sa/sa-a")
}

#[test]
fn a_proxy_tunnel_app_reads_the_clients_address_and_identity_first() {
    let s = LabSession::start();
    let proxy = tunnel("PROXY");
    apply_mesh(
        &s.lab,
        &MeshChanges {
            workload_fields: &[("a2", &proxy), ("b1", &proxy)],
            ..MeshChanges::default()
        },
    );
    // b1 is on the other node (HBONE), a2 on a1's own (delivered there directly).
    for pod in ["b1", "a2"] {
        let server = PodServer::start_proxy_protocol(pod, TUNNEL_PORT).unwrap();
        let dialled = s.addr(pod, APP_PORT);
        let sent = send("a1", dialled, 64 * KIB);
        let report = next_report(&server);
        assert_eq!(report.local.port(), TUNNEL_PORT, "{pod}");
        assert_eq!(
            report.proxy,
            Some(ProxyHeader {
                source: sent.local,
                destination: dialled.into(),
                identity: Some(a1_identity()),
            }),
            "{pod}"
        );
        // The client's bytes follow the header unchanged (the tool checked length and hash).
        assert_eq!(report.bytes, 64 * KIB);
    }
}

#[test]
fn a_tunnel_without_a_header_only_moves_the_port() {
    let s = LabSession::start();
    let plain = tunnel("NONE");
    apply_mesh(
        &s.lab,
        &MeshChanges {
            workload_fields: &[("b1", &plain)],
            ..MeshChanges::default()
        },
    );
    let _server = serve("b1", TUNNEL_PORT);
    let sent = send("a1", s.addr("b1", APP_PORT), 16 * KIB);
    assert_eq!(sent.server.local.port(), TUNNEL_PORT);
    assert_eq!(sent.server.proxy, None);
    assert_eq!(sent.server.peer.ip(), s.ip("a1"));
}

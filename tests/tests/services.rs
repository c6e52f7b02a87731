//! Services: a VIP in front of endpoints on both nodes, load-balanced by the source's proxy,
//! with the service port mapped to the endpoints' target port.

mod support;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;
use support::*;
use ztunnel_lab::mesh::MeshChanges;
use ztunnel_user::api::Direction;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CONNECTIONS: usize = 16;
const UNHEALTHY_DRAWS: usize = 20;

#[test]
fn a_service_vip_is_balanced_across_endpoints_on_both_nodes() {
    let s = LabSession::start();
    let servers = [("a2", serve("a2", APP_PORT)), ("b1", serve("b1", APP_PORT))];
    let endpoint = ECHO_ENDPOINT;
    let service = echo_service(VIP, "");
    apply_mesh(
        &s.lab,
        &MeshChanges {
            workload_fields: &[("a2", endpoint), ("b1", endpoint)],
            sections: &service,
            ..MeshChanges::default()
        },
    );
    for _ in 0..CONNECTIONS {
        let report = send("a1", SocketAddrV4::new(VIP, ECHO_PORT), 16 * 1024);
        // Whichever endpoint took it saw a1, on the target port.
        assert_eq!(report.server.peer.ip(), s.ip("a1"));
        assert_eq!(report.server.local.port(), APP_PORT);
    }
    let mut served = BTreeMap::new();
    for (pod, server) in &servers {
        while server.next_report(Duration::from_millis(500)).is_ok() {
            *served.entry(*pod).or_insert(0) += 1;
        }
    }
    assert_eq!(served.values().sum::<usize>(), CONNECTIONS, "{served:?}");
    // Random choice: both endpoints are used (all 16 on one has probability 2^-15).
    assert_eq!(served.len(), 2, "{served:?}");

    // An endpoint marked unhealthy is no longer chosen: 20 draws that all miss it would come
    // 1 time in a million from a choice that ignored health.
    let unhealthy = &format!("{ECHO_ENDPOINT}  status: Unhealthy\n");
    apply_mesh(
        &s.lab,
        &MeshChanges {
            workload_fields: &[("a2", endpoint), ("b1", unhealthy)],
            sections: &service,
            ..MeshChanges::default()
        },
    );
    for _ in 0..UNHEALTHY_DRAWS {
        let report = send("a1", SocketAddrV4::new(VIP, ECHO_PORT), 1024);
        assert_eq!(report.server.local.ip(), s.ip("a2"));
    }
    assert!(
        servers[1]
            .1
            .next_report(Duration::from_millis(500))
            .is_err()
    );

    // With no healthy endpoint left, the connection is closed and the record says why.
    apply_mesh(
        &s.lab,
        &MeshChanges {
            workload_fields: &[("a2", unhealthy), ("b1", unhealthy)],
            sections: &service,
            ..MeshChanges::default()
        },
    );
    denied("a1", SocketAddrV4::new(VIP, ECHO_PORT));
    let failed = closed_connections(&s.lab, "node1", Direction::Outbound);
    let last = failed.last().expect("a1's record");
    assert_eq!(
        last.error.as_deref(),
        Some(
            "service demo/echo.demo.svc.cluster.local has no endpoint to choose \
             (none healthy, or none its routing preferences allow)"
        ),
        "{last:?}"
    );
}

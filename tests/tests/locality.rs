//! Locality-aware load balancing, end to end: the lab's nodes are two zones of one region
//! (node1 `zone-a`, node2 `zone-b`, region `lab`), the `echo` service has an endpoint on each
//! (a2 on node1, b1 on node2), and a1 (node1) connects to its VIP: node1's daemon ranks the
//! endpoints by the locality they share with a1's workload, under the service's load balancer.

mod support;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use support::*;
use ztunnel_lab::PodServer;
use ztunnel_lab::mesh::MeshChanges;
use ztunnel_user::api::Direction;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// Connections per observation: a random choice between the two endpoints would put them all
/// on one 1 time in 2^19.
const CONNECTIONS: usize = 20;
/// The service's endpoints, a2 in a1's zone and b1 in the other.
const ENDPOINTS: [&str; 2] = ["a2", "b1"];

const FAILOVER: &str = "  loadBalancer: {routingPreferences: [Region, Zone], mode: Failover}\n";
const STRICT: &str = "  loadBalancer: {routingPreferences: [Zone], mode: Strict}\n";
/// Preferences listed, and not to be considered.
const STANDARD: &str = "  loadBalancer: {routingPreferences: [Region, Zone], mode: Standard}\n";
const UNHEALTHY: &str = "  status: Unhealthy\n";

/// The lab, with an echo server in each endpoint pod (kept until the test ends).
fn start() -> (LabSession, [PodServer; 2]) {
    let session = LabSession::start();
    (session, ENDPOINTS.map(|pod| serve(pod, APP_PORT)))
}

/// The mesh with the `echo` service under `load_balancer` (its field lines), and a2 and b1 as
/// its endpoints with the extra workload fields `a2` and `b1`; returns once both daemons run it.
fn apply_echo(s: &LabSession, load_balancer: &str, a2: &str, b1: &str) {
    let (a2, b1) = (
        format!("{ECHO_ENDPOINT}{a2}"),
        format!("{ECHO_ENDPOINT}{b1}"),
    );
    apply_mesh(
        &s.lab,
        &MeshChanges {
            workload_fields: &[("a2", &a2), ("b1", &b1)],
            sections: &echo_service(VIP, load_balancer),
            ..MeshChanges::default()
        },
    );
}

/// How many of `CONNECTIONS` connections from a1 to the VIP each endpoint took.
fn endpoints_reached(s: &LabSession) -> BTreeMap<&'static str, usize> {
    let mut reached = BTreeMap::new();
    for _ in 0..CONNECTIONS {
        let report = send("a1", SocketAddrV4::new(VIP, ECHO_PORT), KIB);
        let pod = ENDPOINTS
            .into_iter()
            .find(|pod| s.ip(pod) == report.server.local.ip())
            .unwrap_or_else(|| panic!("served by no endpoint: {report:?}"));
        *reached.entry(pod).or_insert(0) += 1;
    }
    reached
}

/// Every connection on `pod`.
fn only(pod: &'static str) -> BTreeMap<&'static str, usize> {
    BTreeMap::from([(pod, CONNECTIONS)])
}

#[test]
fn failover_stays_in_the_sources_zone_until_its_endpoint_is_unhealthy() {
    let (s, _servers) = start();
    apply_echo(&s, FAILOVER, "", "");
    assert_eq!(endpoints_reached(&s), only("a2"));

    // a2 unhealthy: b1, which shares the region but not the zone, is the best left.
    apply_echo(&s, FAILOVER, UNHEALTHY, "");
    assert_eq!(endpoints_reached(&s), only("b1"));
}

#[test]
fn strict_fails_without_a_healthy_endpoint_in_the_sources_zone() {
    let (s, _servers) = start();
    // b1 is healthy, but in the other zone: no endpoint for a1, the connection is closed.
    apply_echo(&s, STRICT, UNHEALTHY, "");
    denied("a1", SocketAddrV4::new(VIP, ECHO_PORT));
    let records = closed_connections(&s.lab, "node1", Direction::Outbound);
    let record = records.last().expect("a1's record");
    assert!(
        record
            .error
            .as_deref()
            .is_some_and(|error| error.contains("demo/echo.demo.svc.cluster.local")),
        "{record:?}"
    );

    apply_echo(&s, STRICT, "", "");
    assert_eq!(endpoints_reached(&s), only("a2"));
}

#[test]
fn standard_mode_spreads_connections_over_both_zones() {
    let (s, _servers) = start();
    apply_echo(&s, STANDARD, "", "");
    let reached = endpoints_reached(&s);
    assert_eq!(
        reached.keys().copied().collect::<Vec<_>>(),
        ENDPOINTS,
        "{reached:?}"
    );
}

#[test]
fn an_endpoint_of_capacity_zero_is_never_chosen() {
    let (s, _servers) = start();
    apply_echo(&s, STANDARD, "", "  capacity: 0\n");
    assert_eq!(endpoints_reached(&s), only("a2"));
}

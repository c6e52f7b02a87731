//! Choosing an endpoint: health and capacity filter, the routing preferences rank by mode, and
//! the draw is weighted by capacity. Draws are random, so each test looks at what `DRAWS`
//! draws pick.

use super::*;
use std::collections::{BTreeMap, BTreeSet};

const DRAWS: usize = 2000;

/// The workload `uid` with `fields` (YAML lines) besides those it needs.
fn workload(uid: &str, fields: &str) -> Workload {
    let text =
        format!("uid: {uid}\nname: {uid}\nnamespace: demo\nworkloadIps: [10.0.0.1]\n{fields}");
    serde_yaml_ng::from_str(&text).unwrap()
}

fn located(uid: &str, region: &str, zone: &str) -> Workload {
    workload(
        uid,
        &format!("locality: {{region: {region}, zone: {zone}}}"),
    )
}

/// The client, in region r1, zone z1.
fn source() -> Workload {
    located("source", "r1", "z1")
}

/// Endpoints from the nearest to the source to the farthest: one in its zone, one in its
/// region only, one that shares its zone's name but not its region.
fn near_to_far() -> Vec<Workload> {
    vec![
        located("same-zone", "r1", "z1"),
        located("same-region", "r1", "z2"),
        located("elsewhere", "r2", "z1"),
    ]
}

/// How often each endpoint is picked in `DRAWS` draws under the load balancer `balancer`
/// (YAML).
fn draws(
    balancer: &str,
    source: Option<&Workload>,
    endpoints: &[Workload],
) -> BTreeMap<String, usize> {
    let balancer: LoadBalancer = serde_yaml_ng::from_str(balancer).unwrap();
    let mut counts = BTreeMap::new();
    for _ in 0..DRAWS {
        if let Some(endpoint) = choose(Some(&balancer), source, endpoints.iter()) {
            *counts.entry(endpoint.uid.to_string()).or_default() += 1;
        }
    }
    counts
}

/// The endpoints ever picked in `DRAWS` draws.
fn picked(balancer: &str, source: Option<&Workload>, endpoints: &[Workload]) -> BTreeSet<String> {
    draws(balancer, source, endpoints).into_keys().collect()
}

fn uids<const N: usize>(uids: [&str; N]) -> BTreeSet<String> {
    uids.into_iter().map(str::to_owned).collect()
}

#[test]
fn standard_and_passthrough_modes_ignore_routing_preferences() {
    for mode in ["Standard", "Passthrough"] {
        let balancer = format!("{{mode: {mode}, routingPreferences: [Region, Zone]}}");
        assert_eq!(
            picked(&balancer, Some(&source()), &near_to_far()),
            uids(["elsewhere", "same-region", "same-zone"]),
            "{mode}"
        );
    }
}

#[test]
fn strict_mode_picks_only_endpoints_sharing_every_preference() {
    let strict = "{mode: Strict, routingPreferences: [Region, Zone]}";
    assert_eq!(
        picked(strict, Some(&source()), &near_to_far()),
        uids(["same-zone"])
    );
}

#[test]
fn strict_mode_without_a_full_match_picks_nothing() {
    let strict = "{mode: Strict, routingPreferences: [Region, Zone]}";
    let without_same_zone = &near_to_far()[1..];
    assert_eq!(picked(strict, Some(&source()), without_same_zone), uids([]));
}

#[test]
fn failover_prefers_the_same_zone_then_the_same_region_then_any() {
    let failover = "{mode: Failover, routingPreferences: [Region, Zone]}";
    let mut endpoints = near_to_far();
    for best in ["same-zone", "same-region", "elsewhere"] {
        assert_eq!(picked(failover, Some(&source()), &endpoints), uids([best]));
        endpoints.remove(0);
    }
}

/// A zone of the same name in another region counts for nothing: the rank stops at the
/// region.
#[test]
fn a_rank_stops_at_the_first_preference_not_shared() {
    let failover = "{mode: Failover, routingPreferences: [Region, Zone]}";
    let endpoints = [
        located("elsewhere", "r2", "z1"),
        located("nowhere-alike", "r3", "z9"),
    ];
    assert_eq!(
        picked(failover, Some(&source()), &endpoints),
        uids(["elsewhere", "nowhere-alike"])
    );
}

#[test]
fn an_unknown_source_gets_no_endpoint_under_strict() {
    let strict = "{mode: Strict, routingPreferences: [Region]}";
    assert_eq!(picked(strict, None, &near_to_far()), uids([]));
}

#[test]
fn an_unknown_source_may_get_any_endpoint_under_failover() {
    let failover = "{mode: Failover, routingPreferences: [Region, Zone]}";
    assert_eq!(
        picked(failover, None, &near_to_far()),
        uids(["elsewhere", "same-region", "same-zone"])
    );
}

/// Each scope compares its own field: `X` in `fields` is the value.
#[test]
fn subzone_node_cluster_and_network_scopes_compare_their_own_field() {
    let scopes = [
        ("Subzone", "locality: {subzone: X}"),
        ("Node", "node: X"),
        ("Cluster", "clusterId: X"),
        ("Network", "network: X"),
    ];
    for (scope, fields) in scopes {
        let source = workload("source", &fields.replace('X', "a"));
        let endpoints = [
            workload("same", &fields.replace('X', "a")),
            workload("other", &fields.replace('X', "b")),
        ];
        let strict = format!("{{mode: Strict, routingPreferences: [{scope}]}}");
        assert_eq!(
            picked(&strict, Some(&source), &endpoints),
            uids(["same"]),
            "{scope}"
        );
    }
}

#[test]
fn capacity_weights_the_draw() {
    let endpoints = [
        workload("three", "capacity: 3"),
        workload("one", "capacity: 1"),
    ];
    let counts = draws("{}", None, &endpoints);
    let share = counts["three"] as f64 / DRAWS as f64;
    assert!(
        (0.65..=0.85).contains(&share),
        "share of capacity 3: {share}"
    );
}

#[test]
fn capacity_zero_is_never_chosen() {
    let endpoints = [workload("drained", "capacity: 0"), workload("serving", "")];
    assert_eq!(picked("{}", None, &endpoints), uids(["serving"]));
}

fn healthy_and_unhealthy() -> [Workload; 2] {
    [
        workload("healthy", "status: Healthy"),
        workload("unhealthy", "status: Unhealthy"),
    ]
}

#[test]
fn only_healthy_never_picks_an_unhealthy_endpoint() {
    for balancer in ["{}", "{healthPolicy: OnlyHealthy}"] {
        assert_eq!(
            picked(balancer, None, &healthy_and_unhealthy()),
            uids(["healthy"]),
            "{balancer}"
        );
    }
}

#[test]
fn allow_all_picks_unhealthy_endpoints_too() {
    assert_eq!(
        picked("{healthPolicy: AllowAll}", None, &healthy_and_unhealthy()),
        uids(["healthy", "unhealthy"])
    );
}

/// Failover falls back past the nearest endpoints when health or capacity rule them out.
#[test]
fn endpoints_filtered_out_do_not_hold_the_best_rank() {
    let failover = "{mode: Failover, routingPreferences: [Region, Zone]}";
    let endpoints = [
        workload(
            "same-zone",
            "locality: {region: r1, zone: z1}\nstatus: Unhealthy",
        ),
        workload(
            "same-region",
            "locality: {region: r1, zone: z2}\ncapacity: 0",
        ),
        located("elsewhere", "r2", "z1"),
    ];
    assert_eq!(
        picked(failover, Some(&source()), &endpoints),
        uids(["elsewhere"])
    );
}

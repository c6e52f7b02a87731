//! Istio's fields beyond the lab's subset: locality-aware endpoint picks, IP families, CIDR
//! VIPs, host-network workloads, the fields accepted but not acted on, and the whole model
//! shown back.

use super::super::*;
use super::{FILE, SERVICES, addr, ip, parse};
use std::collections::{BTreeMap, HashSet};

const DRAWS: usize = 2000;

/// The endpoints `DRAWS` picks choose for a connection from the workload `source` (a uid, if
/// known) to `destination` (the address of a service).
fn picks<'a>(config: &'a MeshConfig, source: Option<&str>, destination: &str) -> Vec<Endpoint<'a>> {
    let destination = addr(destination);
    let service = config.service_at(destination).expect("a service there");
    let source = source.map(|uid| config.workload_by_uid(uid).expect("the source"));
    (0..DRAWS)
        .filter_map(|_| config.pick_endpoint(service, source, destination))
        .collect()
}

/// The addresses those picks connect to.
fn picked_addresses(
    config: &MeshConfig,
    source: Option<&str>,
    destination: &str,
) -> HashSet<SocketAddr> {
    let picks = picks(config, source, destination);
    picks.iter().map(|endpoint| endpoint.address).collect()
}

fn addrs<const N: usize>(addresses: [&str; N]) -> HashSet<SocketAddr> {
    addresses.into_iter().map(addr).collect()
}

/// The key of the service at `address`, if any.
fn service_key_at<'a>(config: &'a MeshConfig, address: &str) -> Option<&'a str> {
    config
        .service_at(addr(address))
        .map(|service| &*service.key)
}

/// The model with these entries (YAML each), none refused.
fn model(workloads: &[&str], services: &[&str]) -> MeshConfig {
    let workloads = workloads
        .iter()
        .map(|text| Change::Workload(Arc::new(serde_yaml_ng::from_str(text).unwrap())));
    let services = services
        .iter()
        .map(|text| Change::Service(Arc::new(serde_yaml_ng::from_str(text).unwrap())));
    let updated = MeshConfig::default().updated(workloads.chain(services).collect());
    assert!(updated.refused.is_empty(), "{:?}", updated.refused);
    updated.config
}

const LOCALITIES: &str = "\
workloads:
- {uid: client, name: client, namespace: demo, workloadIps: [10.1.0.1],
   locality: {region: r1, zone: z1}}
- {uid: near, name: near, namespace: demo, workloadIps: [10.1.0.2],
   locality: {region: r1, zone: z1}, services: {demo/lb: {}}}
- {uid: far, name: far, namespace: demo, workloadIps: [10.1.0.3],
   locality: {region: r2, zone: z1}, services: {demo/lb: {}}}
services:
- {name: lb, namespace: demo, hostname: lb, vips: [10.96.1.1], ports: {80: 0},
   loadBalancer: {mode: Failover, routingPreferences: [Region, Zone]}}
";

#[test]
fn pick_endpoint_ranks_endpoints_by_the_source_workloads_locality() {
    let config = parse(LOCALITIES).unwrap();
    assert_eq!(
        picked_addresses(&config, Some("client"), "10.96.1.1:80"),
        addrs(["10.1.0.2:80"])
    );
}

/// A dual-stack endpoint and a v4-only one behind VIPs of both families; `FAMILIES` is the
/// service's `ipFamilies` line.
const FAMILIES: &str = "\
workloads:
- {uid: dual, name: dual, namespace: demo, workloadIps: [10.3.0.1, 'fd00:3::1'],
   services: {demo/families: {}}}
- {uid: v4-only, name: v4-only, namespace: demo, workloadIps: [10.3.0.2],
   services: {demo/families: {}}}
services:
- name: families
  namespace: demo
  hostname: families
  vips: [10.96.3.1, 'fd00:96::1']
  ports: {80: 0}
  FAMILIES
";

fn with_families(families: &str) -> MeshConfig {
    parse(&FAMILIES.replace("FAMILIES", families)).unwrap()
}

#[test]
fn an_ipv4_service_picks_the_v4_address_of_a_dual_stack_endpoint() {
    let config = with_families("ipFamilies: IPv4");
    assert_eq!(
        picked_addresses(&config, None, "[fd00:96::1]:80"),
        addrs(["10.3.0.1:80", "10.3.0.2:80"])
    );
}

#[test]
fn a_v6_destination_picks_the_v6_address_under_dual_or_unset_families() {
    for families in ["ipFamilies: Dual", ""] {
        let config = with_families(families);
        assert_eq!(
            picked_addresses(&config, None, "[fd00:96::1]:80"),
            addrs(["[fd00:3::1]:80", "10.3.0.2:80"]),
            "{families:?}"
        );
    }
}

#[test]
fn an_ipv6_service_skips_a_v4_only_endpoint() {
    let config = with_families("ipFamilies: IPv6");
    assert_eq!(
        picked_addresses(&config, None, "10.96.3.1:80"),
        addrs(["[fd00:3::1]:80"])
    );
}

#[test]
fn a_service_passes_through_only_in_passthrough_mode() {
    let cases = [
        ("loadBalancer: {mode: Passthrough}", true),
        (
            "loadBalancer: {mode: Strict, routingPreferences: [Zone]}",
            false,
        ),
        ("", false),
    ];
    for (balancer, passes) in cases {
        let text = format!("name: s\nnamespace: demo\nhostname: s\nports: {{80: 0}}\n{balancer}");
        let service: Service = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(service.passes_through(), passes, "{balancer:?}");
    }
}

/// A /16 with a /24 inside it, a v6 prefix, and a workload inside the /16.
const CIDRS: &str = "\
workloads:
- {uid: inside, name: inside, namespace: demo, workloadIps: [10.10.1.5]}
services:
- {name: wide, namespace: demo, hostname: wide, cidrVips: [/10.10.0.0/16], ports: {80: 0}}
- {name: narrow, namespace: demo, hostname: narrow, cidrVips: [net1/10.10.2.0/24],
   ports: {80: 0}}
- {name: v6, namespace: demo, hostname: v6, cidrVips: ['fd00:10::/64'], ports: {80: 0}}
";

#[test]
fn an_address_inside_a_cidr_vip_is_the_service_and_one_outside_is_not() {
    let config = parse(CIDRS).unwrap();
    assert_eq!(service_key_at(&config, "10.10.3.4:80"), Some("demo/wide"));
    assert_eq!(service_key_at(&config, "[fd00:10::7]:80"), Some("demo/v6"));
    assert_eq!(service_key_at(&config, "10.11.0.1:80"), None);
    assert_eq!(service_key_at(&config, "[fd00:11::7]:80"), None);
}

#[test]
fn the_longest_cidr_prefix_wins() {
    let config = parse(CIDRS).unwrap();
    assert_eq!(service_key_at(&config, "10.10.2.7:80"), Some("demo/narrow"));
}

#[test]
fn a_workloads_own_ip_inside_a_cidr_vip_is_not_the_service() {
    let config = parse(CIDRS).unwrap();
    assert_eq!(service_key_at(&config, "10.10.1.5:80"), None);
    assert_eq!(service_key_at(&config, "10.10.1.6:80"), Some("demo/wide"));
}

#[test]
fn a_port_the_cidr_service_does_not_serve_is_not_matched() {
    let config = parse(CIDRS).unwrap();
    assert_eq!(service_key_at(&config, "10.10.3.4:81"), None);
}

#[test]
fn a_second_service_with_the_same_prefix_is_refused_naming_the_field() {
    let text = format!(
        "{CIDRS}- {{name: again, namespace: demo, hostname: again, cidrVips: [10.10.2.0/24], ports: {{80: 0}}}}\n"
    );
    let err = parse(&text)
        .err()
        .expect("the config is refused")
        .to_string();
    assert!(err.contains("field cidrVips"), "{err}");
    assert!(err.contains("demo/narrow"), "{err}");
}

/// A prefix written with host bits (`10.20.0.1/16`) holds every address of its prefix.
#[test]
fn a_cidr_vip_with_host_bits_holds_its_prefix() {
    let text = "services:\n- {name: s, namespace: demo, hostname: s, cidrVips: [10.20.0.1/16], ports: {80: 0}}\n";
    let config = parse(text).unwrap();
    assert_eq!(service_key_at(&config, "10.20.5.5:80"), Some("demo/s"));
}

/// Two workloads on one node's network, both endpoints of a service.
const HOST_NETWORK: [&str; 2] = [
    "{uid: h1, name: h1, namespace: demo, workloadIps: [192.168.0.10], networkMode: HostNetwork,
      services: {demo/node-svc: {}}}",
    "{uid: h2, name: h2, namespace: demo, workloadIps: [192.168.0.10], networkMode: HostNetwork,
      services: {demo/node-svc: {}}}",
];
const NODE_SERVICE: &str =
    "{name: node-svc, namespace: demo, hostname: node-svc, vips: [10.96.5.1], ports: {80: 0}}";

/// The uids of the endpoints picks choose.
fn picked_uids(config: &MeshConfig, destination: &str) -> HashSet<String> {
    let picks = picks(config, None, destination);
    picks.iter().map(|e| e.workload.uid.to_string()).collect()
}

#[test]
fn host_network_workloads_may_share_one_ip() {
    let config = model(&HOST_NETWORK, &[NODE_SERVICE]);
    assert_eq!(config.workload_count(), 2);
}

#[test]
fn host_network_workloads_may_share_one_ip_in_a_file() {
    let text = format!(
        "workloads:\n- {}\n- {}\nservices:\n- {NODE_SERVICE}\n",
        HOST_NETWORK[0], HOST_NETWORK[1]
    );
    let config = parse(&text).unwrap();
    assert_eq!(config.workload_count(), 2);
}

#[test]
fn a_host_network_workload_is_not_found_by_its_ip() {
    let config = model(&HOST_NETWORK, &[NODE_SERVICE]);
    assert!(config.workload_by_ip(ip("192.168.0.10")).is_none());
}

#[test]
fn host_network_workloads_are_still_endpoints_of_their_service() {
    let config = model(&HOST_NETWORK, &[NODE_SERVICE]);
    let expected: HashSet<String> = ["h1".into(), "h2".into()].into();
    assert_eq!(picked_uids(&config, "10.96.5.1:80"), expected);
}

#[test]
fn removing_one_host_network_workload_keeps_the_other() {
    let config = model(&HOST_NETWORK, &[NODE_SERVICE]);
    let config = config
        .updated(vec![Change::RemoveWorkload("h1".to_owned())])
        .config;
    assert!(config.workload_by_uid("h2").is_some());
    assert_eq!(picked_uids(&config, "10.96.5.1:80"), ["h2".into()].into());
}

/// Every field Istio's model added, set.
const EVERY_NEW_FIELD: &str = "\
workloads:
- uid: gw
  name: gw
  namespace: demo
  workloadIps: [10.2.0.1, 'fd00:2::1']
  hostname: gw.example
  locality: {region: r1, zone: z1, subzone: s1}
  capacity: 3
  networkMode: HostNetwork
  networkGateway: {destination: net2/10.2.0.99, hboneMtlsPort: 15009}
  nativeTunnel: true
  applicationTunnel: {protocol: PROXY, port: 15088}
  services: {demo/every: {80: 8080}}
services:
- name: every
  namespace: demo
  hostname: every
  vips: [net1/10.96.2.1]
  cidrVips: [net1/10.97.0.0/16]
  ports: {80: 0}
  loadBalancer:
    routingPreferences: [Region, Zone, Subzone, Node, Cluster, Network]
    mode: Failover
    healthPolicy: AllowAll
  ipFamilies: Dual
  canonical: true
  endpoints: {gw: {workloadUid: gw, port: {80: 8080}, status: Unhealthy}}
";

#[test]
fn every_new_field_round_trips_through_serde() {
    let config = parse(EVERY_NEW_FIELD).unwrap();
    let entries = (config.sorted_workloads(), config.sorted_services());
    let text = serde_yaml_ng::to_string(&entries).unwrap();
    let again: (Vec<Workload>, Vec<Service>) = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(again, entries);
    for field in [
        "subzone",
        "capacity",
        "networkMode",
        "networkGateway",
        "nativeTunnel",
        "applicationTunnel",
        "cidrVips",
        "routingPreferences",
        "healthPolicy",
        "ipFamilies",
        "canonical",
        "endpoints",
    ] {
        assert!(text.contains(field), "{field} is missing from\n{text}");
    }
}

/// What `EVERY_NEW_FIELD` sets that this build does not act on.
const NOT_USED: [&str; 4] = [
    "service.canonical",
    "service.endpoints",
    "workload.hostname",
    "workload.nativeTunnel",
];

#[test]
fn fields_set_but_not_acted_on_are_reported() {
    let config = parse(EVERY_NEW_FIELD).unwrap();
    assert_eq!(config.accepted_not_used().collect::<Vec<_>>(), NOT_USED);
    let plain = parse(SERVICES).unwrap();
    assert_eq!(plain.accepted_not_used().count(), 0);
}

#[test]
fn fields_not_acted_on_stay_reported_once_their_entries_are_removed() {
    let config = parse(EVERY_NEW_FIELD).unwrap();
    let emptied = config
        .updated(vec![
            Change::RemoveWorkload("gw".to_owned()),
            Change::RemoveService("demo/every".to_owned()),
        ])
        .config;
    assert_eq!(emptied.workload_count() + emptied.service_count(), 0);
    assert_eq!(emptied.accepted_not_used().collect::<Vec<_>>(), NOT_USED);
    assert_eq!(emptied.accepted_not_used_since(&config).count(), 0);
}

/// Istio's whole model, as the fake istiod's test also sends it over xDS.
const EVERY_FIELD: &str = include_str!("../../../../../tests/fixtures/istio-every-field.yaml");

/// What `/config_dump` shows (the model's sorted entries, serialized) is the file again, every
/// field; the fields without behaviour yet are listed.
#[test]
fn the_model_shows_every_field_of_istios_model_back() {
    let file = MeshFile::parse(Path::new(FILE), EVERY_FIELD).unwrap();
    let config = parse(EVERY_FIELD).unwrap();
    let shown = serde_json::to_string(&(config.sorted_workloads(), config.sorted_services()));
    let read_again: (Vec<Workload>, Vec<Service>) = serde_json::from_str(&shown.unwrap()).unwrap();
    let mut workloads = file.workloads().to_vec();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services = file.services().to_vec();
    services.sort_by_key(Service::key);
    assert_eq!(read_again, (workloads, services));
    assert_eq!(
        config.accepted_not_used().collect::<Vec<_>>(),
        [
            "service.canonical",
            "workload.hostname",
            "workload.nativeTunnel",
        ]
    );
}

/// A service with a primary waypoint at 10.0.9.1 and the weighted set `weighted` (YAML).
fn with_waypoints(weighted: &str) -> Service {
    let text = format!(
        "{{name: s, namespace: demo, hostname: s, vips: [10.96.9.1], ports: {{80: 0}}, \
          waypoint: {{destination: /10.0.9.1}}, weightedWaypoints: {weighted}}}"
    );
    serde_yaml_ng::from_str(&text).unwrap()
}

/// How many of `DRAWS` connections each waypoint address takes.
fn waypoint_shares(service: &Service) -> BTreeMap<IpAddr, usize> {
    let mut shares = BTreeMap::new();
    for _ in 0..DRAWS {
        let waypoint = service.waypoint_for_connection().expect("a waypoint");
        let GatewayDestination::Address(address) = &waypoint.destination else {
            panic!("waypoints here are addresses")
        };
        *shares.entry(address.ip).or_default() += 1;
    }
    shares
}

#[test]
fn each_connection_takes_a_weighted_waypoint_by_weight() {
    let service = with_waypoints(
        "[{waypoint: {destination: /10.0.9.2}, weight: 3}, \
          {waypoint: {destination: /10.0.9.3}, weight: 1}]",
    );
    let shares = waypoint_shares(&service);
    let canary = shares[&ip("10.0.9.3")] as f64 / DRAWS as f64;
    assert!((0.15..0.35).contains(&canary), "{shares:?}");
    assert!(!shares.contains_key(&ip("10.0.9.1")), "{shares:?}");
    assert_eq!(service.waypoints().count(), 3);
}

#[test]
fn an_empty_or_weightless_set_leaves_the_primary_waypoint() {
    for weighted in ["[]", "[{waypoint: {destination: /10.0.9.2}, weight: 0}]"] {
        let shares = waypoint_shares(&with_waypoints(weighted));
        assert_eq!(
            shares,
            BTreeMap::from([(ip("10.0.9.1"), DRAWS)]),
            "{weighted}"
        );
    }
}

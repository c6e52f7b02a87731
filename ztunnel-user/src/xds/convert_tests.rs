//! `convert` on resources as istiod sends them, encoded for real by the generated types: each
//! gives the entry the equivalent local-config YAML gives, bad ones are refused by name, and a
//! converted batch makes a model that finds what it describes.

use super::convert::{
    address_change, address_removal, authorization_change, authorization_removal,
};
use super::proto::istio::security::{
    self as wire_authz, Authorization, Clause, Rule, ServiceAccountMatch, StringMatch,
    string_match::MatchType,
};
use super::proto::istio::workload::{
    Address, AppProtocol, GatewayAddress, IpFamilies, LoadBalancing, NamespacedHostname,
    NetworkAddress, NetworkMode, Port, PortList, Service, TunnelProtocol, Workload, WorkloadStatus,
    WorkloadType, address, gateway_address, load_balancing,
};
use crate::mesh::authz::Policy;
use crate::mesh::config::{self, Change, MeshConfig};
use prost_types::Any;
use std::collections::HashMap;
use std::sync::Arc;

const A1: &str = "Kubernetes//Pod/demo/a1";
const ECHO: &str = "demo/echo.demo.svc.cluster.local";

fn v4(a: u8, b: u8, c: u8, d: u8) -> Vec<u8> {
    vec![a, b, c, d]
}

/// fd00::<last>, as 16 bytes.
fn v6(last: u8) -> Vec<u8> {
    let mut bytes = vec![0; 16];
    bytes[0] = 0xfd;
    bytes[15] = last;
    bytes
}

fn workload_any(workload: Workload) -> Any {
    Any::from_msg(&Address {
        r#type: Some(address::Type::Workload(workload)),
    })
    .unwrap()
}

fn service_any(service: Service) -> Any {
    Any::from_msg(&Address {
        r#type: Some(address::Type::Service(service)),
    })
    .unwrap()
}

fn policy_any(policy: Authorization) -> Any {
    Any::from_msg(&policy).unwrap()
}

/// Pod a1 of the lab as istiod sends it (a port's app_protocol set too, which no proxy reads).
fn a1() -> Workload {
    Workload {
        uid: A1.into(),
        name: "a1".into(),
        namespace: "demo".into(),
        service_account: "sa-a".into(),
        addresses: vec![v4(10, 244, 1, 2)],
        tunnel_protocol: TunnelProtocol::Hbone.into(),
        node: "node1".into(),
        waypoint: Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Address(NetworkAddress {
                network: String::new(),
                address: v4(10, 244, 2, 4),
                length: None,
            })),
            hbone_mtls_port: 15008,
        }),
        services: HashMap::from([(
            ECHO.to_owned(),
            PortList {
                ports: vec![Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: AppProtocol::Http11.into(),
                }],
            },
        )]),
        authorization_policies: vec!["demo/b1-only".into()],
        status: WorkloadStatus::Healthy.into(),
        canonical_name: "a".into(),
        canonical_revision: "latest".into(),
        workload_type: WorkloadType::Pod.into(),
        workload_name: "a".into(),
        cluster_id: "Kubernetes".into(),
        network_mode: NetworkMode::Standard.into(),
        capacity: Some(1),
        ..Default::default()
    }
}

const A1_YAML: &str = "
uid: Kubernetes//Pod/demo/a1
name: a1
namespace: demo
serviceAccount: sa-a
workloadIps: [10.244.1.2]
protocol: HBONE
node: node1
waypoint: {destination: /10.244.2.4, hboneMtlsPort: 15008}
services:
  demo/echo.demo.svc.cluster.local: {80: 8080}
authorizationPolicies: [demo/b1-only]
canonicalName: a
canonicalRevision: latest
workloadType: pod
workloadName: a
clusterId: Kubernetes
";

fn yaml_workload(text: &str) -> Change {
    Change::Workload(Arc::new(serde_yaml_ng::from_str(text).unwrap()))
}

#[test]
fn a_pod_as_istiod_sends_it_is_the_workload_of_the_local_config() {
    let change = address_change(A1, &workload_any(a1())).unwrap();
    assert_eq!(change, yaml_workload(A1_YAML));
}

/// Protobuf's unset fields take the local config's defaults: trust domain, service account,
/// a waypoint's HBONE port. A sidecar's mutual TLS is plain TCP to this proxy, and an
/// IPv6 address is 16 bytes.
#[test]
fn unset_fields_take_the_defaults_of_the_local_config() {
    let minimal = Workload {
        uid: "Kubernetes//Pod/legacy/u1".into(),
        name: "u1".into(),
        namespace: "legacy".into(),
        addresses: vec![v6(3)],
        tunnel_protocol: TunnelProtocol::LegacyIstioMtls.into(),
        status: WorkloadStatus::Unhealthy.into(),
        waypoint: Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: "legacy".into(),
                hostname: "wp.legacy.svc.cluster.local".into(),
            })),
            hbone_mtls_port: 0,
        }),
        ..Default::default()
    };
    let change = address_change("Kubernetes//Pod/legacy/u1", &workload_any(minimal)).unwrap();
    let yaml = "{uid: Kubernetes//Pod/legacy/u1, name: u1, namespace: legacy, \
                workloadIps: ['fd00::3'], status: Unhealthy, workloadType: deployment, \
                waypoint: {destination: \
                  {namespace: legacy, hostname: wp.legacy.svc.cluster.local}}}";
    assert_eq!(change, yaml_workload(yaml));
    let Change::Workload(workload) = change else {
        unreachable!()
    };
    assert_eq!(
        workload.identity().to_string(),
        "spiffe://cluster.local/ns/legacy/sa/default"
    );
}

/// The lab's echo service, with an IPv6 VIP on another network, a waypoint by hostname,
/// failover load balancing and both IP families.
fn echo() -> Service {
    Service {
        name: "echo".into(),
        namespace: "demo".into(),
        hostname: "echo.demo.svc.cluster.local".into(),
        addresses: vec![
            NetworkAddress {
                network: String::new(),
                address: v4(10, 96, 0, 10),
                length: None,
            },
            NetworkAddress {
                network: "net1".into(),
                address: v6(0x10),
                length: None,
            },
        ],
        ports: vec![
            Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: AppProtocol::Http2.into(),
            },
            Port {
                service_port: 81,
                target_port: 0,
                app_protocol: AppProtocol::Unknown.into(),
            },
        ],
        subject_alt_names: vec!["spiffe://cluster.local/ns/demo/sa/extra".into()],
        waypoint: Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: "demo".into(),
                hostname: "waypoint.demo.svc.cluster.local".into(),
            })),
            hbone_mtls_port: 15008,
        }),
        load_balancing: Some(LoadBalancing {
            routing_preference: vec![load_balancing::Scope::Zone.into()],
            mode: load_balancing::Mode::Failover.into(),
            ..Default::default()
        }),
        ip_families: IpFamilies::Dual.into(),
        ..Default::default()
    }
}

#[test]
fn a_service_as_istiod_sends_it_is_the_service_of_the_local_config() {
    let change = address_change(ECHO, &service_any(echo())).unwrap();
    let yaml = "
name: echo
namespace: demo
hostname: echo.demo.svc.cluster.local
vips: [/10.96.0.10, 'net1/fd00::10']
ports: {80: 8080, 81: 0}
subjectAltNames: [spiffe://cluster.local/ns/demo/sa/extra]
waypoint: {destination: {namespace: demo, hostname: waypoint.demo.svc.cluster.local}}
loadBalancer: {routingPreferences: [Zone], mode: Failover}
ipFamilies: Dual
";
    let expected: config::Service = serde_yaml_ng::from_str(yaml).unwrap();
    assert_eq!(change, Change::Service(Arc::new(expected)));
}

fn exact(s: &str) -> StringMatch {
    StringMatch {
        match_type: Some(MatchType::Exact(s.into())),
    }
}

fn cidr(address: Vec<u8>, length: u32) -> wire_authz::Address {
    wire_authz::Address { address, length }
}

/// A policy with every kind of match: principals, namespaces, service accounts, source and
/// destination CIDRs, ports, each with its `not_` twin, in two rules.
fn rich_policy(scope: wire_authz::Scope, action: wire_authz::Action) -> Authorization {
    let identities = wire_authz::Match {
        principals: vec![
            exact("cluster.local/ns/demo/sa/sa-a"),
            StringMatch {
                match_type: Some(MatchType::Prefix("cluster.local/ns/demo/".into())),
            },
        ],
        not_principals: vec![StringMatch {
            match_type: Some(MatchType::Suffix("/sa/evil".into())),
        }],
        namespaces: vec![exact("demo")],
        not_namespaces: vec![StringMatch {
            match_type: Some(MatchType::Presence(())),
        }],
        ..Default::default()
    };
    let addresses = wire_authz::Match {
        source_ips: vec![cidr(v4(10, 244, 0, 0), 16)],
        not_source_ips: vec![cidr(v4(10, 244, 9, 9), 32)],
        destination_ips: vec![cidr(v6(0), 64)],
        not_destination_ips: vec![cidr(v4(10, 96, 0, 10), 32)],
        ..Default::default()
    };
    let ports_and_accounts = wire_authz::Match {
        destination_ports: vec![8080],
        not_destination_ports: vec![9090],
        service_accounts: vec![ServiceAccountMatch {
            namespace: "demo".into(),
            service_account: "sa-a".into(),
        }],
        not_service_accounts: vec![ServiceAccountMatch {
            namespace: "demo".into(),
            service_account: "sa-b".into(),
        }],
        ..Default::default()
    };
    let legacy = wire_authz::Match {
        namespaces: vec![StringMatch {
            match_type: Some(MatchType::Prefix("leg".into())),
        }],
        ..Default::default()
    };
    Authorization {
        name: "p".into(),
        namespace: "demo".into(),
        scope: scope.into(),
        action: action.into(),
        rules: vec![
            Rule {
                clauses: vec![
                    Clause {
                        matches: vec![identities, addresses],
                    },
                    Clause {
                        matches: vec![ports_and_accounts],
                    },
                ],
            },
            Rule {
                clauses: vec![Clause {
                    matches: vec![legacy],
                }],
            },
        ],
        dry_run: true,
    }
}

/// `rich_policy`, named as istiod names it and converted.
fn policy_change(scope: wire_authz::Scope, action: wire_authz::Action) -> Change {
    authorization_change("demo/p", &policy_any(rich_policy(scope, action))).unwrap()
}

const RICH_POLICY_YAML: &str = "
name: p
namespace: demo
scope: SCOPE
action: ACTION
dryRun: true
rules:
- - - principals: [{Exact: cluster.local/ns/demo/sa/sa-a}, {Prefix: cluster.local/ns/demo/}]
      notPrincipals: [{Suffix: /sa/evil}]
      namespaces: [{Exact: demo}]
      notNamespaces: [{Presence: []}]
    - sourceIps: [10.244.0.0/16]
      notSourceIps: [10.244.9.9]
      destinationIps: ['fd00::/64']
      notDestinationIps: [10.96.0.10/32]
  - - destinationPorts: [8080]
      notDestinationPorts: [9090]
      serviceAccounts: [{namespace: demo, serviceAccount: sa-a}]
      notServiceAccounts: [{namespace: demo, serviceAccount: sa-b}]
- - - namespaces: [{Prefix: leg}]
";

#[test]
fn a_policy_of_each_scope_and_action_is_the_policy_of_the_local_config() {
    use wire_authz::{Action, Scope};
    let scopes = [
        (Scope::Global, "Global"),
        (Scope::Namespace, "Namespace"),
        (Scope::WorkloadSelector, "WorkloadSelector"),
    ];
    for (scope, scope_name) in scopes {
        for (action, action_name) in [(Action::Allow, "Allow"), (Action::Deny, "Deny")] {
            let change = policy_change(scope, action);
            let yaml = RICH_POLICY_YAML
                .replace("SCOPE", scope_name)
                .replace("ACTION", action_name);
            let expected: Policy = serde_yaml_ng::from_str(&yaml).unwrap();
            assert_eq!(
                change,
                Change::Policy(Arc::new(expected)),
                "{scope_name} {action_name}"
            );
        }
    }
}

/// Each bad resource is refused with its name first, then what is wrong with it.
#[test]
fn bad_resources_are_refused_by_name() {
    let garbage = Any {
        type_url: "type.googleapis.com/istio.workload.Address".into(),
        value: vec![0xff, 0xff, 0xff],
    };
    let five_bytes = Workload {
        addresses: vec![vec![10, 244, 1, 2, 0]],
        ..a1()
    };
    let unknown_protocol = Workload {
        tunnel_protocol: 99,
        ..a1()
    };
    let unknown_type = Workload {
        workload_type: 9,
        ..a1()
    };
    let no_namespace = Workload {
        namespace: String::new(),
        ..a1()
    };
    let bad_waypoint = Workload {
        waypoint: Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Address(NetworkAddress {
                network: String::new(),
                address: vec![10, 244, 2],
                length: None,
            })),
            hbone_mtls_port: 15008,
        }),
        ..a1()
    };
    let no_destination = Workload {
        waypoint: Some(GatewayAddress {
            destination: None,
            hbone_mtls_port: 15008,
        }),
        ..a1()
    };
    let big_port = Workload {
        services: HashMap::from([(
            ECHO.to_owned(),
            PortList {
                ports: vec![Port {
                    service_port: 80,
                    target_port: 70_000,
                    app_protocol: 0,
                }],
            },
        )]),
        ..a1()
    };
    let long_prefix = Service {
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: v4(10, 97, 0, 0),
            length: Some(33),
        }],
        ..echo()
    };
    let unspecified_scope = Service {
        load_balancing: Some(LoadBalancing {
            routing_preference: vec![2, 0],
            ..Default::default()
        }),
        ..echo()
    };
    let cases: Vec<(Any, &str)> = vec![
        (garbage, "cannot decode"),
        (
            policy_any(rich_policy(
                wire_authz::Scope::Global,
                wire_authz::Action::Deny,
            )),
            "type \"type.googleapis.com/istio.security.Authorization\" where \
             \"type.googleapis.com/istio.workload.Address\" was expected",
        ),
        (
            workload_any(five_bytes),
            "addresses[0]: an address of 5 bytes (an IP is 4 or 16)",
        ),
        (
            workload_any(unknown_protocol),
            "tunnel_protocol: unknown value 99",
        ),
        (workload_any(unknown_type), "workload_type: unknown value 9"),
        (
            workload_any(no_namespace),
            "field namespace must not be empty",
        ),
        (
            workload_any(bad_waypoint),
            "waypoint.address: an address of 3 bytes",
        ),
        (
            workload_any(no_destination),
            "waypoint: neither an address nor a hostname",
        ),
        (
            workload_any(big_port),
            "services[\"demo/echo.demo.svc.cluster.local\"]: 70000 is not a port",
        ),
        (
            service_any(long_prefix),
            "addresses[0]: prefix length 33 is longer than 10.97.0.0",
        ),
        (
            service_any(unspecified_scope),
            "load_balancing.routing_preference[1]: UNSPECIFIED_SCOPE is not a scope",
        ),
        (
            Any::from_msg(&Address { r#type: None }).unwrap(),
            "neither a workload nor a service",
        ),
    ];
    for (any, expected) in cases {
        let err = address_change("the-name", &any).unwrap_err().to_string();
        assert!(err.starts_with("the-name: "), "{err}");
        assert!(err.contains(expected), "{err} should contain {expected}");
    }

    let policy = || rich_policy(wire_authz::Scope::Namespace, wire_authz::Action::Allow);
    let mut unknown_scope = policy();
    unknown_scope.scope = 7;
    let mut unknown_action = policy();
    unknown_action.action = 2;
    let mut short_address = policy();
    short_address.rules[0].clauses[0].matches[1].source_ips[0].address = vec![10; 5];
    let mut long_prefix = policy();
    long_prefix.rules[0].clauses[0].matches[1].not_source_ips[0].length = 33;
    let mut big_port = policy();
    big_port.rules[0].clauses[1].matches[0].destination_ports = vec![8080, 65_536];
    let mut zero_port = policy();
    zero_port.rules[0].clauses[1].matches[0].not_destination_ports = vec![0];
    let mut no_kind = policy();
    no_kind.rules[1].clauses[0].matches[0].namespaces = vec![StringMatch { match_type: None }];
    let mut slash = policy();
    slash.name = "a/b".into();
    let cases: Vec<(Any, &str)> = vec![
        (
            workload_any(a1()),
            "where \"type.googleapis.com/istio.security.Authorization\" was expected",
        ),
        (policy_any(unknown_scope), "scope: unknown value 7"),
        (policy_any(unknown_action), "action: unknown value 2"),
        (
            policy_any(short_address),
            "rules[0][0][1].source_ips[0]: an address of 5 bytes",
        ),
        (
            policy_any(long_prefix),
            "rules[0][0][1].not_source_ips[0]: prefix length 33 is longer than 10.244.9.9",
        ),
        (
            policy_any(big_port),
            "rules[0][1][0].destination_ports[1]: 65536 is not a port",
        ),
        (
            policy_any(zero_port),
            "rules[0][1][0].notDestinationPorts: port 0 is not a port",
        ),
        (
            policy_any(no_kind),
            "rules[1][0][0].namespaces[0]: a string match of no kind",
        ),
        (policy_any(slash), "field name must not contain '/'"),
    ];
    for (any, expected) in cases {
        let err = authorization_change("demo/p", &any)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("demo/p: "), "{err}");
        assert!(err.contains(expected), "{err} should contain {expected}");
    }
}

/// Every prefix of a real encoding, and every byte of it flipped, is converted or refused:
/// never a panic.
#[test]
fn damaged_bytes_never_panic() {
    let good = workload_any(a1());
    for end in 0..good.value.len() {
        let truncated = Any {
            value: good.value[..end].to_vec(),
            ..good.clone()
        };
        let _ = address_change(A1, &truncated);
    }
    for at in 0..good.value.len() {
        let mut flipped = good.clone();
        flipped.value[at] ^= 0xff;
        let _ = address_change(A1, &flipped);
    }
}

/// A response's resources, converted and applied as one batch: the workload is found by its IP,
/// the service by its VIP with the workload behind it, and the policy is in force.
#[test]
fn a_converted_batch_makes_a_model_that_finds_its_entries() {
    let b1 = Workload {
        uid: "Kubernetes//Pod/demo/b1".into(),
        name: "b1".into(),
        service_account: "sa-b".into(),
        addresses: vec![v4(10, 244, 2, 2)],
        node: "node2".into(),
        waypoint: None,
        ..a1()
    };
    let a1_only = Workload {
        services: HashMap::new(),
        ..a1()
    };
    let changes = vec![
        address_change(A1, &workload_any(a1_only)).unwrap(),
        address_change("Kubernetes//Pod/demo/b1", &workload_any(b1)).unwrap(),
        address_change(ECHO, &service_any(echo())).unwrap(),
        policy_change(wire_authz::Scope::Namespace, wire_authz::Action::Deny),
    ];
    let updated = MeshConfig::default().updated(changes);
    assert!(updated.refused.is_empty(), "{:?}", updated.refused);
    assert_eq!(updated.touched.policies, 1);
    let config = updated.config;
    let a1 = config
        .workload_by_ip("10.244.1.2".parse().unwrap())
        .unwrap();
    assert_eq!(&*a1.uid, A1);
    let echo = config.service_at("10.96.0.10:80".parse().unwrap()).unwrap();
    assert_eq!(echo.key(), ECHO);
    assert!(
        config
            .service_at("[fd00::10]:81".parse().unwrap())
            .is_some()
    );
    let endpoint = config
        .pick_endpoint(echo, None, "10.96.0.10:80".parse().unwrap())
        .unwrap();
    assert_eq!(endpoint.address, "10.244.2.2:8080".parse().unwrap());
}

/// A removed Address name is a workload's uid if one has it, else a service's key; a name
/// neither has is nothing to remove. A removed Authorization name is the policy's key.
#[test]
fn removals_find_what_the_name_names() {
    let changes = vec![
        address_change(A1, &workload_any(a1())).unwrap(),
        address_change(ECHO, &service_any(echo())).unwrap(),
        policy_change(wire_authz::Scope::Global, wire_authz::Action::Allow),
    ];
    let config = MeshConfig::default().updated(changes).config;
    assert_eq!(
        address_removal(&config, A1),
        Some(Change::RemoveWorkload(A1.to_owned()))
    );
    assert_eq!(
        address_removal(&config, ECHO),
        Some(Change::RemoveService(ECHO.to_owned()))
    );
    assert_eq!(address_removal(&config, "Kubernetes//Pod/demo/gone"), None);
    assert_eq!(
        address_removal(&config, "demo/gone.demo.svc.cluster.local"),
        None
    );
    assert_eq!(
        authorization_removal("demo/p"),
        Change::RemovePolicy("demo/p".to_owned())
    );

    let removals = [A1, ECHO]
        .into_iter()
        .filter_map(|name| address_removal(&config, name))
        .chain([authorization_removal("demo/p")])
        .collect();
    let updated = config.updated(removals);
    assert_eq!(updated.touched.policies, 1);
    let config = updated.config;
    assert_eq!((config.workload_count(), config.service_count()), (0, 0));
}

//! Table tests of Istio's semantics, the policy file shape, and the plaintext plan against the
//! engine.

use super::*;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{RngCore, SeedableRng};

const TD: &str = "cluster.local";

fn identity(namespace: &str, account: &str) -> Identity {
    Identity {
        trust_domain: TD.into(),
        namespace: namespace.into(),
        service_account: account.into(),
    }
}

fn policies(yaml: &str) -> Policies {
    let list: Vec<Policy> = serde_yaml_ng::from_str(yaml).expect("policies parse");
    for policy in &list {
        policy.validate().expect("policies are valid");
    }
    Policies::new(list)
}

/// One case: policies, the destination (namespace, selected keys), the client (source IP,
/// identity as `ns/sa`), the destination address, and whether it is allowed.
struct Case {
    name: &'static str,
    policies: &'static str,
    namespace: &'static str,
    selected: &'static [&'static str],
    source: &'static str,
    identity: Option<(&'static str, &'static str)>,
    destination: &'static str,
    allowed: bool,
}

const BASE: Case = Case {
    name: "",
    policies: "[]",
    namespace: "demo",
    selected: &[],
    source: "10.0.1.5",
    identity: Some(("demo", "sa-a")),
    destination: "10.0.2.2:8080",
    allowed: true,
};

fn allow(m: &str) -> String {
    format!("[{{name: p, namespace: demo, scope: Namespace, action: Allow, rules: [[[{{{m}}}]]]}}]")
}

fn deny(m: &str) -> String {
    format!("[{{name: p, namespace: demo, scope: Namespace, action: Deny, rules: [[[{{{m}}}]]]}}]")
}

fn leak(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

fn cases() -> Vec<Case> {
    let a = |m: &str| leak(allow(m));
    let d = |m: &str| leak(deny(m));
    vec![
        Case {
            name: "no policy allows",
            ..BASE
        },
        Case {
            name: "allow by exact principal",
            policies: a("principals: [{Exact: cluster.local/ns/demo/sa/sa-a}]"),
            ..BASE
        },
        Case {
            name: "allow by other principal denies",
            policies: a("principals: [{Exact: cluster.local/ns/demo/sa/sa-b}]"),
            allowed: false,
            ..BASE
        },
        Case {
            name: "principal prefix",
            policies: a("principals: [{Prefix: cluster.local/ns/demo/}]"),
            ..BASE
        },
        Case {
            name: "principal prefix with spiffe scheme never matches",
            policies: a("principals: [{Prefix: \"spiffe://\"}]"),
            allowed: false,
            ..BASE
        },
        Case {
            name: "principal suffix",
            policies: a("principals: [{Suffix: /sa/sa-a}]"),
            ..BASE
        },
        Case {
            name: "principal presence with identity",
            policies: a("principals: [{Presence: []}]"),
            ..BASE
        },
        Case {
            name: "principal presence without identity",
            policies: a("principals: [{Presence: []}]"),
            identity: None,
            allowed: false,
            ..BASE
        },
        Case {
            name: "principal any of several",
            policies: a("principals: [{Exact: x}, {Suffix: sa-a}]"),
            ..BASE
        },
        Case {
            name: "not principal excludes",
            policies: a("notPrincipals: [{Exact: cluster.local/ns/demo/sa/sa-a}]"),
            allowed: false,
            ..BASE
        },
        Case {
            name: "not principal without identity matches",
            policies: a("notPrincipals: [{Exact: cluster.local/ns/demo/sa/sa-a}]"),
            identity: None,
            ..BASE
        },
        Case {
            name: "not principal presence only plaintext",
            policies: a("notPrincipals: [{Presence: []}]"),
            identity: None,
            ..BASE
        },
        Case {
            name: "namespace exact",
            policies: a("namespaces: [{Exact: demo}]"),
            ..BASE
        },
        Case {
            name: "namespace other",
            policies: a("namespaces: [{Exact: other}]"),
            allowed: false,
            ..BASE
        },
        Case {
            name: "namespace prefix",
            policies: a("namespaces: [{Prefix: de}]"),
            ..BASE
        },
        Case {
            name: "namespace suffix",
            policies: a("namespaces: [{Suffix: mo}]"),
            ..BASE
        },
        Case {
            name: "namespace presence without identity",
            policies: a("namespaces: [{Presence: []}]"),
            identity: None,
            allowed: false,
            ..BASE
        },
        Case {
            name: "not namespace",
            policies: a("notNamespaces: [{Exact: demo}]"),
            allowed: false,
            ..BASE
        },
        Case {
            name: "not namespace without identity",
            policies: a("notNamespaces: [{Exact: demo}]"),
            identity: None,
            ..BASE
        },
        Case {
            name: "service account",
            policies: a("serviceAccounts: [{namespace: demo, serviceAccount: sa-a}]"),
            ..BASE
        },
        Case {
            name: "service account other namespace",
            policies: a("serviceAccounts: [{namespace: prod, serviceAccount: sa-a}]"),
            allowed: false,
            ..BASE
        },
        Case {
            name: "service account without identity",
            policies: a("serviceAccounts: [{namespace: demo, serviceAccount: sa-a}]"),
            identity: None,
            allowed: false,
            ..BASE
        },
        Case {
            name: "not service account",
            policies: a("notServiceAccounts: [{namespace: demo, serviceAccount: sa-a}]"),
            allowed: false,
            ..BASE
        },
        Case {
            name: "not service account other",
            policies: a("notServiceAccounts: [{namespace: demo, serviceAccount: sa-b}]"),
            ..BASE
        },
        Case {
            name: "source cidr",
            policies: a("sourceIps: [10.0.1.0/24]"),
            ..BASE
        },
        Case {
            name: "source bare address",
            policies: a("sourceIps: [10.0.1.5]"),
            ..BASE
        },
        Case {
            name: "source outside",
            policies: a("sourceIps: [10.0.9.0/24]"),
            allowed: false,
            ..BASE
        },
        Case {
            name: "not source",
            policies: a("notSourceIps: [10.0.1.0/24]"),
            allowed: false,
            ..BASE
        },
        Case {
            name: "v4-mapped source matches v4 cidr",
            policies: a("sourceIps: [10.0.1.0/24]"),
            source: "::ffff:10.0.1.5",
            ..BASE
        },
        Case {
            name: "v6 source",
            policies: a("sourceIps: [fd00::/64]"),
            source: "fd00::5",
            ..BASE
        },
        Case {
            name: "v6 source not in v4 cidr",
            policies: a("sourceIps: [0.0.0.0/0]"),
            source: "fd00::5",
            allowed: false,
            ..BASE
        },
        Case {
            name: "destination ip",
            policies: a("destinationIps: [10.0.2.0/24]"),
            ..BASE
        },
        Case {
            name: "not destination ip",
            policies: a("notDestinationIps: [10.0.2.2/32]"),
            allowed: false,
            ..BASE
        },
        Case {
            name: "destination port",
            policies: a("destinationPorts: [8080]"),
            ..BASE
        },
        Case {
            name: "destination port other",
            policies: a("destinationPorts: [9090]"),
            allowed: false,
            ..BASE
        },
        Case {
            name: "not destination port",
            policies: a("notDestinationPorts: [8080]"),
            allowed: false,
            ..BASE
        },
        Case {
            name: "fields are anded",
            policies: a("principals: [{Suffix: sa-a}], destinationPorts: [9090]"),
            allowed: false,
            ..BASE
        },
        Case {
            name: "matches are ored",
            policies: leak(allow(
                "destinationPorts: [9090]}, {principals: [{Suffix: sa-a}]",
            )),
            ..BASE
        },
        Case {
            name: "clauses are anded",
            policies: "[{name: p, namespace: demo, scope: Namespace, action: Allow, rules: [[[{destinationPorts: [8080]}], [{namespaces: [{Exact: other}]}]]]}]",
            allowed: false,
            ..BASE
        },
        Case {
            name: "rules are ored",
            policies: "[{name: p, namespace: demo, scope: Namespace, action: Allow, rules: [[[{destinationPorts: [1]}]], [[{destinationPorts: [8080]}]]]}]",
            ..BASE
        },
        Case {
            name: "empty clause matches",
            policies: "[{name: p, namespace: demo, scope: Namespace, action: Deny, rules: [[]]}]",
            allowed: false,
            ..BASE
        },
        Case {
            name: "empty match never matches",
            policies: "[{name: p, namespace: demo, scope: Namespace, action: Deny, rules: [[[{}]]]}]",
            ..BASE
        },
        Case {
            name: "no rules never matches",
            policies: "[{name: p, namespace: demo, scope: Namespace, action: Deny}]",
            ..BASE
        },
        Case {
            name: "allow without rules denies",
            policies: "[{name: p, namespace: demo, scope: Namespace, action: Allow}]",
            allowed: false,
            ..BASE
        },
        Case {
            name: "deny by principal",
            policies: d("principals: [{Exact: cluster.local/ns/demo/sa/sa-a}]"),
            allowed: false,
            ..BASE
        },
        Case {
            name: "deny not matching allows",
            policies: d("principals: [{Exact: cluster.local/ns/demo/sa/sa-b}]"),
            ..BASE
        },
        Case {
            name: "deny wins over allow",
            policies: "[{name: a, namespace: demo, scope: Namespace, action: Allow, rules: [[]]}, {name: d, namespace: demo, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [8080]}]]]}]",
            allowed: false,
            ..BASE
        },
        Case {
            name: "allow elsewhere does not apply",
            policies: "[{name: p, namespace: other, scope: Namespace, action: Allow, rules: [[[{destinationPorts: [1]}]]]}]",
            ..BASE
        },
        Case {
            name: "global applies everywhere",
            policies: "[{name: p, namespace: istio-system, scope: Global, action: Deny, rules: [[]]}]",
            allowed: false,
            ..BASE
        },
        Case {
            name: "workload selector not selected",
            policies: "[{name: p, namespace: demo, scope: WorkloadSelector, action: Deny, rules: [[]]}]",
            ..BASE
        },
        Case {
            name: "workload selector selected",
            policies: "[{name: p, namespace: demo, scope: WorkloadSelector, action: Deny, rules: [[]]}]",
            selected: &["demo/p"],
            allowed: false,
            ..BASE
        },
        Case {
            name: "unknown selected key ignored",
            policies: "[]",
            selected: &["demo/missing"],
            ..BASE
        },
        Case {
            name: "selected allow requires a match",
            policies: "[{name: p, namespace: demo, scope: WorkloadSelector, action: Allow, rules: [[[{destinationPorts: [1]}]]]}]",
            selected: &["demo/p"],
            allowed: false,
            ..BASE
        },
        Case {
            name: "dry-run deny does not deny",
            policies: "[{name: p, namespace: demo, scope: Namespace, action: Deny, dryRun: true, rules: [[]]}]",
            ..BASE
        },
        Case {
            name: "dry-run allow does not require a match",
            policies: "[{name: p, namespace: demo, scope: Namespace, action: Allow, dryRun: true, rules: [[[{destinationPorts: [1]}]]]}]",
            ..BASE
        },
        Case {
            name: "dry-run selected deny does not deny",
            policies: "[{name: p, namespace: demo, scope: WorkloadSelector, action: Deny, dryRun: true, rules: [[]]}]",
            selected: &["demo/p"],
            ..BASE
        },
    ]
}

#[test]
fn istio_semantics_table() {
    let cases = cases();
    assert!(cases.len() >= 40);
    for case in cases {
        let policies = policies(case.policies);
        let id = case.identity.map(|(ns, sa)| identity(ns, sa));
        let selected: Vec<String> = case.selected.iter().map(|s| s.to_string()).collect();
        let target = Target {
            namespace: case.namespace,
            selected: &selected,
        };
        let connection = Connection {
            source: case.source.parse().unwrap(),
            destination: case.destination.parse().unwrap(),
            identity: id.as_ref(),
        };
        let decision = policies.check(&target, &connection);
        assert_eq!(
            decision == Decision::Allow,
            case.allowed,
            "{}: {decision:?}",
            case.name
        );
    }
}

#[test]
fn denials_say_which_policy() {
    let p = policies(&deny("destinationPorts: [8080]"));
    let target = Target {
        namespace: "demo",
        selected: &[],
    };
    let connection = Connection {
        source: "10.0.0.1".parse().unwrap(),
        destination: "10.0.0.2:8080".parse().unwrap(),
        identity: None,
    };
    let Decision::Deny(denial) = p.check(&target, &connection) else {
        panic!("not denied")
    };
    assert_eq!(denial.reason, DenyReason::DenyPolicy);
    assert_eq!(denial.to_string(), "DENY policy demo/p matches");
    let p = policies(&allow("destinationPorts: [1]"));
    let Decision::Deny(denial) = p.check(&target, &connection) else {
        panic!("not denied")
    };
    assert_eq!(
        (denial.policy, denial.reason),
        (None, DenyReason::NoAllowMatch)
    );
}

#[test]
fn the_file_shape_and_its_errors() {
    let yaml = "- name: p\n  namespace: demo\n  scope: Namespace\n  action: Allow\n  dryRun: false\n  rules:\n  - - - principals: [{Exact: a}]\n        notNamespaces: [{Presence: []}]\n        serviceAccounts: [{namespace: demo, serviceAccount: sa-a}]\n        sourceIps: [10.244.1.0/24, 10.244.1.7, 'fd00::/8']\n        destinationPorts: [8080]\n        notDestinationPorts: [9999]\n";
    let list: Vec<Policy> = serde_yaml_ng::from_str(yaml).unwrap();
    assert_eq!(list[0].rules[0][0][0].source_ips.len(), 3);
    // YAML tags are the other way serde writes enums.
    let tagged: Vec<StringMatch> =
        serde_yaml_ng::from_str("[!Exact a, !Suffix b, !Presence []]").unwrap();
    assert_eq!(
        tagged,
        [
            StringMatch::Exact("a".into()),
            StringMatch::Suffix("b".into()),
            StringMatch::Presence()
        ]
    );
    assert_eq!(list[0].key(), "demo/p");
    for (bad, expected) in [
        (
            "[{name: p, namespace: demo, scope: Namespace, action: Allow, rulez: []}]",
            "rulez",
        ),
        (
            "[{name: p, namespace: demo, scope: Everywhere, action: Allow}]",
            "Everywhere",
        ),
        (
            "[{name: p, namespace: demo, scope: Namespace, action: Allow, rules: [[[{sourceIps: [nope]}]]]}]",
            "not an address or CIDR",
        ),
        (
            "[{name: p, namespace: demo, scope: Namespace, action: Allow, rules: [[[{principals: [{Regex: x}]}]]]}]",
            "Regex",
        ),
    ] {
        let err = serde_yaml_ng::from_str::<Vec<Policy>>(bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{err} should name {expected}");
    }
    for (bad, expected) in [
        (
            "[{name: '', namespace: demo, scope: Namespace, action: Allow}]",
            "field name must not be empty",
        ),
        (
            "[{name: p, namespace: demo, scope: Namespace, action: Allow, rules: [[[], [{destinationPorts: [0]}]]]}]",
            "rules[0][1][0].destinationPorts: port 0 is not a port",
        ),
        (
            "[{name: p, namespace: demo, scope: Namespace, action: Allow, rules: [[[{notServiceAccounts: [{namespace: '', serviceAccount: a}]}]]]}]",
            "rules[0][0][0].notServiceAccounts",
        ),
    ] {
        let list: Vec<Policy> = serde_yaml_ng::from_str(bad).unwrap();
        let err = list[0].validate().unwrap_err().to_string();
        assert!(err.contains(expected), "{err} should contain {expected}");
    }
}

const NETS: &[&str] = &[
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.3/32",
    "192.168.0.0/16",
    "0.0.0.0/1",
    "128.0.0.0/1",
    "fd00::/8",
    "fd00:1::/32",
    "::/0",
];
const PORTS: &[u16] = &[80, 443, 8080];

fn random_match(rng: &mut StdRng) -> String {
    let mut fields = Vec::new();
    let nets = |rng: &mut StdRng| {
        format!(
            "['{}', '{}']",
            NETS.choose(rng).unwrap(),
            NETS.choose(rng).unwrap()
        )
    };
    match rng.next_u64() % 4 {
        0 => fields.push(format!("sourceIps: {}", nets(rng))),
        1 => fields.push(format!("notSourceIps: {}", nets(rng))),
        _ => {}
    }
    match rng.next_u64() % 4 {
        0 => fields.push(format!(
            "destinationPorts: [{}]",
            PORTS.choose(rng).unwrap()
        )),
        1 => fields.push(format!(
            "notDestinationPorts: [{}]",
            PORTS.choose(rng).unwrap()
        )),
        _ => {}
    }
    match rng.next_u64() % 9 {
        0 => fields.push("principals: [{Presence: []}]".into()),
        1 => fields.push("notNamespaces: [{Exact: demo}]".into()),
        2 => fields.push("namespaces: [{Presence: []}]".into()),
        3 => fields.push(
            "principals: [{Exact: cluster.local/ns/demo/sa/sa-a}, {Exact: cluster.local/ns/other/sa/x}]"
                .into(),
        ),
        4 => fields.push("namespaces: [{Exact: demo}]".into()),
        5 => fields.push("namespaces: [{Exact: other}, {Exact: demo}]".into()),
        _ => {}
    }
    format!("{{{}}}", fields.join(", "))
}

fn random_policies(rng: &mut StdRng) -> String {
    let count = 1 + rng.next_u64() % 4;
    let list: Vec<String> = (0..count)
        .map(|i| {
            let action = if rng.next_u64().is_multiple_of(2) {
                "Allow"
            } else {
                "Deny"
            };
            let rules: Vec<String> = (0..1 + rng.next_u64() % 2)
                .map(|_| {
                    let clauses: Vec<String> = (0..1 + rng.next_u64() % 2)
                        .map(|_| {
                            let matches: Vec<String> = (0..1 + rng.next_u64() % 2)
                                .map(|_| random_match(rng))
                                .collect();
                            format!("[{}]", matches.join(", "))
                        })
                        .collect();
                    format!("[{}]", clauses.join(", "))
                })
                .collect();
            format!(
                "{{name: p{i}, namespace: demo, scope: Namespace, action: {action}, rules: [{}]}}",
                rules.join(", ")
            )
        })
        .collect();
    format!("[{}]", list.join(", "))
}

fn random_source(rng: &mut StdRng) -> IpAddr {
    const SOURCES: &[&str] = &[
        "10.1.2.3",
        "10.1.2.9",
        "10.1.9.9",
        "10.9.9.9",
        "192.168.1.1",
        "200.1.1.1",
        "1.2.3.4",
        "fd00::1",
        "fd00:1::5",
        "2001:db8::1",
        "::ffff:10.1.2.3",
    ];
    SOURCES.choose(rng).unwrap().parse().unwrap()
}

#[test]
fn the_plaintext_plan_agrees_with_the_engine() {
    // Seeded, so a failure reproduces.
    let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
    let target = Target {
        namespace: "demo",
        selected: &[],
    };
    let mut with_denials = 0;
    for _ in 0..300 {
        let yaml = random_policies(&mut rng);
        let p = policies(&yaml);
        let plan = p
            .plaintext_plan(&target)
            .expect("no destination IPs: a plan exists");
        for _ in 0..40 {
            let source = random_source(&mut rng);
            let port = *[80, 443, 8080, 22].choose(&mut rng).unwrap();
            let connection = Connection {
                source,
                destination: SocketAddr::new("10.0.2.2".parse().unwrap(), port),
                identity: None,
            };
            let expected = match p.check(&target, &connection) {
                Decision::Allow => None,
                Decision::Deny(denial) => Some(denial.reason),
            };
            with_denials += usize::from(expected.is_some());
            assert_eq!(
                plan.lookup(source, port),
                expected,
                "{yaml}\n{source} :{port}"
            );
        }
    }
    assert!(
        with_denials > 100,
        "the random policies deny too rarely to test anything"
    );
}

#[test]
fn no_plan_when_policies_look_at_the_destination_address() {
    let p = policies(&deny("destinationIps: [10.0.0.0/8]"));
    assert_eq!(
        p.plaintext_plan(&Target {
            namespace: "demo",
            selected: &[]
        }),
        None
    );
}

#[test]
fn the_indices_never_hide_a_policy() {
    // The engine's answer with its indices against looking at every policy that applies.
    let mut rng = StdRng::seed_from_u64(0x2545_f491_4f6c_dd1d);
    let identities = [
        Some(identity("demo", "sa-a")),
        Some(identity("demo", "sa-b")),
        Some(identity("other", "x")),
        None,
    ];
    let mut denied = 0;
    for _ in 0..300 {
        let yaml = random_policies(&mut rng);
        let p = policies(&yaml);
        for _ in 0..40 {
            let namespace = *["demo", "other"].choose(&mut rng).unwrap();
            let target = Target {
                namespace,
                selected: &[],
            };
            let connection = Connection {
                source: random_source(&mut rng),
                destination: SocketAddr::new(
                    "10.0.2.2".parse().unwrap(),
                    *[80, 443, 8080, 22].choose(&mut rng).unwrap(),
                ),
                identity: identities.choose(&mut rng).unwrap().as_ref(),
            };
            let facts = Facts::of(&connection);
            let applying: Vec<usize> = (0..p.all().len())
                .filter(|&i| p.all()[i].namespace == namespace)
                .collect();
            let matching = |action: Action| {
                applying
                    .iter()
                    .any(|&i| p.all()[i].action == action && p.matches(i, &facts))
            };
            let allows = applying.iter().any(|&i| p.all()[i].action == Action::Allow);
            let expected = !matching(Action::Deny) && (!allows || matching(Action::Allow));
            let allowed = p.check(&target, &connection) == Decision::Allow;
            denied += usize::from(!allowed);
            assert_eq!(allowed, expected, "{yaml}\n{connection:?} to {namespace}");
        }
    }
    assert!(denied > 1000, "too few denials to test anything: {denied}");
}

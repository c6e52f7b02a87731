//! Table tests of Istio's semantics, the policy file shape, and the plaintext plan against the
//! engine.

use super::*;

const TD: &str = "cluster.local";

pub(super) fn identity(namespace: &str, account: &str) -> Identity {
    Identity {
        trust_domain: TD.into(),
        namespace: namespace.into(),
        service_account: account.into(),
    }
}

pub(super) fn policies(yaml: &str) -> Policies {
    let list: Vec<Policy> = serde_yaml_ng::from_str(yaml).expect("policies parse");
    for policy in &list {
        policy.validate().expect("policies are valid");
    }
    Policies::new(list.into_iter().map(Arc::new).collect())
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

pub(super) fn deny(m: &str) -> String {
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

/// One policy's change builds its namespace's group again and shares every other group with
/// the version before; the decisions follow the change, and removals and scope moves too.
#[test]
fn a_policy_change_builds_only_the_groups_it_touches() {
    let policy = |namespace: usize, scope: &str, action: &str| -> Arc<Policy> {
        let yaml = format!(
            "{{name: p, namespace: n{namespace}, scope: {scope}, action: {action}, \
             rules: [[[{{principals: [{{Exact: cluster.local/ns/n{namespace}/sa/x}}]}}]]]}}"
        );
        Arc::new(serde_yaml_ng::from_str(&yaml).unwrap())
    };
    let before = Policies::new((0..10).map(|n| policy(n, "Namespace", "Deny")).collect());
    let denied = |policies: &Policies, namespace: &str| {
        let target = Target {
            namespace,
            selected: &[],
        };
        let id = identity(namespace, "x");
        let connection = Connection {
            source: "10.0.1.5".parse().unwrap(),
            destination: "10.0.2.2:8080".parse().unwrap(),
            identity: Some(&id),
        };
        policies.check(&target, &connection) != Decision::Allow
    };
    assert!(denied(&before, "n3") && denied(&before, "n4"));

    let after = before.updated([(
        Some(policy(3, "Namespace", "Deny")),
        Some(policy(3, "Namespace", "Allow")),
    )]);
    for n in 0..10 {
        let namespace = format!("n{n}");
        let shared = Arc::ptr_eq(
            &before.by_namespace[&namespace],
            &after.by_namespace[&namespace],
        );
        assert_eq!(shared, n != 3, "{namespace}");
    }
    assert!(Arc::ptr_eq(&before.global, &after.global));
    assert!(!denied(&after, "n3") && denied(&after, "n4"));
    assert_eq!(after.len(), 10);

    // Removed: its group goes; moved to the selector scope: selected by key only.
    let removed = after.updated([(Some(policy(4, "Namespace", "Deny")), None)]);
    assert!(!removed.by_namespace.contains_key("n4") && !denied(&removed, "n4"));
    let selector = removed.updated([(None, Some(policy(4, "WorkloadSelector", "Deny")))]);
    assert!(!denied(&selector, "n4"), "not selected");
    let target = Target {
        namespace: "n4",
        selected: &["n4/p".to_owned()],
    };
    let id = identity("n4", "x");
    let connection = Connection {
        source: "10.0.1.5".parse().unwrap(),
        destination: "10.0.2.2:8080".parse().unwrap(),
        identity: Some(&id),
    };
    assert_ne!(selector.check(&target, &connection), Decision::Allow);
    assert_eq!(selector.len(), 10);
}

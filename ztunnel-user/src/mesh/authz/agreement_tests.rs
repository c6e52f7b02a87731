//! The engine against what is derived from it, on random policies: the plaintext plan the
//! kernel enforces and the candidate index must never decide differently from the engine.

use super::tests::{deny, identity, policies};
use super::*;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{RngCore, SeedableRng};

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
            // Some select workloads, some only say what they would do.
            let scope = if rng.next_u64().is_multiple_of(3) {
                "WorkloadSelector"
            } else {
                "Namespace"
            };
            let dry_run = rng.next_u64().is_multiple_of(4);
            format!(
                "{{name: p{i}, namespace: demo, scope: {scope}, action: {action}, dryRun: {dry_run}, rules: [{}]}}",
                rules.join(", ")
            )
        })
        .collect();
    format!("[{}]", list.join(", "))
}

/// The WorkloadSelector policies (of `random_policies`' names) that select the target: some.
fn random_selection(rng: &mut StdRng) -> Vec<String> {
    (0..4)
        .filter(|_| rng.next_u64().is_multiple_of(2))
        .map(|i| format!("demo/p{i}"))
        .collect()
}

/// Whether `policy` takes part in decisions on `target`: not a dry run, and of the target's
/// namespace or selecting it (as Istio's ztunnel, the workload's own list of selecting
/// policies is trusted).
fn applies(policy: &Policy, target: &Target) -> bool {
    let scoped = match policy.scope {
        Scope::Namespace => policy.namespace == target.namespace,
        Scope::WorkloadSelector => target
            .selected
            .contains(&format!("{}/{}", policy.namespace, policy.name)),
        Scope::Global => false,
    };
    scoped && !policy.dry_run
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
    let mut with_denials = 0;
    for _ in 0..300 {
        let yaml = random_policies(&mut rng);
        let p = policies(&yaml);
        let selected = random_selection(&mut rng);
        let target = Target {
            namespace: "demo",
            selected: &selected,
        };
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
                "{yaml}\nselecting {selected:?}: {source} :{port}"
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
        let selected = random_selection(&mut rng);
        for _ in 0..40 {
            let namespace = *["demo", "other"].choose(&mut rng).unwrap();
            let target = Target {
                namespace,
                selected: &selected,
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
            let applying: Vec<Indexed> = p
                .all()
                .into_iter()
                .filter(|policy| applies(policy, &target))
                .map(Indexed::new)
                .collect();
            let matching = |action: Action| {
                applying
                    .iter()
                    .any(|i| i.policy.action == action && i.matches(&facts))
            };
            let allows = applying.iter().any(|i| i.policy.action == Action::Allow);
            let expected = !matching(Action::Deny) && (!allows || matching(Action::Allow));
            let allowed = p.check(&target, &connection) == Decision::Allow;
            denied += usize::from(!allowed);
            assert_eq!(
                allowed, expected,
                "{yaml}\n{connection:?} to {namespace} selecting {selected:?}"
            );
        }
    }
    assert!(denied > 1000, "too few denials to test anything: {denied}");
}

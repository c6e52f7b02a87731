//! Policy evaluation at scale: 10,000 policies of 10 rules each, none of which matches the
//! connection, so every check has to look at everything that may apply to it.
//!
//! Four layouts of 100,000 rules: exact principals, all in the destination's namespace (the
//! principal index skips them), the same spread over 100 namespaces (the scope index skips 99
//! of them), the same limited to ports the connection does not use, and principal prefixes in
//! the destination's namespace, which no index can skip: every rule is evaluated, the worst
//! case.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use ztunnel_user::identity::Identity;
use ztunnel_user::mesh::authz::{
    Action, Connection, Decision, Match, Policies, Policy, Scope, StringMatch, Target,
};

const POLICIES: usize = 10_000;
const RULES: usize = 10;
const DESTINATION: &str = "10.0.2.2:8080";

#[derive(Clone, Copy)]
enum Layout {
    OneNamespace,
    HundredNamespaces,
    OtherPorts,
    Prefixes,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::OneNamespace => "all apply",
            Layout::HundredNamespaces => "spread over 100 namespaces",
            Layout::OtherPorts => "all on other ports",
            Layout::Prefixes => "prefixes, all evaluated",
        }
    }
}

/// ALLOW policies whose rules name principals that are not the client's: with ALLOW policies
/// present and none matching, the check ends in a denial after looking at every candidate.
fn policies(layout: Layout) -> Policies {
    let list = (0..POLICIES)
        .map(|p| {
            let namespace = match layout {
                Layout::HundredNamespaces => format!("ns-{}", p % 100),
                _ => "ns-0".to_owned(),
            };
            let rules = (0..RULES)
                .map(|r| {
                    let destination_ports = match layout {
                        Layout::OtherPorts => vec![10_000 + (p % 1000) as u16],
                        _ => Vec::new(),
                    };
                    let principal = format!("cluster.local/ns/app-{p}/sa/account-{r}");
                    let principal = match layout {
                        Layout::Prefixes => StringMatch::Prefix(principal),
                        _ => StringMatch::Exact(principal),
                    };
                    vec![vec![Match {
                        principals: vec![principal],
                        destination_ports,
                        ..Match::default()
                    }]]
                })
                .collect();
            Arc::new(Policy {
                name: format!("policy-{p}"),
                namespace,
                scope: Scope::Namespace,
                action: Action::Allow,
                rules,
                dry_run: false,
            })
        })
        .collect();
    Policies::new(list)
}

fn evaluation(c: &mut Criterion) {
    let identity = Identity {
        trust_domain: "cluster.local".into(),
        namespace: "client".into(),
        service_account: "client".into(),
    };
    let connection = Connection {
        source: "10.0.1.5".parse().unwrap(),
        destination: DESTINATION.parse::<SocketAddr>().unwrap(),
        identity: Some(&identity),
    };
    let target = Target {
        namespace: "ns-0",
        selected: &[],
    };
    let mut group = c.benchmark_group("authz 10k policies x 10 rules, none matching");
    for layout in [
        Layout::OneNamespace,
        Layout::HundredNamespaces,
        Layout::OtherPorts,
        Layout::Prefixes,
    ] {
        let policies = policies(layout);
        assert!(matches!(
            policies.check(&target, &connection),
            Decision::Deny(_)
        ));
        group.bench_function(BenchmarkId::from_parameter(layout.name()), |b| {
            b.iter(|| policies.check(black_box(&target), black_box(&connection)))
        });
    }
    group.finish();
}

criterion_group!(benches, evaluation);
criterion_main!(benches);

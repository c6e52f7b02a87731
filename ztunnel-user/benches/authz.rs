//! Policy evaluation at scale: 10,000 policies of 10 rules each, none of which matches the
//! connection, so every check has to look at everything that may apply to it.
//!
//! Three layouts of the same 100,000 rules: all in the destination's namespace (nothing can be
//! skipped: the worst case), spread over 100 namespaces (the scope index skips 99 of them), and
//! all in the destination's namespace but each limited to ports the connection does not use
//! (the port index skips them).

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::net::SocketAddr;
use ztunnel_user::authz::{
    Action, Connection, Decision, Match, Policies, Policy, Scope, StringMatch, Target,
};
use ztunnel_user::identity::Identity;

const POLICIES: usize = 10_000;
const RULES: usize = 10;
const DESTINATION: &str = "10.0.2.2:8080";

#[derive(Clone, Copy)]
enum Layout {
    OneNamespace,
    HundredNamespaces,
    OtherPorts,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::OneNamespace => "all apply",
            Layout::HundredNamespaces => "spread over 100 namespaces",
            Layout::OtherPorts => "all on other ports",
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
                Layout::OneNamespace | Layout::OtherPorts => "ns-0".to_owned(),
            };
            let rules = (0..RULES)
                .map(|r| {
                    let destination_ports = match layout {
                        Layout::OtherPorts => vec![10_000 + (p % 1000) as u16],
                        _ => Vec::new(),
                    };
                    vec![vec![Match {
                        principals: vec![StringMatch::Exact(format!(
                            "cluster.local/ns/app-{p}/sa/account-{r}"
                        ))],
                        destination_ports,
                        ..Match::default()
                    }]]
                })
                .collect();
            Policy {
                name: format!("policy-{p}"),
                namespace,
                scope: Scope::Namespace,
                action: Action::Allow,
                rules,
                dry_run: false,
            }
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

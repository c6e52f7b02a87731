//! L4 authorization with Istio's AuthorizationPolicy semantics, as Istio's ztunnel applies
//! them: any matching DENY denies; with no ALLOW policy everything is allowed; otherwise an
//! ALLOW must match. Dry-run policies are only logged. `plaintext` derives what the kernel can
//! decide alone for clients without an identity.

mod index;
mod plaintext;
mod policy;

pub use plaintext::{PlaintextPlan, PlaintextRule};
pub use policy::{Action, Clause, Match, Policy, Rule, Scope, ServiceAccountMatch, StringMatch};

use crate::identity::Identity;
use index::{Index, Keys, possible_ports};
use ipnet::IpNet;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// The destination workload as authorization sees it.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub namespace: &'a str,
    /// Keys (`namespace/name`) of the WorkloadSelector policies that select it.
    pub selected: &'a [String],
}

/// The connection being decided on.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    pub source: IpAddr,
    pub destination: SocketAddr,
    /// The client's SPIFFE identity; none for plaintext.
    pub identity: Option<&'a Identity>,
}

/// A connection as authorization decided on it, owned: kept with each open connection, so a
/// policy change can decide again.
#[derive(Clone, Debug)]
pub(crate) struct Subject {
    /// The destination pod's namespace (for a pod the mesh config does not list).
    pub(crate) namespace: Arc<str>,
    pub(crate) source: IpAddr,
    pub(crate) destination: SocketAddr,
    pub(crate) identity: Option<Arc<Identity>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(Denial),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// The DENY policy that matched; none when no ALLOW policy matched.
    pub policy: Option<String>,
    pub reason: DenyReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    DenyPolicy,
    NoAllowMatch,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.policy {
            Some(policy) => write!(f, "DENY policy {policy} matches"),
            None => write!(f, "no ALLOW policy matches"),
        }
    }
}

/// The policies of a config, indexed by what they apply to and by what they can match. Kept
/// per group (the global policies, each namespace's, the WorkloadSelector ones by key) in
/// persistent maps, so a new version rebuilds only the groups its changes touch and shares
/// the others: one policy's change at 5,000 policies costs its namespace's few.
#[derive(Clone, Default)]
pub struct Policies {
    global: Arc<Group>,
    by_namespace: imbl::OrdMap<String, Arc<Group>>,
    /// WorkloadSelector policies by key.
    selectable: imbl::OrdMap<String, Arc<Indexed>>,
}

/// A policy and the destination ports it can match at all (None: any port), a quick refusal
/// before its rules are looked at.
struct Indexed {
    policy: Arc<Policy>,
    ports: Option<HashSet<u16>>,
}

/// The policies of one scope group, split so a check only looks at those that can matter.
#[derive(Default)]
struct Group {
    /// In the order of their keys; the indices index into it.
    policies: Vec<Indexed>,
    enforced: ByAction,
    dry_run: ByAction,
}

#[derive(Default)]
struct ByAction {
    deny: Index,
    allow: Index,
}

impl ByAction {
    fn of(&self, action: Action) -> &Index {
        match action {
            Action::Deny => &self.deny,
            Action::Allow => &self.allow,
        }
    }
}

/// Which group a policy belongs to.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum GroupOf {
    Global,
    Namespace(String),
    Selector,
}

impl GroupOf {
    fn of(policy: &Policy) -> GroupOf {
        match policy.scope {
            Scope::Global => GroupOf::Global,
            Scope::Namespace => GroupOf::Namespace(policy.namespace.clone()),
            Scope::WorkloadSelector => GroupOf::Selector,
        }
    }
}

/// A policy's change: its version before (if any) and after (if any).
pub(crate) type PolicyChange = (Option<Arc<Policy>>, Option<Arc<Policy>>);

impl Indexed {
    fn new(policy: Arc<Policy>) -> Indexed {
        let ports = possible_ports(&policy).map(HashSet::from_iter);
        Indexed { policy, ports }
    }

    fn matches(&self, facts: &Facts) -> bool {
        if self
            .ports
            .as_ref()
            .is_some_and(|ports| !ports.contains(&facts.port))
        {
            return false;
        }
        self.policy.rules.iter().any(|rule| {
            rule.iter().all(|clause| {
                clause.is_empty() || clause.iter().any(|m| !m.is_empty() && facts.satisfy(m))
            })
        })
    }
}

impl Group {
    /// Indexes `policies` (validated, with unique keys).
    fn new(mut policies: Vec<Arc<Policy>>) -> Group {
        policies.sort_by_cached_key(|p| p.key());
        let mut group = Group::default();
        for (i, policy) in policies.iter().enumerate() {
            let actions = if policy.dry_run {
                &mut group.dry_run
            } else {
                &mut group.enforced
            };
            match policy.action {
                Action::Deny => actions.deny.insert(i, policy),
                Action::Allow => actions.allow.insert(i, policy),
            }
        }
        group.policies = policies.into_iter().map(Indexed::new).collect();
        group
    }

    /// This group without the policies `removed` names, with those `added`.
    fn edited(&self, removed: &HashSet<String>, added: Vec<Arc<Policy>>) -> Group {
        let kept = self.policies.iter().map(|indexed| &indexed.policy);
        let kept = kept.filter(|policy| !removed.contains(&policy.key()));
        Group::new(kept.cloned().chain(added).collect())
    }
}

impl Policies {
    /// Indexes `policies` (validated, with unique keys).
    pub fn new(policies: Vec<Arc<Policy>>) -> Policies {
        Policies::default().updated(policies.into_iter().map(|p| (None, Some(p))))
    }

    /// The next version with `changes` made (each policy's version before, if any, and after,
    /// if any); only the groups they touch are built again.
    pub(crate) fn updated(&self, changes: impl IntoIterator<Item = PolicyChange>) -> Policies {
        let mut edits: BTreeMap<GroupOf, (HashSet<String>, Vec<Arc<Policy>>)> = BTreeMap::new();
        for (before, after) in changes {
            if let Some(before) = before {
                let edit = edits.entry(GroupOf::of(&before)).or_default();
                edit.0.insert(before.key());
            }
            if let Some(after) = after {
                edits.entry(GroupOf::of(&after)).or_default().1.push(after);
            }
        }
        let mut next = self.clone();
        for (group, (removed, added)) in edits {
            match group {
                GroupOf::Global => next.global = Arc::new(self.global.edited(&removed, added)),
                GroupOf::Namespace(namespace) => {
                    let before = self.by_namespace.get(&namespace);
                    let group = before.map_or_else(
                        || Group::new(added.clone()),
                        |group| group.edited(&removed, added.clone()),
                    );
                    if group.policies.is_empty() {
                        next.by_namespace.remove(&namespace);
                    } else {
                        next.by_namespace.insert(namespace, Arc::new(group));
                    }
                }
                GroupOf::Selector => {
                    for key in &removed {
                        next.selectable.remove(key);
                    }
                    for policy in added {
                        let indexed = Arc::new(Indexed::new(policy));
                        next.selectable.insert(indexed.policy.key(), indexed);
                    }
                }
            }
        }
        next
    }

    /// Every policy, in the order of their keys.
    pub fn all(&self) -> Vec<Arc<Policy>> {
        let groups = std::iter::once(&self.global).chain(self.by_namespace.values());
        let grouped = groups.flat_map(|group| &group.policies);
        let indexed = grouped.chain(self.selectable.values().map(|indexed| &**indexed));
        let mut all: Vec<Arc<Policy>> = indexed.map(|i| i.policy.clone()).collect();
        all.sort_by_cached_key(|p| p.key());
        all
    }

    /// How many policies there are.
    pub fn len(&self) -> usize {
        let grouped: usize = self.by_namespace.values().map(|g| g.policies.len()).sum();
        self.global.policies.len() + grouped + self.selectable.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `connection` to `target` is allowed.
    pub fn check(&self, target: &Target, connection: &Connection) -> Decision {
        let facts = Facts::of(connection);
        let (groups, selected) = self.applicable(target);
        let decision = self.decide(&groups, &selected, &facts, false);
        let dry_run = groups
            .iter()
            .any(|g| g.dry_run.deny.len() + g.dry_run.allow.len() > 0)
            || selected.iter().any(|i| i.policy.dry_run);
        if dry_run {
            let shadow = self.decide(&groups, &selected, &facts, true);
            if shadow != decision {
                tracing::info!(
                    source = %connection.source,
                    destination = %connection.destination,
                    identity = ?connection.identity.map(ToString::to_string),
                    enforced = ?decision,
                    with_dry_run = ?shadow,
                    "dry-run policies would change this decision"
                );
            }
        }
        decision
    }

    /// The scope groups and the selected WorkloadSelector policies that apply to `target`.
    fn applicable(&self, target: &Target) -> (Vec<&Group>, Vec<&Indexed>) {
        let mut groups = vec![&*self.global];
        groups.extend(self.by_namespace.get(target.namespace).map(|g| &**g));
        let selected = target
            .selected
            .iter()
            .filter_map(|key| self.selectable.get(key.as_str()).map(|i| &**i))
            .collect();
        (groups, selected)
    }

    fn decide(
        &self,
        groups: &[&Group],
        selected: &[&Indexed],
        facts: &Facts,
        with_dry_run: bool,
    ) -> Decision {
        let keys = facts.keys();
        let indices = |action: Action| {
            groups.iter().flat_map(move |g| {
                let dry_run = with_dry_run.then_some(&g.dry_run);
                std::iter::once(&g.enforced)
                    .chain(dry_run)
                    .map(move |actions| (*g, actions.of(action)))
            })
        };
        let selected = |action: Action| {
            selected
                .iter()
                .copied()
                .filter(move |i| i.policy.action == action && (with_dry_run || !i.policy.dry_run))
        };
        let matching = |action: Action| {
            indices(action)
                .flat_map(|(group, index)| index.candidates(&keys).map(|i| &group.policies[i]))
                .chain(selected(action))
                .find(|i| i.matches(facts))
        };
        if let Some(deny) = matching(Action::Deny) {
            return Decision::Deny(Denial {
                policy: Some(deny.policy.key()),
                reason: DenyReason::DenyPolicy,
            });
        }
        let allows = indices(Action::Allow)
            .map(|(_, index)| index.len())
            .sum::<usize>()
            + selected(Action::Allow).count();
        if allows == 0 || matching(Action::Allow).is_some() {
            Decision::Allow
        } else {
            Decision::Deny(Denial {
                policy: None,
                reason: DenyReason::NoAllowMatch,
            })
        }
    }
}

/// What the matches compare, computed once per check.
struct Facts<'a> {
    source: IpAddr,
    destination: IpAddr,
    port: u16,
    identity: Option<&'a Identity>,
    /// `td/ns/<ns>/sa/<sa>`: the SPIFFE id without its scheme, as Istio matches principals.
    principal: Option<String>,
}

impl<'a> Facts<'a> {
    fn of(connection: &Connection<'a>) -> Facts<'a> {
        Facts {
            source: connection.source.to_canonical(),
            destination: connection.destination.ip().to_canonical(),
            port: connection.destination.port(),
            identity: connection.identity,
            principal: connection.identity.map(|id| {
                format!(
                    "{}/ns/{}/sa/{}",
                    id.trust_domain, id.namespace, id.service_account
                )
            }),
        }
    }

    fn keys(&self) -> Keys<'_> {
        Keys {
            principal: self.principal.as_deref(),
            namespace: self.namespace(),
            port: self.port,
        }
    }

    /// The source identity's namespace; without an identity, the empty string.
    fn namespace(&self) -> &str {
        self.identity.map_or("", |id| id.namespace.as_str())
    }

    /// Whether every field `m` sets matches.
    fn satisfy(&self, m: &Match) -> bool {
        let namespace = self.namespace();
        let principal = |s: &StringMatch| self.principal.as_deref().is_some_and(|p| s.matches(p));
        let account = |a: &ServiceAccountMatch| {
            self.identity.is_some_and(|id| {
                id.namespace == a.namespace && id.service_account == a.service_account
            })
        };
        let contains = |ip: IpAddr| move |net: &IpNet| net.contains(&ip);
        field(&m.namespaces, &m.not_namespaces, |s| s.matches(namespace))
            && field(&m.principals, &m.not_principals, principal)
            && field(&m.service_accounts, &m.not_service_accounts, account)
            && field(&m.source_ips, &m.not_source_ips, contains(self.source))
            && field(
                &m.destination_ips,
                &m.not_destination_ips,
                contains(self.destination),
            )
            && field(&m.destination_ports, &m.not_destination_ports, |p| {
                *p == self.port
            })
    }
}

/// A field and its not-form: any of `positive` (when set), none of `negative`.
fn field<T>(positive: &[T], negative: &[T], test: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&test)) && !negative.iter().any(test)
}

#[cfg(test)]
mod agreement_tests;
#[cfg(test)]
mod tests;

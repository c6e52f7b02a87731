//! Which policies a check has to look at. Most policies can only match connections with one of
//! a few principals, source namespaces or destination ports; filed under those values, they
//! cost a check nothing unless the connection has one of them. Each policy is filed under one
//! dimension only (the most selective it has), so a check's candidates never repeat.

use super::policy::{Match, Policy, StringMatch};
use std::collections::HashMap;
use std::hash::Hash;

/// What a connection offers to the index: the values policies are filed under.
pub(super) struct Keys<'a> {
    pub principal: Option<&'a str>,
    /// The source identity's namespace; empty without an identity, as matching sees it.
    pub namespace: &'a str,
    pub port: u16,
}

/// The values a policy can possibly match on, in the first dimension that limits it.
#[derive(Debug, PartialEq, Eq)]
enum Guard {
    Principals(Vec<String>),
    Namespaces(Vec<String>),
    Ports(Vec<u16>),
    /// Nothing limits it: a candidate for every connection.
    Any,
}

#[derive(Default)]
pub(super) struct Index {
    members: Vec<usize>,
    any: Vec<usize>,
    by_principal: HashMap<String, Vec<usize>>,
    by_namespace: HashMap<String, Vec<usize>>,
    by_port: HashMap<u16, Vec<usize>>,
}

impl Index {
    pub(super) fn insert(&mut self, index: usize, policy: &Policy) {
        self.members.push(index);
        match guard(policy) {
            Guard::Principals(values) => file(&mut self.by_principal, values, index),
            Guard::Namespaces(values) => file(&mut self.by_namespace, values, index),
            Guard::Ports(values) => file(&mut self.by_port, values, index),
            Guard::Any => self.any.push(index),
        }
    }

    /// The policies that may match a connection with `keys`, each once.
    pub(super) fn candidates<'a>(&'a self, keys: &Keys) -> impl Iterator<Item = usize> + 'a {
        let filed = |list: Option<&'a Vec<usize>>| list.map_or(&[][..], Vec::as_slice);
        let principal = filed(keys.principal.and_then(|p| self.by_principal.get(p)));
        let namespace = filed(self.by_namespace.get(keys.namespace));
        let port = filed(self.by_port.get(&keys.port));
        self.any
            .iter()
            .chain(principal)
            .chain(namespace)
            .chain(port)
            .copied()
    }

    /// Every policy in the index.
    pub(super) fn members(&self) -> &[usize] {
        &self.members
    }

    pub(super) fn len(&self) -> usize {
        self.members.len()
    }
}

fn file<K: Hash + Eq>(map: &mut HashMap<K, Vec<usize>>, values: Vec<K>, index: usize) {
    for value in values {
        let filed = map.entry(value).or_default();
        // A policy naming a value twice is filed under it once.
        if filed.last() != Some(&index) {
            filed.push(index);
        }
    }
}

fn guard(policy: &Policy) -> Guard {
    if let Some(principals) = possible(policy, |m| exact(&m.principals)) {
        return Guard::Principals(principals);
    }
    if let Some(namespaces) = possible(policy, |m| exact(&m.namespaces)) {
        return Guard::Namespaces(namespaces);
    }
    match possible_ports(policy) {
        Some(ports) => Guard::Ports(ports),
        None => Guard::Any,
    }
}

/// The destination ports a policy can match at all, or None when it may match any port.
pub(super) fn possible_ports(policy: &Policy) -> Option<Vec<u16>> {
    possible(policy, |m| {
        (!m.destination_ports.is_empty()).then(|| m.destination_ports.clone())
    })
}

/// The values of one dimension that a policy can match at all, or None when it is not limited
/// in it. `limit` gives the values a single match is limited to, if it is. A rule is limited
/// when one of its clauses only has limited matches (the clause, so the rule, needs one of
/// their values); a policy, when all its rules that can match at all are.
fn possible<K>(policy: &Policy, limit: impl Fn(&Match) -> Option<Vec<K>>) -> Option<Vec<K>> {
    let mut union = Vec::new();
    for rule in &policy.rules {
        let limited = rule.iter().find_map(|clause| {
            let live: Vec<&Match> = clause.iter().filter(|m| !m.is_empty()).collect();
            if live.is_empty() {
                return None;
            }
            live.iter()
                .map(|m| limit(m))
                .collect::<Option<Vec<Vec<K>>>>()
                .map(|values| values.into_iter().flatten().collect::<Vec<K>>())
        });
        match limited {
            Some(values) => union.extend(values),
            // A clause whose matches are all empty never matches, so neither does the rule.
            None if rule
                .iter()
                .any(|clause| !clause.is_empty() && clause.iter().all(Match::is_empty)) => {}
            None => return None,
        }
    }
    Some(union)
}

/// The values of a string field when all its matches are exact, so equality decides.
fn exact(matches: &[StringMatch]) -> Option<Vec<String>> {
    if matches.is_empty() {
        return None;
    }
    matches
        .iter()
        .map(|m| match m {
            StringMatch::Exact(value) => Some(value.clone()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard_of(rules: &str) -> Guard {
        let policy: Policy = serde_yaml_ng::from_str(&format!(
            "{{name: p, namespace: n, scope: Global, action: Allow, rules: {rules}}}"
        ))
        .unwrap();
        guard(&policy)
    }

    #[test]
    fn policies_are_filed_under_their_most_selective_dimension() {
        let principals = |v: &[&str]| Guard::Principals(v.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            guard_of("[[[{principals: [{Exact: a}], destinationPorts: [80]}]]]"),
            principals(&["a"])
        );
        // Two rules: the union of what each needs.
        assert_eq!(
            guard_of(
                "[[[{principals: [{Exact: a}]}]], [[{principals: [{Exact: b}]}], [{destinationPorts: [1]}]]]"
            ),
            principals(&["a", "b"])
        );
        // One clause limits the rule even when another does not.
        assert_eq!(
            guard_of("[[[{sourceIps: [10.0.0.0/8]}], [{namespaces: [{Exact: x}]}]]]"),
            Guard::Namespaces(vec!["x".into()])
        );
        // A prefix is no exact value: the next dimension is tried.
        assert_eq!(
            guard_of("[[[{principals: [{Prefix: a}], destinationPorts: [80, 81]}]]]"),
            Guard::Ports(vec![80, 81])
        );
        // A clause with an unlimited match is unlimited.
        assert_eq!(
            guard_of("[[[{principals: [{Exact: a}]}, {sourceIps: [10.0.0.0/8]}]]]"),
            Guard::Any
        );
        // A rule that can never match limits nothing; an empty rule matches everything.
        assert_eq!(
            guard_of("[[[{}]], [[{principals: [{Exact: a}]}]]]"),
            principals(&["a"])
        );
        assert_eq!(guard_of("[[]]"), Guard::Any);
        // No rules: matches nothing, so it can be filed nowhere.
        assert_eq!(guard_of("[]"), principals(&[]));
    }
}

//! The kernel's view of the mesh config: every workload address with the daemon's integer
//! indices for the workload and its identity (identity strings stay in userspace), and the
//! plaintext rules `sk_lookup` applies to this node's workloads. Indices are stable across
//! reloads for as long as a uid or an identity stays in the config.

use super::authz::{DenyReason, PlaintextPlan};
use super::config::{MeshConfig, Protocol, Workload};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use ztunnel_common::Addr;
use ztunnel_common::maps::{
    PLAINTEXT_ALLOW, PLAINTEXT_DENY_NEEDS_IDENTITY, PLAINTEXT_DENY_POLICY,
    PLAINTEXT_RULE_FIXED_BITS, PlaintextRuleKey, WORKLOAD_HAS_WAYPOINT, WORKLOAD_IN_MESH,
    WORKLOAD_ON_THIS_NODE, WORKLOAD_PLAINTEXT_RULES, WorkloadEntry,
};

/// What the kernel should know of the mesh config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct MeshMaps {
    /// `ZT_WORKLOADS`.
    pub(crate) workloads: BTreeMap<Addr, WorkloadEntry>,
    /// `ZT_PLAINTEXT_RULES`: (prefix length, key) -> `PLAINTEXT_*` verdict.
    pub(crate) plaintext_rules: BTreeMap<(u32, PlaintextRuleKey), u32>,
}

impl MeshMaps {
    /// The same maps with no plaintext rules: the proxy alone enforces the policies.
    pub(crate) fn without_plaintext_rules(&self) -> MeshMaps {
        let mut workloads = self.workloads.clone();
        for entry in workloads.values_mut() {
            entry.flags &= !WORKLOAD_PLAINTEXT_RULES;
        }
        MeshMaps {
            workloads,
            plaintext_rules: BTreeMap::new(),
        }
    }
}

/// A CIDR in the kernel's 16-byte address space (IPv4 as v4-mapped IPv6): the network address
/// and the prefix length there.
pub(crate) fn mapped_prefix(net: &IpNet) -> (Addr, u32) {
    match net {
        IpNet::V4(v4) => (
            Addr::from(IpAddr::V4(v4.network())),
            96 + u32::from(v4.prefix_len()),
        ),
        IpNet::V6(v6) => (
            Addr::from(IpAddr::V6(v6.network())),
            u32::from(v6.prefix_len()),
        ),
    }
}

/// A workload as the kernel knows it, for the API (and the tests comparing the two).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedWorkload {
    pub uid: String,
    pub workload_index: u32,
    pub identity: String,
    pub identity_index: u32,
    pub addresses: Vec<IpAddr>,
    pub flags: u32,
}

/// Hands out small integers for names and takes them back when a name leaves.
#[derive(Default)]
struct Indices {
    by_name: HashMap<String, u32>,
    free: Vec<u32>,
    next: u32,
}

impl Indices {
    fn get(&mut self, name: &str) -> u32 {
        if let Some(&index) = self.by_name.get(name) {
            return index;
        }
        let index = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        });
        self.by_name.insert(name.to_owned(), index);
        index
    }

    /// Frees the indices of names not in `keep`.
    fn retain(&mut self, keep: &std::collections::HashSet<&str>) {
        let free = &mut self.free;
        self.by_name.retain(|name, index| {
            let kept = keep.contains(name.as_str());
            if !kept {
                free.push(*index);
            }
            kept
        });
    }
}

/// Builds the kernel view of successive configs.
pub(crate) struct WorkloadMap {
    node: String,
    workloads: Indices,
    identities: Indices,
}

impl WorkloadMap {
    pub(crate) fn new(node: &str) -> WorkloadMap {
        WorkloadMap {
            node: node.to_owned(),
            workloads: Indices::default(),
            identities: Indices::default(),
        }
    }

    /// The maps for `config`, and the indexed workloads the API reports.
    pub(crate) fn view(&mut self, config: &MeshConfig) -> (MeshMaps, Vec<IndexedWorkload>) {
        let mut workloads: Vec<&Workload> = config.workloads().collect();
        workloads.sort_unstable_by(|a, b| a.uid.cmp(&b.uid));
        let uids = workloads.iter().map(|w| w.uid.as_str()).collect();
        self.workloads.retain(&uids);
        let identities: Vec<String> = workloads.iter().map(|w| w.identity().to_string()).collect();
        self.identities
            .retain(&identities.iter().map(String::as_str).collect());
        let mut maps = MeshMaps::default();
        let mut indexed = Vec::with_capacity(workloads.len());
        for (workload, identity) in workloads.into_iter().zip(identities) {
            let workload_index = self.workloads.get(&workload.uid);
            let mut flags = 0;
            if workload.protocol == Protocol::Hbone {
                flags |= WORKLOAD_IN_MESH;
            }
            if workload.waypoint.is_some() {
                flags |= WORKLOAD_HAS_WAYPOINT;
            }
            if !self.node.is_empty() && workload.node == self.node {
                flags |= WORKLOAD_ON_THIS_NODE;
                let target = config.authz_target(workload.workload_ips[0], &workload.namespace);
                let plan = config.policies.plaintext_plan(&target);
                if let Some(rules) = plan
                    .as_ref()
                    .and_then(|p| plaintext_rules(p, workload_index))
                {
                    flags |= WORKLOAD_PLAINTEXT_RULES;
                    maps.plaintext_rules.extend(rules);
                }
            }
            let entry = WorkloadEntry {
                workload: workload_index,
                identity: self.identities.get(&identity),
                flags,
                _pad: 0,
            };
            for ip in &workload.workload_ips {
                maps.workloads.insert(Addr::from(*ip), entry);
            }
            indexed.push(IndexedWorkload {
                uid: workload.uid.clone(),
                workload_index,
                identity,
                identity_index: entry.identity,
                addresses: workload.workload_ips.clone(),
                flags,
            });
        }
        (maps, indexed)
    }
}

/// The LPM entries of a plan, or None when it denies nothing (the kernel then need not look).
fn plaintext_rules(
    plan: &PlaintextPlan,
    workload: u32,
) -> Option<BTreeMap<(u32, PlaintextRuleKey), u32>> {
    if plan.rules.iter().all(|rule| rule.verdict.is_none()) {
        return None;
    }
    let entries = plan.rules.iter().map(|rule| {
        let (source, prefix) = mapped_prefix(&rule.source);
        let key = PlaintextRuleKey {
            workload,
            port: rule.port.unwrap_or(0),
            _pad: 0,
            source,
        };
        let verdict = match rule.verdict {
            None => PLAINTEXT_ALLOW,
            Some(DenyReason::DenyPolicy) => PLAINTEXT_DENY_POLICY,
            Some(DenyReason::NoAllowMatch) => PLAINTEXT_DENY_NEEDS_IDENTITY,
        };
        ((PLAINTEXT_RULE_FIXED_BITS + prefix, key), verdict)
    });
    Some(entries.collect())
}

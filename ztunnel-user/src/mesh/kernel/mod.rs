//! The kernel's view of the mesh config: every workload address with the daemon's integer
//! indices for the workload and its identity (identity strings stay in userspace), and the
//! plaintext rules `sk_lookup` applies to this node's workloads. Indices are stable across
//! reloads for as long as a uid or an identity stays in the config.

use super::authz::{DenyReason, PlaintextPlan};
use super::config::{MeshConfig, Protocol, Touched, Workload};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
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

/// Where the kernel view goes: the capture's maps.
pub(crate) trait KernelMaps {
    type Error: std::fmt::Display;
    /// Makes the maps hold exactly `maps`, whatever they held.
    fn sync(&self, maps: &MeshMaps) -> Result<(), Self::Error>;
    /// Makes the changes `diff` lists.
    fn write(&self, diff: &MapsDiff) -> Result<(), Self::Error>;
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

/// What the kernel maps must change: each key's new value, or `None` to delete it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct MapsDiff {
    pub(crate) workloads: BTreeMap<Addr, Option<WorkloadEntry>>,
    pub(crate) plaintext_rules: BTreeMap<(u32, PlaintextRuleKey), Option<u32>>,
}

/// Hands out small integers for names, counting the holders of each; a name's integer is
/// taken back when its last holder leaves, at `release`, not before: within a batch a new
/// name never gets the integer of one that left, so a key the batch deletes is never one it
/// writes for someone else.
#[derive(Default)]
struct Indices {
    /// A workload's uid is the model's own string, not a copy.
    by_name: HashMap<Arc<str>, (u32, usize)>,
    free: Vec<u32>,
    next: u32,
}

impl Indices {
    /// The index `name` holds, if any.
    fn index(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).map(|(index, _)| *index)
    }

    /// The index of `name`, with one more holder.
    fn hold(&mut self, name: &Arc<str>) -> u32 {
        if let Some((index, holders)) = self.by_name.get_mut(name) {
            *holders += 1;
            return *index;
        }
        let index = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        });
        self.by_name.insert(name.clone(), (index, 1));
        index
    }

    /// One holder of `name` fewer; with none left, its index is free again.
    fn release(&mut self, name: &str) {
        if let Some((index, holders)) = self.by_name.get_mut(name) {
            *holders -= 1;
            if *holders == 0 {
                self.free.push(*index);
                self.by_name.remove(name);
            }
        }
    }
}

/// One workload as the kernel knows it (its uid, identity and addresses are the model's):
/// its entry's integers, and, on this node, the plaintext rules `sk_lookup` applies to it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct KernelWorkload {
    identity_index: u32,
    flags: u32,
    rules: BTreeMap<(u32, PlaintextRuleKey), u32>,
}

impl KernelWorkload {
    /// What the kernel holds of it: its entry, without its rules (and their flag) while the
    /// plaintext rules are not written.
    fn entry(&self, workload_index: u32, with_rules: bool) -> WorkloadEntry {
        let mut flags = self.flags;
        if !with_rules {
            flags &= !WORKLOAD_PLAINTEXT_RULES;
        }
        WorkloadEntry {
            workload: workload_index,
            identity: self.identity_index,
            flags,
            _pad: 0,
        }
    }

    /// Adds what the kernel holds of it, at `addresses`, to `maps`.
    fn write_into(
        &self,
        maps: &mut MeshMaps,
        workload_index: u32,
        addresses: &[IpAddr],
        with_rules: bool,
    ) {
        let entry = self.entry(workload_index, with_rules);
        for ip in addresses {
            maps.workloads.insert(Addr::from(*ip), entry);
        }
        if with_rules {
            maps.plaintext_rules
                .extend(self.rules.iter().map(|(key, verdict)| (*key, *verdict)));
        }
    }
}

/// The kernel's view of the model, kept per workload: a batch of changes recomputes the
/// workloads it touched (and, when policies changed, the plaintext rules of this node's
/// workloads), and what the kernel maps must change follows from the entries before and
/// after. Only integers are kept here; names and addresses are read from the model, the one
/// in force or the one a batch makes.
pub(crate) struct WorkloadMap {
    node: String,
    workloads: Indices,
    identities: Indices,
    /// By workload index.
    entries: HashMap<u32, KernelWorkload>,
    /// The uids of the workloads on this node: their plaintext rules follow the policies.
    local: BTreeSet<String>,
    /// Whether the kernel holds the plaintext rules (a full map can refuse them; the proxy
    /// then enforces every policy alone).
    rules_written: bool,
}

/// A batch's kernel view, not in force until `commit`.
pub(crate) struct Staged {
    /// Each recomputed workload's uid, index and entry (`None`: it left).
    entries: Vec<(String, u32, Option<KernelWorkload>)>,
    /// The names whose indices the batch took, to give back if it is dropped.
    held: Vec<(Arc<str>, Arc<str>)>,
    /// The names whose indices the batch lets go of, once it is in force.
    released: Vec<(String, String)>,
}

impl WorkloadMap {
    pub(crate) fn new(node: &str) -> WorkloadMap {
        WorkloadMap {
            node: node.to_owned(),
            workloads: Indices::default(),
            identities: Indices::default(),
            entries: HashMap::new(),
            local: BTreeSet::new(),
            rules_written: true,
        }
    }

    /// The kernel view of the workloads `touched` names (and of every workload on this node
    /// when policies changed), as `next` has them; `current` is the model in force.
    pub(crate) fn stage(
        &mut self,
        current: &MeshConfig,
        next: &MeshConfig,
        touched: &Touched,
    ) -> Staged {
        let mut uids: BTreeSet<String> = touched.workloads.iter().cloned().collect();
        if touched.policies > 0 {
            uids.extend(self.local.iter().cloned());
        }
        let mut staged = Staged {
            entries: Vec::with_capacity(uids.len()),
            held: Vec::new(),
            released: Vec::new(),
        };
        for uid in uids {
            let old_index = self.workloads.index(&uid);
            if let Some(old) = current.workload_by_uid(&uid) {
                staged
                    .released
                    .push((uid.clone(), old.identity().to_string()));
            }
            match next.workload_by_uid(&uid) {
                Some(workload) => {
                    let identity: Arc<str> = workload.identity().to_string().into();
                    let workload_index = self.workloads.hold(&workload.uid);
                    let identity_index = self.identities.hold(&identity);
                    staged.held.push((workload.uid.clone(), identity));
                    let entry = self.compute(next, workload, workload_index, identity_index);
                    staged.entries.push((uid, workload_index, Some(entry)));
                }
                None => {
                    if let Some(index) = old_index {
                        staged.entries.push((uid, index, None));
                    }
                }
            }
        }
        staged
    }

    fn compute(
        &self,
        config: &MeshConfig,
        workload: &Workload,
        workload_index: u32,
        identity_index: u32,
    ) -> KernelWorkload {
        let mut flags = 0;
        if workload.protocol == Protocol::Hbone {
            flags |= WORKLOAD_IN_MESH;
        }
        if workload.waypoint.is_some() {
            flags |= WORKLOAD_HAS_WAYPOINT;
        }
        let mut rules = BTreeMap::new();
        if !self.node.is_empty() && workload.node == self.node {
            flags |= WORKLOAD_ON_THIS_NODE;
            let target = config.authz_target(workload.workload_ips[0], &workload.namespace);
            let plan = config.policies.plaintext_plan(&target);
            if let Some(planned) = plan
                .as_ref()
                .and_then(|p| plaintext_rules(p, workload_index))
            {
                flags |= WORKLOAD_PLAINTEXT_RULES;
                rules = planned;
            }
        }
        KernelWorkload {
            identity_index,
            flags,
            rules,
        }
    }

    /// What the kernel maps must change for `staged` (made from `current` to `next`), as they
    /// are written now. Only the batch's own workloads can hold its keys: the model gives no
    /// address to two workloads, and a rule's key holds its workload's index.
    pub(crate) fn diff(
        &self,
        current: &MeshConfig,
        next: &MeshConfig,
        staged: &Staged,
    ) -> MapsDiff {
        let mut before = MeshMaps::default();
        let mut after = MeshMaps::default();
        for (uid, index, new) in &staged.entries {
            let old_index = self.workloads.index(uid);
            let old = old_index.and_then(|i| Some((i, self.entries.get(&i)?)));
            if let (Some((i, old)), Some(workload)) = (old, current.workload_by_uid(uid)) {
                old.write_into(&mut before, i, &workload.workload_ips, self.rules_written);
            }
            if let (Some(new), Some(workload)) = (new, next.workload_by_uid(uid)) {
                new.write_into(
                    &mut after,
                    *index,
                    &workload.workload_ips,
                    self.rules_written,
                );
            }
        }
        MapsDiff {
            workloads: changes(&before.workloads, &after.workloads),
            plaintext_rules: changes(&before.plaintext_rules, &after.plaintext_rules),
        }
    }

    /// Puts `staged` in force: the kernel holds it now (with the plaintext rules, or not).
    pub(crate) fn commit(&mut self, staged: Staged, rules_written: bool) {
        for (uid, index, entry) in staged.entries {
            match entry {
                Some(entry) => {
                    if entry.flags & WORKLOAD_ON_THIS_NODE != 0 {
                        self.local.insert(uid);
                    } else {
                        self.local.remove(&uid);
                    }
                    self.entries.insert(index, entry);
                }
                None => {
                    self.local.remove(&uid);
                    self.entries.remove(&index);
                }
            }
        }
        for (uid, identity) in staged.released {
            self.workloads.release(&uid);
            self.identities.release(&identity);
        }
        self.rules_written = rules_written;
    }

    /// Drops `staged`: the indices it took are given back.
    pub(crate) fn discard(&mut self, staged: Staged) {
        for (uid, identity) in staged.held {
            self.workloads.release(&uid);
            self.identities.release(&identity);
        }
    }

    /// Whether the kernel holds the plaintext rules.
    pub(crate) fn rules_written(&self) -> bool {
        self.rules_written
    }

    /// Everything the kernel maps hold for `config` (with the plaintext rules or not), which
    /// is the model in force, or the one `staged` was made for: what a full write reconciles
    /// them with.
    pub(crate) fn full(
        &self,
        config: &MeshConfig,
        staged: Option<&Staged>,
        with_rules: bool,
    ) -> MeshMaps {
        let staged: HashMap<u32, &KernelWorkload> = staged
            .map(|s| {
                s.entries
                    .iter()
                    .filter_map(|(_, index, entry)| Some((*index, entry.as_ref()?)))
                    .collect()
            })
            .unwrap_or_default();
        let mut maps = MeshMaps::default();
        for workload in config.workloads() {
            let Some(index) = self.workloads.index(&workload.uid) else {
                continue;
            };
            let entry = staged
                .get(&index)
                .copied()
                .or_else(|| self.entries.get(&index));
            if let Some(entry) = entry {
                entry.write_into(&mut maps, index, &workload.workload_ips, with_rules);
            }
        }
        maps
    }

    /// Every workload of `config` (the model in force) with its indices, by uid, as the
    /// kernel knows them.
    pub(crate) fn indexed(&self, config: &MeshConfig) -> Vec<IndexedWorkload> {
        let mut indexed: Vec<IndexedWorkload> = config
            .workloads()
            .filter_map(|workload| {
                let index = self.workloads.index(&workload.uid)?;
                let entry = self.entries.get(&index)?.entry(index, self.rules_written);
                Some(IndexedWorkload {
                    uid: workload.uid.to_string(),
                    workload_index: index,
                    identity: workload.identity().to_string(),
                    identity_index: entry.identity,
                    addresses: workload.workload_ips.clone(),
                    flags: entry.flags,
                })
            })
            .collect();
        indexed.sort_unstable_by(|a, b| a.uid.cmp(&b.uid));
        indexed
    }
}

/// Each key whose value differs between `before` and `after`, with its value after (`None`:
/// it goes).
fn changes<K: Ord + Copy, V: PartialEq + Copy>(
    before: &BTreeMap<K, V>,
    after: &BTreeMap<K, V>,
) -> BTreeMap<K, Option<V>> {
    let gone = before
        .keys()
        .filter(|key| !after.contains_key(key))
        .map(|key| (*key, None));
    let written = after
        .iter()
        .filter(|(key, value)| before.get(key) != Some(value))
        .map(|(key, value)| (*key, Some(*value)));
    gone.chain(written).collect()
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

#[cfg(test)]
pub(crate) mod memory;

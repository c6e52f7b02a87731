//! What the file put in the model, entry by entry: each entry's key and a hash of its text. A
//! new version of the file is compared with it: the entries whose text is unchanged are not
//! parsed again, those whose text is new are parsed and checked on their own, and those whose
//! text is gone are removed. So one pod's change in a file of 50,000 costs the file's read and
//! hash and one entry's parse, not the whole file's.
//!
//! The comparison only ever takes a short cut the whole parse would agree with; whenever it
//! cannot tell (a layout `layout::split` does not read, an entry that does not parse or check
//! on its own, a key or an address used twice, a waypoint involved), the whole file is parsed
//! and checked as before, and its errors name the entry.

use super::layout::{self, EntryText, EntryTexts};
use super::{ConfigError, FileChanges, FileEntry, MeshFile, Removed};
use crate::mesh::authz::Policy;
use crate::mesh::config::{Change, GatewayDestination, MeshConfig, Service, Workload};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// `EntryText::hash`.
type TextHash = u128;
type FastHash = foldhash::fast::FixedState;

/// What the version of the file in force put in the model.
#[derive(Debug, Default)]
pub(crate) struct FileIndex {
    workloads: Entries,
    services: Entries,
    policies: Entries,
    /// Whether each entry's text hash is known (the file's layout splits); if not, the next
    /// version is parsed whole.
    by_text: bool,
    /// What the file's waypoints name: an entry that holds one of these is only removed or
    /// changed by a whole parse, which checks that every waypoint still names an entry.
    waypoint_targets: WaypointTargets,
}

/// One kind's entries.
#[derive(Debug, Default)]
struct Entries {
    keys: HashSet<Arc<str>>,
    /// Each entry's text hash and key, in the file's order (empty unless
    /// `FileIndex::by_text`).
    in_order: Vec<(TextHash, Arc<str>)>,
}

#[derive(Debug, Default)]
struct WaypointTargets {
    addresses: HashSet<IpAddr>,
    /// Service keys (`namespace/hostname`).
    hostnames: HashSet<String>,
}

/// How the index changes once a version is in force.
#[derive(Debug)]
pub(crate) enum IndexUpdate {
    /// The version was parsed whole.
    Replace(Box<FileIndex>),
    /// The version was compared entry by entry.
    Patch(Box<[EntriesPatch; 3]>),
}

/// How one kind's entries changed: the range of `Entries::in_order` between the first and the
/// last difference, what the new version has there, and the keys of the entries whose text is
/// gone (`vanished`) and of those whose text is new (`added`).
#[derive(Debug, Default)]
pub(crate) struct EntriesPatch {
    range: Range<usize>,
    middle: Vec<(TextHash, Arc<str>)>,
    vanished: Vec<Arc<str>>,
    added: Vec<Arc<str>>,
}

impl FileIndex {
    /// The changes a new version of the file (`text`) makes to the model in force (`current`),
    /// and the index once they are made. `path` only names the file in errors.
    pub(crate) fn read(
        &self,
        path: &Path,
        text: &str,
        current: &MeshConfig,
    ) -> Result<(FileChanges, IndexUpdate), ConfigError> {
        if let Some(by_entry) = self.read_changed_entries(text, current) {
            return Ok(by_entry);
        }
        let file = MeshFile::parse(path, text)?;
        let index = FileIndex::of(&file, layout::split(text));
        let removed = Removed {
            workloads: self.workloads.gone_from(&index.workloads),
            services: self.services.gone_from(&index.services),
            policies: self.policies.gone_from(&index.policies),
        };
        let changes = FileChanges::whole(file, removed);
        Ok((changes, IndexUpdate::Replace(Box::new(index))))
    }

    /// Takes `update` in: the version it came with is in force.
    pub(crate) fn commit(&mut self, update: IndexUpdate) {
        match update {
            IndexUpdate::Replace(index) => *self = *index,
            IndexUpdate::Patch(patches) => {
                let [workloads, services, policies] = *patches;
                self.workloads.patch(workloads);
                self.services.patch(services);
                self.policies.patch(policies);
            }
        }
    }

    /// The index of a file parsed whole, with its entries' texts if its layout splits.
    fn of(file: &MeshFile, texts: Option<EntryTexts>) -> FileIndex {
        // The split finds what the parse found; were it ever otherwise, the next version is
        // parsed whole too.
        let texts = texts.filter(|texts| {
            texts.workloads.len() == file.workloads.len()
                && texts.services.len() == file.services.len()
                && texts.policies.len() == file.policies.len()
        });
        let by_text = texts.is_some();
        let texts = texts.unwrap_or_default();
        let mut waypoint_targets = WaypointTargets::default();
        let waypoints = file.workloads.iter().filter_map(|w| w.waypoint.as_deref());
        let waypoints = waypoints.chain(file.services.iter().flat_map(Service::waypoints));
        for waypoint in waypoints {
            match &waypoint.destination {
                GatewayDestination::Address(address) => {
                    waypoint_targets.addresses.insert(address.ip);
                }
                GatewayDestination::Hostname(name) => {
                    waypoint_targets.hostnames.insert(name.key().to_owned());
                }
            }
        }
        FileIndex {
            workloads: Entries::of(&file.workloads, &texts.workloads),
            services: Entries::of(&file.services, &texts.services),
            policies: Entries::of(&file.policies, &texts.policies),
            by_text,
            waypoint_targets,
        }
    }

    /// The new version compared entry by entry, if it can be.
    fn read_changed_entries(
        &self,
        text: &str,
        current: &MeshConfig,
    ) -> Option<(FileChanges, IndexUpdate)> {
        if !self.by_text {
            return None;
        }
        let texts = layout::split(text)?;
        let workloads = self.workloads.compare::<Workload>(&texts.workloads)?;
        let services = self.services.compare::<Service>(&texts.services)?;
        let policies = self.policies.compare::<Policy>(&texts.policies)?;
        if !self.waypoints_unaffected(&workloads, &services, current) {
            return None;
        }
        let summary = MeshFile::summary_of(
            texts.workloads.len(),
            texts.services.len(),
            texts.policies.len(),
        );
        let (workloads, workloads_patch) = workloads.into_parts();
        let (services, services_patch) = services.into_parts();
        let (policies, policies_patch) = policies.into_parts();
        let changes = FileChanges {
            workloads,
            services,
            policies,
            removed: Removed {
                workloads: workloads_patch.removed(),
                services: services_patch.removed(),
                policies: policies_patch.removed(),
            },
            summary,
        };
        // The model checks addresses as the whole parse does (none held twice): a version it
        // would refuse an entry of is parsed whole, to be refused with the entry named.
        if !current
            .updated(changes.addressed(current))
            .refused
            .is_empty()
        {
            return None;
        }
        let patches = Box::new([workloads_patch, services_patch, policies_patch]);
        Some((changes, IndexUpdate::Patch(patches)))
    }

    /// Whether the waypoints stay as the index has them: no entry involved names one, or holds
    /// an address or hostname one names.
    fn waypoints_unaffected(
        &self,
        workloads: &Compared<Workload>,
        services: &Compared<Service>,
        current: &MeshConfig,
    ) -> bool {
        let targets = &self.waypoint_targets;
        let new_name_none = workloads.changed.iter().all(|w| w.waypoint.is_none())
            && services
                .changed
                .iter()
                .all(|s| s.waypoints().next().is_none());
        let old_workloads_untied = workloads.patch.vanished.iter().all(|uid| {
            current.workload_by_uid(uid).is_some_and(|old| {
                old.waypoint.is_none()
                    && !old
                        .workload_ips
                        .iter()
                        .any(|ip| targets.addresses.contains(ip))
            })
        });
        let old_services_untied = services.patch.vanished.iter().all(|key| {
            !targets.hostnames.contains(&**key)
                && current.service_by_key(key).is_some_and(|old| {
                    old.waypoints().next().is_none()
                        && !old
                            .vips
                            .iter()
                            .any(|vip| targets.addresses.contains(&vip.ip))
                })
        });
        new_name_none && old_workloads_untied && old_services_untied
    }
}

impl Entries {
    fn of<T: FileEntry>(entries: &[T], texts: &[EntryText]) -> Entries {
        let keys: Vec<Arc<str>> = entries.iter().map(FileEntry::key).collect();
        let hashes = texts.iter().map(|text| text.hash);
        Entries {
            in_order: hashes.zip(keys.iter().cloned()).collect(),
            keys: keys.into_iter().collect(),
        }
    }

    /// The keys of these entries that `next` does not have.
    fn gone_from(&self, next: &Entries) -> Vec<Arc<str>> {
        let gone = self.keys.iter().filter(|key| !next.keys.contains(*key));
        gone.cloned().collect()
    }

    /// A new version's entries of this kind (`texts`) against these. A version mostly changes
    /// a few entries where they are: those before its first difference and after its last are
    /// compared in place, and only those between are looked up by their text.
    fn compare<T: FileEntry>(&self, texts: &[EntryText]) -> Option<Compared<T>> {
        let old = &self.in_order;
        let same = |&((was, _), now): &(&(TextHash, Arc<str>), &EntryText)| *was == now.hash;
        let prefix = old.iter().zip(texts).take_while(same).count();
        let (old_rest, new_rest) = (&old[prefix..], &texts[prefix..]);
        let suffix = old_rest.iter().rev().zip(new_rest.iter().rev());
        let suffix = suffix.take_while(same).count();
        let range = prefix..old.len() - suffix;
        let mut unclaimed: HashMap<TextHash, &Arc<str>, FastHash> = old[range.clone()]
            .iter()
            .map(|(hash, key)| (*hash, key))
            .collect();
        let new_middle = &texts[prefix..texts.len() - suffix];
        let mut middle = Vec::with_capacity(new_middle.len());
        let mut changed = Vec::new();
        for EntryText { text, hash } in new_middle {
            match unclaimed.remove(hash) {
                Some(key) => middle.push((*hash, key.clone())),
                None => {
                    let entry = parse_entry::<T>(text)?;
                    middle.push((*hash, entry.key()));
                    changed.push(entry);
                }
            }
        }
        let vanished: Vec<Arc<str>> = unclaimed.into_values().cloned().collect();
        // A new text's key must be neither an unchanged entry's (the same entry twice is an
        // error the whole parse names) nor another new text's.
        let freed: HashSet<&str> = vanished.iter().map(|key| &**key).collect();
        let mut added = Vec::with_capacity(changed.len());
        let mut new_keys = HashSet::new();
        for entry in &changed {
            let key = entry.key();
            let held = self.keys.contains(&key) && !freed.contains(&*key);
            if held || !new_keys.insert(key.clone()) {
                return None;
            }
            added.push(key);
        }
        let patch = EntriesPatch {
            range,
            middle,
            vanished,
            added,
        };
        Some(Compared { changed, patch })
    }

    fn patch(&mut self, patch: EntriesPatch) {
        self.in_order.splice(patch.range, patch.middle);
        for key in &patch.vanished {
            self.keys.remove(key);
        }
        self.keys.extend(patch.added);
    }
}

/// One kind's entries of a new version against those in force: the entries whose text is new
/// (parsed and checked), and the patch of the index that takes the version in.
struct Compared<T> {
    changed: Vec<T>,
    patch: EntriesPatch,
}

impl<T> Compared<T> {
    fn into_parts(self) -> (Vec<Arc<T>>, EntriesPatch) {
        (self.changed.into_iter().map(Arc::new).collect(), self.patch)
    }
}

impl EntriesPatch {
    /// The keys the version no longer has: gone, and not back with a new text.
    fn removed(&self) -> Vec<Arc<str>> {
        let back: HashSet<&str> = self.added.iter().map(|key| &**key).collect();
        let gone = self.vanished.iter().filter(|key| !back.contains(&***key));
        gone.cloned().collect()
    }
}

/// One entry's text parsed and checked on its own; `None` if it does not parse to exactly one
/// valid entry (the whole parse then says why).
fn parse_entry<T: FileEntry>(text: &str) -> Option<T> {
    let mut list: Vec<T> = serde_yaml_ng::from_str(text).ok()?;
    let mut entry = list.pop().filter(|_| list.is_empty())?;
    entry.trim();
    entry.check().ok()?;
    Some(entry)
}

impl FileChanges {
    /// The workload and service changes, for the model's check of their addresses.
    fn addressed(&self, current: &MeshConfig) -> Vec<Change> {
        let mut changes = self.changes(current);
        changes.retain(|change| !matches!(change, Change::Policy(_) | Change::RemovePolicy(_)));
        changes
    }
}

//! The mesh config file, in the camelCase shape of Istio ztunnel's local config (so an Istio
//! user's file works as it is): read, validated as a whole (a bad entry refuses the file,
//! naming the entry and the field), then turned into the changes that make the model in force
//! equal to it. A new version is compared with the one in force entry by entry where it can be
//! (`index`, `layout`): only the entries whose text changed are parsed.

mod index;
mod layout;

pub(crate) use index::{FileIndex, IndexUpdate};

use super::{Change, GatewayAddress, GatewayDestination, MeshConfig, Service, Workload};
use crate::mesh::FieldError;
use crate::mesh::authz::Policy;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read mesh config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mesh config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml_ng::Error,
    },
    #[error("mesh config {path}: {entry}: {problem}")]
    Invalid {
        path: PathBuf,
        entry: String,
        problem: FieldError,
    },
}

/// A valid file's entries.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshFile {
    #[serde(default)]
    workloads: Vec<Workload>,
    #[serde(default)]
    services: Vec<Service>,
    #[serde(default)]
    policies: Vec<Policy>,
}

/// What the file's diff needs of an entry, whatever its kind.
trait FileEntry: DeserializeOwned {
    /// The uid or key that names it in the model.
    fn key(&self) -> Arc<str>;
    /// Checks the fields serde cannot.
    fn check(&self) -> Result<(), FieldError>;
    /// serde grows a list as it reads it, with room for four entries at first: a policy's one
    /// match took 1.2 KB of its 1.8. The entries go into the model at their lists' lengths.
    fn trim(&mut self);
}

impl FileEntry for Workload {
    fn key(&self) -> Arc<str> {
        self.uid.clone()
    }

    fn check(&self) -> Result<(), FieldError> {
        self.validate()
    }

    fn trim(&mut self) {
        self.workload_ips.shrink_to_fit();
        self.authorization_policies.shrink_to_fit();
    }
}

impl FileEntry for Service {
    fn key(&self) -> Arc<str> {
        Service::key(self).into()
    }

    fn check(&self) -> Result<(), FieldError> {
        self.validate()
    }

    fn trim(&mut self) {
        self.vips.shrink_to_fit();
        self.subject_alt_names.shrink_to_fit();
    }
}

impl FileEntry for Policy {
    fn key(&self) -> Arc<str> {
        Policy::key(self).into()
    }

    fn check(&self) -> Result<(), FieldError> {
        self.validate()
    }

    fn trim(&mut self) {
        self.shrink_to_fit();
    }
}

impl MeshFile {
    /// Parses and validates; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<MeshFile, ConfigError> {
        let mut file: MeshFile =
            serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        file.workloads.iter_mut().for_each(FileEntry::trim);
        file.services.iter_mut().for_each(FileEntry::trim);
        file.policies.iter_mut().for_each(FileEntry::trim);
        file.validate()
            .map_err(|(entry, problem)| ConfigError::Invalid {
                path: path.to_owned(),
                entry,
                problem,
            })?;
        Ok(file)
    }

    pub fn workloads(&self) -> &[Workload] {
        &self.workloads
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    fn summary(&self) -> String {
        MeshFile::summary_of(
            self.workloads.len(),
            self.services.len(),
            self.policies.len(),
        )
    }

    /// How many workloads, services and policies a file holds, for the log.
    fn summary_of(workloads: usize, services: usize, policies: usize) -> String {
        format!("{workloads} workloads, {services} services, {policies} policies")
    }

    /// Checks every entry, and that uids, addresses, hostnames and policy keys are unique and
    /// waypoints name an entry of the file. The error names the entry.
    fn validate(&self) -> Result<(), (String, FieldError)> {
        let mut uids = HashSet::new();
        let mut addresses: HashMap<IpAddr, &str> = HashMap::new();
        for (index, workload) in self.workloads.iter().enumerate() {
            let entry = || entry_name("workload", index, &workload.namespace, &workload.name);
            workload.validate().map_err(|p| (entry(), p))?;
            if !uids.insert(&*workload.uid) {
                let problem = format!("field uid {} is used by an earlier workload", workload.uid);
                return Err((entry(), FieldError::new(problem)));
            }
            // Host-network workloads share their node's address.
            let owned = workload
                .workload_ips
                .iter()
                .filter(|_| workload.owns_its_addresses());
            for ip in owned {
                if addresses.insert(*ip, "workload").is_some() {
                    let problem = format!("field workloadIps: {ip} belongs to an earlier workload");
                    return Err((entry(), FieldError::new(problem)));
                }
            }
        }
        let mut hostnames = HashSet::new();
        let mut prefixes = HashMap::new();
        for (index, service) in self.services.iter().enumerate() {
            let entry = || entry_name("service", index, &service.namespace, &service.name);
            service.validate().map_err(|p| (entry(), p))?;
            if !hostnames.insert(service.key()) {
                let problem = format!("hostname {} is used by an earlier service", service.key());
                return Err((entry(), FieldError::new(problem)));
            }
            for vip in &service.vips {
                if addresses.insert(vip.ip, "service").is_some() {
                    let problem = format!("field vips: {} is already in use", vip.ip);
                    return Err((entry(), FieldError::new(problem)));
                }
            }
            for vip in &service.cidr_vips {
                if let Some(holder) = prefixes.insert(vip.cidr, service.key()) {
                    let problem = format!(
                        "field cidrVips: {} is a prefix of service {holder}",
                        vip.cidr
                    );
                    return Err((entry(), FieldError::new(problem)));
                }
            }
        }
        // Waypoints may name any workload or service, so they are checked once all are known.
        let known = |waypoint: &GatewayAddress| match &waypoint.destination {
            GatewayDestination::Address(address) => addresses.contains_key(&address.ip),
            GatewayDestination::Hostname(name) => hostnames.contains(name.key()),
        };
        let waypoints = self
            .workloads
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                let entry = || entry_name("workload", i, &w.namespace, &w.name);
                Some((entry(), w.waypoint.as_deref()?))
            })
            .chain(self.services.iter().enumerate().flat_map(|(i, s)| {
                let entry = move || entry_name("service", i, &s.namespace, &s.name);
                s.waypoints().map(move |waypoint| (entry(), waypoint))
            }));
        for (entry, waypoint) in waypoints {
            if !known(waypoint) {
                let problem = format!(
                    "field waypoint: {:?} is neither a workload nor a service of this config",
                    waypoint.destination
                );
                return Err((entry, FieldError::new(problem)));
            }
        }
        let mut keys = HashSet::new();
        for (index, policy) in self.policies.iter().enumerate() {
            let entry = || entry_name("policy", index, &policy.namespace, &policy.name);
            policy.validate().map_err(|p| (entry(), p))?;
            if !keys.insert(policy.key()) {
                let problem = format!("{} is used by an earlier policy", policy.key());
                return Err((entry(), FieldError::new(problem)));
            }
        }
        Ok(())
    }
}

/// The changes a version of the file makes: the entries it adds or changes (those that equal
/// the model's are left out when the changes are made), and the keys of the entries of the
/// version before that it no longer has. Entries from another source (istiod) are left alone.
#[derive(Debug)]
pub(crate) struct FileChanges {
    workloads: Vec<Arc<Workload>>,
    services: Vec<Arc<Service>>,
    policies: Vec<Arc<Policy>>,
    removed: Removed,
    summary: String,
}

/// Keys by kind.
#[derive(Debug, Default)]
struct Removed {
    workloads: Vec<Arc<str>>,
    services: Vec<Arc<str>>,
    policies: Vec<Arc<str>>,
}

impl FileChanges {
    /// Every entry of a file parsed whole.
    fn whole(file: MeshFile, removed: Removed) -> FileChanges {
        let summary = file.summary();
        FileChanges {
            workloads: file.workloads.into_iter().map(Arc::new).collect(),
            services: file.services.into_iter().map(Arc::new).collect(),
            policies: file.policies.into_iter().map(Arc::new).collect(),
            removed,
            summary,
        }
    }

    /// The version's entries and removals, against the model in force.
    pub(crate) fn changes(&self, current: &MeshConfig) -> Vec<Change> {
        let removed = &self.removed;
        let mut changes: Vec<Change> = removed
            .workloads
            .iter()
            .filter(|uid| current.workload_by_uid(uid).is_some())
            .map(|uid| Change::RemoveWorkload(uid.to_string()))
            .collect();
        changes.extend(
            removed
                .services
                .iter()
                .filter(|key| current.service_by_key(key).is_some())
                .map(|key| Change::RemoveService(key.to_string())),
        );
        changes.extend(
            removed
                .policies
                .iter()
                .filter(|key| current.policy_by_key(key).is_some())
                .map(|key| Change::RemovePolicy(key.to_string())),
        );
        changes.extend(
            self.workloads
                .iter()
                .filter(|w| current.workload_by_uid(&w.uid) != Some(w))
                .map(|w| Change::Workload(w.clone())),
        );
        changes.extend(
            self.services
                .iter()
                .filter(|s| current.service_by_key(&s.key()) != Some(s))
                .map(|s| Change::Service(s.clone())),
        );
        changes.extend(
            self.policies
                .iter()
                .filter(|p| current.policy_by_key(&p.key()) != Some(p))
                .map(|p| Change::Policy(p.clone())),
        );
        changes
    }

    /// How many workloads, services and policies the version holds, for the log.
    pub(crate) fn summary(&self) -> &str {
        &self.summary
    }

    /// How many entries were parsed: all of them when the version was parsed whole.
    pub(crate) fn entries_parsed(&self) -> usize {
        self.workloads.len() + self.services.len() + self.policies.len()
    }
}

/// How errors name an entry: its kind, position and `namespace/name`.
fn entry_name(kind: &str, index: usize, namespace: &str, name: &str) -> String {
    format!("{kind} #{index} ({namespace}/{name})")
}

#[cfg(test)]
mod tests;

//! The mesh config file, in the camelCase shape of Istio ztunnel's local config (so an Istio
//! user's file works as it is): read, validated as a whole (a bad entry refuses the file,
//! naming the entry and the field), then turned into the changes that make the model in force
//! equal to it.

use super::{Change, GatewayAddress, GatewayDestination, MeshConfig, Service, Workload};
use crate::mesh::FieldError;
use crate::mesh::authz::Policy;
use serde::Deserialize;
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

/// The names of a file's entries, by kind.
#[derive(Clone, Debug, Default)]
pub struct FileEntries {
    workloads: HashSet<String>,
    services: HashSet<String>,
    policies: HashSet<String>,
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

impl MeshFile {
    /// Parses and validates; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<MeshFile, ConfigError> {
        let mut file: MeshFile =
            serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        file.shrink_lists();
        file.validate()
            .map_err(|(entry, problem)| ConfigError::Invalid {
                path: path.to_owned(),
                entry,
                problem,
            })?;
        Ok(file)
    }

    /// serde grows a list as it reads it, with room for four entries at first: a policy's one
    /// match took 1.2 KB of its 1.8. The entries go into the model at their lists' lengths.
    fn shrink_lists(&mut self) {
        for workload in &mut self.workloads {
            workload.workload_ips.shrink_to_fit();
            workload.authorization_policies.shrink_to_fit();
        }
        for service in &mut self.services {
            service.vips.shrink_to_fit();
            service.subject_alt_names.shrink_to_fit();
        }
        self.policies.iter_mut().for_each(Policy::shrink_to_fit);
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

    /// How many workloads, services and policies the file holds, for the log.
    pub(crate) fn summary(&self) -> String {
        format!(
            "{} workloads, {} services, {} policies",
            self.workloads.len(),
            self.services.len(),
            self.policies.len()
        )
    }

    /// The names of its entries: what a later version of the file is diffed against.
    pub(crate) fn entries(&self) -> FileEntries {
        FileEntries {
            workloads: self.workloads.iter().map(|w| w.uid.to_string()).collect(),
            services: self.services.iter().map(Service::key).collect(),
            policies: self.policies.iter().map(Policy::key).collect(),
        }
    }

    /// The changes that make `current` hold this file's entries as the file has them (those
    /// that differ or are new), and no longer those of the file's version before (`before`)
    /// that it dropped. Entries from another source (istiod) are left alone.
    pub(crate) fn changes_from(self, current: &MeshConfig, before: &FileEntries) -> Vec<Change> {
        let now = self.entries();
        let mut changes: Vec<Change> = before
            .workloads
            .difference(&now.workloads)
            .filter(|uid| current.workload_by_uid(uid).is_some())
            .map(|uid| Change::RemoveWorkload(uid.clone()))
            .collect();
        changes.extend(
            before
                .services
                .difference(&now.services)
                .filter(|key| current.service_by_key(key).is_some())
                .map(|key| Change::RemoveService(key.clone())),
        );
        changes.extend(
            before
                .policies
                .difference(&now.policies)
                .filter(|key| current.policies.get(key).is_some())
                .map(|key| Change::RemovePolicy(key.clone())),
        );
        changes.extend(
            self.workloads
                .into_iter()
                .filter(|w| current.workload_by_uid(&w.uid) != Some(w))
                .map(|w| Change::Workload(Arc::new(w))),
        );
        changes.extend(
            self.services
                .into_iter()
                .filter(|s| current.service_by_key(&s.key()) != Some(s))
                .map(|s| Change::Service(Arc::new(s))),
        );
        changes.extend(
            self.policies
                .into_iter()
                .filter(|p| current.policies.get(&p.key()) != Some(p))
                .map(|p| Change::Policy(Arc::new(p))),
        );
        changes
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
            for ip in &workload.workload_ips {
                if addresses.insert(*ip, "workload").is_some() {
                    let problem = format!("field workloadIps: {ip} belongs to an earlier workload");
                    return Err((entry(), FieldError::new(problem)));
                }
            }
        }
        let mut hostnames = HashSet::new();
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
            .chain(self.services.iter().enumerate().filter_map(|(i, s)| {
                let entry = || entry_name("service", i, &s.namespace, &s.name);
                Some((entry(), s.waypoint.as_ref()?))
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

/// How errors name an entry: its kind, position and `namespace/name`.
fn entry_name(kind: &str, index: usize, namespace: &str, name: &str) -> String {
    format!("{kind} #{index} ({namespace}/{name})")
}

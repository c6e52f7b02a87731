//! The mesh model: workloads, services and authorization policies, whatever their source (the
//! local file: `file`, kept current by `reload`). `MeshConfig` is one version of it with its
//! lookups, cheap to clone: its maps are persistent, so a version shares every entry it did
//! not change with the one before. Every proxied connection takes one version and uses it
//! throughout; a batch of `Change`s makes the next version touching only what depends on the
//! entries changed (their addresses, their services' endpoints; the policy index when a policy
//! changes), and says what it touched.

mod address;
mod endpoints;
mod file;
mod load_balancing;
mod ports;
pub mod reload;
mod service;
mod workload;

pub use address::{
    GatewayAddress, GatewayDestination, NamespacedHostname, NetworkAddress, NetworkCidr,
};
pub use file::{ConfigError, MeshFile};
pub(crate) use file::{FileChanges, FileIndex, IndexUpdate};
pub use load_balancing::{HealthPolicy, IpFamily, LoadBalancer, LoadBalancerMode, LocalityScope};
pub use ports::{PortMap, ServicePorts};
pub use service::{Service, ServiceEndpoint, WeightedWaypoint};
pub(crate) use workload::DEFAULT_SERVICE_ACCOUNT;
pub use workload::{
    ApplicationTunnel, HealthStatus, Locality, NetworkMode, Protocol, TunnelHeader, Workload,
};

use super::FieldError;
use super::authz::{Connection, Decision, Denial, Policies, Policy, Subject, Target};
use endpoints::Endpoints;
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

/// Why the config offers nothing that can take a connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unroutable {
    #[error(
        "service {0} has no endpoint to choose (none healthy, or none its routing preferences allow)"
    )]
    ServiceWithoutEndpoint(String),
    #[error("waypoint {0:?} has no healthy instance")]
    WaypointWithoutInstance(GatewayDestination),
    #[error(
        "workload {workload} is on another network ({network:?}) and no gateway to it is known"
    )]
    NetworkWithoutGateway { workload: String, network: String },
}

/// One change of the model: an entry added or replaced (by its uid or key), or removed.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Workload(Arc<Workload>),
    /// By uid.
    RemoveWorkload(String),
    Service(Arc<Service>),
    /// By `namespace/hostname`.
    RemoveService(String),
    Policy(Arc<Policy>),
    /// By `namespace/name`.
    RemovePolicy(String),
}

/// A change the model refused (the others of its batch are applied), and why.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {problem}")]
pub struct Refused {
    /// The entry's uid or key.
    pub name: String,
    pub problem: FieldError,
}

/// What a batch of changes touched, for what depends on the model outside it (the kernel's
/// view of the workloads, the decisions on open connections).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Touched {
    /// The uids of the workloads added, replaced or removed.
    pub workloads: Vec<String>,
    pub services: usize,
    pub policies: usize,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty() && self.services == 0 && self.policies == 0
    }
}

/// The next version of the model, and what making it did.
pub struct Updated {
    pub config: MeshConfig,
    pub touched: Touched,
    pub refused: Vec<Refused>,
}

/// One version of the model with its lookups.
#[derive(Clone, Default)]
pub struct MeshConfig {
    workloads: imbl::OrdMap<Arc<str>, Arc<Workload>>,
    by_ip: imbl::OrdMap<IpAddr, Arc<Workload>>,
    /// By `namespace/hostname`.
    services: imbl::OrdMap<Arc<str>, KeyedService>,
    /// By VIP (`service_at` checks the port).
    services_by_vip: imbl::OrdMap<IpAddr, KeyedService>,
    /// By CIDR VIP, with how many prefixes of each family and length there are (the lengths
    /// a lookup tries, longest first).
    services_by_cidr: imbl::OrdMap<IpNet, KeyedService>,
    cidr_lengths: imbl::OrdMap<(bool, u8), usize>,
    /// The endpoints of each service key (whether that service is known yet or not), by uid.
    endpoints: imbl::OrdMap<Arc<str>, Endpoints>,
    /// Policies by `namespace/name`; `policies` indexes them for checks.
    policy_entries: imbl::OrdMap<Arc<str>, Arc<Policy>>,
    pub policies: Arc<Policies>,
    /// Every field an entry has set whose behaviour this build does not have, since the
    /// first version (so each is reported once).
    accepted_not_used: imbl::OrdSet<&'static str>,
}

/// A service as the model holds it: with its key, made once (connections routed to it look its
/// endpoints up by the key).
#[derive(Clone, Debug)]
pub struct KeyedService {
    pub key: Arc<str>,
    pub service: Arc<Service>,
}

impl std::ops::Deref for KeyedService {
    type Target = Service;

    fn deref(&self) -> &Service {
        &self.service
    }
}

/// A service endpoint chosen for a connection.
pub struct Endpoint<'a> {
    pub workload: &'a Workload,
    pub address: SocketAddr,
}

impl MeshConfig {
    /// The model a valid file describes; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<MeshConfig, ConfigError> {
        let empty = MeshConfig::default();
        let (file, _) = FileIndex::default().read(path, text, &empty)?;
        let mut updated = empty.updated(file.changes(&empty));
        // A valid file's entries fit together, so nothing is refused; if something were, the
        // file is.
        match updated.refused.pop() {
            None => Ok(updated.config),
            Some(refused) => Err(ConfigError::Invalid {
                path: path.to_owned(),
                entry: refused.name,
                problem: refused.problem,
            }),
        }
    }

    /// The next version with `changes` made. Entries a batch replaces or removes are taken
    /// out first, so entries may trade addresses within one batch; a new entry that is invalid
    /// or takes an address of an entry outside the batch is refused, and its previous version
    /// (if any, and if it still fits) stays.
    pub fn updated(&self, changes: Vec<Change>) -> Updated {
        let mut next = self.clone();
        let mut replaced = HashMap::new();
        let mut replaced_services = HashMap::new();
        let mut touched = Touched::default();
        for change in &changes {
            match change {
                Change::Workload(workload) => {
                    if let Some(old) = next.unlink_workload(&workload.uid) {
                        replaced.insert(workload.uid.clone(), old);
                    }
                }
                Change::RemoveWorkload(uid) => {
                    if let Some(old) = next.unlink_workload(uid) {
                        replaced.insert(old.uid.clone(), old);
                    }
                }
                Change::Service(service) => {
                    let key = service.key();
                    if let Some(old) = next.unlink_service(&key) {
                        replaced_services.insert(key, old);
                    }
                }
                Change::RemoveService(key) => {
                    if let Some(old) = next.unlink_service(key) {
                        replaced_services.insert(key.clone(), old);
                    }
                }
                Change::Policy(_) | Change::RemovePolicy(_) => {}
            }
        }
        let mut refused = Vec::new();
        let mut policy_changes = Vec::new();
        for change in changes {
            match change {
                Change::Workload(workload) => {
                    let uid = workload.uid.clone();
                    if let Err(problem) = next.link_workload(workload) {
                        // The version in force stays, unless the batch gave its place away.
                        if let Some(old) = replaced.remove(&uid) {
                            let _gone = next.link_workload(old);
                        }
                        refused.push(Refused {
                            name: uid.to_string(),
                            problem,
                        });
                        continue;
                    }
                    touched.workloads.push(uid.to_string());
                }
                Change::RemoveWorkload(uid) => {
                    if replaced.remove(uid.as_str()).is_some() {
                        touched.workloads.push(uid);
                    }
                }
                Change::Service(service) => {
                    let key = service.key();
                    if let Err(problem) = next.link_service(service) {
                        // As for workloads: the version in force stays if it still fits.
                        if let Some(old) = replaced_services.remove(&key)
                            && next.link_service(old).is_err()
                        {
                            touched.services += 1;
                        }
                        refused.push(Refused { name: key, problem });
                        continue;
                    }
                    touched.services += 1;
                }
                Change::RemoveService(key) => {
                    if replaced_services.remove(&key).is_some() {
                        touched.services += 1;
                    }
                }
                Change::Policy(policy) => match policy.validate() {
                    Ok(()) => {
                        let before = next
                            .policy_entries
                            .insert(policy.key().into(), policy.clone());
                        policy_changes.push((before, Some(policy)));
                    }
                    Err(problem) => refused.push(Refused {
                        name: policy.key(),
                        problem,
                    }),
                },
                Change::RemovePolicy(key) => {
                    if let Some(before) = next.policy_entries.remove(key.as_str()) {
                        policy_changes.push((Some(before), None));
                    }
                }
            }
        }
        touched.policies = policy_changes.len();
        if !policy_changes.is_empty() {
            next.policies = Arc::new(self.policies.updated(policy_changes));
        }
        Updated {
            config: next,
            touched,
            refused,
        }
    }

    /// Takes the workload `uid` out of every lookup; returns it.
    fn unlink_workload(&mut self, uid: &str) -> Option<Arc<Workload>> {
        let old = self.workloads.remove(uid)?;
        if old.owns_its_addresses() {
            for ip in &old.workload_ips {
                self.by_ip.remove(ip);
            }
        }
        for key in old.services.keys() {
            if let Some(endpoints) = self.endpoints.get_mut(key) {
                endpoints.remove(uid);
                if endpoints.is_empty() {
                    self.endpoints.remove(key);
                }
            }
        }
        Some(old)
    }

    /// Puts `workload` into every lookup, unless it is invalid or an address is taken.
    fn link_workload(&mut self, workload: Arc<Workload>) -> Result<(), FieldError> {
        workload.validate()?;
        // A host-network workload shares its node's address: never found by it.
        let addresses: &[IpAddr] = match workload.owns_its_addresses() {
            true => &workload.workload_ips,
            false => &[],
        };
        for ip in addresses {
            if let Some(holder) = self.by_ip.get(ip) {
                return Err(FieldError::new(format!(
                    "field workloadIps: {ip} belongs to workload {}",
                    holder.uid
                )));
            }
            if let Some(service) = self.services_by_vip.get(ip) {
                return Err(FieldError::new(format!(
                    "field workloadIps: {ip} is a VIP of service {}",
                    service.key()
                )));
            }
        }
        for ip in addresses {
            self.by_ip.insert(*ip, workload.clone());
        }
        self.accepted_not_used.extend(workload.accepted_not_used());
        for key in workload.services.keys() {
            self.endpoints
                .entry(key.into())
                .or_default()
                .insert(workload.clone());
        }
        self.workloads.insert(workload.uid.clone(), workload);
        Ok(())
    }

    /// Takes the service `key` out of every lookup; returns it.
    fn unlink_service(&mut self, key: &str) -> Option<Arc<Service>> {
        let old = self.services.remove(key)?;
        for vip in &old.vips {
            self.services_by_vip.remove(&vip.ip);
        }
        for vip in &old.cidr_vips {
            self.services_by_cidr.remove(&vip.cidr);
            let length = cidr_length(&vip.cidr);
            let left = self.cidr_lengths.get(&length).map_or(0, |n| n - 1);
            match left {
                0 => self.cidr_lengths.remove(&length),
                n => self.cidr_lengths.insert(length, n),
            };
        }
        Some(old.service)
    }

    /// Puts `service` into every lookup, unless it is invalid or a VIP is taken.
    fn link_service(&mut self, service: Arc<Service>) -> Result<(), FieldError> {
        service.validate()?;
        for vip in &service.vips {
            let taken =
                self.by_ip.contains_key(&vip.ip) || self.services_by_vip.contains_key(&vip.ip);
            if taken {
                return Err(FieldError::new(format!(
                    "field vips: {} is already in use",
                    vip.ip
                )));
            }
        }
        for vip in &service.cidr_vips {
            if let Some(holder) = self.services_by_cidr.get(&vip.cidr) {
                return Err(FieldError::new(format!(
                    "field cidrVips: {} is a prefix of service {}",
                    vip.cidr, holder.key
                )));
            }
        }
        self.accepted_not_used.extend(service.accepted_not_used());
        let keyed = KeyedService {
            key: service.key().into(),
            service,
        };
        for vip in &keyed.vips {
            self.services_by_vip.insert(vip.ip, keyed.clone());
        }
        for vip in &keyed.cidr_vips {
            self.services_by_cidr.insert(vip.cidr, keyed.clone());
            *self.cidr_lengths.entry(cidr_length(&vip.cidr)).or_default() += 1;
        }
        self.services.insert(keyed.key.clone(), keyed);
        Ok(())
    }

    /// Every workload, in no particular order.
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.values().map(|w| &**w)
    }

    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }

    /// Every service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values().map(|s| &*s.service)
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Every workload, by uid.
    pub fn sorted_workloads(&self) -> Vec<Workload> {
        let mut workloads: Vec<Workload> = self.workloads().cloned().collect();
        workloads.sort_unstable_by(|a, b| a.uid.cmp(&b.uid));
        workloads
    }

    /// Every service, by key.
    pub fn sorted_services(&self) -> Vec<Service> {
        let mut services: Vec<Service> = self.services().cloned().collect();
        services.sort_unstable_by_key(Service::key);
        services
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).map(|w| &**w)
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Workload> {
        self.workloads.get(uid).map(|w| &**w)
    }

    /// The workload of an enrolled pod: the one with the pod's uid (a mesh file lists pods by
    /// it), else the one named `namespace`/`name` on `node` (istiod names workloads
    /// `<cluster>//Pod/<namespace>/<name>`, so Istio's ztunnel joins its local pods so). A
    /// look through every workload, once per enrollment.
    pub(crate) fn pod_workload(
        &self,
        uid: &str,
        namespace: &str,
        name: &str,
        node: &str,
    ) -> Option<&Workload> {
        self.workload_by_uid(uid).or_else(|| {
            self.workloads()
                .find(|w| w.namespace == namespace && w.name == name && w.node == node)
        })
    }

    /// The service with the key `namespace/hostname`.
    /// The policy with the key `namespace/name`.
    pub fn policy_by_key(&self, key: &str) -> Option<&Policy> {
        self.policy_entries.get(key).map(|policy| &**policy)
    }

    pub fn service_by_key(&self, key: &str) -> Option<&Service> {
        self.services.get(key).map(|s| &*s.service)
    }

    /// The service a connection to `address` is for: one of its VIPs, else (unless a
    /// workload has the address) the longest of its CIDR VIPs holding it; and one of its ports.
    pub fn service_at(&self, address: SocketAddr) -> Option<&KeyedService> {
        let ip = address.ip();
        let service = match self.services_by_vip.get(&ip) {
            Some(service) => service,
            None if self.cidr_lengths.is_empty() || self.by_ip.contains_key(&ip) => return None,
            None => self.service_by_cidr(ip)?,
        };
        service
            .ports
            .contains_key(&address.port())
            .then_some(service)
    }

    fn service_by_cidr(&self, ip: IpAddr) -> Option<&KeyedService> {
        self.cidr_lengths
            .keys()
            .rev()
            .filter(|(v6, _)| *v6 == ip.is_ipv6())
            .find_map(|&(_, length)| {
                let prefix = IpNet::new(ip, length).ok()?.trunc();
                self.services_by_cidr.get(&prefix)
            })
    }

    /// The endpoint of `service` for a connection from `source` (a workload of the model, if
    /// known) to `destination` (a VIP and port of it), chosen by the service's load balancer
    /// (`load_balancing`), with the port mapped to the endpoint's target port.
    pub fn pick_endpoint(
        &self,
        service: &KeyedService,
        source: Option<&Workload>,
        destination: SocketAddr,
    ) -> Option<Endpoint<'_>> {
        let port = destination.port();
        let endpoints = self.endpoints.get(&service.key)?.iter();
        let family_ok = |w: &&Workload| {
            load_balancing::endpoint_ip(w, service.ip_families, destination.ip()).is_some()
        };
        let workload = load_balancing::choose(
            service.load_balancer.as_ref(),
            source,
            endpoints.filter(family_ok),
        )?;
        let ip = load_balancing::endpoint_ip(workload, service.ip_families, destination.ip())?;
        let from_workload = workload.services.get(&service.key)?.get(port);
        let target_port = [from_workload, service.ports.get(&port).copied()]
            .into_iter()
            .flatten()
            .find(|&p| p != 0)
            .unwrap_or(port);
        Some(Endpoint {
            workload,
            address: SocketAddr::new(ip, target_port),
        })
    }

    /// The fields entries have set whose behaviour this build does not have: accepted, shown,
    /// not acted on.
    pub fn accepted_not_used(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.accepted_not_used.iter().copied()
    }

    /// Those of `accepted_not_used` that `before` (an earlier version) did not have.
    pub(crate) fn accepted_not_used_since<'a>(
        &'a self,
        before: &'a MeshConfig,
    ) -> impl Iterator<Item = &'static str> + 'a {
        self.accepted_not_used()
            .filter(|field| !before.accepted_not_used.contains(field))
    }

    /// The service a waypoint names, when it is not a workload's address.
    fn waypoint_service(&self, waypoint: &GatewayAddress) -> Option<&KeyedService> {
        match &waypoint.destination {
            GatewayDestination::Address(address) => self.services_by_vip.get(&address.ip),
            GatewayDestination::Hostname(name) => self.services.get(name.key()),
        }
    }

    /// The workload that serves as a gateway (a waypoint, or another network's east-west
    /// gateway) for a connection from `source`, and where it takes HBONE.
    pub(crate) fn resolve_gateway(
        &self,
        waypoint: &GatewayAddress,
        source: Option<&Workload>,
    ) -> Option<Endpoint<'_>> {
        if let GatewayDestination::Address(address) = &waypoint.destination
            && let Some(workload) = self.workload_by_ip(address.ip)
        {
            return Some(Endpoint {
                workload,
                address: SocketAddr::new(address.ip, waypoint.hbone_mtls_port),
            });
        }
        let service = self.waypoint_service(waypoint)?;
        let port = *service.ports.keys().next()?;
        let vip = match &waypoint.destination {
            GatewayDestination::Address(address) => address.ip,
            GatewayDestination::Hostname(_) => service.vips.first()?.ip,
        };
        let endpoint = self.pick_endpoint(service, source, SocketAddr::new(vip, port))?;
        Some(Endpoint {
            address: SocketAddr::new(endpoint.address.ip(), waypoint.hbone_mtls_port),
            ..endpoint
        })
    }

    /// Whether the workload at `ip` is (one of the instances of) `waypoint`: its own traffic
    /// must not be sent back to it.
    pub(crate) fn is_waypoint(&self, waypoint: &GatewayAddress, ip: IpAddr) -> bool {
        let Some(workload) = self.by_ip.get(&ip) else {
            return false;
        };
        if let GatewayDestination::Address(address) = &waypoint.destination
            && self
                .by_ip
                .get(&address.ip)
                .is_some_and(|w| Arc::ptr_eq(w, workload))
        {
            return true;
        }
        self.waypoint_service(waypoint).is_some_and(|service| {
            self.endpoints
                .get(&service.key)
                .is_some_and(|endpoints| endpoints.contains(&workload.uid))
        })
    }

    /// Whether this config's policies let `subject` in; the denial says why not.
    pub(crate) fn authorize(&self, subject: &Subject) -> Result<(), Denial> {
        let target = self.authz_target(subject.destination.ip(), &subject.namespace);
        let connection = Connection {
            source: subject.source,
            destination: subject.destination,
            identity: subject.identity.as_deref(),
        };
        match self.policies.check(&target, &connection) {
            Decision::Allow => Ok(()),
            Decision::Deny(denial) => Err(denial),
        }
    }

    /// What authorization needs to know of the workload at `ip`: its namespace and the
    /// policies that select it. A pod the config does not list is in `namespace`.
    pub fn authz_target<'a>(&'a self, ip: IpAddr, namespace: &'a str) -> Target<'a> {
        match self.workload_by_ip(ip) {
            Some(workload) => Target {
                namespace: &workload.namespace,
                selected: &workload.authorization_policies,
            },
            None => Target {
                namespace,
                selected: &[],
            },
        }
    }
}

/// The lookup key of a prefix's family and length.
fn cidr_length(cidr: &IpNet) -> (bool, u8) {
    (matches!(cidr, IpNet::V6(_)), cidr.prefix_len())
}

#[cfg(test)]
mod tests;

//! The mesh model: workloads, services and authorization policies, whatever their source (the
//! local file: `file`, kept current by `reload`). `MeshConfig` is one version of it with its
//! lookups, cheap to clone: its maps are persistent, so a version shares every entry it did
//! not change with the one before. Every proxied connection takes one version and uses it
//! throughout; a batch of `Change`s makes the next version touching only what depends on the
//! entries changed (their addresses, their services' endpoints; the policy index when a policy
//! changes), and says what it touched.

mod address;
mod file;
pub mod reload;
mod service;
mod workload;

pub use address::{GatewayAddress, GatewayDestination, NamespacedHostname, NetworkAddress};
pub use file::{ConfigError, MeshFile};
pub use service::Service;
pub(crate) use workload::DEFAULT_SERVICE_ACCOUNT;
pub use workload::{HealthStatus, Protocol, Workload};

use super::FieldError;
use super::authz::{Connection, Decision, Denial, Policies, Policy, Subject, Target};
use rand::seq::IndexedRandom;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

/// Why the config offers nothing that can take a connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unroutable {
    #[error("service {0} has no healthy endpoint")]
    NoHealthyEndpoint(String),
    #[error("waypoint {0:?} has no healthy instance")]
    NoWaypointInstance(GatewayDestination),
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
    workloads: imbl::HashMap<Arc<str>, Arc<Workload>>,
    by_ip: imbl::HashMap<IpAddr, Arc<Workload>>,
    /// By `namespace/hostname`.
    services: imbl::HashMap<Arc<str>, Arc<Service>>,
    /// By VIP (`service_at` checks the port).
    services_by_vip: imbl::HashMap<IpAddr, Arc<Service>>,
    /// The endpoints of each service key (whether that service is known yet or not), by uid.
    endpoints: imbl::HashMap<Arc<str>, imbl::OrdMap<Arc<str>, Arc<Workload>>>,
    /// Policies by `namespace/name`; `policies` indexes them for checks.
    policy_entries: imbl::HashMap<Arc<str>, Arc<Policy>>,
    pub policies: Arc<Policies>,
}

/// A service endpoint chosen for a connection.
pub struct Endpoint<'a> {
    pub workload: &'a Workload,
    pub address: SocketAddr,
}

impl MeshConfig {
    /// The model a valid file describes; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<MeshConfig, ConfigError> {
        let changes = MeshFile::parse(path, text)?.changes_from(&MeshConfig::default());
        let mut updated = MeshConfig::default().updated(changes);
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
                        replaced.insert(uid.clone(), old);
                    }
                }
                Change::Service(service) => {
                    next.unlink_service(&service.key());
                }
                Change::RemoveService(key) => {
                    next.unlink_service(key);
                }
                Change::Policy(_) | Change::RemovePolicy(_) => {}
            }
        }
        let mut refused = Vec::new();
        for change in changes {
            match change {
                Change::Workload(workload) => {
                    let uid = workload.uid.clone();
                    if let Err(problem) = next.link_workload(workload) {
                        // The version in force stays, unless the batch gave its place away.
                        if let Some(old) = replaced.remove(&uid) {
                            let _gone = next.link_workload(old);
                        }
                        refused.push(Refused { name: uid, problem });
                        continue;
                    }
                    touched.workloads.push(uid);
                }
                Change::RemoveWorkload(uid) => {
                    if replaced.remove(&uid).is_some() {
                        touched.workloads.push(uid);
                    }
                }
                Change::Service(service) => {
                    let key = service.key();
                    match next.link_service(service) {
                        Ok(()) => touched.services += 1,
                        Err(problem) => refused.push(Refused { name: key, problem }),
                    }
                }
                Change::RemoveService(_) => touched.services += 1,
                Change::Policy(policy) => match policy.validate() {
                    Ok(()) => {
                        next.policy_entries.insert(policy.key().into(), policy);
                        touched.policies += 1;
                    }
                    Err(problem) => refused.push(Refused {
                        name: policy.key(),
                        problem,
                    }),
                },
                Change::RemovePolicy(key) => {
                    if next.policy_entries.remove(key.as_str()).is_some() {
                        touched.policies += 1;
                    }
                }
            }
        }
        if touched.policies > 0 {
            next.policies = Arc::new(Policies::new(
                next.policy_entries.values().cloned().collect(),
            ));
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
        for ip in &old.workload_ips {
            self.by_ip.remove(ip);
        }
        for key in old.services.keys() {
            if let Some(endpoints) = self.endpoints.get_mut(key.as_str()) {
                endpoints.remove(uid);
                if endpoints.is_empty() {
                    self.endpoints.remove(key.as_str());
                }
            }
        }
        Some(old)
    }

    /// Puts `workload` into every lookup, unless it is invalid or an address is taken.
    fn link_workload(&mut self, workload: Arc<Workload>) -> Result<(), FieldError> {
        workload.validate()?;
        for ip in &workload.workload_ips {
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
        let uid: Arc<str> = workload.uid.as_str().into();
        for ip in &workload.workload_ips {
            self.by_ip.insert(*ip, workload.clone());
        }
        for key in workload.services.keys() {
            self.endpoints
                .entry(key.as_str().into())
                .or_default()
                .insert(uid.clone(), workload.clone());
        }
        self.workloads.insert(uid, workload);
        Ok(())
    }

    fn unlink_service(&mut self, key: &str) {
        if let Some(old) = self.services.remove(key) {
            for vip in &old.vips {
                self.services_by_vip.remove(&vip.ip);
            }
        }
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
        for vip in &service.vips {
            self.services_by_vip.insert(vip.ip, service.clone());
        }
        self.services.insert(service.key().into(), service);
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
        self.services.values().map(|s| &**s)
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

    /// The service with the key `namespace/hostname`.
    pub fn service_by_key(&self, key: &str) -> Option<&Service> {
        self.services.get(key).map(|s| &**s)
    }

    /// The service a connection to `address` is for: one of its VIPs and one of its ports.
    pub fn service_at(&self, address: SocketAddr) -> Option<&Service> {
        let service = self.services_by_vip.get(&address.ip())?;
        service
            .ports
            .contains_key(&address.port())
            .then_some(&**service)
    }

    /// One healthy endpoint of `service` for its `port`, chosen at random (the default load
    /// balancing of Istio's ztunnel), with the port mapped to the endpoint's target port.
    pub fn pick_endpoint(&self, service: &Service, port: u16) -> Option<Endpoint<'_>> {
        let key = service.key();
        let healthy: Vec<&Workload> = self
            .endpoints
            .get(key.as_str())?
            .values()
            .map(|w| &**w)
            .filter(|w| w.status == HealthStatus::Healthy)
            .collect();
        let workload = *healthy.choose(&mut rand::rng())?;
        let from_workload = workload.services[&key].get(&port).copied();
        let target_port = [from_workload, service.ports.get(&port).copied()]
            .into_iter()
            .flatten()
            .find(|&p| p != 0)
            .unwrap_or(port);
        Some(Endpoint {
            workload,
            address: SocketAddr::new(workload.workload_ips[0], target_port),
        })
    }

    /// The service a waypoint names, when it is not a workload's address.
    fn waypoint_service(&self, waypoint: &GatewayAddress) -> Option<&Service> {
        match &waypoint.destination {
            GatewayDestination::Address(address) => self.services_by_vip.get(&address.ip),
            GatewayDestination::Hostname(name) => self
                .services
                .get(format!("{}/{}", name.namespace, name.hostname).as_str()),
        }
        .map(|s| &**s)
    }

    /// The workload that serves as the waypoint for a connection, and where it takes HBONE.
    pub(crate) fn resolve_waypoint(&self, waypoint: &GatewayAddress) -> Option<Endpoint<'_>> {
        if let GatewayDestination::Address(address) = &waypoint.destination
            && let Some(workload) = self.workload_by_ip(address.ip)
        {
            return Some(Endpoint {
                workload,
                address: SocketAddr::new(address.ip, waypoint.hbone_mtls_port),
            });
        }
        let service = self.waypoint_service(waypoint)?;
        let endpoint = self.pick_endpoint(service, *service.ports.keys().next()?)?;
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
                .get(service.key().as_str())
                .is_some_and(|endpoints| endpoints.contains_key(workload.uid.as_str()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashSet};

    const FILE: &str = "mesh.yaml";

    fn parse(text: &str) -> Result<MeshConfig, ConfigError> {
        MeshConfig::parse(Path::new(FILE), text)
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_istio_style_workload_list() {
        let config = parse(
            "workloads:\n\
             - uid: cluster1//v1/Pod/demo/a1\n  name: a1\n  namespace: demo\n  serviceAccount: sa-a\n  \
               workloadIps: [10.244.1.2]\n  protocol: HBONE\n  node: node1\n  network: ''\n  \
               canonicalName: a\n  clusterId: Kubernetes\n\
             - uid: legacy-u1\n  name: u1\n  namespace: legacy\n  workloadIps: [10.244.2.3]\n",
        )
        .unwrap();
        let a1 = config
            .workload_by_ip("10.244.1.2".parse().unwrap())
            .unwrap();
        assert_eq!(a1.protocol, Protocol::Hbone);
        assert_eq!(
            a1.identity().to_string(),
            "spiffe://cluster.local/ns/demo/sa/sa-a"
        );
        let u1 = config.workload_by_uid("legacy-u1").unwrap();
        assert_eq!(
            (u1.protocol, u1.service_account.as_str()),
            (Protocol::Tcp, "default")
        );
        assert!(config.workload_by_ip("10.0.0.1".parse().unwrap()).is_none());
    }

    const SERVICES: &str = "\
workloads:
- {uid: e1, name: e1, namespace: demo, workloadIps: [10.0.1.1], protocol: HBONE,
   services: {demo/echo.demo.svc: {80: 8081}}}
- {uid: e2, name: e2, namespace: demo, workloadIps: [10.0.2.1], protocol: HBONE,
   services: {demo/echo.demo.svc: {}}}
- {uid: e3, name: e3, namespace: demo, workloadIps: [10.0.2.2], status: Unhealthy,
   services: {demo/echo.demo.svc: {}}}
- {uid: wp, name: wp, namespace: demo, serviceAccount: waypoint, workloadIps: [10.0.2.9],
   protocol: HBONE}
- {uid: b1, name: b1, namespace: demo, workloadIps: [10.0.2.5], protocol: HBONE,
   waypoint: {destination: /10.0.2.9, hboneMtlsPort: 15008}}
services:
- name: echo
  namespace: demo
  hostname: echo.demo.svc
  vips: [/10.96.0.10]
  ports: {80: 8080, 81: 0}
  subjectAltNames: [spiffe://cluster.local/ns/demo/sa/extra]
- name: waypointed
  namespace: demo
  hostname: w.demo.svc
  vips: [10.96.0.11]
  ports: {80: 8080}
  waypoint: {destination: {namespace: demo, hostname: echo.demo.svc}}
";

    #[test]
    fn services_resolve_to_healthy_endpoints_with_their_target_ports() {
        let config = parse(SERVICES).unwrap();
        assert!(config.service_at(addr("10.96.0.10:90")).is_none());
        let echo = config.service_at(addr("10.96.0.10:80")).unwrap();
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let endpoint = config.pick_endpoint(echo, 80).unwrap();
            seen.insert(endpoint.address);
        }
        // e1 maps 80 to its own 8081; e2 takes the service's 8080; unhealthy e3 never.
        let expected: HashSet<SocketAddr> = [addr("10.0.1.1:8081"), addr("10.0.2.1:8080")].into();
        assert_eq!(seen, expected);
        // Target port 0 means the service port itself.
        let port_81 = config.pick_endpoint(echo, 81).unwrap().address.port();
        assert_eq!(port_81, 81);
        assert_eq!(
            echo.extra_identities()[0].to_string(),
            "spiffe://cluster.local/ns/demo/sa/extra"
        );
    }

    #[test]
    fn waypoints_resolve_and_know_their_own_traffic() {
        let config = parse(SERVICES).unwrap();
        let b1 = config.workload_by_uid("b1").unwrap();
        let waypoint = b1.waypoint.as_ref().unwrap();
        let endpoint = config.resolve_waypoint(waypoint).unwrap();
        assert_eq!(endpoint.address, addr("10.0.2.9:15008"));
        assert_eq!(endpoint.workload.service_account, "waypoint");
        assert!(config.is_waypoint(waypoint, "10.0.2.9".parse().unwrap()));
        assert!(!config.is_waypoint(waypoint, "10.0.1.1".parse().unwrap()));
        // A waypoint named by service hostname: any of the service's endpoints is it.
        let service = config.service_at(addr("10.96.0.11:80")).unwrap();
        let by_name = service.waypoint.as_ref().unwrap();
        let endpoint = config.resolve_waypoint(by_name).unwrap();
        assert_eq!(endpoint.address.port(), 15008);
        assert!(config.is_waypoint(by_name, "10.0.2.1".parse().unwrap()));
        assert!(!config.is_waypoint(by_name, "10.0.2.9".parse().unwrap()));
    }

    /// `count` HBONE workloads `w<i>` in namespace `demo`, each an endpoint of service
    /// `demo/s<i % 100>`.
    fn workloads(count: u32) -> Vec<Change> {
        (0..count)
            .map(|i| {
                let text = format!(
                    "{{uid: w{i}, name: w{i}, namespace: demo, workloadIps: [10.{}.{}.{}], protocol: HBONE, services: {{demo/s{}: {{}}}}}}",
                    i >> 16,
                    (i >> 8) & 255,
                    i & 255,
                    i % 100
                );
                Change::Workload(Arc::new(serde_yaml_ng::from_str(&text).unwrap()))
            })
            .collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// A change at 10,000 workloads touches that workload: the next version shares every other
    /// entry with the one before, and only its service's endpoints change.
    #[test]
    fn one_change_touches_only_what_depends_on_it() {
        let updated = MeshConfig::default().updated(workloads(10_000));
        assert!(updated.refused.is_empty());
        assert_eq!(updated.touched.workloads.len(), 10_000);
        let before = updated.config;
        let mut moved: Workload = before.workload_by_uid("w7").unwrap().clone();
        moved.workload_ips = vec![ip("10.200.0.7")];
        moved.services = [("demo/other".to_owned(), BTreeMap::new())].into();
        let after = before.updated(vec![Change::Workload(Arc::new(moved))]);
        assert_eq!(
            after.touched,
            Touched {
                workloads: vec!["w7".to_owned()],
                ..Touched::default()
            }
        );
        let after = after.config;
        assert!(after.workload_by_ip(ip("10.0.0.7")).is_none());
        assert_eq!(after.workload_by_ip(ip("10.200.0.7")).unwrap().uid, "w7");
        for uid in ["w0", "w8", "w9999"] {
            assert!(Arc::ptr_eq(&before.workloads[uid], &after.workloads[uid]));
        }
        let endpoints =
            |config: &MeshConfig, key: &str| config.endpoints.get(key).map_or(0, imbl::OrdMap::len);
        assert_eq!(endpoints(&before, "demo/s7"), 100);
        assert_eq!(endpoints(&after, "demo/s7"), 99);
        assert_eq!(endpoints(&after, "demo/other"), 1);
        assert!(after.endpoints["demo/s8"].ptr_eq(&before.endpoints["demo/s8"]));
        // The version before is intact: a connection holding it sees no change.
        assert_eq!(before.workload_by_ip(ip("10.0.0.7")).unwrap().uid, "w7");
    }

    #[test]
    fn entries_may_trade_addresses_within_one_batch() {
        let config = MeshConfig::default().updated(workloads(2)).config;
        let mut first = config.workload_by_uid("w0").unwrap().clone();
        let mut second = config.workload_by_uid("w1").unwrap().clone();
        std::mem::swap(&mut first.workload_ips, &mut second.workload_ips);
        let updated = config.updated(vec![
            Change::Workload(Arc::new(first)),
            Change::Workload(Arc::new(second)),
        ]);
        assert!(updated.refused.is_empty(), "{:?}", updated.refused);
        assert_eq!(
            updated.config.workload_by_ip(ip("10.0.0.0")).unwrap().uid,
            "w1"
        );
        assert_eq!(
            updated.config.workload_by_ip(ip("10.0.0.1")).unwrap().uid,
            "w0"
        );
    }

    /// An entry that takes an address outside its batch is refused, naming the holder, and its
    /// previous version stays; the rest of the batch is applied.
    #[test]
    fn a_conflicting_entry_is_refused_and_its_previous_version_stays() {
        let config = MeshConfig::default().updated(workloads(3)).config;
        let mut thief = config.workload_by_uid("w0").unwrap().clone();
        thief.workload_ips = vec![ip("10.0.0.1")];
        let service = "{name: s, namespace: demo, hostname: s, vips: [/10.0.0.2], ports: {80: 80}}";
        let updated = config.updated(vec![
            Change::Workload(Arc::new(thief)),
            Change::Service(Arc::new(serde_yaml_ng::from_str(service).unwrap())),
            Change::RemoveWorkload("w2".to_owned()),
        ]);
        let refused: Vec<String> = updated.refused.iter().map(ToString::to_string).collect();
        assert_eq!(
            refused,
            ["w0: field workloadIps: 10.0.0.1 belongs to workload w1"]
        );
        let config = updated.config;
        assert_eq!(config.workload_by_ip(ip("10.0.0.0")).unwrap().uid, "w0");
        assert_eq!(config.workload_by_ip(ip("10.0.0.1")).unwrap().uid, "w1");
        assert!(config.service_at("10.0.0.2:80".parse().unwrap()).is_some());
        assert!(config.workload_by_uid("w2").is_none());
        assert_eq!(
            (updated.touched.workloads, updated.touched.services),
            (vec!["w2".to_owned()], 1)
        );
    }

    /// A file's changes make the model equal to the file: what differs, what is new, and the
    /// removal of what the file no longer has; an unchanged file makes none.
    #[test]
    fn a_file_becomes_the_changes_that_make_the_model_equal_to_it() {
        let first = parse(SERVICES).unwrap();
        let edited = SERVICES
            .replace("status: Unhealthy", "status: Healthy")
            .replace("- {uid: wp,", "- {uid: wp2,");
        let file = MeshFile::parse(Path::new(FILE), &edited).unwrap();
        let changes = file.changes_from(&first);
        let names: Vec<String> = changes
            .iter()
            .map(|change| match change {
                Change::Workload(w) => format!("+{}", w.uid),
                Change::RemoveWorkload(uid) => format!("-{uid}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(names, ["-wp", "+e3", "+wp2"]);
        let updated = first.updated(changes);
        assert_eq!(
            updated.config.sorted_workloads(),
            parse(&edited).unwrap().sorted_workloads()
        );
        let again = MeshFile::parse(Path::new(FILE), &edited).unwrap();
        assert!(again.changes_from(&updated.config).is_empty());
    }

    #[test]
    fn errors_name_the_file_the_entry_and_the_field() {
        let cases = [
            (
                "workloads:\n- uid: x\n  name: a\n  namespace: ''\n  workloadIps: [10.0.0.1]\n",
                "workload #0 (/a): field namespace must not be empty",
            ),
            (
                "workloads:\n- uid: x\n  name: a\n  namespace: n\n  workloadIps: []\n",
                "workload #0 (n/a): field workloadIps",
            ),
            (
                "workloads:\n- {uid: x, name: a, namespace: n, workloadIps: [10.0.0.1]}\n- {uid: x, name: b, namespace: n, workloadIps: [10.0.0.2]}\n",
                "workload #1 (n/b): field uid x is used",
            ),
            (
                "workloads:\n- {uid: x, name: a, namespace: n, workloadIps: [10.0.0.1]}\n- {uid: y, name: b, namespace: n, workloadIps: [10.0.0.1]}\n",
                "workload #1 (n/b): field workloadIps: 10.0.0.1",
            ),
            (
                "workloads:\n- {uid: x, name: a, namespace: n, serviceAccount: a/b, workloadIps: [10.0.0.1]}\n",
                "serviceAccount must not contain",
            ),
            (
                "workloads:\n- {uid: x, name: a, namespace: n, workloadIps: [10.0.0.1], services: {nohost: {}}}\n",
                "workload #0 (n/a): field services: \"nohost\"",
            ),
            (
                "workloads:\n- {uid: x, name: a, namespace: n, workloadIps: [10.0.0.1], waypoint: {destination: /10.9.9.9}}\n",
                "workload #0 (n/a): field waypoint",
            ),
            (
                "services:\n- {name: s, namespace: n, hostname: h, vips: [/10.96.0.1], ports: {}}\n",
                "service #0 (n/s): field ports",
            ),
            (
                "services:\n- {name: s, namespace: n, hostname: h, vips: [/10.96.0.1], ports: {80: 80}}\n- {name: t, namespace: n, hostname: i, vips: [/10.96.0.1], ports: {80: 80}}\n",
                "service #1 (n/t): field vips: 10.96.0.1 is already in use",
            ),
            (
                "services:\n- {name: s, namespace: n, hostname: h, vips: [/10.96.0.1], ports: {80: 80}, subjectAltNames: [x]}\n",
                "service #0 (n/s): field subjectAltNames",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(text)
                .err()
                .expect("the config is refused")
                .to_string();
            assert!(err.starts_with("mesh config mesh.yaml"), "{err}");
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
        let err = parse("workloads:\n- {uid: x, name: a, namespace: n, workloadIps: [10.0.0.1], protocl: HBONE}\n").err().expect("the config is refused");
        assert!(err.to_string().contains("protocl"), "{err}");
        for bad in [
            "workloads:\n- {uid: x, name: a, namespace: n, workloadIps: [not-an-ip]}\n",
            "services:\n- {name: s, namespace: n, hostname: h, vips: [net/bad], ports: {80: 80}}\n",
        ] {
            let err = parse(bad).err().expect("the config is refused");
            assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        }
    }
}

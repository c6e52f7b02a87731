//! The mesh config from a local file: workloads, services and authorization policies in the
//! camelCase shape of Istio ztunnel's local config, so an Istio user's file works as it is.
//! `MeshConfig` is the validated, indexed form every proxied connection consults; `reload`
//! keeps it current while the daemon runs.

mod address;
pub mod reload;
mod service;
mod workload;

pub use address::{GatewayAddress, GatewayDestination, NamespacedHostname, NetworkAddress};
pub use service::Service;
pub(crate) use workload::DEFAULT_SERVICE_ACCOUNT;
pub use workload::{HealthStatus, Protocol, Workload};

use super::FieldError;
use super::authz::{Connection, Decision, Denial, Policies, Policy, Subject, Target};
use rand::seq::IndexedRandom;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

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

/// Why the config offers nothing that can take a connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unroutable {
    #[error("service {0} has no healthy endpoint")]
    NoHealthyEndpoint(String),
    #[error("waypoint {0:?} has no healthy instance")]
    NoWaypointInstance(GatewayDestination),
}

/// The file as written.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MeshConfigFile {
    #[serde(default)]
    workloads: Vec<Workload>,
    #[serde(default)]
    services: Vec<Service>,
    #[serde(default)]
    policies: Vec<Policy>,
}

/// The validated config with its lookups.
#[derive(Default)]
pub struct MeshConfig {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub policies: Policies,
    by_ip: HashMap<IpAddr, usize>,
    by_uid: HashMap<String, usize>,
    /// Services by `namespace/hostname`.
    services_by_key: HashMap<String, usize>,
    /// Services by VIP (`service_at` checks the port).
    services_by_vip: HashMap<IpAddr, usize>,
    /// Each service's endpoints, as indices into `workloads`.
    endpoints: Vec<Vec<usize>>,
}

/// A service endpoint chosen for a connection.
pub struct Endpoint<'a> {
    pub workload: &'a Workload,
    pub address: SocketAddr,
}

impl MeshConfig {
    /// Parses and validates; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<MeshConfig, ConfigError> {
        let file: MeshConfigFile =
            serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        let invalid = |entry: String, problem: FieldError| ConfigError::Invalid {
            path: path.to_owned(),
            entry,
            problem,
        };
        let mut config = MeshConfig {
            workloads: file.workloads,
            services: file.services,
            ..MeshConfig::default()
        };
        for (index, workload) in config.workloads.iter().enumerate() {
            let entry = || entry_name("workload", index, &workload.namespace, &workload.name);
            workload.validate().map_err(|p| invalid(entry(), p))?;
            if config.by_uid.insert(workload.uid.clone(), index).is_some() {
                let problem = FieldError::new(format!(
                    "field uid {} is used by an earlier workload",
                    workload.uid
                ));
                return Err(invalid(entry(), problem));
            }
            for ip in &workload.workload_ips {
                if config.by_ip.insert(*ip, index).is_some() {
                    let problem = FieldError::new(format!(
                        "field workloadIps: {ip} belongs to an earlier workload"
                    ));
                    return Err(invalid(entry(), problem));
                }
            }
        }
        for (index, service) in config.services.iter().enumerate() {
            let entry = || entry_name("service", index, &service.namespace, &service.name);
            service.validate().map_err(|p| invalid(entry(), p))?;
            if config
                .services_by_key
                .insert(service.key(), index)
                .is_some()
            {
                let problem = FieldError::new(format!(
                    "hostname {} is used by an earlier service",
                    service.key()
                ));
                return Err(invalid(entry(), problem));
            }
            for vip in &service.vips {
                let taken = config.by_ip.contains_key(&vip.ip)
                    || config.services_by_vip.insert(vip.ip, index).is_some();
                if taken {
                    let problem =
                        FieldError::new(format!("field vips: {} is already in use", vip.ip));
                    return Err(invalid(entry(), problem));
                }
            }
        }
        config.endpoints = config
            .services
            .iter()
            .map(|service| {
                let key = service.key();
                (0..config.workloads.len())
                    .filter(|&w| config.workloads[w].services.contains_key(&key))
                    .collect()
            })
            .collect();
        // Waypoints may name any workload or service, so they are checked once all are known.
        let waypoints = config
            .workloads
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                Some((
                    entry_name("workload", i, &w.namespace, &w.name),
                    w.waypoint.as_ref()?,
                ))
            })
            .chain(config.services.iter().enumerate().filter_map(|(i, s)| {
                Some((
                    entry_name("service", i, &s.namespace, &s.name),
                    s.waypoint.as_ref()?,
                ))
            }));
        for (entry, waypoint) in waypoints {
            config
                .check_waypoint(waypoint)
                .map_err(|p| invalid(entry, p))?;
        }
        let mut keys = HashSet::new();
        for (index, policy) in file.policies.iter().enumerate() {
            let entry = || entry_name("policy", index, &policy.namespace, &policy.name);
            policy.validate().map_err(|p| invalid(entry(), p))?;
            if !keys.insert(policy.key()) {
                let problem =
                    FieldError::new(format!("{} is used by an earlier policy", policy.key()));
                return Err(invalid(entry(), problem));
            }
        }
        config.policies = Policies::new(file.policies);
        Ok(config)
    }

    /// A waypoint must name a workload or a service of this config.
    fn check_waypoint(&self, waypoint: &GatewayAddress) -> Result<(), FieldError> {
        let known = match &waypoint.destination {
            GatewayDestination::Address(address) => {
                self.by_ip.contains_key(&address.ip)
                    || self.services_by_vip.contains_key(&address.ip)
            }
            GatewayDestination::Hostname(name) => self
                .services_by_key
                .contains_key(&format!("{}/{}", name.namespace, name.hostname)),
        };
        if known {
            Ok(())
        } else {
            Err(FieldError::new(format!(
                "field waypoint: {:?} is neither a workload nor a service of this config",
                waypoint.destination
            )))
        }
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).map(|&index| &self.workloads[index])
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Workload> {
        self.by_uid.get(uid).map(|&index| &self.workloads[index])
    }

    /// The service a connection to `address` is for: one of its VIPs and one of its ports.
    pub fn service_at(&self, address: SocketAddr) -> Option<&Service> {
        let service = &self.services[*self.services_by_vip.get(&address.ip())?];
        service
            .ports
            .contains_key(&address.port())
            .then_some(service)
    }

    /// One healthy endpoint of `service` for its `port`, chosen at random (the default load
    /// balancing of Istio's ztunnel), with the port mapped to the endpoint's target port.
    pub fn pick_endpoint(&self, service: &Service, port: u16) -> Option<Endpoint<'_>> {
        let index = self.services_by_key.get(&service.key())?;
        let healthy: Vec<&Workload> = self.endpoints[*index]
            .iter()
            .map(|&w| &self.workloads[w])
            .filter(|w| w.status == HealthStatus::Healthy)
            .collect();
        let workload = *healthy.choose(&mut rand::rng())?;
        let from_workload = workload.services[&service.key()].get(&port).copied();
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

    /// The workload that serves as the waypoint for a connection, and where it takes HBONE.
    pub(crate) fn resolve_waypoint(&self, waypoint: &GatewayAddress) -> Option<Endpoint<'_>> {
        let service = match &waypoint.destination {
            GatewayDestination::Address(address) => match self.workload_by_ip(address.ip) {
                Some(workload) => {
                    return Some(Endpoint {
                        workload,
                        address: SocketAddr::new(address.ip, waypoint.hbone_mtls_port),
                    });
                }
                None => &self.services[*self.services_by_vip.get(&address.ip)?],
            },
            GatewayDestination::Hostname(name) => {
                let key = format!("{}/{}", name.namespace, name.hostname);
                &self.services[*self.services_by_key.get(&key)?]
            }
        };
        let endpoint = self.pick_endpoint(service, *service.ports.keys().next()?)?;
        Some(Endpoint {
            address: SocketAddr::new(endpoint.address.ip(), waypoint.hbone_mtls_port),
            ..endpoint
        })
    }

    /// Whether the workload at `ip` is (one of the instances of) `waypoint`: its own traffic
    /// must not be sent back to it.
    pub(crate) fn is_waypoint(&self, waypoint: &GatewayAddress, ip: IpAddr) -> bool {
        let Some(&workload) = self.by_ip.get(&ip) else {
            return false;
        };
        let service = match &waypoint.destination {
            GatewayDestination::Address(address) => {
                if self.by_ip.get(&address.ip) == Some(&workload) {
                    return true;
                }
                self.services_by_vip.get(&address.ip)
            }
            GatewayDestination::Hostname(name) => self
                .services_by_key
                .get(&format!("{}/{}", name.namespace, name.hostname)),
        };
        service.is_some_and(|&s| self.endpoints[s].contains(&workload))
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

/// How errors name an entry: its kind, position and `namespace/name`.
fn entry_name(kind: &str, index: usize, namespace: &str, name: &str) -> String {
    format!("{kind} #{index} ({namespace}/{name})")
}

#[cfg(test)]
mod tests {
    use super::*;

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

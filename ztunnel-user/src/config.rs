//! The mesh config from a local file: the workloads of the mesh, in the camelCase shape of
//! Istio ztunnel's local config, so an Istio user's workload entries work as they are.

use crate::identity::Identity;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

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
    #[error("mesh config {path}: workload {entry}: {problem}")]
    Invalid {
        path: PathBuf,
        entry: String,
        problem: String,
    },
}

/// How a workload takes inbound mesh traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    /// Through HBONE on 15008 (a workload captured by a mesh proxy).
    #[serde(rename = "HBONE")]
    Hbone,
    /// Plain TCP (outside the mesh).
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    pub workload_ips: Vec<IpAddr>,
    #[serde(default)]
    pub protocol: Protocol,
    /// The node the workload runs on.
    #[serde(default)]
    pub node: String,
}

impl Workload {
    pub fn identity(&self) -> Identity {
        Identity {
            trust_domain: self.trust_domain.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
        }
    }
}

fn default_service_account() -> String {
    DEFAULT_SERVICE_ACCOUNT.to_owned()
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_owned()
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfig {
    #[serde(default)]
    pub workloads: Vec<Workload>,
    /// Index into `workloads` by address and by uid, built by `parse`: every proxied
    /// connection looks its destination up here.
    #[serde(skip)]
    by_ip: HashMap<IpAddr, usize>,
    #[serde(skip)]
    by_uid: HashMap<String, usize>,
}

impl MeshConfig {
    pub fn load(path: &Path) -> Result<MeshConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        MeshConfig::parse(path, &text)
    }

    /// Parses and validates; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<MeshConfig, ConfigError> {
        let mut config: MeshConfig =
            serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        config.validate(path)?;
        for (index, workload) in config.workloads.iter().enumerate() {
            config.by_uid.insert(workload.uid.clone(), index);
            config
                .by_ip
                .extend(workload.workload_ips.iter().map(|ip| (*ip, index)));
        }
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let mut uids = HashSet::new();
        let mut ips = HashSet::new();
        for (index, workload) in self.workloads.iter().enumerate() {
            let entry = format!("#{index} ({}/{})", workload.namespace, workload.name);
            let invalid = |problem: String| ConfigError::Invalid {
                path: path.to_owned(),
                entry: entry.clone(),
                problem,
            };
            for (field, value) in [
                ("uid", &workload.uid),
                ("name", &workload.name),
                ("namespace", &workload.namespace),
                ("serviceAccount", &workload.service_account),
                ("trustDomain", &workload.trust_domain),
            ] {
                if value.is_empty() {
                    return Err(invalid(format!("field {field} must not be empty")));
                }
                let in_spiffe_id = matches!(field, "namespace" | "serviceAccount" | "trustDomain");
                if in_spiffe_id && value.contains('/') {
                    return Err(invalid(format!(
                        "field {field} must not contain '/' (it is part of a SPIFFE id)"
                    )));
                }
            }
            if workload.workload_ips.is_empty() {
                return Err(invalid(
                    "field workloadIps must list at least one address".into(),
                ));
            }
            if !uids.insert(&workload.uid) {
                return Err(invalid(format!(
                    "field uid {} is used by an earlier workload",
                    workload.uid
                )));
            }
            for ip in &workload.workload_ips {
                if !ips.insert(*ip) {
                    return Err(invalid(format!(
                        "field workloadIps: {ip} belongs to an earlier workload"
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).map(|&index| &self.workloads[index])
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Workload> {
        self.by_uid.get(uid).map(|&index| &self.workloads[index])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "mesh.yaml";

    fn parse(text: &str) -> Result<MeshConfig, ConfigError> {
        MeshConfig::parse(Path::new(FILE), text)
    }

    #[test]
    fn an_istio_style_workload_list() {
        let config = parse(
            "workloads:\n\
             - uid: cluster1//v1/Pod/demo/a1\n  name: a1\n  namespace: demo\n  serviceAccount: sa-a\n  \
               workloadIps: [10.244.1.2]\n  protocol: HBONE\n  node: node1\n\
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

    #[test]
    fn errors_name_the_file_the_entry_and_the_field() {
        let cases = [
            (
                "workloads:\n- uid: x\n  name: a\n  namespace: ''\n  workloadIps: [10.0.0.1]\n",
                "#0 (/a): field namespace must not be empty",
            ),
            (
                "workloads:\n- uid: x\n  name: a\n  namespace: n\n  workloadIps: []\n",
                "#0 (n/a): field workloadIps",
            ),
            (
                "workloads:\n- {uid: x, name: a, namespace: n, workloadIps: [10.0.0.1]}\n- {uid: x, name: b, namespace: n, workloadIps: [10.0.0.2]}\n",
                "#1 (n/b): field uid x is used",
            ),
            (
                "workloads:\n- {uid: x, name: a, namespace: n, workloadIps: [10.0.0.1]}\n- {uid: y, name: b, namespace: n, workloadIps: [10.0.0.1]}\n",
                "#1 (n/b): field workloadIps: 10.0.0.1",
            ),
            (
                "workloads:\n- {uid: x, name: a, namespace: n, serviceAccount: a/b, workloadIps: [10.0.0.1]}\n",
                "serviceAccount must not contain",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with("mesh config mesh.yaml"), "{err}");
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
        let err = parse("workloads:\n- {uid: x, name: a, namespace: n, workloadIps: [10.0.0.1], protocl: HBONE}\n").unwrap_err();
        assert!(err.to_string().contains("protocl"), "{err}");
        let err =
            parse("workloads:\n- {uid: x, name: a, namespace: n, workloadIps: [not-an-ip]}\n")
                .unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }
}

//! The mesh config the lab's daemons run from (Istio ztunnel's local config shape).

use crate::error::{LabError, Result};
use crate::topology::{self, MESH_CONFIG, NETWORK_GATEWAY, PODS, PodSpec, TRUST_DOMAIN};
use std::fmt::Write as _;

/// Every lab pod as a workload, with both its addresses (IPv4 first), the protocol its `hbone`
/// flag says, its node's locality and, off the default network, its node's network and that
/// network's gateway.
pub fn mesh_config() -> String {
    mesh_config_with(&MeshChanges::default())
}

/// What a test adds to the lab's mesh config: extra fields of some pods' workloads (YAML
/// lines indented two spaces, e.g. `  authorizationPolicies: [demo/p]\n`), more workload
/// entries (`- {uid: ...}` lines), and top-level sections (`services:`, `policies:`).
#[derive(Clone, Debug, Default)]
pub struct MeshChanges<'a> {
    /// Pods whose workload has another service account than the lab gives them.
    pub service_accounts: &'a [(&'a str, &'a str)],
    pub workload_fields: &'a [(&'a str, &'a str)],
    pub extra_workloads: &'a str,
    pub sections: &'a str,
}

pub fn mesh_config_with(changes: &MeshChanges) -> String {
    let mut yaml = String::from("# Written by `cargo xtask lab up`.\nworkloads:\n");
    for pod in &PODS {
        let protocol = if pod.hbone { "HBONE" } else { "TCP" };
        let _ = write!(
            yaml,
            "- uid: {uid}\n  name: {name}\n  namespace: {namespace}\n  serviceAccount: {sa}\n  trustDomain: {TRUST_DOMAIN}\n  workloadIps: [{ip}, {ip6}]\n  protocol: {protocol}\n  node: {node}\n  locality: {{region: {region}, zone: {zone}}}\n",
            uid = pod.uid,
            name = pod.name,
            namespace = pod.namespace,
            sa = changes
                .service_accounts
                .iter()
                .find(|(name, _)| *name == pod.name)
                .map_or(pod.service_account, |(_, account)| *account),
            ip = pod.expected_ip(),
            ip6 = pod.expected_ip6(),
            node = pod.node.name,
            region = pod.node.region,
            zone = pod.node.zone,
        );
        if !pod.node.network.is_empty() {
            let _ = writeln!(yaml, "  network: {}", pod.node.network);
        }
        if let Some(gateway) = network_gateway(pod) {
            let _ = writeln!(
                yaml,
                "  networkGateway: {{destination: {}/{}, hboneMtlsPort: 15008}}",
                gateway.node.network,
                gateway.expected_ip()
            );
        }
        for (name, fields) in changes.workload_fields {
            if *name == pod.name {
                yaml.push_str(fields);
            }
        }
    }
    yaml.push_str(changes.extra_workloads);
    yaml.push_str(changes.sections);
    yaml
}

/// The east-west gateway in front of `pod`'s network, unless the pod is on the default
/// network or is the gateway.
fn network_gateway(pod: &PodSpec) -> Option<&'static PodSpec> {
    let gateway = topology::pod_spec(NETWORK_GATEWAY).ok()?;
    (!pod.node.network.is_empty() && pod.name != gateway.name).then_some(gateway)
}

pub fn write_mesh_config() -> Result<()> {
    write_mesh_config_text(&mesh_config())
}

/// Replaces the file the way an editor or a ConfigMap update does: whole, by rename, so the
/// daemons never read half of it.
pub fn write_mesh_config_text(text: &str) -> Result<()> {
    let staged = format!("{MESH_CONFIG}.new");
    std::fs::write(&staged, text).map_err(|e| LabError::io("writing", &staged, e))?;
    std::fs::rename(&staged, MESH_CONFIG).map_err(|e| LabError::io("renaming", &staged, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_pod_with_its_expected_address() {
        let yaml = mesh_config();
        assert!(yaml.contains("name: a1\n  namespace: demo\n  serviceAccount: sa-a"));
        assert!(yaml.contains(
            "workloadIps: [10.244.1.3, fd00:10:244:1::3]\n  protocol: HBONE\n  node: node1"
        ));
        assert!(yaml.contains(
            "workloadIps: [10.244.2.3, fd00:10:244:2::3]\n  protocol: TCP\n  node: node2"
        ));
        assert!(yaml.contains("name: w1\n  namespace: foreign\n  serviceAccount: default\n  trustDomain: cluster.local\n  workloadIps: [10.244.2.4, fd00:10:244:2::4]\n  protocol: HBONE"));
    }

    #[test]
    fn every_workload_is_in_its_nodes_zone() {
        let yaml = mesh_config();
        let in_zone = |zone: &str| {
            yaml.matches(&format!("  locality: {{region: lab, zone: {zone}}}\n"))
                .count()
        };
        // a1 and a2 on node1; b1, u1 and w1 on node2; c1 and g1 on node3.
        let zones = ["zone-a", "zone-b", "zone-c"].map(in_zone);
        assert_eq!(zones, [2, 3, 2]);
        assert!(yaml.contains("node: node1\n  locality: {region: lab, zone: zone-a}\n"));
        assert!(yaml.contains("node: node2\n  locality: {region: lab, zone: zone-b}\n"));
    }

    #[test]
    fn the_other_networks_pods_are_behind_its_gateway() {
        let yaml = mesh_config();
        let behind = "  network: net2\n  networkGateway: {destination: net2/10.244.3.3, hboneMtlsPort: 15008}\n";
        assert!(yaml.contains(&format!(
            "node: node3\n  locality: {{region: lab, zone: zone-c}}\n{behind}"
        )));
        // c1 is behind g1; g1, the gateway, is not behind itself; node1's and node2's pods
        // are on the default network.
        assert_eq!(yaml.matches("networkGateway").count(), 1);
        assert_eq!(yaml.matches("  network: net2\n").count(), 2);
    }

    #[test]
    fn the_daemon_reads_every_workloads_locality() {
        let path = std::path::Path::new(MESH_CONFIG);
        let file = ztunnel_user::mesh::config::MeshFile::parse(path, &mesh_config())
            .expect("the lab's mesh config loads");
        assert_eq!(file.workloads().len(), PODS.len());
        for workload in file.workloads() {
            let pod = crate::topology::pod_spec(&workload.name).expect("a lab pod");
            let locality = workload.locality.as_deref().expect("a locality");
            assert_eq!(
                (&*locality.region, &*locality.zone),
                (pod.node.region, pod.node.zone)
            );
        }
    }
}

//! The mesh config the lab's daemons run from (Istio ztunnel's local config shape).

use crate::error::{LabError, Result};
use crate::topology::{MESH_CONFIG, PODS, TRUST_DOMAIN};
use std::fmt::Write as _;

/// Every lab pod as a workload, with the protocol its `hbone` flag says.
pub fn mesh_config() -> String {
    let mut yaml = String::from("# Written by `cargo xtask lab up`.\nworkloads:\n");
    for pod in &PODS {
        let protocol = if pod.hbone { "HBONE" } else { "TCP" };
        let _ = write!(
            yaml,
            "- uid: {uid}\n  name: {name}\n  namespace: {namespace}\n  serviceAccount: {sa}\n  trustDomain: {TRUST_DOMAIN}\n  workloadIps: [{ip}]\n  protocol: {protocol}\n  node: {node}\n",
            uid = pod.uid,
            name = pod.name,
            namespace = pod.namespace,
            sa = pod.service_account,
            ip = pod.expected_ip(),
            node = pod.node.name,
        );
    }
    yaml
}

pub fn write_mesh_config() -> Result<()> {
    std::fs::write(MESH_CONFIG, mesh_config()).map_err(|e| LabError::io("writing", MESH_CONFIG, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_pod_with_its_expected_address() {
        let yaml = mesh_config();
        assert!(yaml.contains("name: a1\n  namespace: demo\n  serviceAccount: sa-a"));
        assert!(yaml.contains("workloadIps: [10.244.1.3]\n  protocol: HBONE\n  node: node1"));
        assert!(yaml.contains("workloadIps: [10.244.2.3]\n  protocol: TCP\n  node: node2"));
        assert!(yaml.contains("name: w1\n  namespace: foreign\n  serviceAccount: default\n  trustDomain: cluster.local\n  workloadIps: [10.244.2.4]\n  protocol: HBONE"));
    }
}

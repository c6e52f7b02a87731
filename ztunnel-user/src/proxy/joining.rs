//! Local pods joined to their workloads: a pod's identity is its workload's, found by the
//! pod's uid (a mesh file lists pods by it) or by namespace and name on this node (istiod
//! names workloads `<cluster>//Pod/<namespace>/<name>`), else its namespace's `default`
//! service account. A workload may arrive after its pod was enrolled (istiod has not seen the
//! pod yet): the pod then serves as the new identity from that change on, and its connections
//! made as the old one end. A workload's removal leaves its pod's identity as it is: the pod
//! is on its way out, or its workload comes back.

use super::{PodProxy, ProxyContext};
use crate::identity::Identity;
use crate::mesh::config::{DEFAULT_SERVICE_ACCOUNT, MeshConfig};
use std::collections::HashSet;
use std::net::IpAddr;

impl ProxyContext {
    /// The identity of the pod `uid`, `namespace`/`name` in `config`.
    pub(crate) fn identity_of(
        &self,
        config: &MeshConfig,
        uid: &str,
        namespace: &str,
        name: &str,
    ) -> Identity {
        match config.pod_workload(uid, namespace, name, &self.settings.node) {
            Some(workload) => workload.identity(),
            None => Identity {
                trust_domain: self.settings.trust_domain.clone(),
                namespace: namespace.to_owned(),
                service_account: DEFAULT_SERVICE_ACCOUNT.to_owned(),
            },
        }
    }

    /// The identity of the workload at `ip`: an enrolled pod of this node, else its mesh
    /// config entry.
    pub(super) fn identity_at(&self, config: &MeshConfig, ip: IpAddr) -> Option<Identity> {
        match self.local_pods.get(ip) {
            Some(pod) => Some(Identity::clone(&pod.identity())),
            None => config.workload_by_ip(ip).map(|w| w.identity()),
        }
    }

    /// Joins `pod` to its workload in the config in force now. Called as the pod is added
    /// to the local pods (a change applied while it was being enrolled is seen here) and for
    /// each change that adds or replaces its workload.
    pub(crate) fn rejoin(&self, pod: &PodProxy) {
        let replaced = pod.serve_as(&self.tls, || {
            let config = self.mesh.current();
            self.identity_of(&config, &pod.uid, &pod.namespace, &pod.name)
        });
        if let Some(before) = replaced {
            tracing::info!(pod = %pod.label, before = %before, identity = %pod.identity(),
                "pod joined to its workload: serving as its identity, connections made as the one before end");
            self.release_identity(&before);
        }
    }

    /// After a change to the mesh: rejoins the local pods a workload among `touched` (now in
    /// `config`) is for.
    pub(super) fn rejoin_changed(&self, config: &MeshConfig, touched: &[String]) {
        let mut uids = HashSet::new();
        let mut names = HashSet::new();
        for workload in touched.iter().filter_map(|uid| config.workload_by_uid(uid)) {
            uids.insert(&*workload.uid);
            if workload.node == self.settings.node {
                names.insert((workload.namespace.as_str(), workload.name.as_str()));
            }
        }
        if uids.is_empty() {
            return;
        }
        for pod in self.local_pods.pods() {
            if uids.contains(pod.uid.as_str()) || names.contains(&(&*pod.namespace, &*pod.name)) {
                self.rejoin(&pod);
            }
        }
    }

    /// Drops the certificate of `identity` unless a local pod still serves as it: the
    /// certificate goes with the last pod of its identity.
    pub(crate) fn release_identity(&self, identity: &Identity) {
        let in_use = self
            .local_pods
            .pods()
            .iter()
            .any(|pod| *pod.identity() == *identity);
        if !in_use {
            self.tls.store.forget(identity);
        }
    }
}

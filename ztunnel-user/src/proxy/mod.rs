//! The userspace proxy: per enrolled pod, an outbound listener (15001) that receives the pod's
//! captured connections, an inbound listener (15006) that receives plaintext connections
//! steered to the pod, and the HBONE listener (15008) for mesh traffic from other nodes
//! (`listeners`). The handlers: `outbound`, `inbound` (plaintext) and `inbound_hbone`.
//! `route::Route` is the one place that chooses how a destination is reached, and
//! `ProxyContext::authorize` (`authorize`) the one place that applies the policies.
//!
//! A connection's task lives as long as the connection, and its size is that of its largest
//! state; so each handler runs its set-up (routing, authorization, connects, TLS handshakes,
//! opening an HBONE stream) boxed, and what stays for the connection's life is a
//! `carry::Carriage`: the relay's few hundred bytes and the connection's records.

pub(crate) mod admission;
mod authorize;
mod carry;
mod inbound;
mod inbound_hbone;
pub(crate) mod listeners;
mod outbound;
mod route;

use crate::capture::Capture;
use crate::delivery::Connector;
use crate::hbone::OpenCounts;
use crate::hbone::client::Pool;
use crate::hbone::mtls::Mtls;
use crate::host::netns::Netns;
use crate::identity::Identity;
use crate::mesh::Mesh;
use crate::mesh::config::{DEFAULT_SERVICE_ACCOUNT, MeshConfig};
use crate::settings::Settings;
use crate::telemetry::connections::ConnectionLog;
use crate::telemetry::labels::Described;
use crate::telemetry::refusals::Refusals;
use admission::{Admission, Share};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy's handlers share.
pub(crate) struct ProxyContext {
    pub(crate) settings: Arc<Settings>,
    pub(crate) capture: Capture,
    pub(crate) connector: Connector,
    pub(crate) mesh: Mesh,
    pub(crate) connections: ConnectionLog,
    pub(crate) tls: Mtls,
    pub(crate) pool: Arc<Pool>,
    /// Open HBONE server connections and their streams, on every pod's 15008.
    pub(crate) hbone_server: Arc<OpenCounts>,
    /// Becomes true when the daemon shuts down (HBONE servers send GOAWAY).
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) local_pods: Arc<LocalPods>,
    pub(crate) refusals: Arc<Refusals>,
    /// The node's descriptor budget and the caps every accepted connection is admitted by.
    pub(crate) admission: Arc<Admission>,
}

impl ProxyContext {
    /// A pod's identity: from its workload in the mesh (`MeshConfig::pod_workload`), else its
    /// namespace's `default` service account in this node's trust domain (what Kubernetes
    /// gives a pod that names none).
    pub(crate) fn identity_of(&self, uid: &str, namespace: &str, name: &str) -> Identity {
        let config = self.mesh.current();
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
    fn identity_at(&self, config: &MeshConfig, ip: IpAddr) -> Option<Identity> {
        match self.local_pods.get(ip) {
            Some(pod) => Some(Identity::clone(&pod.identity)),
            None => config.workload_by_ip(ip).map(|w| w.identity()),
        }
    }
}

/// How metrics and access logs describe the workload at `ip`: by its mesh config entry, else
/// as `pod` (an enrolled pod the config does not list), else not at all.
fn describe<'a>(
    config: &'a MeshConfig,
    ip: IpAddr,
    pod: Option<&'a PodProxy>,
) -> Option<Described<'a>> {
    config.workload_by_ip(ip).map(Described::from).or_else(|| {
        pod.map(|pod| Described {
            name: &pod.name,
            namespace: &pod.namespace,
            workload: None,
        })
    })
}

/// One pod as the proxy sees it.
pub(crate) struct PodProxy {
    pub(crate) name: String,
    /// Shared with every connection's record and authorization subject.
    pub(crate) namespace: Arc<str>,
    /// `namespace/name`, for records and logs.
    pub(crate) label: Arc<str>,
    pub(crate) netns: Netns,
    /// The pod's addresses: its own connections come from one of them.
    pub(crate) ips: Vec<IpAddr>,
    pub(crate) identity: Arc<Identity>,
    /// The mTLS server side of the pod's 15008, as `identity`.
    pub(crate) hbone_acceptor: tokio_rustls::TlsAcceptor,
    /// The pod's share of the node's descriptor budget, charged by its connections.
    pub(crate) share: Arc<Share>,
    /// Cancelled when the pod is released: its connections end (sockets in a deleted pod's
    /// netns would otherwise keep the netns, and a drain waiting on them, alive).
    pub(crate) released: CancellationToken,
}

impl PodProxy {
    /// Ends every connection the proxy serves for the pod.
    pub(crate) fn release(&self) {
        self.released.cancel();
    }

    /// The W3C `baggage` the pod's HBONE requests carry (Istio's keys).
    fn baggage(&self) -> String {
        format!(
            "k8s.namespace.name={},k8s.pod.name={},service.name={}",
            self.namespace, self.name, self.name
        )
    }
}

/// The pods enrolled on this node, by address: the same-node path's table.
#[derive(Default)]
pub(crate) struct LocalPods(RwLock<HashMap<IpAddr, Arc<PodProxy>>>);

impl LocalPods {
    pub(crate) fn get(&self, ip: IpAddr) -> Option<Arc<PodProxy>> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .cloned()
    }

    /// Adds the pod at `ips`, or with `None` removes those addresses.
    pub(crate) fn set(&self, ips: &[IpAddr], pod: Option<&Arc<PodProxy>>) {
        let mut local = self.0.write().unwrap_or_else(|p| p.into_inner());
        for ip in ips {
            match pod {
                Some(pod) => local.insert(*ip, pod.clone()),
                None => local.remove(ip),
            };
        }
    }

    /// How many pods there are (a pod may have several addresses).
    pub(crate) fn count(&self) -> usize {
        let local = self.0.read().unwrap_or_else(|p| p.into_inner());
        let pods: HashSet<*const PodProxy> = local.values().map(Arc::as_ptr).collect();
        pods.len()
    }
}

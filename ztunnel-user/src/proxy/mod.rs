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
mod joining;
pub(crate) mod listeners;
mod outbound;
mod route;

use crate::api::PodSpec;
use crate::capture::Capture;
use crate::delivery::Connector;
use crate::hbone::OpenCounts;
use crate::hbone::client::Pool;
use crate::hbone::mtls::Mtls;
use crate::host::netns::Netns;
use crate::identity::Identity;
use crate::mesh::Mesh;
use crate::mesh::config::MeshConfig;
use crate::settings::Settings;
use crate::telemetry::connections::ConnectionLog;
use crate::telemetry::labels::Described;
use crate::telemetry::refusals::Refusals;
use admission::{Admission, Share};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
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
    /// The pod's Kubernetes uid: with its namespace and name, what joins it to its workload.
    pub(crate) uid: String,
    pub(crate) name: String,
    /// Shared with every connection's record and authorization subject.
    pub(crate) namespace: Arc<str>,
    /// `namespace/name`, for records and logs.
    pub(crate) label: Arc<str>,
    pub(crate) netns: Netns,
    /// The pod's addresses: its own connections come from one of them.
    pub(crate) ips: Vec<IpAddr>,
    /// Who the pod is in the mesh; replaced when its workload arrives after enrollment.
    serving_as: RwLock<Arc<ServingAs>>,
    /// The pod's share of the node's descriptor budget, charged by its connections.
    pub(crate) share: Arc<Share>,
    /// Cancelled when the pod is released: its connections end (sockets in a deleted pod's
    /// netns would otherwise keep the netns, and a drain waiting on them, alive).
    released: CancellationToken,
}

/// A pod's identity and what serves as it, replaced as a whole. Each connection takes the one
/// in force as it is accepted and is served as it throughout.
struct ServingAs {
    identity: Arc<Identity>,
    /// The mTLS server side of the pod's 15008, as `identity`.
    hbone_acceptor: TlsAcceptor,
    /// Cancelled when the pod is released or serves as another identity: a connection made as
    /// this one ends.
    connections: CancellationToken,
}

impl PodProxy {
    pub(crate) fn new(
        spec: &PodSpec,
        netns: Netns,
        share: Arc<Share>,
        tls: &Mtls,
        identity: Identity,
    ) -> PodProxy {
        let released = CancellationToken::new();
        PodProxy {
            uid: spec.uid.clone(),
            name: spec.name.clone(),
            namespace: spec.namespace.as_str().into(),
            label: format!("{}/{}", spec.namespace, spec.name).into(),
            netns,
            ips: spec.ips.clone(),
            serving_as: RwLock::new(ServingAs::new(tls, identity, &released)),
            share,
            released,
        }
    }

    /// The pod's address (with the client's port) that a connection from `client` to `to`
    /// leaves from: the client's own when the families match, else the pod's address of
    /// `to`'s family (a dual-stack service whose `ipFamilies` is not the one dialled). With no
    /// address of that family it stays the client's, and the delivery refuses it.
    pub(crate) fn address_towards(&self, client: SocketAddr, to: SocketAddr) -> SocketAddr {
        if client.is_ipv4() == to.is_ipv4() {
            return client;
        }
        self.ips
            .iter()
            .find(|ip| ip.is_ipv4() == to.is_ipv4())
            .map_or(client, |ip| SocketAddr::new(*ip, client.port()))
    }

    pub(crate) fn identity(&self) -> Arc<Identity> {
        self.serving_as().identity.clone()
    }

    fn serving_as(&self) -> Arc<ServingAs> {
        self.serving_as
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Serves the pod as the identity `wanted` gives (called under the lock, so the last
    /// caller's answer stands), ending its connections made as the one before; returns that
    /// one if it was replaced.
    fn serve_as(&self, tls: &Mtls, wanted: impl FnOnce() -> Identity) -> Option<Arc<Identity>> {
        let mut serving_as = self.serving_as.write().unwrap_or_else(|p| p.into_inner());
        let identity = wanted();
        if *serving_as.identity == identity {
            return None;
        }
        tls.store.prefetch(&identity);
        let before = std::mem::replace(
            &mut *serving_as,
            ServingAs::new(tls, identity, &self.released),
        );
        before.connections.cancel();
        Some(before.identity.clone())
    }

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

impl ServingAs {
    fn new(tls: &Mtls, identity: Identity, released: &CancellationToken) -> Arc<ServingAs> {
        Arc::new(ServingAs {
            hbone_acceptor: tls.acceptor(&identity),
            identity: Arc::new(identity),
            connections: released.child_token(),
        })
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

    /// Each pod once (a pod may have several addresses).
    pub(crate) fn pods(&self) -> Vec<Arc<PodProxy>> {
        let local = self.0.read().unwrap_or_else(|p| p.into_inner());
        let mut seen = HashSet::new();
        local
            .values()
            .filter(|pod| seen.insert(Arc::as_ptr(pod)))
            .cloned()
            .collect()
    }

    pub(crate) fn count(&self) -> usize {
        self.pods().len()
    }
}

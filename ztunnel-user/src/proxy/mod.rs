//! The userspace proxy: per enrolled pod, an outbound listener (15001) that receives the pod's
//! captured connections, an inbound listener (15006) that receives plaintext connections
//! steered to the pod, and the HBONE listener (15008) for mesh traffic from other nodes.
//! `route::Route` is the one place that chooses how a destination is reached, and
//! `ProxyContext::authorize` the one place that applies the policies.
//!
//! A connection's task lives as long as the connection, and its size is that of its largest
//! state; so each handler runs its set-up (routing, authorization, connects, TLS handshakes,
//! opening an HBONE stream) boxed, and what stays for the connection's life is a
//! `carry::Carriage`: the relay's few hundred bytes and the connection's records.

pub mod carry;
mod inbound;
mod outbound;
pub(crate) mod relay;
mod route;
pub mod sockets;

use crate::authz::{Connection, Decision};
use crate::config::MeshConfig;
use crate::connections::{ConnectionLog, OpenCount, Subject, Tracked};
use crate::datapath::Datapath;
use crate::hbone::client::Pool;
use crate::hbone::mtls::Mtls;
use crate::identity::Identity;
use crate::mesh::Mesh;
use crate::metrics::Described;
use crate::netns::Netns;
use pin_project_lite::pin_project;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::RwLock;
use std::task::{Context, Poll};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

pub use sockets::ListenerError;

/// How enrolled pods' connections are brought to the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Capture {
    /// The eBPF programs on the pod's cgroup and netns (the product).
    Ebpf,
    /// NAT REDIRECT rules in the pod's netns (`iptables`): the baseline eBPF is measured
    /// against.
    Iptables,
}

/// What every connection handler needs.
pub struct ProxyContext {
    pub capture: Capture,
    /// What capture leaves alone (iptables capture writes it into its rules; the eBPF
    /// programs read it from their maps).
    pub exclusions: crate::iptables::Exclusions,
    /// The netns the daemon started in; threads return here after creating pod sockets.
    pub home: Netns,
    pub datapath: Arc<Datapath>,
    pub connections: ConnectionLog,
    pub mark: u32,
    pub mesh: Mesh,
    /// The trust domain of this node's workloads (for pods the mesh config does not list).
    pub trust_domain: String,
    pub tls: Mtls,
    pub pool: Arc<Pool>,
    /// Becomes true when the daemon shuts down (HBONE servers send GOAWAY).
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub readiness: crate::readiness::Readiness,
    /// Open HBONE server connections and their streams, on every pod's 15008.
    pub hbone_connections: OpenCount,
    pub hbone_streams: OpenCount,
    /// Pods enrolled on this node, by address (the same-node path).
    pub local_pods: RwLock<HashMap<IpAddr, Arc<PodProxy>>>,
}

impl ProxyContext {
    /// A pod's identity: from its mesh config entry, else its namespace's `default` service
    /// account in this node's trust domain (what Kubernetes gives a pod that names none).
    pub fn identity_of(&self, uid: &str, namespace: &str) -> Identity {
        match self.mesh.current().workload_by_uid(uid) {
            Some(workload) => workload.identity(),
            None => Identity {
                trust_domain: self.trust_domain.clone(),
                namespace: namespace.to_owned(),
                service_account: crate::config::DEFAULT_SERVICE_ACCOUNT.to_owned(),
            },
        }
    }

    /// Applies the policies in `config` to a connection into `pod`; on success the connection
    /// is put under re-checking, so a later policy change can close it.
    pub fn authorize(
        &self,
        config: &MeshConfig,
        pod: &PodProxy,
        tracked: &mut Tracked,
        subject: Subject,
    ) -> Result<(), String> {
        if let Some(denial) = decide(config, &subject) {
            tracing::info!(pod = %pod.label, source = %subject.source, destination = %subject.destination,
                identity = ?subject.identity.as_ref().map(ToString::to_string), %denial, "connection denied by policy");
            return Err(denial);
        }
        self.connections.authorized(tracked, subject);
        Ok(())
    }

    /// Puts `config` in force and closes the open connections it denies. If the kernel maps
    /// cannot be written, the config in force stays and the error says why.
    pub fn apply_config(&self, config: MeshConfig) -> Result<(), String> {
        self.mesh
            .apply(config, &self.datapath)
            .map_err(|err| format!("cannot write the mesh config to the kernel maps: {err}"))?;
        let config = self.mesh.current();
        let closed = self
            .connections
            .revalidate(|subject| decide(&config, subject));
        if closed > 0 {
            tracing::info!(closed, "closed open connections the new policies deny");
        }
        Ok(())
    }

    /// Where a captured outbound connection from `client` was going, if it was captured.
    pub fn outbound_destination(
        &self,
        stream: &TcpStream,
        client: SocketAddr,
    ) -> Option<SocketAddr> {
        match self.capture {
            Capture::Ebpf => self.datapath.take_orig_dst(client),
            Capture::Iptables => {
                crate::iptables::original_destination(stream, client.is_ipv6()).ok()
            }
        }
    }

    /// Where a connection steered to the inbound listener was going.
    pub fn inbound_destination(&self, stream: &TcpStream) -> std::io::Result<SocketAddr> {
        match self.capture {
            // sk_lookup keeps the original destination as the accepted socket's address.
            Capture::Ebpf => stream.local_addr(),
            Capture::Iptables => {
                let v6 = stream.local_addr()?.is_ipv6();
                crate::iptables::original_destination(stream, v6)
            }
        }
    }

    /// How many pods of this node the proxy serves.
    pub fn enrolled_pods(&self) -> usize {
        let local = self.local_pods.read().unwrap_or_else(|p| p.into_inner());
        let pods: std::collections::HashSet<*const PodProxy> =
            local.values().map(Arc::as_ptr).collect();
        pods.len()
    }

    pub fn local_pod(&self, ip: IpAddr) -> Option<Arc<PodProxy>> {
        self.local_pods
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .cloned()
    }
}

/// How metrics and access logs describe the workload at `ip`: by its mesh config entry, else
/// as `pod` (an enrolled pod the config does not list), else not at all.
pub fn describe<'a>(
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

/// The identity of the workload at `ip`: an enrolled pod of this node, else its mesh config
/// entry.
pub fn identity_at(ctx: &ProxyContext, config: &MeshConfig, ip: IpAddr) -> Option<Identity> {
    match ctx.local_pod(ip) {
        Some(pod) => Some(Identity::clone(&pod.identity)),
        None => config.workload_by_ip(ip).map(|w| w.identity()),
    }
}

/// Why `config`'s policies deny `subject`, if they do.
fn decide(config: &MeshConfig, subject: &Subject) -> Option<String> {
    let target = config.authz_target(subject.destination.ip(), &subject.namespace);
    let connection = Connection {
        source: subject.source,
        destination: subject.destination,
        identity: subject.identity.as_deref(),
    };
    match config.policies.check(&target, &connection) {
        Decision::Allow => None,
        Decision::Deny(denial) => Some(denial.to_string()),
    }
}

/// One pod as the proxy sees it.
pub struct PodProxy {
    pub name: String,
    /// Shared with every connection's record and authorization subject.
    pub namespace: Arc<str>,
    /// `namespace/name`, for records and logs.
    pub label: Arc<str>,
    pub netns: Netns,
    pub identity: Arc<Identity>,
    /// The mTLS server side of the pod's 15008, as `identity`.
    pub hbone_acceptor: tokio_rustls::TlsAcceptor,
    /// Cancelled when the pod is released: its connections end (sockets in a deleted pod's
    /// netns would otherwise keep the netns, and a drain waiting on them, alive).
    pub released: CancellationToken,
}

impl PodProxy {
    /// Ends every connection the proxy serves for the pod.
    pub fn release(&self) {
        self.released.cancel();
    }

    /// The W3C `baggage` the pod's HBONE requests carry (Istio's keys).
    pub fn baggage(&self) -> String {
        format!(
            "k8s.namespace.name={},k8s.pod.name={},service.name={}",
            self.namespace, self.name, self.name
        )
    }
}

/// The listeners of one pod, open inside its netns.
pub struct PodListeners {
    pub outbound: Vec<TcpListener>,
    pub inbound: Vec<(IpAddr, TcpListener)>,
    pub hbone: Vec<TcpListener>,
}

impl PodListeners {
    /// Opens the outbound and HBONE listeners on each pod address and one inbound listener per
    /// family.
    pub fn open(
        ctx: &ProxyContext,
        netns: &Netns,
        ips: &[IpAddr],
    ) -> Result<PodListeners, ListenerError> {
        let mut listeners = PodListeners {
            outbound: Vec::new(),
            inbound: Vec::new(),
            hbone: Vec::new(),
        };
        for &ip in ips {
            listeners
                .outbound
                .push(sockets::outbound_listener(ctx, netns, ip)?);
            listeners
                .inbound
                .push((ip, sockets::inbound_listener(ctx, netns, ip)?));
            listeners
                .hbone
                .push(sockets::hbone_listener(ctx, netns, ip)?);
        }
        Ok(listeners)
    }
}

/// Serves a pod's listeners until the returned set is dropped or aborted (at disenrollment).
pub fn serve(ctx: Arc<ProxyContext>, pod: Arc<PodProxy>, listeners: PodListeners) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    for listener in listeners.outbound {
        tasks.spawn(accept_loop(
            ctx.clone(),
            pod.clone(),
            listener,
            "outbound",
            outbound::handle,
        ));
    }
    for listener in listeners.hbone {
        tasks.spawn(accept_loop(
            ctx.clone(),
            pod.clone(),
            listener,
            "hbone",
            inbound::handle_hbone,
        ));
    }
    for (_, listener) in listeners.inbound {
        tasks.spawn(accept_loop(
            ctx.clone(),
            pod.clone(),
            listener,
            "inbound",
            inbound::handle,
        ));
    }
    tasks
}

/// Accepts until aborted, handing each connection to `handle` on a task of its own.
async fn accept_loop<Handle, Handled>(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    listener: TcpListener,
    kind: &'static str,
    handle: Handle,
) where
    Handle: Fn(Arc<ProxyContext>, Arc<PodProxy>, TcpStream, SocketAddr) -> Handled,
    Handled: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                // The relays write what they just read: Nagle's wait for an ACK would only add
                // latency (a request/response round trip waits out the peer's delayed ACK).
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(pod = %pod.label, %client, %err, "cannot set TCP_NODELAY");
                }
                let released = pod.released.clone().cancelled_owned();
                let handled = handle(ctx.clone(), pod.clone(), stream, client);
                tokio::spawn(UntilReleased { handled, released });
            }
            Err(err) => {
                // Usually transient (out of file descriptors, a connection reset while queued):
                // back off briefly so a persistent one cannot spin a core.
                tracing::warn!(pod = %pod.label, listener = kind, %err, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

pin_project! {
    /// A connection's handler, cut short when its pod is released. Written out rather than as
    /// an async block, which would store the handler's future twice (as its capture and as the
    /// local it awaits) and so double every connection's task.
    struct UntilReleased<Handled> {
        #[pin]
        handled: Handled,
        #[pin]
        released: WaitForCancellationFutureOwned,
    }
}

impl<Handled: Future<Output = ()>> Future for UntilReleased<Handled> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.released.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        this.handled.poll(cx)
    }
}

//! Delta ADS as istiod serves it to ztunnel: each stream subscribes to a type (wildcard) with
//! the versions it already holds; the first response for it sends what differs from those
//! (everything new or changed, and the removal of what is gone), even when nothing does; each
//! later version of the mesh file sends only its differences. ACKs and NACKs are logged, and
//! a proxy that has ACKed a version of the file for every type is reported synced to it.

use crate::proxy_status::ProxyStatus;
use crate::resources::{Resources, Snapshot};
use crate::token::TokenFile;
use prost_types::value::Kind;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio::sync::{mpsc, watch};
use tonic::codegen::tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use ztunnel_user::xds::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
    aggregated_discovery_service_server::AggregatedDiscoveryService,
};

/// The client's address, which the connection's service puts in each request.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::SocketAddr);

type Responses = mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, Status>>;

#[derive(Clone)]
pub struct Xds {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub token: TokenFile,
    pub status: ProxyStatus,
    pub streams: Arc<AtomicU64>,
    /// Changes when every stream is to end with `Unavailable` (a fault).
    pub drops: watch::Receiver<u64>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Xds {
    type DeltaAggregatedResourcesStream =
        UnboundedReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        self.token.authenticate(request.metadata())?;
        let peer = request
            .extensions()
            .get::<Peer>()
            .map_or_else(|| "a client".to_owned(), |peer| peer.0.to_string());
        let (responses, outgoing) = mpsc::unbounded_channel();
        let stream = XdsStream {
            id: self.streams.fetch_add(1, Ordering::Relaxed),
            peer,
            node: None,
            responses,
            subscriptions: HashMap::new(),
            nonces: 0,
            status: self.status.clone(),
        };
        let (snapshots, mut drops) = (self.snapshots.clone(), self.drops.clone());
        drops.mark_unchanged();
        tokio::spawn(stream.serve(request.into_inner(), snapshots, drops));
        Ok(Response::new(UnboundedReceiverStream::new(outgoing)))
    }
}

/// One client's stream.
struct XdsStream {
    id: u64,
    peer: String,
    /// The proxy's node (its `NODE_NAME` metadata), once its first request said it.
    node: Option<String>,
    responses: Responses,
    subscriptions: HashMap<String, Subscription>,
    nonces: u64,
    status: ProxyStatus,
}

/// A response sent and not yet ACKed.
struct Pending {
    nonce: String,
    /// The file version it brings.
    version: String,
    sent: Instant,
}

/// One subscribed type.
#[derive(Default)]
struct Subscription {
    /// The version of each resource the client holds, as far as we know.
    held: BTreeMap<String, String>,
    /// The response not yet ACKed.
    pending: Option<Pending>,
    /// The file version the client has ACKed all of.
    synced: Option<String>,
}

impl XdsStream {
    async fn serve(
        mut self,
        mut requests: Streaming<DeltaDiscoveryRequest>,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        mut drops: watch::Receiver<u64>,
    ) {
        tracing::info!(peer = %self.peer, "xDS stream opened");
        loop {
            let delivered = tokio::select! {
                request = requests.message() => match request {
                    Ok(Some(request)) => {
                        let snapshot = snapshots.borrow().clone();
                        self.handle(request, &snapshot)
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::info!(peer = %self.peer, %status, "xDS stream failed");
                        break;
                    }
                },
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snapshot = snapshots.borrow_and_update().clone();
                    self.push(&snapshot)
                }
                Ok(()) = drops.changed() => {
                    let status = Status::unavailable("istiod ended the stream (a fault)");
                    let _ = self.responses.send(Err(status));
                    break;
                }
            };
            if delivered.is_err() {
                break;
            }
            self.report();
        }
        if let Some(node) = &self.node {
            self.status.set(node, self.id, None);
        }
        tracing::info!(peer = %self.peer, "xDS stream ended");
    }

    /// A subscription (answered at once), or an ACK or NACK of a response.
    fn handle(&mut self, request: DeltaDiscoveryRequest, snapshot: &Snapshot) -> Result<(), Gone> {
        if let Some(node) = request.node.as_ref().and_then(node_name) {
            self.node = Some(node);
        }
        let type_url = request.type_url;
        if !request.response_nonce.is_empty() {
            self.acknowledged(&type_url, &request.response_nonce, request.error_detail);
            return Ok(());
        }
        let Some(resources) = snapshot.of_type(&type_url) else {
            tracing::warn!(peer = %self.peer, %type_url, "subscription to a type not served");
            return Ok(());
        };
        tracing::info!(
            peer = %self.peer, %type_url,
            held = request.initial_resource_versions.len(),
            "subscribed"
        );
        let mut subscription = Subscription {
            held: request.initial_resource_versions.into_iter().collect(),
            ..Subscription::default()
        };
        let response = self.difference(&type_url, &mut subscription.held, resources);
        subscription.pending = Some(Pending::of(&response, snapshot));
        self.subscriptions.insert(type_url, subscription);
        self.send(response)
    }

    fn acknowledged(
        &mut self,
        type_url: &str,
        nonce: &str,
        error: Option<ztunnel_user::xds::proto::google::rpc::Status>,
    ) {
        if let Some(error) = error {
            tracing::warn!(peer = %self.peer, %type_url, %nonce, "NACK: {}", error.message);
            return;
        }
        let Some(subscription) = self.subscriptions.get_mut(type_url) else {
            return;
        };
        match subscription
            .pending
            .take_if(|pending| pending.nonce == nonce)
        {
            Some(pending) => {
                // From the response's sending to its ACK: the proxy's decode, apply and
                // answer (the benchmark reads it).
                let after_us = pending.sent.elapsed().as_micros();
                tracing::info!(peer = %self.peer, %type_url, %nonce, after_us, "ACK");
                subscription.synced = Some(pending.version);
            }
            None => tracing::info!(peer = %self.peer, %type_url, %nonce, "ACK of a stale response"),
        }
    }

    /// Each subscribed type's differences from what the client holds, where there are any.
    fn push(&mut self, snapshot: &Snapshot) -> Result<(), Gone> {
        let mut subscriptions = std::mem::take(&mut self.subscriptions);
        let mut delivered = Ok(());
        for (type_url, subscription) in &mut subscriptions {
            let Some(resources) = snapshot.of_type(type_url) else {
                continue;
            };
            let response = self.difference(type_url, &mut subscription.held, resources);
            if response.resources.is_empty() && response.removed_resources.is_empty() {
                // Nothing to send: a client synced before is synced to this version too.
                if subscription.pending.is_none() {
                    subscription.synced = Some(snapshot.version.clone());
                }
                continue;
            }
            subscription.pending = Some(Pending::of(&response, snapshot));
            delivered = delivered.and(self.send(response));
        }
        self.subscriptions = subscriptions;
        delivered
    }

    /// The version every subscribed type is synced to, if they agree, as the proxy's status.
    fn report(&self) {
        let Some(node) = &self.node else {
            return;
        };
        let mut versions = self
            .subscriptions
            .values()
            .map(|subscription| subscription.synced.as_deref());
        if let Some(Some(first)) = versions.next()
            && versions.all(|version| version == Some(first))
        {
            self.status.set(node, self.id, Some(first));
        }
    }

    /// The response that brings `held` to `now`; `held` is `now`'s versions after it.
    fn difference(
        &mut self,
        type_url: &str,
        held: &mut BTreeMap<String, String>,
        now: &Resources,
    ) -> DeltaDiscoveryResponse {
        let removed_resources = held
            .keys()
            .filter(|name| !now.contains_key(*name))
            .cloned()
            .collect();
        let resources = now
            .iter()
            .filter(|(name, r)| held.get(*name) != Some(&r.version))
            .map(|(name, r)| Resource {
                name: name.clone(),
                version: r.version.clone(),
                resource: Some(r.body.clone()),
                ..Default::default()
            })
            .collect();
        *held = now
            .iter()
            .map(|(name, r)| (name.clone(), r.version.clone()))
            .collect();
        self.nonces += 1;
        DeltaDiscoveryResponse {
            type_url: type_url.to_owned(),
            nonce: format!("{}-{}", self.id, self.nonces),
            resources,
            removed_resources,
            ..Default::default()
        }
    }

    fn send(&self, response: DeltaDiscoveryResponse) -> Result<(), Gone> {
        tracing::info!(
            peer = %self.peer, type_url = %response.type_url, nonce = %response.nonce,
            resources = response.resources.len(), removed = response.removed_resources.len(),
            "sent"
        );
        self.responses.send(Ok(response)).map_err(|_| Gone)
    }
}

impl Pending {
    fn of(response: &DeltaDiscoveryResponse, snapshot: &Snapshot) -> Pending {
        Pending {
            nonce: response.nonce.clone(),
            version: snapshot.version.clone(),
            sent: Instant::now(),
        }
    }
}

/// The node a proxy runs on, from its `NODE_NAME` metadata.
fn node_name(node: &ztunnel_user::xds::proto::envoy::config::core::v3::Node) -> Option<String> {
    let value = node.metadata.as_ref()?.fields.get("NODE_NAME")?;
    match &value.kind {
        Some(Kind::StringValue(name)) => Some(name.clone()),
        _ => None,
    }
}

/// The client went away.
struct Gone;

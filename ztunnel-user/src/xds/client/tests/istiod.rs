//! istiod as the client's tests script it, and the rig that runs a client against it: apart
//! from the tests so that they read as what they check, not how istiod is played.

use super::{
    ADDRESS, AUTHORIZATION, ECHO, ModelSink, WAIT, a1, address_entry, echo_service, policy,
    response,
};
use crate::istiod::Credentials;
use crate::istiod::Dial;
use crate::xds::client::{NodeFacts, XdsClient, XdsConfig, XdsHandle};
use crate::xds::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use crate::xds::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use http::Uri;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tonic::codegen::StdError;
use tonic::codegen::tokio_stream::wrappers::UnboundedReceiverStream;

/// istiod as the tests script it: each stream opening is recorded (time and headers) and
/// either refused with the next queued status or handed to the test as an `IstiodStream`.
#[derive(Clone)]
pub(super) struct FakeIstiod {
    inner: Arc<Istiod>,
}

struct Istiod {
    refusals: Mutex<VecDeque<tonic::Status>>,
    openings: Mutex<Vec<Opening>>,
    streams: UnboundedSender<IstiodStream>,
}

/// One stream opening as istiod saw it.
#[derive(Clone, Debug)]
pub(super) struct Opening {
    pub(super) at: Instant,
    pub(super) authorization: Option<String>,
    pub(super) cluster_id: Option<String>,
}

/// An open stream: what the client sent on it, and the way to answer. Dropping it ends the
/// stream cleanly.
pub(super) struct IstiodStream {
    requests: UnboundedReceiver<DeltaDiscoveryRequest>,
    responses: UnboundedSender<Result<DeltaDiscoveryResponse, tonic::Status>>,
}

impl FakeIstiod {
    pub(super) fn new() -> (FakeIstiod, UnboundedReceiver<IstiodStream>) {
        let (streams, opened) = unbounded_channel();
        let istiod = Istiod {
            refusals: Mutex::default(),
            openings: Mutex::default(),
            streams,
        };
        let fake = FakeIstiod {
            inner: Arc::new(istiod),
        };
        (fake, opened)
    }

    pub(super) fn refuse_next(&self, status: tonic::Status) {
        self.inner.refusals.lock().unwrap().push_back(status);
    }

    pub(super) fn openings(&self) -> Vec<Opening> {
        self.inner.openings.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeIstiod {
    type DeltaAggregatedResourcesStream =
        UnboundedReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        let opening = Opening {
            at: Instant::now(),
            authorization: header("authorization"),
            cluster_id: header("clusterid"),
        };
        self.inner.openings.lock().unwrap().push(opening);
        if let Some(status) = self.inner.refusals.lock().unwrap().pop_front() {
            return Err(status);
        }
        let mut incoming = request.into_inner();
        let (forward, requests) = unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(request)) = incoming.message().await {
                if forward.send(request).is_err() {
                    break;
                }
            }
        });
        let (responses, outgoing) = unbounded_channel();
        let _ = self.inner.streams.send(IstiodStream {
            requests,
            responses,
        });
        Ok(tonic::Response::new(UnboundedReceiverStream::new(outgoing)))
    }
}

impl IstiodStream {
    async fn request(&mut self) -> DeltaDiscoveryRequest {
        timeout(WAIT, self.requests.recv())
            .await
            .expect("a request in time")
            .expect("the stream is open")
    }

    /// The two initial requests, in the client's order.
    pub(super) async fn initial_requests(&mut self) -> [DeltaDiscoveryRequest; 2] {
        [self.request().await, self.request().await]
    }

    /// Sends `response`; returns the client's ACK or NACK of it.
    pub(super) async fn reply(
        &mut self,
        response: DeltaDiscoveryResponse,
    ) -> DeltaDiscoveryRequest {
        self.responses.send(Ok(response)).unwrap();
        let reply = self.request().await;
        assert!(reply.node.is_none() && reply.initial_resource_versions.is_empty());
        reply
    }

    /// Sends `response`, which the client must ACK.
    pub(super) async fn acked(&mut self, response: DeltaDiscoveryResponse) {
        let nonce = response.nonce.clone();
        let reply = self.reply(response).await;
        assert_eq!(reply.response_nonce, nonce);
        assert_eq!(reply.error_detail, None, "NACKed");
    }

    /// Sends workload a1 (version 1) and service echo (2), then policy demo/deny-ssh (3):
    /// both ACKed.
    pub(super) async fn send_mesh(&mut self) {
        let resources = vec![a1("1"), address_entry(ECHO, "2", echo_service())];
        self.acked(response(ADDRESS, "n1", resources, &[])).await;
        let policies = vec![policy("deny-ssh", "3")];
        self.acked(response(AUTHORIZATION, "n2", policies, &[]))
            .await;
    }

    /// Waits until the client has ended its side of the stream.
    pub(super) async fn half_closed(&mut self) {
        let request = timeout(WAIT, self.requests.recv()).await.expect("in time");
        assert!(request.is_none(), "{request:?}");
    }

    /// Whether the client's side of the stream is still open, sending nothing.
    pub(super) async fn quiet(&mut self) -> bool {
        timeout(WAIT, self.requests.recv()).await.is_err()
    }

    /// Ends the stream with `status`.
    pub(super) fn fail(self, status: tonic::Status) {
        self.responses.send(Err(status)).unwrap();
    }
}

async fn next_stream(streams: &mut UnboundedReceiver<IstiodStream>) -> IstiodStream {
    timeout(WAIT, streams.recv())
        .await
        .expect("a stream opening in time")
        .unwrap()
}

/// A `Dial` that never gives a channel: for a client whose responses the test hands over.
pub(super) struct Unreachable;

impl Dial for Unreachable {
    type Channel = AggregatedDiscoveryServiceServer<FakeIstiod>;

    async fn dial<Client>(&self, _: fn(Self::Channel, Uri) -> Client) -> Result<Client, StdError> {
        Err("no istiod in this test".into())
    }
}

/// Gives the client channels to `istiod` in memory, recording when; the first `failing` ones
/// cannot be had.
struct Dialer {
    istiod: FakeIstiod,
    dials: Arc<Mutex<Vec<Instant>>>,
    failing: AtomicUsize,
}

impl Dial for Dialer {
    type Channel = AggregatedDiscoveryServiceServer<FakeIstiod>;

    async fn dial<Client>(
        &self,
        client: fn(Self::Channel, Uri) -> Client,
    ) -> Result<Client, StdError> {
        self.dials.lock().unwrap().push(Instant::now());
        let fail = self
            .failing
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err("connection refused".into());
        }
        // No origin: the server is the channel, so requests name no host.
        let server = AggregatedDiscoveryServiceServer::new(self.istiod.clone());
        Ok(client(server, Uri::default()))
    }
}

/// A client running against the scripted istiod, with the mesh model as its sink; dropping it
/// stops the client.
pub(super) struct Harness {
    pub(super) istiod: FakeIstiod,
    streams: UnboundedReceiver<IstiodStream>,
    pub(super) sink: Arc<ModelSink>,
    pub(super) xds: XdsHandle,
    /// When the client asked for a channel.
    dials: Arc<Mutex<Vec<Instant>>>,
    task: JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The node the client under test runs on.
pub(super) fn facts() -> NodeFacts {
    NodeFacts {
        instance_ip: Some("10.0.0.5".parse().unwrap()),
        pod_name: "ztunnel-x7".into(),
        pod_namespace: "istio-system".into(),
        node_name: "node1".into(),
        cluster_id: "Kubernetes".into(),
    }
}

/// The credentials on that node: its cluster id, and the token of `token_path` if given.
pub(super) fn credentials(token_path: Option<PathBuf>) -> Credentials {
    Credentials {
        cluster_id: facts().cluster_id,
        token_path,
        headers: Vec::new(),
    }
}

/// The client's config on that node, reading its token from `token_path` if given.
pub(super) fn config(token_path: Option<PathBuf>) -> XdsConfig {
    let env = [("ISTIO_META_DNS_CAPTURE".to_owned(), "true".to_owned())];
    XdsConfig::for_node(&facts(), env, credentials(token_path))
}

/// Starts a client whose first `failing_dials` channels cannot be had.
pub(super) fn start(config: XdsConfig, failing_dials: usize) -> Harness {
    let (istiod, streams) = FakeIstiod::new();
    let dials = Arc::new(Mutex::new(Vec::new()));
    let dialer = Dialer {
        istiod: istiod.clone(),
        dials: dials.clone(),
        failing: AtomicUsize::new(failing_dials),
    };
    start_client(config, dialer, (istiod, streams), dials)
}

/// Starts a client that reaches `istiod` through `dial`, the mesh model as its sink.
pub(super) fn start_client(
    config: XdsConfig,
    dial: impl Dial,
    (istiod, streams): (FakeIstiod, UnboundedReceiver<IstiodStream>),
    dials: Arc<Mutex<Vec<Instant>>>,
) -> Harness {
    let sink = Arc::new(ModelSink::new());
    let client = XdsClient::new(config, dial, sink.clone());
    let xds = client.handle();
    let task = tokio::spawn(client.run());
    Harness {
        istiod,
        streams,
        sink,
        xds,
        dials,
        task,
    }
}

/// Starts a client whose token file (in the temporary directory returned) holds `content`.
pub(super) fn start_with_token(content: &str) -> (tempfile::TempDir, PathBuf, Harness) {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("istio-token");
    std::fs::write(&token, content).unwrap();
    let h = start(config(Some(token.clone())), 0);
    (dir, token, h)
}

/// Makes the first three openings fail, so the next delay due is 80 ms: distinct from "at
/// once" (under 10 ms).
pub(super) fn refuse_three(h: &Harness) {
    for _ in 0..3 {
        h.istiod
            .refuse_next(tonic::Status::unauthenticated("not yet"));
    }
}

impl Harness {
    pub(super) async fn next_stream(&mut self) -> IstiodStream {
        next_stream(&mut self.streams).await
    }

    /// A stream whose initial requests were read.
    pub(super) async fn subscribed(&mut self) -> IstiodStream {
        let mut stream = self.next_stream().await;
        stream.initial_requests().await;
        stream
    }

    pub(super) fn dials(&self) -> Vec<Instant> {
        self.dials.lock().unwrap().clone()
    }
}

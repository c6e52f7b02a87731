//! The client's tests, against a scripted istiod (`istiod`: the generated server's trait fed
//! to the generated client in memory, no network), so every request and response is a real
//! protobuf message through tonic. The sink is the mesh model itself (`apply_to_model` over a
//! `Mesh` with kernel maps in memory), as the daemon's `ProxyContext` applies it (that one is
//! run in the lab). Time is tokio's paused clock: delays are checked without waiting them.

use super::super::proto::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use super::super::proto::istio::security::{Action, Authorization, Clause, Match, Rule, Scope};
use super::super::proto::istio::workload::{
    Address, NetworkAddress, Port, Service, TunnelProtocol, Workload, address,
};
use super::*;
use crate::mesh::Mesh;
use crate::mesh::kernel::memory::MemoryMaps;
use istiod::{Unreachable, config, credentials, facts, refuse_three, start, start_with_token};
use prost_types::Any;
use prost_types::value::Kind;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use tokio::time::{Instant, timeout};

mod istiod;
mod reconnect;
mod tls;

const ADDRESS: &str = "type.googleapis.com/istio.workload.Address";
const AUTHORIZATION: &str = "type.googleapis.com/istio.security.Authorization";
const NODE_ID: &str = "ztunnel~10.0.0.5~ztunnel-x7.istio-system~istio-system.svc.cluster.local";
/// How long a test waits for the client (virtual time: only a stuck client takes it).
const WAIT: Duration = Duration::from_secs(60);
/// What "at once" allows: the spread under the first backoff, and the timer's millisecond.
const AT_ONCE: Duration = Duration::from_millis(11);

// ---- the sink: the mesh model ----------------------------------------------------------

/// One call of the sink: the names it was given.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SinkCall {
    kind: ResourceKind,
    upserts: Vec<String>,
    removed: Vec<String>,
}

/// The mesh model as the sink, recording each call.
struct ModelSink {
    mesh: Mesh,
    maps: MemoryMaps,
    calls: Mutex<Vec<SinkCall>>,
}

impl XdsSink for ModelSink {
    fn apply(&self, batch: XdsBatch) -> Result<Vec<Rejected>, SinkError> {
        self.calls.lock().unwrap().push(SinkCall {
            kind: batch.kind,
            upserts: batch.upserts.iter().map(|u| u.name.clone()).collect(),
            removed: batch.removed.clone(),
        });
        let apply = |changes: MeshBatch| self.mesh.apply(|c| changes.changes(c), &self.maps);
        Ok(apply_to_model(batch, apply)?)
    }
}

impl ModelSink {
    /// The model of an empty mesh on node1.
    fn new() -> ModelSink {
        let maps = MemoryMaps::default();
        ModelSink {
            mesh: Mesh::new(|_| Vec::new(), None, "node1", &maps).unwrap(),
            maps,
            calls: Mutex::default(),
        }
    }

    fn calls(&self) -> Vec<SinkCall> {
        self.calls.lock().unwrap().clone()
    }
}

// ---- resources -------------------------------------------------------------------------

fn uid(name: &str) -> String {
    format!("Kubernetes//Pod/demo/{name}")
}

fn workload(name: &str, ip: &[u8]) -> address::Type {
    address::Type::Workload(Workload {
        uid: uid(name),
        name: name.into(),
        namespace: "demo".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: TunnelProtocol::Hbone.into(),
        node: "node1".into(),
        ..Workload::default()
    })
}

/// Workload a1 at 10.0.0.1, at `version`.
fn a1(version: &str) -> Resource {
    address_entry(&uid("a1"), version, workload("a1", &[10, 0, 0, 1]))
}

const ECHO: &str = "demo/echo.demo.svc.cluster.local";

fn echo_service() -> address::Type {
    address::Type::Service(Service {
        name: "echo".into(),
        namespace: "demo".into(),
        hostname: "echo.demo.svc.cluster.local".into(),
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 10],
            length: None,
        }],
        ports: vec![Port {
            service_port: 80,
            target_port: 8080,
            ..Port::default()
        }],
        ..Service::default()
    })
}

fn address_entry(name: &str, version: &str, address: address::Type) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(
            Any::from_msg(&Address {
                r#type: Some(address),
            })
            .unwrap(),
        ),
        ..Resource::default()
    }
}

/// The DENY policy `demo/<name>` of port 22.
fn policy(name: &str, version: &str) -> Resource {
    let policy = Authorization {
        name: name.into(),
        namespace: "demo".into(),
        scope: Scope::Namespace.into(),
        action: Action::Deny.into(),
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    destination_ports: vec![22],
                    ..Match::default()
                }],
            }],
        }],
        dry_run: false,
    };
    Resource {
        name: format!("demo/{name}"),
        version: version.into(),
        resource: Some(Any::from_msg(&policy).unwrap()),
        ..Resource::default()
    }
}

fn response(
    type_url: &str,
    nonce: &str,
    resources: Vec<Resource>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: nonce.into(),
        resources,
        removed_resources: removed.iter().map(|name| (*name).to_owned()).collect(),
        ..DeltaDiscoveryResponse::default()
    }
}

fn versions(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(name, version)| ((*name).to_owned(), (*version).to_owned()))
        .collect()
}

fn string(value: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::StringValue(value.into())),
    }
}

// ---- tests -----------------------------------------------------------------------------

/// A resource that does not decode fails its response whole, as when tonic decoded responses
/// whole: nothing of it applied or held, no answer (the stream ends as failed).
#[test]
fn a_resource_that_does_not_decode_fails_the_response() {
    let sink = Arc::new(ModelSink::new());
    let client = XdsClient::new(config(None), Unreachable, sink.clone());
    let response = response::DeltaResponse {
        type_url: ADDRESS.into(),
        nonce: "n1".into(),
        // The second: a name of 5 bytes, cut after the first.
        resources: vec![
            prost::Message::encode_to_vec(&a1("1")).into(),
            vec![0x0a, 5, b'x'].into(),
        ],
        removed_resources: Vec::new(),
    };
    assert!(client.take(response).is_err());
    assert_eq!(sink.calls(), []);
    assert!(client.handle().versions(ResourceKind::Address).is_empty());
}

#[test]
fn the_node_is_named_as_istios_ztunnel_names_it() {
    let env = [
        ("ISTIO_META_DNS_CAPTURE", "true"),
        ("ISTIO_META_NAME", "renamed"),
        ("ISTIO_META_", "no key"),
        ("ISTIO_METAJSON_LABELS", "{}"),
        ("PATH", "/bin"),
    ]
    .map(|(key, value)| (key.to_owned(), value.to_owned()));
    let config = XdsConfig::for_node(&facts(), env, credentials(None));
    assert_eq!(config.node_id, NODE_ID);
    assert_eq!(config.credentials.cluster_id, "Kubernetes");
    let expected = [
        ("NAME", "renamed"),
        ("NAMESPACE", "istio-system"),
        ("INSTANCE_IPS", "10.0.0.5"),
        ("NODE_NAME", "node1"),
        ("DNS_CAPTURE", "true"),
        ("CLUSTER_ID", "Kubernetes"),
    ]
    .map(|(key, value)| (key.to_owned(), string(value)));
    assert_eq!(config.node_metadata.fields, expected.into());

    let unset = NodeFacts {
        instance_ip: None,
        ..facts()
    };
    assert_eq!(
        unset.node_id(),
        "ztunnel~1.1.1.1~ztunnel-x7.istio-system~istio-system.svc.cluster.local"
    );
    assert_eq!(unset.metadata([]).fields["INSTANCE_IPS"], string("1.1.1.1"));
}

/// Each opening subscribes to both types with the node and no names; after a clean end the
/// client is back at once (not after the 80 ms three refused openings made the backoff) and
/// echoes the versions it holds.
#[tokio::test(start_paused = true)]
async fn initial_requests_carry_the_node_and_after_a_reconnect_the_versions_held() {
    let mut h = start(config(None), 0);
    refuse_three(&h);
    let mut stream = h.next_stream().await;
    for (request, type_url) in stream
        .initial_requests()
        .await
        .iter()
        .zip([ADDRESS, AUTHORIZATION])
    {
        assert_eq!(request.type_url, type_url);
        let node = request.node.as_ref().unwrap();
        assert_eq!(node.id, NODE_ID);
        let metadata = &node.metadata.as_ref().unwrap().fields;
        assert_eq!(metadata["CLUSTER_ID"], string("Kubernetes"));
        assert_eq!(metadata["DNS_CAPTURE"], string("true"));
        assert!(request.resource_names_subscribe.is_empty());
        assert!(request.resource_names_unsubscribe.is_empty());
        assert!(request.initial_resource_versions.is_empty());
        assert!(request.response_nonce.is_empty() && request.error_detail.is_none());
    }
    let opening = h.istiod.openings().pop().unwrap();
    assert_eq!(opening.authorization, None);
    assert_eq!(opening.cluster_id.as_deref(), Some("Kubernetes"));

    stream.send_mesh().await;
    let status = h.xds.status();
    assert!(status.connected && status.ready);
    assert_eq!(status.attempts, 4);
    let held: Vec<_> = status.types.iter().map(|t| t.resources).collect();
    assert_eq!(held, [2, 1]);
    let ack = status.types[1].last_ack.as_ref().unwrap();
    assert_eq!(ack.nonce, "n2");
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["types"][0]["type_url"], ADDRESS);

    let ended = Instant::now();
    drop(stream);
    let mut stream = h.next_stream().await;
    assert!(h.istiod.openings().last().unwrap().at - ended < AT_ONCE);
    let [address_request, authorization_request] = stream.initial_requests().await;
    assert_eq!(
        address_request.initial_resource_versions,
        versions(&[(&uid("a1"), "1"), (ECHO, "2")])
    );
    assert_eq!(
        authorization_request.initial_resource_versions,
        versions(&[("demo/deny-ssh", "3")])
    );
    assert_eq!(address_request.node.unwrap().id, NODE_ID);
    let status = h.xds.status();
    assert_eq!(status.attempts, 5);
    assert_eq!(
        status.last_error.as_deref(),
        Some("istiod ended the stream")
    );
}

/// A response with a good workload and service, one the conversion refuses, one that holds
/// nothing and one the model refuses: the good ones are applied, the NACK names the others,
/// and only the good ones are held.
#[tokio::test(start_paused = true)]
async fn a_bad_resource_is_nacked_by_name_and_its_siblings_applied() {
    let mut h = start(config(None), 0);
    let mut stream = h.subscribed().await;
    let empty = Resource {
        name: "empty".into(),
        ..Resource::default()
    };
    let resources = vec![
        a1("1"),
        address_entry(ECHO, "2", echo_service()),
        address_entry("bad", "3", workload("bad", &[10, 0, 0])),
        empty,
        address_entry("squatter", "4", workload("squatter", &[10, 0, 0, 1])),
    ];
    let nack = stream.reply(response(ADDRESS, "n1", resources, &[])).await;

    assert_eq!(nack.type_url, ADDRESS);
    assert_eq!(nack.response_nonce, "n1");
    let message = nack.error_detail.unwrap().message;
    assert_eq!(
        message,
        "bad: addresses[0]: an address of 3 bytes (an IP is 4 or 16); \
         empty: the entry holds no resource; \
         squatter: field workloadIps: 10.0.0.1 belongs to workload Kubernetes//Pod/demo/a1"
    );
    assert_eq!(
        h.sink.calls(),
        [SinkCall {
            kind: ResourceKind::Address,
            upserts: vec![uid("a1"), ECHO.into(), "squatter".into()],
            removed: vec![],
        }]
    );
    let config = h.sink.mesh.current();
    assert!(config.workload_by_uid(&uid("a1")).is_some());
    assert!(config.service_by_key(ECHO).is_some());
    assert!(config.workload_by_uid(&uid("squatter")).is_none());
    assert_eq!(
        h.xds.versions(ResourceKind::Address),
        versions(&[(&uid("a1"), "1"), (ECHO, "2")])
    );
    let status = h.xds.status();
    let address_status = &status.types[0];
    assert_eq!(address_status.last_ack, None);
    let last_nack = address_status.last_nack.as_ref().unwrap();
    assert_eq!((&*last_nack.nonce, &*last_nack.message), ("n1", &*message));
}

/// Removed names reach the sink after the upserts, and leave the model and the versions.
#[tokio::test(start_paused = true)]
async fn removals_reach_the_model() {
    let mut h = start(config(None), 0);
    let mut stream = h.subscribed().await;
    stream.send_mesh().await;
    assert_eq!(h.sink.mesh.current().policies.all().len(), 1);

    let a2 = address_entry(&uid("a2"), "4", workload("a2", &[10, 0, 0, 2]));
    let removed = [uid("a1"), ECHO.to_owned(), "never-held".to_owned()];
    let removed: Vec<&str> = removed.iter().map(String::as_str).collect();
    stream
        .acked(response(ADDRESS, "n3", vec![a2], &removed))
        .await;
    stream
        .acked(response(AUTHORIZATION, "n4", vec![], &["demo/deny-ssh"]))
        .await;

    let calls = h.sink.calls();
    assert_eq!(
        calls[2],
        SinkCall {
            kind: ResourceKind::Address,
            upserts: vec![uid("a2")],
            removed: removed.iter().map(|name| (*name).to_owned()).collect(),
        }
    );
    assert_eq!(calls[3].removed, ["demo/deny-ssh"]);
    let config = h.sink.mesh.current();
    assert!(config.workload_by_uid(&uid("a1")).is_none());
    assert!(config.workload_by_uid(&uid("a2")).is_some());
    assert!(config.service_by_key(ECHO).is_none());
    assert!(config.policies.all().is_empty());
    assert_eq!(
        h.xds.versions(ResourceKind::Address),
        versions(&[(&uid("a2"), "4")])
    );
    assert!(h.xds.versions(ResourceKind::Authorization).is_empty());
}

/// A response beyond tonic's default limit of 4 MiB (a big cluster's first push) is taken
/// whole, as Istio's ztunnel takes up to 200 MiB; then, once istiod is quiet, the stream is
/// renewed (its receive buffer goes with it), the new one presenting every version held; a
/// second one within 10 minutes is not.
#[tokio::test(start_paused = true)]
async fn a_response_over_4_mib_is_taken_then_the_stream_renewed_once() {
    let mut h = start(config(None), 0);
    let mut stream = h.subscribed().await;
    let count: u16 = 20_000;
    // Big bodies under short names: the new stream's request, which names every resource,
    // stays under the 4 MiB istiod takes.
    let big = |version: &str| {
        let resources: Vec<Resource> = (0..count)
            .map(|i| {
                let name = format!("w{i}");
                let [high, low] = i.to_be_bytes();
                let mut body = workload(&name, &[10, 1, high, low]);
                if let address::Type::Workload(w) = &mut body {
                    w.hostname = format!("{name}.{}", "x".repeat(200));
                }
                address_entry(&uid(&name), version, body)
            })
            .collect();
        response(ADDRESS, version, resources, &[])
    };
    let first = big("1");
    assert!(prost::Message::encoded_len(&first) > 4 * 1024 * 1024);
    stream.acked(first).await;
    assert_eq!(h.sink.mesh.current().workload_count(), usize::from(count));
    // istiod's next response, right after, is still taken and ACKed on this stream.
    let policies = vec![policy("deny-ssh", "1")];
    stream
        .acked(response(AUTHORIZATION, "p1", policies, &[]))
        .await;

    stream.half_closed().await;
    drop(stream);
    let mut stream = h.next_stream().await;
    let [address_request, _] = stream.initial_requests().await;
    assert_eq!(
        address_request.initial_resource_versions.len(),
        usize::from(count)
    );
    let status = h.xds.status();
    assert!(
        status.connected && status.ready && status.attempts == 2,
        "{status:?}"
    );
    assert!(
        status
            .last_error
            .unwrap()
            .starts_with("renewed after a response of")
    );

    stream.acked(big("2")).await;
    assert!(stream.quiet().await, "renewed twice within 10 minutes");
}

/// Ready once each type has had an ACKed response: a NACKed one does not count.
#[tokio::test(start_paused = true)]
async fn ready_only_once_both_types_had_an_acked_response() {
    let mut h = start(config(None), 0);
    let mut stream = h.subscribed().await;
    assert!(!h.xds.is_ready());

    let bad = address_entry("bad", "1", workload("bad", &[10, 0, 0]));
    let nack = stream.reply(response(ADDRESS, "n1", vec![bad], &[])).await;
    assert!(nack.error_detail.is_some());
    stream
        .acked(response(
            AUTHORIZATION,
            "n2",
            vec![policy("deny-ssh", "1")],
            &[],
        ))
        .await;
    assert!(!h.xds.is_ready());
    assert!(
        timeout(Duration::from_secs(1), h.xds.ready())
            .await
            .is_err()
    );

    // An empty response is a response: wildcard on an empty mesh.
    stream.acked(response(ADDRESS, "n3", vec![], &[])).await;
    assert!(h.xds.is_ready());
    timeout(WAIT, h.xds.ready()).await.unwrap();
    assert!(h.xds.status().ready);
}

/// The token file is read at every opening: a rotated token goes with the next stream.
#[tokio::test(start_paused = true)]
async fn the_token_is_read_again_at_every_opening() {
    let (_dir, token, mut h) = start_with_token("token-one\n");
    let stream = h.subscribed().await;
    std::fs::write(&token, "token-two").unwrap();
    drop(stream);
    let _stream = h.subscribed().await;
    let openings = h.istiod.openings();
    let authorizations: Vec<_> = openings
        .iter()
        .map(|opening| opening.authorization.as_deref())
        .collect();
    assert_eq!(
        authorizations,
        [Some("Bearer token-one"), Some("Bearer token-two")]
    );
    assert!(
        openings
            .iter()
            .all(|opening| opening.cluster_id.as_deref() == Some("Kubernetes"))
    );
}

/// An empty token file is an error, retried with the backoff until the token is there.
#[tokio::test(start_paused = true)]
async fn an_empty_token_file_is_retried_with_backoff() {
    let (_dir, token, mut h) = start_with_token("");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = h.xds.status();
    // 10 + 20 + 40 ms at most, 5 + 10 + 20 + 40 at least: 4 or 5 attempts, not a busy loop.
    assert!((4..=5).contains(&status.attempts), "{}", status.attempts);
    assert!(!status.connected);
    let expected = format!("the token file {} is empty", token.display());
    assert_eq!(status.last_error, Some(expected));
    assert!(h.istiod.openings().is_empty() && h.dials().is_empty());

    std::fs::write(&token, "token").unwrap();
    let _stream = h.subscribed().await;
    let openings = h.istiod.openings();
    assert_eq!(openings[0].authorization.as_deref(), Some("Bearer token"));
    assert!(h.xds.status().connected);
}

/// A response the kernel's maps refuse as a whole: every resource of it is NACKed, the model
/// and the versions held stay.
#[tokio::test(start_paused = true)]
async fn a_response_the_kernel_refuses_is_nacked_whole() {
    let mut h = start(config(None), 0);
    let mut stream = h.subscribed().await;
    stream
        .acked(response(ADDRESS, "n1", vec![a1("1")], &[]))
        .await;

    h.sink.maps.refuse_workloads.store(true, Ordering::Relaxed);
    let resources = vec![
        address_entry(&uid("a1"), "2", workload("a1", &[10, 0, 0, 9])),
        address_entry(&uid("a2"), "1", workload("a2", &[10, 0, 0, 2])),
        address_entry("bad", "1", workload("bad", &[])),
    ];
    let removed = uid("a3");
    let nack = stream
        .reply(response(ADDRESS, "n2", resources, &[&removed]))
        .await;
    let not_applied = "not applied: ZT_WORKLOADS is full";
    assert_eq!(
        nack.error_detail.unwrap().message,
        format!(
            "bad: addresses[0]: an address of 0 bytes (an IP is 4 or 16); \
             {a1}: {not_applied}; {a2}: {not_applied}; {removed}: {not_applied}",
            a1 = uid("a1"),
            a2 = uid("a2"),
        )
    );
    let config = h.sink.mesh.current();
    let a1 = config.workload_by_uid(&uid("a1")).unwrap();
    assert_eq!(
        a1.workload_ips,
        ["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert!(config.workload_by_uid(&uid("a2")).is_none());
    assert_eq!(
        h.xds.versions(ResourceKind::Address),
        versions(&[(&uid("a1"), "1")])
    );
}

/// A response of a type the client did not subscribe to is NACKed and goes nowhere.
#[tokio::test(start_paused = true)]
async fn a_response_of_an_unknown_type_is_nacked() {
    let mut h = start(config(None), 0);
    let mut stream = h.subscribed().await;
    let cluster = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    let nack = stream
        .reply(response(cluster, "n1", vec![policy("p", "1")], &[]))
        .await;
    assert_eq!(nack.type_url, cluster);
    assert_eq!(nack.response_nonce, "n1");
    assert_eq!(
        nack.error_detail.unwrap().message,
        format!("{cluster}: not a type this client subscribes to")
    );
    assert!(h.sink.calls().is_empty());
    assert!(!h.xds.is_ready());
}

#[test]
fn a_nack_names_at_most_100_resources() {
    let rejected: Vec<Rejected> = (0..250)
        .map(|i| Rejected::new(format!("r{i}"), "bad"))
        .collect();
    let message = nack_message(&rejected);
    assert!(message.starts_with("r0: bad; r1: bad; "));
    assert!(message.ends_with("r99: bad; and 150 more"));
    assert_eq!(nack_message(&rejected[..100]).matches("; ").count(), 99);
}

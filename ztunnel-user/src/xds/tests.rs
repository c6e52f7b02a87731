//! The generated wire types against Istio's and envoy's wire: real protobuf encoding, bytes
//! written by hand from the field numbers, and the generated gRPC clients talking to the
//! generated servers in memory (no network).

use super::proto::envoy::config::core::v3::{Node, node::UserAgentVersionType};
use super::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    aggregated_discovery_service_server::{
        self as ads_server, AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
};
use super::proto::google::rpc::Status;
use super::proto::istio::security::{
    Action, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
    string_match::MatchType,
};
use super::proto::istio::v1::auth::{
    IstioCertificateRequest, IstioCertificateResponse,
    istio_certificate_service_client::IstioCertificateServiceClient,
    istio_certificate_service_server::{
        self as ca_server, IstioCertificateService, IstioCertificateServiceServer,
    },
};
use super::proto::istio::workload::{
    Address, AppProtocol, GatewayAddress, NetworkAddress, NetworkMode, Port, PortList, Service,
    TunnelProtocol, Workload, WorkloadStatus, address, gateway_address,
};
use prost::{Message, Name};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tonic::codegen::{Service as TowerService, tokio_stream};
use tonic::server::NamedService;

const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
const ADS_DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const CA_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// A length-delimited field (wire type 2): its key, written by hand by the caller, then the
/// payload's length (one byte: every payload here is short) and the payload.
fn ld(key: &[u8], payload: &[u8]) -> Vec<u8> {
    let len = u8::try_from(payload.len()).unwrap();
    assert!(len < 0x80, "a longer payload needs a multi-byte length");
    [key, &[len], payload].concat()
}

fn ipv4(a: u8, b: u8, c: u8, d: u8) -> Vec<u8> {
    vec![a, b, c, d]
}

/// A pod the way istiod sends it: addresses, services, waypoint, policies and the rest.
fn pod_workload() -> Workload {
    Workload {
        uid: "Kubernetes//Pod/ns/app-1".into(),
        name: "app-1".into(),
        namespace: "ns".into(),
        addresses: vec![ipv4(10, 0, 0, 7)],
        network: "net".into(),
        tunnel_protocol: TunnelProtocol::Hbone.into(),
        trust_domain: "cluster.local".into(),
        service_account: "app".into(),
        waypoint: Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Address(NetworkAddress {
                network: "net".into(),
                address: ipv4(10, 0, 0, 9),
                length: None,
            })),
            hbone_mtls_port: 15008,
        }),
        node: "node-1".into(),
        canonical_name: "app".into(),
        canonical_revision: "v1".into(),
        workload_name: "app".into(),
        services: HashMap::from([(
            "ns/app.ns.svc.cluster.local".to_owned(),
            PortList {
                ports: vec![Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: AppProtocol::Http2.into(),
                }],
            },
        )]),
        authorization_policies: vec!["ns/deny-all".into()],
        status: WorkloadStatus::Healthy.into(),
        cluster_id: "Kubernetes".into(),
        network_mode: NetworkMode::Standard.into(),
        capacity: Some(2),
        ..Default::default()
    }
}

#[test]
fn a_workload_goes_through_address_any_and_delta_response_unchanged() {
    let address = Address {
        r#type: Some(address::Type::Workload(pod_workload())),
    };
    assert_eq!(Address::decode(&*address.encode_to_vec()).unwrap(), address);

    // The resource as delta xDS carries it: an Any typed by the type URL istiod uses.
    assert_eq!(Address::type_url(), ADDRESS_TYPE);
    assert_eq!(Authorization::type_url(), AUTHORIZATION_TYPE);
    let any = prost_types::Any::from_msg(&address).unwrap();
    assert_eq!(any.type_url, ADDRESS_TYPE);
    let response = DeltaDiscoveryResponse {
        system_version_info: "2026-08-20T00:00:00Z/1".into(),
        type_url: ADDRESS_TYPE.into(),
        resources: vec![Resource {
            name: "Kubernetes//Pod/ns/app-1".into(),
            aliases: vec!["net/10.0.0.7".into()],
            version: "42".into(),
            resource: Some(any),
            ..Default::default()
        }],
        removed_resources: vec!["Kubernetes//Pod/ns/gone".into()],
        nonce: "nonce-1".into(),
        ..Default::default()
    };
    let received = DeltaDiscoveryResponse::decode(&*response.encode_to_vec()).unwrap();
    assert_eq!(received, response);
    let resource = received.resources[0].resource.as_ref().unwrap();
    let unpacked: Address = resource.to_msg().unwrap();
    assert_eq!(unpacked, address);
    let Some(address::Type::Workload(workload)) = unpacked.r#type else {
        panic!("not a workload: {unpacked:?}");
    };
    assert_eq!(workload.addresses, [vec![10, 0, 0, 7]]);
    assert_eq!(workload.tunnel_protocol(), TunnelProtocol::Hbone);
    assert_eq!(
        workload.services["ns/app.ns.svc.cluster.local"].ports[0].app_protocol(),
        AppProtocol::Http2
    );
    // The wrong type is refused, not misread.
    assert!(resource.to_msg::<Authorization>().is_err());
}

#[test]
fn a_service_round_trips_inside_an_address() {
    let address = Address {
        r#type: Some(address::Type::Service(Service {
            name: "app".into(),
            namespace: "ns".into(),
            hostname: "app.ns.svc.cluster.local".into(),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: ipv4(10, 96, 0, 10),
                length: None,
            }],
            ports: vec![Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: AppProtocol::Unknown.into(),
            }],
            canonical: true,
            ..Default::default()
        })),
    };
    let bytes = address.encode_to_vec();
    // Address.service is field 2, length-delimited: key (2 << 3) | 2.
    assert_eq!(bytes[0], 0x12);
    assert_eq!(Address::decode(&*bytes).unwrap(), address);
}

/// Workload's fields by Istio's numbers, in field order (so encoding gives the same bytes).
#[test]
fn workload_fields_have_istios_numbers() {
    let waypoint = [
        ld(&[0x12], &ld(&[0x12], &[10, 0, 0, 9])), // address: 2 (NetworkAddress.address: 2)
        vec![0x18, 0xA0, 0x75],                    // hbone_mtls_port: 3, varint 15008
    ]
    .concat();
    let port = [
        &[0x08, 80][..],         // service_port: 1, varint
        &[0x10, 0x90, 0x3F][..], // target_port: 2, varint 8080
        &[0x18, 0x02][..],       // app_protocol: 3, HTTP2 = 2
    ]
    .concat();
    let services_entry = [
        ld(&[0x0A], b"ns/svc"),           // map key: 1
        ld(&[0x12], &ld(&[0x0A], &port)), // map value: 2, a PortList (ports: 1)
    ]
    .concat();
    let bytes = [
        ld(&[0x1A], &[10, 0, 0, 7]),        // addresses: 3, bytes
        vec![0x28, 0x01],                   // tunnel_protocol: 5, varint HBONE = 1
        ld(&[0x3A], b"sa"),                 // service_account: 7
        ld(&[0x42], &waypoint),             // waypoint: 8
        ld(&[0x82, 0x01], b"ns/deny"),      // authorization_policies: 16 -> key 130
        ld(&[0xA2, 0x01], b"uid-1"),        // uid: 20 -> key 162
        ld(&[0xB2, 0x01], &services_entry), // services: 22 -> key 178
        vec![0xC8, 0x01, 0x01],             // network_mode: 25 -> key 200, HOST_NETWORK = 1
        ld(&[0xDA, 0x01], &[0x08, 0x03]),   // capacity: 27 -> key 218, UInt32Value{value: 3}
    ]
    .concat();

    let workload = Workload::decode(&*bytes).unwrap();
    assert_eq!(workload.uid, "uid-1");
    assert_eq!(workload.addresses, [vec![10, 0, 0, 7]]);
    assert_eq!(workload.service_account, "sa");
    assert_eq!(workload.tunnel_protocol(), TunnelProtocol::Hbone);
    assert_eq!(workload.authorization_policies, ["ns/deny"]);
    assert_eq!(workload.network_mode(), NetworkMode::HostNetwork);
    assert_eq!(workload.capacity, Some(3));
    let waypoint = workload.waypoint.as_ref().unwrap();
    assert_eq!(waypoint.hbone_mtls_port, 15008);
    assert_eq!(
        waypoint.destination,
        Some(gateway_address::Destination::Address(NetworkAddress {
            network: String::new(),
            address: vec![10, 0, 0, 9],
            length: None,
        }))
    );
    let ports = &workload.services["ns/svc"].ports;
    assert_eq!((ports[0].service_port, ports[0].target_port), (80, 8080));
    assert_eq!(ports[0].app_protocol(), AppProtocol::Http2);
    assert_eq!(workload.encode_to_vec(), bytes);
}

#[test]
fn authorization_fields_have_istios_numbers() {
    let matches = [
        ld(&[0x4A], &[22]), // destination_ports: 9, packed varints
        ld(
            &[0x5A],                                            // service_accounts: 11 -> key 90
            &[ld(&[0x0A], b"ns"), ld(&[0x12], b"sa")].concat(), // namespace: 1, serviceAccount: 2
        ),
    ]
    .concat();
    let rule = ld(&[0x0A], &ld(&[0x12], &matches)); // clauses: 1, Clause.matches: 2
    let bytes = [
        ld(&[0x0A], b"deny"), // name: 1
        ld(&[0x12], b"ns"),   // namespace: 2
        vec![0x18, 0x02],     // scope: 3, WORKLOAD_SELECTOR = 2
        vec![0x20, 0x01],     // action: 4, DENY = 1
        ld(&[0x2A], &rule),   // rules: 5
        vec![0x30, 0x01],     // dry_run: 6
    ]
    .concat();

    let policy = Authorization::decode(&*bytes).unwrap();
    assert_eq!(
        policy,
        Authorization {
            name: "deny".into(),
            namespace: "ns".into(),
            scope: Scope::WorkloadSelector.into(),
            action: Action::Deny.into(),
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![Match {
                        destination_ports: vec![22],
                        service_accounts: vec![ServiceAccountMatch {
                            namespace: "ns".into(),
                            service_account: "sa".into(),
                        }],
                        ..Default::default()
                    }],
                }],
            }],
            dry_run: true,
        }
    );
    assert_eq!(policy.encode_to_vec(), bytes);

    // StringMatch's oneof: exact 1, prefix 2, suffix 3, presence 4 (an Empty).
    let suffix = StringMatch::decode(&*ld(&[0x1A], b".local")).unwrap();
    assert_eq!(suffix.match_type, Some(MatchType::Suffix(".local".into())));
    let presence = StringMatch::decode(&[0x22, 0x00][..]).unwrap();
    assert_eq!(presence.match_type, Some(MatchType::Presence(())));
}

#[test]
fn certificate_request_fields_have_istios_numbers() {
    let value = ld(&[0x1A], b"spiffe://td/ns/a/sa/b"); // Value.string_value: 3
    let entry = [ld(&[0x0A], b"ImpersonatedIdentity"), ld(&[0x12], &value)].concat();
    let bytes = [
        ld(&[0x0A], b"PEM"),               // csr: 1
        vec![0x18, 0x80, 0xA3, 0x05],      // validity_duration: 3, varint 86400
        ld(&[0x22], &ld(&[0x0A], &entry)), // metadata: 4, Struct.fields: 1
    ]
    .concat();

    let request = IstioCertificateRequest::decode(&*bytes).unwrap();
    assert_eq!(request.csr, "PEM");
    assert_eq!(request.validity_duration, 86_400);
    let metadata = request.metadata.as_ref().unwrap();
    assert_eq!(
        metadata.fields["ImpersonatedIdentity"].kind,
        Some(prost_types::value::Kind::StringValue(
            "spiffe://td/ns/a/sa/b".into()
        ))
    );
    assert_eq!(request.encode_to_vec(), bytes);

    let chain = [ld(&[0x0A], b"leaf"), ld(&[0x0A], b"root")].concat(); // cert_chain: 1
    let response = IstioCertificateResponse::decode(&*chain).unwrap();
    assert_eq!(response.cert_chain, ["leaf", "root"]);
}

#[test]
fn delta_request_and_node_fields_have_envoys_numbers() {
    let node = [
        ld(
            &[0x0A],
            b"ztunnel~10.0.0.1~zt.istio-system~istio-system.svc.cluster.local",
        ), // id: 1
        ld(&[0x12], b"Kubernetes"), // cluster: 2
        ld(&[0x32], b"ztunnel"),    // user_agent_name: 6
        ld(&[0x3A], b"0.1.0"),      // user_agent_version: 7
    ]
    .concat();
    let status = [vec![0x08, 0x03], ld(&[0x12], b"uid-1: bad address")].concat(); // code 1, message 2
    let bytes = [
        ld(&[0x0A], &node),                   // node: 1
        ld(&[0x12], ADDRESS_TYPE.as_bytes()), // type_url: 2
        ld(&[0x1A], b"*"),                    // resource_names_subscribe: 3
        ld(&[0x22], b"*"),                    // resource_names_unsubscribe: 4
        ld(
            &[0x2A],
            &[ld(&[0x0A], b"uid-1"), ld(&[0x12], b"7")].concat(),
        ), // initial_resource_versions: 5
        ld(&[0x32], b"nonce-1"),              // response_nonce: 6
        ld(&[0x3A], &status),                 // error_detail: 7
    ]
    .concat();

    let request = DeltaDiscoveryRequest::decode(&*bytes).unwrap();
    assert_eq!(
        request,
        DeltaDiscoveryRequest {
            node: Some(Node {
                id: "ztunnel~10.0.0.1~zt.istio-system~istio-system.svc.cluster.local".into(),
                cluster: "Kubernetes".into(),
                user_agent_name: "ztunnel".into(),
                user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(
                    "0.1.0".into()
                )),
                ..Default::default()
            }),
            type_url: ADDRESS_TYPE.into(),
            resource_names_subscribe: vec!["*".into()],
            resource_names_unsubscribe: vec!["*".into()],
            initial_resource_versions: HashMap::from([("uid-1".into(), "7".into())]),
            response_nonce: "nonce-1".into(),
            error_detail: Some(Status {
                code: 3,
                message: "uid-1: bad address".into(),
                details: vec![],
            }),
        }
    );
    assert_eq!(request.encode_to_vec(), bytes);
}

#[test]
fn delta_response_fields_have_envoys_numbers() {
    let resource = [
        ld(&[0x0A], b"7"),          // version: 1
        ld(&[0x1A], b"uid-1"),      // name: 3
        ld(&[0x22], b"n/10.0.0.7"), // aliases: 4
    ]
    .concat();
    let bytes = [
        ld(&[0x0A], b"v1"),                   // system_version_info: 1
        ld(&[0x12], &resource),               // resources: 2
        ld(&[0x22], ADDRESS_TYPE.as_bytes()), // type_url: 4
        ld(&[0x2A], b"nonce-1"),              // nonce: 5
        ld(&[0x32], b"uid-2"),                // removed_resources: 6
    ]
    .concat();

    let response = DeltaDiscoveryResponse::decode(&*bytes).unwrap();
    assert_eq!(response.system_version_info, "v1");
    assert_eq!(response.type_url, ADDRESS_TYPE);
    assert_eq!(response.nonce, "nonce-1");
    assert_eq!(response.removed_resources, ["uid-2"]);
    let resource = &response.resources[0];
    assert_eq!((&*resource.name, &*resource.version), ("uid-1", "7"));
    assert_eq!(resource.aliases, ["n/10.0.0.7"]);
    assert_eq!(response.encode_to_vec(), bytes);
}

/// A client-side layer that records the path of every request before passing it on.
#[derive(Clone)]
struct RecordPaths<S> {
    inner: S,
    paths: Arc<Mutex<Vec<String>>>,
}

impl<S> RecordPaths<S> {
    fn new(inner: S) -> Self {
        RecordPaths {
            inner,
            paths: Arc::default(),
        }
    }

    fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }
}

impl<S> TowerService<http::Request<tonic::body::Body>> for RecordPaths<S>
where
    S: TowerService<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        self.paths
            .lock()
            .unwrap()
            .push(request.uri().path().to_owned());
        self.inner.call(request)
    }
}

/// Signs nothing: answers with the CSR and the impersonated identity it was sent.
struct EchoCa;

#[tonic::async_trait]
impl IstioCertificateService for EchoCa {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let request = request.into_inner();
        let identity = request
            .metadata
            .as_ref()
            .and_then(|metadata| metadata.fields.get("ImpersonatedIdentity"))
            .and_then(|value| match &value.kind {
                Some(prost_types::value::Kind::StringValue(identity)) => Some(identity.clone()),
                _ => None,
            })
            .ok_or_else(|| tonic::Status::invalid_argument("no identity"))?;
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain: vec![request.csr, identity],
        }))
    }
}

/// Answers the first request of a stream with one response for its type, nonce "n1".
struct EchoAds;

#[tonic::async_trait]
impl AggregatedDiscoveryService for EchoAds {
    type DeltaAggregatedResourcesStream =
        tokio_stream::Once<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let first = request
            .into_inner()
            .message()
            .await?
            .ok_or_else(|| tonic::Status::invalid_argument("empty stream"))?;
        Ok(tonic::Response::new(tokio_stream::once(Ok(
            DeltaDiscoveryResponse {
                type_url: first.type_url,
                nonce: "n1".into(),
                ..Default::default()
            },
        ))))
    }
}

#[test]
fn services_have_istios_and_envoys_names() {
    assert_eq!(
        ca_server::SERVICE_NAME,
        "istio.v1.auth.IstioCertificateService"
    );
    assert_eq!(
        <IstioCertificateServiceServer<EchoCa> as NamedService>::NAME,
        "istio.v1.auth.IstioCertificateService"
    );
    assert_eq!(
        ads_server::SERVICE_NAME,
        "envoy.service.discovery.v3.AggregatedDiscoveryService"
    );
    assert_eq!(
        <AggregatedDiscoveryServiceServer<EchoAds> as NamedService>::NAME,
        "envoy.service.discovery.v3.AggregatedDiscoveryService"
    );
}

#[tokio::test]
async fn ca_client_calls_the_server_on_istios_path() {
    let server = RecordPaths::new(IstioCertificateServiceServer::new(EchoCa));
    let mut client = IstioCertificateServiceClient::new(server.clone());
    let metadata = prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(
                    "spiffe://cluster.local/ns/ns/sa/app".into(),
                )),
            },
        )]
        .into(),
    };
    let response = client
        .create_certificate(IstioCertificateRequest {
            csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
            validity_duration: 86_400,
            metadata: Some(metadata),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.cert_chain,
        [
            "-----BEGIN CERTIFICATE REQUEST-----",
            "spiffe://cluster.local/ns/ns/sa/app"
        ]
    );
    assert_eq!(server.paths(), [CA_PATH]);
}

#[tokio::test]
async fn ads_client_streams_to_the_server_on_envoys_delta_path() {
    let server = RecordPaths::new(AggregatedDiscoveryServiceServer::new(EchoAds));
    let mut client = AggregatedDiscoveryServiceClient::new(server.clone());
    let subscribe = DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE.into(),
        ..Default::default()
    };
    let mut responses = client
        .delta_aggregated_resources(tokio_stream::iter([subscribe]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    assert_eq!(
        (&*response.type_url, &*response.nonce),
        (ADDRESS_TYPE, "n1")
    );
    assert!(responses.message().await.unwrap().is_none());
    assert_eq!(server.paths(), [ADS_DELTA_PATH]);
}

/// The generated servers route by the exact path: a neighbour (state-of-the-world ADS, a
/// different case) is Unimplemented, the real one is not.
#[tokio::test]
async fn servers_answer_only_their_exact_paths() {
    async fn grpc_status<S>(mut server: S, path: &str) -> Option<String>
    where
        S: TowerService<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
            >,
        S::Error: std::fmt::Debug,
    {
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(path)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(tonic::body::Body::default())
            .unwrap();
        let response = server.call(request).await.unwrap();
        response
            .headers()
            .get("grpc-status")
            .map(|status| status.to_str().unwrap().to_owned())
    }

    let unimplemented = Some((tonic::Code::Unimplemented as i32).to_string());
    let ads = AggregatedDiscoveryServiceServer::new(EchoAds);
    let sotw = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
    assert_eq!(grpc_status(ads.clone(), sotw).await, unimplemented);
    assert_ne!(grpc_status(ads, ADS_DELTA_PATH).await, unimplemented);
    let ca = IstioCertificateServiceServer::new(EchoCa);
    let lower = "/istio.v1.auth.IstioCertificateService/createCertificate";
    assert_eq!(grpc_status(ca.clone(), lower).await, unimplemented);
    assert_ne!(grpc_status(ca, CA_PATH).await, unimplemented);
}

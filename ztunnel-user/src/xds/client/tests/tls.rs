//! The client on the daemon's own channel (`IstiodEndpoint`): TLS 1.3 and HTTP/2 over real
//! sockets on 127.0.0.1, to the scripted istiod behind a TLS listener, its certificate
//! checked against the roots given and the name asked for.

use super::istiod::{FakeIstiod, Harness, IstiodStream, start_client};
use super::*;
use crate::istiod::{IstiodEndpoint, RootCertificates};
use crate::xds::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rcgen::{CertificateParams, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::path::Path;
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedReceiver;

/// The name in istiod's certificate (with 127.0.0.1), as Istio's istiod carries it.
const ISTIOD_NAME: &str = "istiod.istio-system.svc";

/// A root named `name`, and the PEM that trusts it.
fn root(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    (Issuer::new(params, key), cert.pem())
}

/// The scripted istiod served over TLS (ALPN h2) on 127.0.0.1, with a certificate for
/// `ISTIOD_NAME` and 127.0.0.1 signed by `root`; each connection served until it ends.
async fn serve_over_tls(istiod: FakeIstiod, root: &Issuer<'static, KeyPair>) -> SocketAddr {
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec![ISTIOD_NAME.to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, root).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(cert.der().to_vec())], key)
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, istiod) = (acceptor.clone(), istiod.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = AggregatedDiscoveryServiceServer::new(istiod);
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(service))
                    .await;
            });
        }
    });
    address
}

/// A client of the TLS istiod at `address`, trusting `roots_pem`, checking `name` if given.
fn start_on_tls(
    istiod: (FakeIstiod, UnboundedReceiver<IstiodStream>),
    address: SocketAddr,
    roots_pem: String,
    name: Option<&str>,
    token: &Path,
) -> Harness {
    let endpoint = IstiodEndpoint::new(
        &address.to_string(),
        RootCertificates::Pem(roots_pem),
        name.map(str::to_owned),
    )
    .unwrap()
    .unwrap();
    let config = config(Some(token.to_owned()));
    start_client(config, endpoint, istiod, Arc::default())
}

/// The whole path as the daemon takes it: a TLS 1.3 + HTTP/2 channel, the token and cluster
/// id on the stream, the mesh applied and ACKed; then istiod restarts its stream and the
/// client is back with the versions it holds.
#[tokio::test]
async fn the_daemon_channel_streams_the_mesh_from_istiod_over_tls() {
    let (root, roots_pem) = root("istio-ca");
    let (istiod, streams) = FakeIstiod::new();
    let address = serve_over_tls(istiod.clone(), &root).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("istio-token");
    std::fs::write(&token, "tls-token\n").unwrap();
    let mut h = start_on_tls(
        (istiod, streams),
        address,
        roots_pem,
        Some(ISTIOD_NAME),
        &token,
    );

    let mut stream = h.subscribed().await;
    stream.send_mesh().await;
    h.xds.ready().await;
    let opening = &h.istiod.openings()[0];
    assert_eq!(opening.authorization.as_deref(), Some("Bearer tls-token"));
    assert_eq!(opening.cluster_id.as_deref(), Some("Kubernetes"));
    assert!(h.sink.mesh.current().workload_by_uid(&uid("a1")).is_some());

    stream.fail(tonic::Status::unavailable("istiod restarting"));
    let mut again = h.next_stream().await;
    let [addresses, _] = again.initial_requests().await;
    assert_eq!(
        addresses.initial_resource_versions,
        versions(&[(&uid("a1"), "1"), (ECHO, "2")])
    );
}

/// An istiod whose certificate the roots do not vouch for, or that does not carry the name
/// asked for, gets no stream: the status says why, and nothing reaches the model.
#[tokio::test]
async fn an_istiod_the_roots_or_the_name_do_not_vouch_for_gets_no_stream() {
    let (root, roots_pem) = root("istio-ca");
    let (_, other_roots_pem) = self::root("another-ca");
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("istio-token");
    std::fs::write(&token, "t").unwrap();
    for (roots, name, why) in [
        (other_roots_pem, Some(ISTIOD_NAME), "UnknownIssuer"),
        (
            roots_pem,
            Some("istiod.other.svc"),
            "not valid for name \"istiod.other.svc\"",
        ),
    ] {
        let (istiod, streams) = FakeIstiod::new();
        let address = serve_over_tls(istiod.clone(), &root).await;
        let h = start_on_tls((istiod, streams), address, roots, name, &token);
        let failed = async {
            loop {
                let status = h.xds.status();
                if status.attempts >= 2 {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let status = timeout(WAIT, failed).await.expect("two attempts in time");
        let error = status.last_error.unwrap_or_default();
        assert!(error.starts_with("cannot connect to istiod"), "{error}");
        assert!(error.contains(why), "{error} should say {why}");
        assert!(h.istiod.openings().is_empty());
        assert!(!status.connected && !status.ready);
        assert_eq!(h.sink.calls(), []);
    }
}

//! The TLS configurations against real handshakes: what each side accepts and refuses.

use super::*;
use crate::identity::{BuiltInSource, CertificateAuthority};
use rustls::{CipherSuite, ProtocolVersion};
use std::io;
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

/// The limit of every step that could hang.
const STEP: Duration = Duration::from_secs(5);

struct Node {
    ca_dir: tempfile::TempDir,
    store: Arc<CertificateStore>,
}

impl Node {
    fn roots(&self) -> Arc<RootCertStore> {
        self.store.roots()
    }
}

/// A node with its own built-in CA, holding the certificates of the server and the client
/// identities of `trust_domain` (the handshakes only read what is held).
async fn node(trust_domain: &str, lifetime: Duration) -> Node {
    let dir = tempfile::tempdir().unwrap();
    node_of_ca(dir, trust_domain, lifetime).await
}

/// A node of `trust_domain` whose built-in CA is the root kept in `dir` (created if none).
async fn node_of_ca(dir: tempfile::TempDir, trust_domain: &str, lifetime: Duration) -> Node {
    let ca = CertificateAuthority::load_or_create(dir.path(), trust_domain).unwrap();
    let store = CertificateStore::start(Arc::new(BuiltInSource::new(ca, lifetime)));
    for workload in ["ns/shop/sa/checkout", "ns/web/sa/frontend"] {
        let identity = id(&format!("spiffe://{trust_domain}/{workload}"));
        store.certificate(&identity).await.unwrap();
    }
    Node { ca_dir: dir, store }
}

fn id(text: &str) -> Identity {
    text.parse().unwrap()
}

fn server_id() -> Identity {
    id("spiffe://cluster.local/ns/shop/sa/checkout")
}

fn client_id() -> Identity {
    id("spiffe://cluster.local/ns/web/sa/frontend")
}

type Handshake = (
    io::Result<server::TlsStream<TcpStream>>,
    io::Result<client::TlsStream<TcpStream>>,
);

/// A TLS handshake over loopback between the two configurations.
async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Handshake {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let address = listener.local_addr().unwrap();
    let accept = async {
        let (tcp, _) = listener.accept().await?;
        TlsAcceptor::from(server).accept(tcp).await
    };
    let connect = async {
        let tcp = TcpStream::connect(address).await?;
        let name = ServerName::IpAddress(address.ip().into());
        TlsConnector::from(client).connect(name, tcp).await
    };
    let (accepted, connected) = tokio::join!(timeout(STEP, accept), timeout(STEP, connect));
    let hung = || io::Error::new(io::ErrorKind::TimedOut, "handshake hung");
    (
        accepted.unwrap_or_else(|_| Err(hung())),
        connected.unwrap_or_else(|_| Err(hung())),
    )
}

/// The usual pair: a server as `server_id()` and a client as `client_id()` expecting it.
fn configs(node: &Node) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let server = server_config(node.store.clone(), server_id());
    let client = client_config(
        node.store.clone(),
        client_id(),
        node.roots(),
        vec![server_id()],
    );
    (server, client)
}

/// Sends `message` from the client and back, over an established connection.
async fn echo(
    server: &mut server::TlsStream<TcpStream>,
    client: &mut client::TlsStream<TcpStream>,
    message: &[u8],
) {
    let exchange = async {
        client.write_all(message).await?;
        client.flush().await?;
        let mut received = vec![0; message.len()];
        server.read_exact(&mut received).await?;
        server.write_all(&received).await?;
        server.flush().await?;
        let mut echoed = vec![0; message.len()];
        client.read_exact(&mut echoed).await?;
        io::Result::Ok(echoed)
    };
    let echoed = timeout(STEP, exchange).await.unwrap().unwrap();
    assert_eq!(echoed, message);
}

fn leaf(conn: &CommonState) -> CertificateDer<'static> {
    conn.peer_certificates().unwrap()[0].clone().into_owned()
}

#[tokio::test]
async fn peers_of_one_trust_domain_connect_as_istio_does() {
    let node = node("cluster.local", Duration::from_secs(600)).await;
    let (server, client) = configs(&node);
    let (server, client) = handshake(server, client).await;
    let (mut server, mut client) = (server.unwrap(), client.unwrap());
    echo(&mut server, &mut client, b"hello").await;

    let server_side = server.get_ref().1;
    let client_side = client.get_ref().1;
    assert_eq!(peer_identity(server_side), Some(client_id()));
    assert_eq!(peer_identity(client_side), Some(server_id()));
    assert_eq!(
        server_side.protocol_version(),
        Some(ProtocolVersion::TLSv1_3)
    );
    assert_eq!(server_side.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(client_side.alpn_protocol(), Some(ALPN_H2));
    let suite = server_side.negotiated_cipher_suite().unwrap().suite();
    assert_eq!(suite, CipherSuite::TLS13_AES_256_GCM_SHA384);
    // The client sends no SNI.
    assert_eq!(server_side.server_name(), None);
    // Only the leaf is sent.
    assert_eq!(server_side.peer_certificates().unwrap().len(), 1);
}

#[tokio::test]
async fn client_refuses_a_server_it_does_not_expect() {
    let node = node("cluster.local", Duration::from_secs(600)).await;
    let server = server_config(node.store.clone(), server_id());
    let expected = vec![id("spiffe://cluster.local/ns/shop/sa/payments")];
    let client = client_config(node.store.clone(), client_id(), node.roots(), expected);
    let (server, client) = handshake(server, client).await;
    let error = client.unwrap_err().to_string();
    assert!(error.contains("UnexpectedServer"), "{error}");
    assert!(error.contains(&server_id().to_string()), "{error}");
    assert!(server.is_err());
}

#[tokio::test]
async fn server_refuses_a_client_of_another_trust_domain() {
    let home = node("cluster.local", Duration::from_secs(600)).await;
    // One root signs both trust domains, so only the trust domain tells them apart.
    let shared_root = tempfile::tempdir().unwrap();
    for file in [
        crate::identity::ROOT_CERT_FILE,
        crate::identity::ROOT_KEY_FILE,
    ] {
        std::fs::copy(home.ca_dir.path().join(file), shared_root.path().join(file)).unwrap();
    }
    let foreign = node_of_ca(shared_root, "other.local", Duration::from_secs(600)).await;
    let server = server_config(home.store.clone(), server_id());
    let client = client_config(
        foreign.store.clone(),
        id("spiffe://other.local/ns/web/sa/frontend"),
        home.roots(),
        vec![server_id()],
    );
    let (server, _client) = handshake(server, client).await;
    let error = server.unwrap_err().to_string();
    assert!(error.contains("ForeignTrustDomain"), "{error}");
    assert!(
        error.contains("spiffe://other.local/ns/web/sa/frontend"),
        "{error}"
    );
}

#[tokio::test]
async fn server_refuses_a_client_of_an_untrusted_ca() {
    let home = node("cluster.local", Duration::from_secs(600)).await;
    let stranger = node("cluster.local", Duration::from_secs(600)).await;
    let server = server_config(home.store.clone(), server_id());
    let client = client_config(
        stranger.store.clone(),
        client_id(),
        home.roots(),
        vec![server_id()],
    );
    let (server, _client) = handshake(server, client).await;
    let error = server.unwrap_err().to_string();
    assert!(error.contains("UnknownIssuer"), "{error}");
}

#[tokio::test]
async fn client_refuses_a_server_of_an_untrusted_ca() {
    let home = node("cluster.local", Duration::from_secs(600)).await;
    let stranger = node("cluster.local", Duration::from_secs(600)).await;
    let server = server_config(stranger.store.clone(), server_id());
    let client = client_config(
        home.store.clone(),
        client_id(),
        home.roots(),
        vec![server_id()],
    );
    let (_server, client) = handshake(server, client).await;
    let error = client.unwrap_err().to_string();
    assert!(error.contains("UnknownIssuer"), "{error}");
}

/// A client built by hand: our verifier of the server, then `finish` sets the rest.
fn custom_client(
    node: &Node,
    provider: CryptoProvider,
    versions: &[&'static rustls::SupportedProtocolVersion],
    finish: impl FnOnce(
        rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
    ) -> ClientConfig,
) -> Arc<ClientConfig> {
    let verifier = SpiffeServerVerifier {
        roots: node.roots(),
        expected: vec![server_id()],
        algorithms: provider.signature_verification_algorithms,
    };
    let builder = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = finish(builder);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

#[tokio::test]
async fn server_refuses_a_client_without_certificate() {
    let node = node("cluster.local", Duration::from_secs(600)).await;
    let (server, _) = configs(&node);
    let client = custom_client(&node, default_provider(), &[&TLS13], |builder| {
        builder.with_no_client_auth()
    });
    let (server, _client) = handshake(server, client).await;
    let error = server.unwrap_err().to_string();
    assert!(error.contains("no certificates"), "{error}");
}

#[tokio::test]
async fn server_refuses_a_tls12_client() {
    let node = node("cluster.local", Duration::from_secs(600)).await;
    let (server, _) = configs(&node);
    let store = node.store.clone();
    let versions = [&rustls::version::TLS12];
    let client = custom_client(&node, default_provider(), &versions, |builder| {
        builder.with_client_cert_resolver(Arc::new(StoreResolver {
            store,
            local: client_id(),
        }))
    });
    let (server, client) = handshake(server, client).await;
    let error = server.unwrap_err().to_string();
    assert!(error.contains("Tls12NotOfferedOrEnabled"), "{error}");
    assert!(client.is_err());
}

#[tokio::test]
async fn server_refuses_a_client_without_alpn_h2() {
    let node = node("cluster.local", Duration::from_secs(600)).await;
    let (server, client) = configs(&node);
    for offered in [vec![b"http/1.1".to_vec()], vec![]] {
        let mut client = (*client).clone();
        client.alpn_protocols = offered.clone();
        let (server, client) = handshake(server.clone(), Arc::new(client)).await;
        assert!(server.is_err(), "server accepted ALPN {offered:?}");
        assert!(client.is_err(), "client connected with ALPN {offered:?}");
    }
}

#[tokio::test]
async fn renewal_reaches_new_connections_and_spares_established_ones() {
    let node = node("cluster.local", Duration::from_secs(2)).await;
    let (server, client) = configs(&node);
    let (first_server, first_client) = handshake(server.clone(), client.clone()).await;
    let (mut first_server, mut first_client) = (first_server.unwrap(), first_client.unwrap());
    let first_leaf = leaf(first_client.get_ref().1);

    // Wait past half the lifetime: the store then renews the certificate.
    let renewal = async {
        loop {
            let current = node.store.held(&server_id()).unwrap();
            if current.cert[0] != first_leaf {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    timeout(STEP, renewal).await.expect("no renewal");

    echo(&mut first_server, &mut first_client, b"still here").await;
    let (second_server, second_client) = handshake(server, client).await;
    let (mut second_server, mut second_client) = (second_server.unwrap(), second_client.unwrap());
    echo(&mut second_server, &mut second_client, b"new").await;
    let second_leaf = leaf(second_client.get_ref().1);
    assert_ne!(second_leaf, first_leaf);
    let serial = |der: &CertificateDer<'_>| {
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        cert.raw_serial().to_vec()
    };
    assert_ne!(serial(&second_leaf), serial(&first_leaf));
}

#[tokio::test]
async fn a_handshake_only_reads_what_the_store_holds() {
    let node = node("cluster.local", Duration::from_secs(600)).await;
    let unheld = id("spiffe://cluster.local/ns/shop/sa/cart");
    let server = server_config(node.store.clone(), unheld.clone());
    let client = client_config(
        node.store.clone(),
        client_id(),
        node.roots(),
        vec![unheld.clone()],
    );
    let (server, client) = handshake(server, client).await;
    assert!(server.is_err());
    assert!(client.is_err());
    // The failed handshake fetched nothing: only the identities fetched ahead are held.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(node.store.held(&unheld).is_none());
    let held: Vec<Identity> = node
        .store
        .expiries()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(held, vec![server_id(), client_id()]);
}

//! The rustls configurations of HBONE's mutual TLS, as Istio's ztunnel sets them up: TLS 1.3
//! only, AES-GCM suites, ALPN `h2`, no SNI, no resumption, and a certificate on both sides
//! whose SPIFFE identity is checked. Certificates come from the [`CertificateStore`] at each
//! handshake, so renewals reach new connections only.
//!
//! `rustls` wants a server name to connect: callers pass the peer's address
//! (`ServerName::IpAddress`). SNI is disabled, so it is never sent, and the verifier checks
//! identities rather than names.

use super::certs::CertificateStore;
use super::spiffe::Identity;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::ring::{cipher_suite, default_provider};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::version::TLS13;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName, Error,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use std::sync::Arc;
use webpki::{EndEntityCert, KeyUsage};

/// The one application protocol of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a peer with a valid certificate chain is refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("the server is {identity}, not one of the expected identities: {}", list(.expected))]
    UnexpectedServer {
        identity: Identity,
        expected: Vec<Identity>,
    },
    #[error("the client {identity} is not in this node's trust domain {trust_domain}")]
    ForeignTrustDomain {
        identity: Identity,
        trust_domain: String,
    },
}

/// The server side: requires a client certificate from this trust domain, serves `local`'s.
pub fn server_config(
    store: Arc<CertificateStore>,
    local: Identity,
    roots: Arc<RootCertStore>,
) -> Arc<ServerConfig> {
    let provider = provider();
    let verifier = SpiffeClientVerifier {
        roots,
        trust_domain: local.trust_domain.clone(),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .expect("ring offers TLS 1.3 with the chosen suites")
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(StoreResolver { store, local }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every connection proves its identity with a full handshake.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// The client side: presents `local`'s certificate and accepts a server presenting one of
/// `expected`.
pub fn client_config(
    store: Arc<CertificateStore>,
    local: Identity,
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
) -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        roots,
        expected,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .expect("ring offers TLS 1.3 with the chosen suites")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(StoreResolver { store, local }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

/// The identity of the peer of an established connection (from its leaf certificate).
pub fn peer_identity(conn: &CommonState) -> Option<Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    Identity::from_certificate(leaf).ok()
}

/// The ring provider, cut down to Istio's suites in its order (no ChaCha20).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        ..default_provider()
    })
}

/// Resolves `local`'s certificate from the store at each handshake, on either side.
#[derive(Debug)]
struct StoreResolver {
    store: Arc<CertificateStore>,
    local: Identity,
}

impl StoreResolver {
    fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.store
            .certified_key(&self.local)
            .inspect_err(|error| {
                tracing::warn!(identity = %self.local, %error, "no certificate for a handshake");
            })
            .ok()
    }
}

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls refuses a client whose ALPN list lacks h2 but accepts one sending no ALPN at
        // all; HBONE needs h2, so refuse that one here (no certificate aborts the handshake).
        let offers_h2 = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|protocol| protocol == ALPN_H2));
        if !offers_h2 {
            tracing::debug!("refusing a TLS client that does not offer ALPN h2");
            return None;
        }
        self.certified_key()
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.certified_key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Checks the server's chain up to the roots, and that its identity is an expected one.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let identity = verify_chain(
            end_entity,
            intermediates,
            &self.roots,
            now,
            KeyUsage::server_auth(),
            &self.algorithms,
        )?;
        if !self.expected.contains(&identity) {
            return Err(refused(PeerError::UnexpectedServer {
                identity,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Requires a client certificate, checks its chain up to the roots, and that the client is in
/// the server's trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Clients hold one certificate per identity: hints would not change their choice.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let identity = verify_chain(
            end_entity,
            intermediates,
            &self.roots,
            now,
            KeyUsage::client_auth(),
            &self.algorithms,
        )?;
        if identity.trust_domain != self.trust_domain {
            return Err(refused(PeerError::ForeignTrustDomain {
                identity,
                trust_domain: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Verifies a peer's chain up to `roots` for `usage`, without a name check (the peer is named
/// by its SPIFFE URI, which webpki does not match), and returns the peer's identity.
fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
    now: UnixTime,
    usage: KeyUsage,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<Identity, Error> {
    let cert = EndEntityCert::try_from(end_entity).map_err(chain_error)?;
    cert.verify_for_usage(
        algorithms.all,
        &roots.roots,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(chain_error)?;
    Identity::from_certificate(end_entity).map_err(|error| {
        Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
    })
}

/// The rustls error for a chain webpki refused; the common causes keep their own alert.
fn chain_error(error: webpki::Error) -> Error {
    let error = match error {
        webpki::Error::BadDer | webpki::Error::BadDerTime => CertificateError::BadEncoding,
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::CertExpired { time, not_after } => {
            CertificateError::ExpiredContext { time, not_after }
        }
        webpki::Error::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    Error::InvalidCertificate(error)
}

/// The rustls error for a peer refused by identity; it keeps the reason for the caller's logs.
fn refused(error: PeerError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

fn list(identities: &[Identity]) -> String {
    let names: Vec<String> = identities.iter().map(Identity::to_string).collect();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::CertificateAuthority;
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
        _dir: tempfile::TempDir,
        ca: Arc<CertificateAuthority>,
        store: Arc<CertificateStore>,
    }

    fn node(trust_domain: &str, lifetime: Duration) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(CertificateAuthority::load_or_create(dir.path(), trust_domain).unwrap());
        let store = Arc::new(CertificateStore::new(ca.clone(), lifetime));
        Node {
            _dir: dir,
            ca,
            store,
        }
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
        let server = server_config(node.store.clone(), server_id(), node.ca.roots());
        let client = client_config(
            node.store.clone(),
            client_id(),
            node.ca.roots(),
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
        let node = node("cluster.local", Duration::from_secs(600));
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
        let node = node("cluster.local", Duration::from_secs(600));
        let server = server_config(node.store.clone(), server_id(), node.ca.roots());
        let expected = vec![id("spiffe://cluster.local/ns/shop/sa/payments")];
        let client = client_config(node.store.clone(), client_id(), node.ca.roots(), expected);
        let (server, client) = handshake(server, client).await;
        let error = client.unwrap_err().to_string();
        assert!(error.contains("UnexpectedServer"), "{error}");
        assert!(error.contains(&server_id().to_string()), "{error}");
        assert!(server.is_err());
    }

    #[tokio::test]
    async fn server_refuses_a_client_of_another_trust_domain() {
        let home = node("cluster.local", Duration::from_secs(600));
        let foreign = node("other.local", Duration::from_secs(600));
        // The server trusts both roots, so only the trust domain tells them apart.
        let mut roots = (*home.ca.roots()).clone();
        roots.extend(foreign.ca.roots().roots.iter().cloned());
        let server = server_config(home.store.clone(), server_id(), Arc::new(roots));
        let client = client_config(
            foreign.store.clone(),
            id("spiffe://other.local/ns/web/sa/frontend"),
            home.ca.roots(),
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
        let home = node("cluster.local", Duration::from_secs(600));
        let stranger = node("cluster.local", Duration::from_secs(600));
        let server = server_config(home.store.clone(), server_id(), home.ca.roots());
        let client = client_config(
            stranger.store.clone(),
            client_id(),
            home.ca.roots(),
            vec![server_id()],
        );
        let (server, _client) = handshake(server, client).await;
        let error = server.unwrap_err().to_string();
        assert!(error.contains("UnknownIssuer"), "{error}");
    }

    #[tokio::test]
    async fn client_refuses_a_server_of_an_untrusted_ca() {
        let home = node("cluster.local", Duration::from_secs(600));
        let stranger = node("cluster.local", Duration::from_secs(600));
        let server = server_config(stranger.store.clone(), server_id(), home.ca.roots());
        let client = client_config(
            home.store.clone(),
            client_id(),
            home.ca.roots(),
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
            roots: node.ca.roots(),
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
        let node = node("cluster.local", Duration::from_secs(600));
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
        let node = node("cluster.local", Duration::from_secs(600));
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
        let node = node("cluster.local", Duration::from_secs(600));
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
        let node = node("cluster.local", Duration::from_secs(2));
        let (server, client) = configs(&node);
        let (first_server, first_client) = handshake(server.clone(), client.clone()).await;
        let (mut first_server, mut first_client) = (first_server.unwrap(), first_client.unwrap());
        let first_leaf = leaf(first_client.get_ref().1);

        // Wait past half the lifetime: the store then issues a new certificate.
        let renewal = async {
            loop {
                let current = node.store.certified_key(&server_id()).unwrap();
                if current.cert[0] != first_leaf {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        timeout(STEP, renewal).await.expect("no renewal");

        echo(&mut first_server, &mut first_client, b"still here").await;
        let (second_server, second_client) = handshake(server, client).await;
        let (mut second_server, mut second_client) =
            (second_server.unwrap(), second_client.unwrap());
        echo(&mut second_server, &mut second_client, b"new").await;
        let second_leaf = leaf(second_client.get_ref().1);
        assert_ne!(second_leaf, first_leaf);
        let serial = |der: &CertificateDer<'_>| {
            let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
            cert.raw_serial().to_vec()
        };
        assert_ne!(serial(&second_leaf), serial(&first_leaf));
    }
}

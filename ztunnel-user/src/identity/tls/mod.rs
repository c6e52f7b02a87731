//! The rustls configurations of HBONE's mutual TLS, as Istio's ztunnel sets them up: TLS 1.3
//! only, AES-GCM suites, ALPN `h2`, no SNI, no resumption, and a certificate on both sides
//! whose SPIFFE identity is checked. Certificates are read from the [`CertificateStore`] at
//! each handshake (never fetched there), so renewals reach new connections only.
//!
//! `rustls` wants a server name to connect: callers pass a placeholder address
//! (`ServerName::IpAddress`; an HBONE connection inside another has no address of its own).
//! SNI is disabled, so it is never sent, and the verifier checks identities rather than names.

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
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// Why a peer with a valid certificate chain is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
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

/// The server side: requires a client certificate from this trust domain, chaining to the
/// roots the store names at that handshake (a pod's configuration lives as long as the pod,
/// and Istio's roots may rotate meanwhile), and serves `local`'s.
pub(crate) fn server_config(store: Arc<CertificateStore>, local: Identity) -> Arc<ServerConfig> {
    let provider = provider();
    let verifier = SpiffeClientVerifier {
        store: store.clone(),
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
pub(crate) fn client_config(
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
pub(crate) fn peer_identity(conn: &CommonState) -> Option<Identity> {
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
    /// The certificate held now; without one the handshake fails (rustls cannot wait, so the
    /// certificate is fetched ahead: `CertificateStore::prefetch` and `certificate`).
    fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        let held = self.store.held(&self.local);
        if held.is_none() {
            tracing::warn!(identity = %self.local, "no valid certificate held for a handshake");
        }
        held
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

/// Requires a client certificate, checks its chain up to the store's roots, and that the
/// client is in the server's trust domain.
struct SpiffeClientVerifier {
    store: Arc<CertificateStore>,
    trust_domain: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
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
            &self.store.roots(),
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
mod tests;

//! Istio's CA as a source of workload certificates: for each certificate, a unary
//! `/istio.v1.auth.IstioCertificateService/CreateCertificate` to istiod, as Istio's ztunnel
//! asks (`src/identity/caclient.rs`).
//!
//! - The request: a PEM CSR with a fresh ECDSA P-256 key, an empty subject and one URI SAN, the
//!   SPIFFE identity; `validity_duration`, the configured TTL in seconds (Istio's `SECRET_TTL`,
//!   24 h by default); `metadata {"ImpersonatedIdentity": "<spiffe uri>"}`, since the node proxy
//!   asks on behalf of its pods (istiod lets it when our service account is in its
//!   `CA_TRUSTED_NODE_ACCOUNTS` and such a pod runs on our node); the headers of
//!   `istiod::Credentials`, the token file read again per request.
//! - The response: `cert_chain`, the leaf first and the roots last (the last entry may hold
//!   several PEM roots, all of them trust anchors; what lies between is sent with the leaf).
//!   Refused: an empty chain, a leaf that does not parse, a leaf for another identity or for
//!   another key than the request's.
//! - The roots: those of the latest response that carried any, with the mesh's root file
//!   (`istio-ca-root-cert`) if one is given.
//!
//! The channel is the caller's (`istiod::Dial`: a fresh one per request, in memory in the
//! tests, TLS to istiod in the daemon), so nothing here knows the transport. It sits above
//! `identity` (it implements its `CertificateSource`) because the generated code lives in
//! `xds`, which `identity` must not reach: `xds` depends on `mesh`, which depends on
//! `identity`.

mod connect;
#[cfg(test)]
mod fake;
#[cfg(test)]
mod store_tests;
#[cfg(test)]
mod tests;

pub use connect::{CaSettingsError, from_settings};

use crate::host::file_watch;
use crate::identity::{CertificateSource, Identity, IssueError, Issuing, WorkloadCertificate};
use crate::istiod::{
    ChannelError, Credentials, CredentialsError, Dial, RootCertificates, channel_failure,
};
use crate::xds::proto::istio::v1::auth::{
    IstioCertificateRequest, IstioCertificateResponse,
    istio_certificate_service_client::IstioCertificateServiceClient,
};
use prost_types::value::Kind;
use prost_types::{Struct, Value};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::RootCertStore;
use rustls::crypto::ring::sign::any_ecdsa_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, TrustAnchor};
use rustls::sign::CertifiedKey;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::codegen::StdError;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

/// The validity asked for by default, as Istio's `SECRET_TTL`.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The metadata key naming the identity a node proxy asks for.
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// What the CA client is told.
#[derive(Clone, Debug)]
pub struct IstioCaConfig {
    /// The headers of every request.
    pub credentials: Credentials,
    /// The validity asked for (whole seconds).
    pub ttl: Duration,
    /// A PEM file of the mesh's roots (Istio's `istio-ca-root-cert`), trusted besides the
    /// roots the CA sends; read when the client is made, and again at each change while
    /// `follow_root_file` runs.
    pub root_cert: Option<RootCertificates>,
}

/// Why the CA client could not be made, or a certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum IstioCaError {
    #[error("the mesh's roots for the CA client: {0}")]
    RootCert(ChannelError),
    #[error("cannot make a key and certificate request for {identity}: {reason}")]
    Request { identity: Identity, reason: String },
    #[error("cannot authenticate the certificate request for {identity}: {source}")]
    Credentials {
        identity: Identity,
        source: CredentialsError,
    },
    #[error("cannot reach the CA to ask for {identity}: {reason}")]
    Connect {
        identity: Identity,
        reason: StdError,
    },
    #[error("the CA refused a certificate for {identity}: {:?}: {}", .status.code(), .status.message())]
    Refused {
        identity: Identity,
        status: tonic::Status,
    },
    #[error("the CA answered the request for {identity} with an empty certificate chain")]
    EmptyChain { identity: Identity },
    #[error("the CA's leaf certificate for {identity} does not parse: {reason}")]
    BadLeaf { identity: Identity, reason: String },
    #[error("entry {index} of the CA's chain for {identity} is not PEM certificates: {reason}")]
    BadChain {
        identity: Identity,
        index: usize,
        reason: String,
    },
    #[error("the CA's certificate asked for {identity} is for {issued}")]
    WrongIdentity { identity: Identity, issued: String },
    #[error("the CA's certificate for {identity} is not for the key of the request")]
    WrongKey { identity: Identity },
}

/// The client of Istio's CA, over the channels `istiod` gives.
pub struct IstioCa<D> {
    istiod: D,
    credentials: Credentials,
    ttl: Duration,
    root_cert: Option<RootCertificates>,
    trust: Mutex<Trust>,
}

/// The roots peers are checked against.
struct Trust {
    /// The root file's.
    file: RootCertStore,
    /// Those of the latest response that carried any.
    answered: Vec<TrustAnchor<'static>>,
    /// Both, combined at each change: every handshake reads them.
    all: Arc<RootCertStore>,
}

impl Trust {
    fn new(file: RootCertStore) -> Trust {
        Trust {
            all: Arc::new(file.clone()),
            file,
            answered: Vec::new(),
        }
    }

    fn set_file(&mut self, file: RootCertStore) {
        self.file = file;
        self.combine();
    }

    fn set_answered(&mut self, answered: Vec<TrustAnchor<'static>>) {
        self.answered = answered;
        self.combine();
    }

    fn combine(&mut self) {
        let mut all = self.file.clone();
        all.extend(self.answered.iter().cloned());
        self.all = Arc::new(all);
    }
}

/// A response taken: the certificate, and the roots it came with.
struct Accepted {
    cert: WorkloadCertificate,
    roots: Vec<TrustAnchor<'static>>,
}

impl<D: Dial> IstioCa<D> {
    /// A client asking over the channels `istiod` gives, as `config` says; reads the root
    /// file.
    pub fn new(istiod: D, config: IstioCaConfig) -> Result<Self, IstioCaError> {
        let file_roots = match &config.root_cert {
            Some(roots) => roots.load().map_err(IstioCaError::RootCert)?,
            None => RootCertStore::empty(),
        };
        Ok(IstioCa {
            istiod,
            credentials: config.credentials,
            ttl: config.ttl,
            root_cert: config.root_cert,
            trust: Mutex::new(Trust::new(file_roots)),
        })
    }

    /// Reads the root file again at each change (an operator's rotation, a ConfigMap swap),
    /// forever; returns at once when the roots are not a file. A file that cannot be read or
    /// holds no usable root is logged, and the roots in force stay.
    pub async fn follow_root_file(self: Arc<Self>) {
        let Some(roots @ RootCertificates::File(path)) = &self.root_cert else {
            return;
        };
        let unwatched =
            |err: &file_watch::WatchError| tracing::warn!(%err, "the mesh's roots in force stay");
        file_watch::on_changes(path, unwatched, || {
            match roots.load() {
                Ok(file) => {
                    let count = file.len();
                    self.trust().set_file(file);
                    tracing::info!(path = %path.display(), roots = count, "the mesh's root file read");
                }
                Err(err) => tracing::warn!(%err, "the mesh's roots in force stay"),
            }
            None
        })
        .await;
    }

    fn trust(&self) -> std::sync::MutexGuard<'_, Trust> {
        self.trust.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks the CA for a certificate for `identity`, with a new key; takes the roots of the
    /// response.
    pub(crate) async fn issue(
        &self,
        identity: &Identity,
    ) -> Result<WorkloadCertificate, IstioCaError> {
        let (key, request) = self.request(identity)?;
        let headers =
            self.credentials
                .metadata()
                .await
                .map_err(|source| IstioCaError::Credentials {
                    identity: identity.clone(),
                    source,
                })?;
        let mut client = self
            .istiod
            .dial(IstioCertificateServiceClient::with_origin)
            .await
            .map_err(|reason| IstioCaError::Connect {
                identity: identity.clone(),
                reason,
            })?;
        let mut request = tonic::Request::new(request);
        *request.metadata_mut() = headers;
        let response = client
            .create_certificate(request)
            .await
            .map_err(|status| match channel_failure(&status) {
                Some(failure) => IstioCaError::Connect {
                    identity: identity.clone(),
                    reason: failure.into(),
                },
                None => IstioCaError::Refused {
                    identity: identity.clone(),
                    status,
                },
            })?
            .into_inner();
        let accepted = accept(identity, &key, response)?;
        if !accepted.roots.is_empty() {
            self.trust().set_answered(accepted.roots);
        }
        Ok(accepted.cert)
    }

    /// A new key, and the request for a certificate of `identity` for it.
    fn request(
        &self,
        identity: &Identity,
    ) -> Result<(KeyPair, IstioCertificateRequest), IstioCaError> {
        let failed = |reason: &dyn std::fmt::Display| IstioCaError::Request {
            identity: identity.clone(),
            reason: reason.to_string(),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| failed(&e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.to_string().try_into().map_err(|e| failed(&e))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params.serialize_request(&key).map_err(|e| failed(&e))?;
        let csr = csr.pem().map_err(|e| failed(&e))?;
        let impersonated = Value {
            kind: Some(Kind::StringValue(identity.to_string())),
        };
        let request = IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(Struct {
                fields: [(IMPERSONATED_IDENTITY.to_owned(), impersonated)].into(),
            }),
        };
        Ok((key, request))
    }
}

impl<D: Dial> CertificateSource for IstioCa<D> {
    fn issue<'a>(&'a self, identity: &'a Identity) -> Issuing<'a> {
        Box::pin(async move { self.issue(identity).await.map_err(IssueError::from) })
    }

    fn roots(&self) -> Arc<RootCertStore> {
        self.trust().all.clone()
    }
}

/// Checks a response to the request for `identity` with `key`, and makes the certificate.
fn accept(
    identity: &Identity,
    key: &KeyPair,
    response: IstioCertificateResponse,
) -> Result<Accepted, IstioCaError> {
    let chain = response.cert_chain;
    let bad_leaf = |reason: &dyn std::fmt::Display| IstioCaError::BadLeaf {
        identity: identity.clone(),
        reason: reason.to_string(),
    };
    let (first, rest) = chain
        .split_first()
        .ok_or_else(|| IstioCaError::EmptyChain {
            identity: identity.clone(),
        })?;
    let mut sent = parse_entry(identity, 0, first)?;
    // The roots are the last entry's, unless the leaf is alone.
    let (between, roots) = match rest.split_last() {
        Some((last, between)) => {
            let index = chain.len() - 1;
            let roots = trust_anchors(&parse_entry(identity, index, last)?).map_err(|reason| {
                IstioCaError::BadChain {
                    identity: identity.clone(),
                    index,
                    reason: reason.to_string(),
                }
            })?;
            (between, roots.roots)
        }
        None => (rest, Vec::new()),
    };
    for (index, entry) in between.iter().enumerate() {
        sent.extend(parse_entry(identity, index + 1, entry)?);
    }
    let (not_before, not_after) = {
        let (_, leaf) = X509Certificate::from_der(&sent[0]).map_err(|e| bad_leaf(&e))?;
        if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(IstioCaError::WrongKey {
                identity: identity.clone(),
            });
        }
        let validity = leaf.validity();
        (
            system_time(validity.not_before.timestamp())
                .ok_or_else(|| bad_leaf(&"its notBefore is out of range"))?,
            system_time(validity.not_after.timestamp())
                .ok_or_else(|| bad_leaf(&"its notAfter is out of range"))?,
        )
    };
    let issued = Identity::from_certificate(&sent[0]).map_err(|e| bad_leaf(&e))?;
    if issued != *identity {
        return Err(IstioCaError::WrongIdentity {
            identity: identity.clone(),
            issued: issued.to_string(),
        });
    }
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key = any_ecdsa_type(&key_der).map_err(|e| IstioCaError::Request {
        identity: identity.clone(),
        reason: e.to_string(),
    })?;
    Ok(Accepted {
        cert: WorkloadCertificate {
            certified_key: Arc::new(CertifiedKey::new(sent, signing_key)),
            not_before,
            not_after,
        },
        roots,
    })
}

/// The certificates of the chain's entry `index`: one or more PEM blocks.
fn parse_entry(
    identity: &Identity,
    index: usize,
    entry: &str,
) -> Result<Vec<CertificateDer<'static>>, IstioCaError> {
    let bad = |reason: String| IstioCaError::BadChain {
        identity: identity.clone(),
        index,
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(entry.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("it holds no certificate".to_owned()));
    }
    Ok(certs)
}

/// A root store of `roots`; each must be a certificate webpki can anchor to.
fn trust_anchors(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, rustls::Error> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone())?;
    }
    Ok(store)
}

/// The time `seconds` after the epoch, if a `SystemTime` holds it.
fn system_time(seconds: i64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(seconds).ok()?))
}

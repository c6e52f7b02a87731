//! istiod's CA as the tests script it: the generated server's trait, implemented here, served
//! to the generated client in memory (the server is the client's channel: no network). It
//! signs each CSR with its own rcgen root, records what each request carried, and can be told
//! to stall, fail, or answer wrongly.

use super::{IstioCa, IstioCaConfig};
use crate::istiod::{Credentials, Dial, RootCertificates};
use crate::xds::proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::xds::proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use http::Uri;
use prost_types::value::Kind;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::time::Instant;
use tonic::codegen::StdError;

/// How the CA answers the next requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Answer {
    /// Signs the CSR as asked.
    #[default]
    Sign,
    /// Fails the call with this code.
    Refuse(tonic::Code),
    /// Sends no certificate at all.
    EmptyChain,
    /// Signs the CSR's key for another identity.
    OtherIdentity,
    /// Signs another key for the CSR's identity.
    OtherKey,
    /// Sends a PEM block that is not a certificate as the leaf.
    Garbage,
}

/// The identity `Answer::OtherIdentity` signs for.
pub(super) const OTHER_IDENTITY: &str = "spiffe://cluster.local/ns/evil/sa/mallory";

/// One request, as the CA saw it.
#[derive(Clone, Debug)]
pub(super) struct Seen {
    pub(super) at: Instant,
    pub(super) authorization: Option<String>,
    pub(super) cluster_id: Option<String>,
    pub(super) validity_duration: i64,
    pub(super) impersonated: Option<String>,
    /// The CSR's SANs (URIs as such, others in debug form).
    pub(super) sans: Vec<String>,
    pub(super) subject_is_empty: bool,
    pub(super) key_is_p256: bool,
}

#[derive(Clone)]
pub(super) struct FakeCa {
    inner: Arc<Inner>,
}

struct Inner {
    root: Root,
    /// More roots sent with the CA's in the chain's last entry.
    more_roots: Mutex<Vec<String>>,
    answer: Mutex<Answer>,
    delay: Mutex<Duration>,
    seen: Mutex<Vec<Seen>>,
    running: AtomicUsize,
    most_running: AtomicUsize,
}

/// A self-signed root: what signs, and its certificate in PEM.
pub(super) struct Root {
    pub(super) issuer: Issuer<'static, KeyPair>,
    pub(super) pem: String,
}

impl Root {
    pub(super) fn new(name: &str) -> Root {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).unwrap().pem();
        Root {
            issuer: Issuer::new(params, key),
            pem,
        }
    }
}

impl FakeCa {
    pub(super) fn new() -> FakeCa {
        FakeCa {
            inner: Arc::new(Inner {
                root: Root::new("fake istiod CA"),
                more_roots: Mutex::default(),
                answer: Mutex::default(),
                delay: Mutex::new(Duration::ZERO),
                seen: Mutex::default(),
                running: AtomicUsize::new(0),
                most_running: AtomicUsize::new(0),
            }),
        }
    }

    pub(super) fn answer(&self, answer: Answer) {
        *self.inner.answer.lock().unwrap() = answer;
    }

    /// How long each call takes from now on.
    pub(super) fn delay(&self, delay: Duration) {
        *self.inner.delay.lock().unwrap() = delay;
    }

    /// Sends `pem` too in the chain's last entry, after the CA's own root.
    pub(super) fn add_root(&self, pem: &str) {
        self.inner.more_roots.lock().unwrap().push(pem.to_owned());
    }

    pub(super) fn root_pem(&self) -> &str {
        &self.inner.root.pem
    }

    pub(super) fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().unwrap().clone()
    }

    /// The most calls that were running at once.
    pub(super) fn most_running(&self) -> usize {
        self.inner.most_running.load(Ordering::SeqCst)
    }

    /// A client of this CA, asking for `ttl` with the token of `token_path` (if any) and the
    /// cluster id `Kubernetes`, and trusting the roots of `root_cert` besides.
    pub(super) fn client(
        &self,
        ttl: Duration,
        token_path: Option<PathBuf>,
        root_cert: Option<PathBuf>,
    ) -> IstioCa<Dialer> {
        let config = IstioCaConfig {
            credentials: Credentials {
                cluster_id: "Kubernetes".into(),
                token_path,
                headers: Vec::new(),
            },
            ttl,
            root_cert: root_cert.map(RootCertificates::File),
        };
        IstioCa::new(self.dialer(), config).unwrap()
    }

    pub(super) fn dialer(&self) -> Dialer {
        Dialer(self.clone())
    }

    /// The chain answering `request`, as `answer` says.
    fn chain(&self, request: &IstioCertificateRequest, answer: Answer) -> Vec<String> {
        let mut csr = CertificateSigningRequestParams::from_pem(&request.csr).unwrap();
        let now = OffsetDateTime::now_utc();
        let params = &mut csr.params;
        params.not_before = now;
        params.not_after = now + time::Duration::seconds(request.validity_duration);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        if answer == Answer::OtherIdentity {
            params.subject_alt_names = vec![SanType::URI(OTHER_IDENTITY.try_into().unwrap())];
        }
        let issuer = &self.inner.root.issuer;
        let leaf = match answer {
            Answer::OtherKey => {
                let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
                csr.params.signed_by(&other, issuer).unwrap().pem()
            }
            Answer::Garbage => {
                "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n".into()
            }
            _ => csr.signed_by(issuer).unwrap().pem(),
        };
        let mut roots = self.inner.root.pem.clone();
        roots.extend(
            self.inner
                .more_roots
                .lock()
                .unwrap()
                .iter()
                .map(String::as_str),
        );
        vec![leaf, roots]
    }

    fn record(&self, request: &tonic::Request<IstioCertificateRequest>) {
        let header = |name: &str| {
            let value = request.metadata().get(name)?;
            value.to_str().ok().map(str::to_owned)
        };
        let body = request.get_ref();
        let csr = CertificateSigningRequestParams::from_pem(&body.csr).unwrap();
        let sans = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        let impersonated = body
            .metadata
            .as_ref()
            .and_then(|metadata| metadata.fields.get("ImpersonatedIdentity"))
            .and_then(|value| match &value.kind {
                Some(Kind::StringValue(text)) => Some(text.clone()),
                _ => None,
            });
        self.inner.seen.lock().unwrap().push(Seen {
            at: Instant::now(),
            authorization: header("authorization"),
            cluster_id: header("clusterid"),
            validity_duration: body.validity_duration,
            impersonated,
            sans,
            subject_is_empty: csr.params.distinguished_name.iter().next().is_none(),
            key_is_p256: csr.public_key.algorithm() == &PKCS_ECDSA_P256_SHA256,
        });
    }
}

#[tonic::async_trait]
impl IstioCertificateService for FakeCa {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        self.record(&request);
        let running = self.inner.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.inner.most_running.fetch_max(running, Ordering::SeqCst);
        let delay = *self.inner.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        self.inner.running.fetch_sub(1, Ordering::SeqCst);
        let answer = *self.inner.answer.lock().unwrap();
        let cert_chain = match answer {
            Answer::Refuse(code) => return Err(tonic::Status::new(code, "the fake CA refuses")),
            Answer::EmptyChain => Vec::new(),
            _ => self.chain(request.get_ref(), answer),
        };
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain,
        }))
    }
}

/// Gives the client a channel to the fake CA, in memory.
pub(super) struct Dialer(FakeCa);

impl Dial for Dialer {
    type Channel = IstioCertificateServiceServer<FakeCa>;

    async fn dial<Client>(
        &self,
        client: fn(Self::Channel, Uri) -> Client,
    ) -> Result<Client, StdError> {
        // No origin: the server is the channel, so requests name no host.
        let server = IstioCertificateServiceServer::new(self.0.clone());
        Ok(client(server, Uri::default()))
    }
}

//! Istio's CA as istiod serves it: `CreateCertificate` signs the CSR's key for the CSR's one
//! SPIFFE identity, valid for the duration asked, and answers the leaf then the root. As
//! istiod, it refuses a caller without the token, an `ImpersonatedIdentity` that is not the
//! CSR's, and an identity no workload of the mesh has. The root is the lab's (kept in the CA
//! directory, as Istio's `cacerts` plugs one in), so every piece of the lab trusts one root;
//! it also signs istiod's own serving certificate.

use crate::faults::FaultsFile;
use crate::resources::Snapshot;
use crate::token::TokenFile;
use anyhow::Context;
use prost_types::value::Kind;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use ztunnel_lab::istiod::CaAnswer;
use ztunnel_user::identity::{ROOT_CERT_FILE, ROOT_KEY_FILE};
use ztunnel_user::xds::proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateService;
use ztunnel_user::xds::proto::istio::v1::auth::{
    IstioCertificateRequest, IstioCertificateResponse,
};

/// The identity `CaAnswer::WrongIdentity` signs for.
const WRONG_IDENTITY: &str = "spiffe://cluster.local/ns/evil/sa/mallory";

/// The longest certificate istiod gives (its `MAX_WORKLOAD_CERT_TTL` default).
const MAX_TTL_SECS: i64 = 90 * 24 * 3600;

pub struct Root {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Root {
    /// The root kept in `dir`, or a new one written there.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Root> {
        let (cert_path, key_path) = (dir.join(ROOT_CERT_FILE), dir.join(ROOT_KEY_FILE));
        if cert_path.exists() {
            let pem = std::fs::read_to_string(&cert_path)
                .with_context(|| format!("reading {}", cert_path.display()))?;
            let key = std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading {}", key_path.display()))?;
            let key = KeyPair::from_pem(&key).context("the root's key")?;
            let issuer = Issuer::from_ca_cert_pem(&pem, key).context("the root's certificate")?;
            return Ok(Root { issuer, pem });
        }
        let key = KeyPair::generate().context("generating the root's key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "fake istiod root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = params.self_signed(&key)?.pem();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(&key_path, key.serialize_pem())
            .with_context(|| format!("writing {}", key_path.display()))?;
        std::fs::write(&cert_path, &pem)
            .with_context(|| format!("writing {}", cert_path.display()))?;
        Ok(Root {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// istiod's TLS server: TLS 1.3, ALPN h2, a certificate for `names` (DNS names or IPs)
    /// signed by this root.
    pub fn server_config(&self, names: Vec<String>) -> anyhow::Result<rustls::ServerConfig> {
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(names)?.signed_by(&key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(cert.der().to_vec())], key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// The CSR's key certified for its identity, valid from now for `seconds`.
    fn sign(
        &self,
        mut csr: CertificateSigningRequestParams,
        seconds: i64,
    ) -> Result<String, Status> {
        let now = OffsetDateTime::now_utc();
        let params = &mut csr.params;
        params.not_before = now;
        params.not_after = now + time::Duration::seconds(seconds);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let leaf = csr
            .signed_by(&self.issuer)
            .map_err(|err| Status::internal(format!("signing: {err}")))?;
        Ok(leaf.pem())
    }
}

#[derive(Clone)]
pub struct Ca {
    pub root: Arc<Root>,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub token: TokenFile,
    pub faults: FaultsFile,
}

#[tonic::async_trait]
impl IstioCertificateService for Ca {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        self.token.authenticate(request.metadata())?;
        let faults = self.faults.read();
        tokio::time::sleep(Duration::from_millis(faults.ca_delay_ms)).await;
        let request = request.into_inner();
        let mut csr = CertificateSigningRequestParams::from_pem(&request.csr)
            .map_err(|err| Status::invalid_argument(format!("the CSR: {err}")))?;
        let identity = match csr.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] => uri.as_str().to_owned(),
            _ => return Err(Status::invalid_argument("the CSR must have one URI SAN")),
        };
        if let Some(impersonated) = impersonated_identity(&request)
            && impersonated != identity
        {
            return Err(Status::permission_denied(format!(
                "ImpersonatedIdentity {impersonated} is not the CSR's identity {identity}"
            )));
        }
        if !self.snapshots.borrow().identities.contains(&identity) {
            return Err(Status::permission_denied(format!(
                "no workload of the mesh has the identity {identity}"
            )));
        }
        let seconds = match request.validity_duration {
            asked @ 1..=MAX_TTL_SECS => asked,
            _ => MAX_TTL_SECS,
        };
        match faults.ca {
            CaAnswer::Sign => {}
            CaAnswer::Refuse => {
                tracing::info!(%identity, "refused (a fault)");
                return Err(Status::unavailable("istiod's CA is down (a fault)"));
            }
            CaAnswer::EmptyChain => {
                tracing::info!(%identity, "answered no certificate (a fault)");
                return Ok(Response::new(IstioCertificateResponse::default()));
            }
            CaAnswer::WrongIdentity => {
                tracing::info!(%identity, "signing for {WRONG_IDENTITY} instead (a fault)");
                let uri = WRONG_IDENTITY.try_into().expect("a valid URI");
                csr.params.subject_alt_names = vec![SanType::URI(uri)];
            }
        }
        let leaf = self.root.sign(csr, seconds)?;
        tracing::info!(%identity, seconds, "issued a certificate");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![leaf, self.root.pem.clone()],
        }))
    }
}

fn impersonated_identity(request: &IstioCertificateRequest) -> Option<String> {
    let value = request
        .metadata
        .as_ref()?
        .fields
        .get("ImpersonatedIdentity")?;
    match &value.kind {
        Some(Kind::StringValue(identity)) => Some(identity.clone()),
        _ => Some(String::new()),
    }
}

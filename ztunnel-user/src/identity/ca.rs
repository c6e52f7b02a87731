//! The built-in certificate authority: a root that signs the short-lived certificates of the
//! workloads on this node. It is created on first start and kept in the state directory, or
//! given by the operator so that several nodes share one trust root.

use super::spiffe::Identity;
use crate::host::files;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::RootCertStore;
use rustls::crypto::ring::sign::any_ecdsa_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use std::fs::{self, DirBuilder, File, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

/// The root certificate's file in the state directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The root key's file in the state directory (mode 0600).
pub const ROOT_KEY_FILE: &str = "root-key.pem";
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
const ROOT_COMMON_NAME: &str = "ztunnel root CA";
/// How long before it is made a certificate starts to be valid: a peer whose clock is behind
/// ours still accepts it at once. Even on one machine OpenSSL, which reads glibc's `time()`,
/// sees the second before for up to a tick after each second begins.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

const STATE_DIR_HINT: &str = "remove root-cert.pem and root-key.pem from the CA directory to \
                              start a new root CA, or pass an existing CA with --ca-cert and --ca-key";
const OPERATOR_HINT: &str = "check the files given with --ca-cert and --ca-key";

#[derive(Debug, thiserror::Error)]
pub(crate) enum CaError {
    #[error(
        "cannot prepare the CA state directory {path}: {source} (ztunnel keeps its root CA there)"
    )]
    StateDir { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source} ({hint})")]
    Read {
        path: PathBuf,
        source: io::Error,
        hint: &'static str,
    },
    #[error("{path} is not a usable CA certificate: {reason} ({hint})")]
    BadCertificate {
        path: PathBuf,
        reason: String,
        hint: &'static str,
    },
    #[error(
        "{path} is not a usable CA key: {reason}; it must be an unencrypted PKCS#8 PEM key \
         (\"BEGIN PRIVATE KEY\"; `openssl pkcs8 -topk8 -nocrypt` converts others) ({hint})"
    )]
    BadKey {
        path: PathBuf,
        reason: String,
        hint: &'static str,
    },
    #[error("CA key {key} is not the key of CA certificate {cert} ({hint})")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        hint: &'static str,
    },
    #[error("cannot write {path}: {source} (check that ztunnel can write its state directory)")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot generate a root CA: {0}")]
    Generate(String),
    #[error("cannot issue a certificate for {identity}: {reason}")]
    Issue { identity: Identity, reason: String },
}

/// A workload's certificate and key, as the CA issued them.
#[derive(Clone, Debug)]
pub(crate) struct WorkloadCertificate {
    /// The chain and key for rustls. The chain is the leaf, then any intermediates, never the
    /// root: peers hold it already, and Istio does not send it either.
    pub certified_key: Arc<CertifiedKey>,
    /// When it is valid. The built-in CA gives the requested validity (the certificate's own,
    /// in whole seconds, covers it); Istio's CA, the leaf's.
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCertificate {
    /// Halfway through the validity: time for a new certificate, well before this one expires.
    pub(crate) fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime / 2
    }
}

/// The root (or operator-given) CA that signs workload certificates.
#[derive(Debug)]
pub(crate) struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    roots: Arc<RootCertStore>,
}

impl CertificateAuthority {
    /// Loads the root kept in `state_dir`, or creates one there for `trust_domain` (ECDSA P-256,
    /// ten years) on first start. The trust domain only names the new root.
    pub(crate) fn load_or_create(state_dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let cert_path = state_dir.join(ROOT_CERT_FILE);
        let key_path = state_dir.join(ROOT_KEY_FILE);
        let state_dir_error = |source| CaError::StateDir {
            path: state_dir.to_owned(),
            source,
        };
        // The key is written before the certificate, so a certificate means a complete root;
        // a key alone is left from an interrupted first start and is replaced.
        if cert_path.try_exists().map_err(state_dir_error)? {
            return Self::load(&cert_path, &key_path, STATE_DIR_HINT);
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .and_then(|()| fs::set_permissions(state_dir, Permissions::from_mode(0o700)))
            .map_err(state_dir_error)?;
        let (ca, cert_pem, key_pem) = Self::generate(trust_domain)?;
        write_atomically(&key_path, key_pem.as_bytes(), 0o600)?;
        write_atomically(&cert_path, cert_pem.as_bytes(), 0o644)?;
        // Make the renames durable before the root signs anything.
        File::open(state_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(state_dir_error)?;
        tracing::info!(dir = %state_dir.display(), trust_domain, "created a new root CA");
        Ok(ca)
    }

    /// Loads an operator-given CA: a PEM certificate (the first one in the file signs) and its
    /// unencrypted PKCS#8 PEM key (ECDSA, Ed25519 or RSA).
    pub(crate) fn from_files(cert_pem: &Path, key_pem: &Path) -> Result<Self, CaError> {
        Self::load(cert_pem, key_pem, OPERATOR_HINT)
    }

    /// Issues a certificate for `identity`, valid from now for `lifetime`: ECDSA P-256, the
    /// SPIFFE ID as its URI SAN, usable for both TLS client and server authentication.
    pub(crate) fn issue(
        &self,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<WorkloadCertificate, CaError> {
        let failed = |reason: &dyn std::fmt::Display| CaError::Issue {
            identity: identity.clone(),
            reason: reason.to_string(),
        };
        let not_before = SystemTime::now();
        let not_after = not_before
            .checked_add(lifetime)
            .ok_or_else(|| failed(&format!("the lifetime {lifetime:?} is out of range")))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| failed(&e))?;

        let mut params = CertificateParams::default();
        // As Istio's: no subject (rcgen then marks the SAN critical, as RFC 5280 asks).
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.to_string().try_into().map_err(|e| failed(&e))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, not_before, not_after).map_err(|e| failed(&e))?;
        // No serial given: rcgen derives it from the fresh public key, so each one differs.
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| failed(&e))?;

        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = any_ecdsa_type(&key_der).map_err(|e| failed(&e))?;
        Ok(WorkloadCertificate {
            certified_key: Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing_key)),
            not_before,
            not_after,
        })
    }

    /// The trust roots of the mesh: this CA's certificate.
    pub(crate) fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    fn new(
        issuer: Issuer<'static, KeyPair>,
        certificate: CertificateDer<'static>,
    ) -> Result<Self, rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots.add(certificate)?;
        Ok(CertificateAuthority {
            issuer,
            roots: Arc::new(roots),
        })
    }

    /// A new self-signed root, with the PEM of its certificate and of its key (to be saved).
    fn generate(trust_domain: &str) -> Result<(Self, String, String), CaError> {
        let failed = |error: &dyn std::fmt::Display| CaError::Generate(error.to_string());
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| failed(&e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        // A name of its own, so that a peer under another root fails as "unknown issuer"
        // rather than as a bad signature from a namesake.
        let key_id: String = params
            .key_identifier(&key)
            .iter()
            .take(4)
            .map(|byte| format!("{byte:02x}"))
            .collect();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{ROOT_COMMON_NAME} {key_id}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        now.checked_add(ROOT_LIFETIME)
            .ok_or(rcgen::Error::Time)
            .and_then(|not_after| set_validity(&mut params, now, not_after))
            .map_err(|e| failed(&e))?;
        let certificate = params.self_signed(&key).map_err(|e| failed(&e))?;
        let (cert_pem, key_pem) = (certificate.pem(), key.serialize_pem());
        let ca = Self::new(Issuer::new(params, key), certificate.der().clone())
            .map_err(|e| failed(&e))?;
        Ok((ca, cert_pem, key_pem))
    }

    fn load(cert_path: &Path, key_path: &Path, hint: &'static str) -> Result<Self, CaError> {
        let read = |path: &Path| {
            fs::read(path).map_err(|source| CaError::Read {
                path: path.to_owned(),
                source,
                hint,
            })
        };
        let bad_cert = |reason: &dyn std::fmt::Display| CaError::BadCertificate {
            path: cert_path.to_owned(),
            reason: reason.to_string(),
            hint,
        };
        let bad_key = |reason: &dyn std::fmt::Display| CaError::BadKey {
            path: key_path.to_owned(),
            reason: reason.to_string(),
            hint,
        };

        let certificate =
            CertificateDer::from_pem_slice(&read(cert_path)?).map_err(|e| bad_cert(&e))?;
        let key_der = PrivateKeyDer::from_pem_slice(&read(key_path)?).map_err(|e| bad_key(&e))?;
        let key = KeyPair::try_from(&key_der).map_err(|e| bad_key(&e))?;
        {
            let (_, x509) = X509Certificate::from_der(&certificate).map_err(|e| bad_cert(&e))?;
            if !x509.is_ca() {
                return Err(bad_cert(
                    &"it is not a CA certificate (basicConstraints CA:TRUE)",
                ));
            }
            if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(CaError::KeyMismatch {
                    cert: cert_path.to_owned(),
                    key: key_path.to_owned(),
                    hint,
                });
            }
        }
        let issuer = Issuer::from_ca_cert_der(&certificate, key).map_err(|e| bad_cert(&e))?;
        Self::new(issuer, certificate).map_err(|e| bad_cert(&e))
    }
}

/// Sets a certificate's validity to cover `not_before..not_after` in X.509's whole seconds,
/// beginning `CLOCK_SKEW_ALLOWANCE` early.
fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), rcgen::Error> {
    let since_epoch = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_err(|_| rcgen::Error::Time);
    let at = |secs: u64| {
        i64::try_from(secs)
            .ok()
            .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
            .ok_or(rcgen::Error::Time)
    };
    let start = since_epoch(not_before)?;
    let end = since_epoch(not_after)?;
    params.not_before = at(start
        .as_secs()
        .saturating_sub(CLOCK_SKEW_ALLOWANCE.as_secs()))?;
    let round_up = u64::from(end.subsec_nanos() > 0);
    params.not_after = at(end.as_secs().saturating_add(round_up))?;
    Ok(())
}

/// Writes `contents` to `path` in one step, with `mode`.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    files::write_atomically(path, contents, mode).map_err(|source| CaError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// The root certificate the CA keeps in `dir`.
    fn root_certificate(dir: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(dir.join(ROOT_CERT_FILE)).unwrap()
    }

    #[test]
    fn creates_a_root_once_and_loads_it_afterwards() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let created = CertificateAuthority::load_or_create(&state, "cluster.local").unwrap();
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(ROOT_KEY_FILE)), 0o600);
        let mut files: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        files.sort();
        assert_eq!(files, [ROOT_CERT_FILE, ROOT_KEY_FILE]);

        let loaded = CertificateAuthority::load_or_create(&state, "ignored.local").unwrap();
        assert_eq!(created.roots().roots, loaded.roots().roots);
        let root = root_certificate(&state);
        let (_, root) = X509Certificate::from_der(&root).unwrap();
        assert!(root.is_ca());
        let subject = root.subject().to_string();
        assert!(
            subject.starts_with("O=cluster.local, CN=ztunnel root CA "),
            "{subject}"
        );
        let lifetime =
            root.validity().not_after.timestamp() - root.validity().not_before.timestamp();
        assert!(lifetime >= ROOT_LIFETIME.as_secs() as i64);
    }

    #[test]
    fn loads_an_operator_ca_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let created = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        let loaded = CertificateAuthority::from_files(
            &dir.path().join(ROOT_CERT_FILE),
            &dir.path().join(ROOT_KEY_FILE),
        )
        .unwrap();
        assert_eq!(created.roots().roots, loaded.roots().roots);
        assert_eq!(loaded.roots().roots.len(), 1);
    }

    #[test]
    fn a_corrupt_key_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        let key = dir.path().join(ROOT_KEY_FILE);
        fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let error = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap_err();
        assert!(matches!(error, CaError::BadKey { .. }), "{error}");
        let message = error.to_string();
        assert!(message.contains(&key.display().to_string()), "{message}");
        assert!(message.contains("start a new root CA"), "{message}");

        fs::write(&key, "garbage").unwrap();
        let error = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap_err();
        assert!(matches!(error, CaError::BadKey { .. }), "{error}");
    }

    #[test]
    fn a_corrupt_or_missing_certificate_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        let cert = dir.path().join(ROOT_CERT_FILE);
        let key = dir.path().join(ROOT_KEY_FILE);
        fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let error = CertificateAuthority::from_files(&cert, &key).unwrap_err();
        assert!(matches!(error, CaError::BadCertificate { .. }), "{error}");
        assert!(error.to_string().contains(OPERATOR_HINT), "{error}");

        let missing = dir.path().join("missing.pem");
        let error = CertificateAuthority::from_files(&missing, &key).unwrap_err();
        assert!(matches!(error, CaError::Read { .. }), "{error}");
    }

    #[test]
    fn a_key_of_another_ca_is_refused() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(first.path(), "cluster.local").unwrap();
        CertificateAuthority::load_or_create(second.path(), "cluster.local").unwrap();
        let error = CertificateAuthority::from_files(
            &first.path().join(ROOT_CERT_FILE),
            &second.path().join(ROOT_KEY_FILE),
        )
        .unwrap_err();
        assert!(matches!(error, CaError::KeyMismatch { .. }), "{error}");
    }

    #[test]
    fn a_key_left_without_certificate_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join(ROOT_KEY_FILE);
        fs::write(&key, "interrupted").unwrap();
        let created = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        // A whole new pair: the key file is a key now, and the next start loads the same root.
        assert_ne!(fs::read_to_string(&key).unwrap(), "interrupted");
        let loaded = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        assert_eq!(created.roots().roots, loaded.roots().roots);
        let identity: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let issued = created.issue(&identity, Duration::from_secs(60)).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(loaded.roots(), provider)
                .build()
                .unwrap();
        verifier
            .verify_client_cert(
                &issued.certified_key.cert[0],
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .expect("the loaded root verifies what the created one issued");
    }

    #[test]
    fn issues_workload_certificates_as_istio_does() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        let identity: Identity = "spiffe://cluster.local/ns/shop/sa/checkout"
            .parse()
            .unwrap();
        let lifetime = Duration::from_secs(3600);
        let issued = ca.issue(&identity, lifetime).unwrap();
        assert_eq!(
            issued.not_after.duration_since(issued.not_before).unwrap(),
            lifetime
        );
        let chain = &issued.certified_key.cert;
        assert_eq!(chain.len(), 1, "the leaf alone");
        let leaf = &chain[0];
        assert_eq!(Identity::from_certificate(leaf).unwrap(), identity);
        let (_, cert) = X509Certificate::from_der(leaf).unwrap();
        let key = cert.public_key();
        assert_eq!(key.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
        let curve = key.algorithm.parameters.as_ref().unwrap().as_oid().unwrap();
        assert_eq!(curve, OID_EC_P256);
        assert!(!cert.is_ca());
        let usage = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(usage.server_auth && usage.client_auth);
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(
            san.critical,
            "a certificate without subject has a critical SAN"
        );
        let root = root_certificate(dir.path());
        let (_, root) = X509Certificate::from_der(&root).unwrap();
        assert_eq!(cert.issuer(), root.subject());
        let validity = cert.validity();
        let allowance = CLOCK_SKEW_ALLOWANCE.as_secs() as i64;
        let since_epoch = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert_eq!(
            validity.not_before.timestamp(),
            since_epoch(issued.not_before) - allowance,
            "valid from before it was made, for peers whose clocks are behind"
        );
        let seconds = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert!(
            (3600 + allowance..=3601 + allowance).contains(&seconds),
            "{seconds}"
        );
    }

    #[test]
    fn an_out_of_range_lifetime_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        let identity: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let error = ca.issue(&identity, Duration::MAX).unwrap_err();
        assert!(matches!(error, CaError::Issue { .. }), "{error}");
    }
}

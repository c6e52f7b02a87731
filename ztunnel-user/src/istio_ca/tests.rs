//! The CA client against the fake istiod CA (`fake`), in memory: what each request carries,
//! and which answers are taken or refused.

use super::fake::{Answer, FakeCa, OTHER_IDENTITY, Root};
use super::*;
use rustls::pki_types::pem::PemObject;
use std::fs;
use std::path::PathBuf;

const TTL: Duration = Duration::from_secs(3600);

fn checkout() -> Identity {
    "spiffe://cluster.local/ns/shop/sa/checkout"
        .parse()
        .unwrap()
}

/// A token file holding `token`, in a directory of its own.
fn token_file(token: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("istio-token");
    fs::write(&path, token).unwrap();
    (dir, path)
}

/// The trust anchor of a PEM certificate, to compare with a root store's.
fn anchor(pem: &str) -> TrustAnchor<'static> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    webpki::anchor_from_trusted_cert(&der).unwrap().to_owned()
}

#[tokio::test]
async fn issues_a_certificate_as_istio_asks() {
    let ca = FakeCa::new();
    let (_dir, token) = token_file("first-token\n");
    let client = ca.client(TTL, Some(token), None);
    let cert = client.issue(&checkout()).await.unwrap();

    let seen = ca.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.sans, [checkout().to_string()]);
    assert!(request.subject_is_empty);
    assert!(request.key_is_p256);
    assert_eq!(request.validity_duration, 3600);
    assert_eq!(request.impersonated, Some(checkout().to_string()));
    assert_eq!(request.authorization.as_deref(), Some("Bearer first-token"));
    assert_eq!(request.cluster_id.as_deref(), Some("Kubernetes"));

    let chain = &cert.certified_key.cert;
    assert_eq!(chain.len(), 1, "the leaf alone: the root is not sent");
    assert_eq!(Identity::from_certificate(&chain[0]).unwrap(), checkout());
    cert.certified_key.keys_match().unwrap();
    let lifetime = cert.not_after.duration_since(cert.not_before).unwrap();
    assert_eq!(lifetime, TTL);
}

#[tokio::test]
async fn the_token_file_is_read_again_for_each_request() {
    let ca = FakeCa::new();
    let (_dir, token) = token_file("first-token");
    let client = ca.client(TTL, Some(token.clone()), None);
    client.issue(&checkout()).await.unwrap();
    fs::write(&token, "rotated-token").unwrap();
    client.issue(&checkout()).await.unwrap();
    let sent: Vec<Option<String>> = ca.seen().into_iter().map(|s| s.authorization).collect();
    assert_eq!(
        sent,
        [
            Some("Bearer first-token".to_owned()),
            Some("Bearer rotated-token".to_owned())
        ]
    );
    fs::write(&token, "").unwrap();
    let error = client.issue(&checkout()).await.unwrap_err();
    assert!(matches!(error, IstioCaError::Credentials { .. }), "{error}");
    assert_eq!(ca.seen().len(), 2, "no request without a token");
}

/// The error of a request the CA answers with `answer`.
async fn refused(answer: Answer) -> IstioCaError {
    let ca = FakeCa::new();
    ca.answer(answer);
    let client = ca.client(TTL, None, None);
    let error = client.issue(&checkout()).await.unwrap_err();
    assert!(
        error.to_string().contains(&checkout().to_string()),
        "the error names the identity: {error}"
    );
    assert_eq!(
        CertificateSource::roots(&client).roots.len(),
        0,
        "no roots taken from a refused answer"
    );
    error
}

#[tokio::test]
async fn an_empty_chain_is_refused() {
    let error = refused(Answer::EmptyChain).await;
    assert!(matches!(error, IstioCaError::EmptyChain { .. }), "{error}");
}

#[tokio::test]
async fn a_leaf_for_another_identity_is_refused() {
    let error = refused(Answer::OtherIdentity).await;
    assert!(
        matches!(error, IstioCaError::WrongIdentity { .. }),
        "{error}"
    );
    assert!(error.to_string().contains(OTHER_IDENTITY), "{error}");
}

#[tokio::test]
async fn a_leaf_for_another_key_is_refused() {
    let error = refused(Answer::OtherKey).await;
    assert!(matches!(error, IstioCaError::WrongKey { .. }), "{error}");
}

#[tokio::test]
async fn a_leaf_that_does_not_parse_is_refused() {
    let error = refused(Answer::Garbage).await;
    assert!(matches!(error, IstioCaError::BadLeaf { .. }), "{error}");
}

#[tokio::test]
async fn a_refusal_names_its_status() {
    let error = refused(Answer::Refuse(tonic::Code::PermissionDenied)).await;
    assert!(matches!(error, IstioCaError::Refused { .. }), "{error}");
    assert!(error.to_string().contains("PermissionDenied"), "{error}");
}

#[tokio::test]
async fn every_root_of_the_last_entry_is_trusted_with_the_root_file() {
    let ca = FakeCa::new();
    let next_root = Root::new("next istiod CA");
    ca.add_root(&next_root.pem);
    let file_root = Root::new("root of the root file");
    let dir = tempfile::tempdir().unwrap();
    let root_cert = dir.path().join("root-cert.pem");
    fs::write(&root_cert, &file_root.pem).unwrap();
    let client = ca.client(TTL, None, Some(root_cert));
    assert_eq!(
        CertificateSource::roots(&client).roots,
        [anchor(&file_root.pem)],
        "before any answer, the file's root"
    );

    client.issue(&checkout()).await.unwrap();
    let roots = CertificateSource::roots(&client);
    let expected = [
        file_root.pem.as_str(),
        ca.root_pem(),
        next_root.pem.as_str(),
    ]
    .map(anchor);
    assert_eq!(roots.roots, expected);
}

#[tokio::test]
async fn a_root_file_replaced_on_disk_is_trusted_instead_and_a_bad_one_is_not_taken() {
    let ca = FakeCa::new();
    let (old_root, new_root) = (Root::new("old mesh root"), Root::new("new mesh root"));
    let dir = tempfile::tempdir().unwrap();
    let root_cert = dir.path().join("root-cert.pem");
    fs::write(&root_cert, &old_root.pem).unwrap();
    let client = Arc::new(ca.client(TTL, None, Some(root_cert.clone())));
    client.issue(&checkout()).await.unwrap();
    let following = tokio::spawn(client.clone().follow_root_file());
    let roots_become = |expected: [&str; 2]| {
        let client = client.clone();
        let expected = expected.map(anchor);
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while CertificateSource::roots(client.as_ref()).roots != expected {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the roots did not change"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // Replaced as an operator or a ConfigMap swap would: the new root, with the CA's.
    let partial = dir.path().join("partial");
    fs::write(&partial, &new_root.pem).unwrap();
    fs::rename(&partial, &root_cert).unwrap();
    roots_become([new_root.pem.as_str(), ca.root_pem()]).await;

    // A file with no certificate in it is not taken: the roots in force stay.
    fs::write(&root_cert, "no PEM here").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    roots_become([new_root.pem.as_str(), ca.root_pem()]).await;
    following.abort();
}

#[test]
fn a_root_file_without_certificates_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root-cert.pem");
    for contents in [None, Some("no PEM here")] {
        if let Some(contents) = contents {
            fs::write(&path, contents).unwrap();
        }
        let config = IstioCaConfig {
            credentials: Credentials::default(),
            ttl: TTL,
            root_cert: Some(RootCertificates::File(path.clone())),
        };
        let error = IstioCa::new(FakeCa::new().dialer(), config).err().unwrap();
        assert!(matches!(error, IstioCaError::RootCert { .. }), "{error}");
        assert!(error.to_string().contains(&path.display().to_string()));
    }
}

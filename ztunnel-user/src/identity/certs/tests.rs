//! The store over the built-in CA. Its life against Istio's CA (failures, backoff, concurrency)
//! is tested with the Istio CA client's fake istiod, which can fail and stall.

use super::*;
use crate::identity::{BuiltInSource, CertificateAuthority};
use std::sync::Weak;

fn identity(name: &str) -> Identity {
    format!("spiffe://cluster.local/ns/test/sa/{name}")
        .parse()
        .unwrap()
}

/// A store over a new built-in CA issuing for `lifetime`, and a way to see the source go.
fn store(
    lifetime: Duration,
) -> (
    tempfile::TempDir,
    Arc<CertificateStore>,
    Weak<dyn CertificateSource>,
) {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
    let source: Arc<dyn CertificateSource> = Arc::new(BuiltInSource::new(ca, lifetime));
    let watched = Arc::downgrade(&source);
    (dir, CertificateStore::start(source), watched)
}

#[tokio::test]
async fn one_certificate_per_identity_until_its_renewal() {
    let (_dir, store, _) = store(Duration::from_secs(600));
    let first = store.certificate(&identity("a")).await.unwrap();
    let again = store.certificate(&identity("a")).await.unwrap();
    assert!(Arc::ptr_eq(&first, &again));
    let held = store.held(&identity("a")).unwrap();
    assert!(Arc::ptr_eq(&first, &held));
    let other = store.certificate(&identity("b")).await.unwrap();
    assert_ne!(first.cert, other.cert);
    assert_eq!(store.roots().roots.len(), 1);
}

#[tokio::test]
async fn nothing_is_held_before_a_fetch() {
    let (_dir, store, _) = store(Duration::from_secs(600));
    assert!(store.held(&identity("a")).is_none());
    assert!(store.expiries().is_empty());
    store.prefetch(&identity("a"));
    store.certificate(&identity("a")).await.unwrap();
    assert!(store.held(&identity("a")).is_some());
}

#[tokio::test(start_paused = true)]
async fn renews_at_half_the_lifetime_without_being_asked() {
    let (_dir, store, _) = store(Duration::from_secs(100));
    store.prefetch(&identity("a"));
    let first = store.certificate(&identity("a")).await.unwrap();
    let before = store.expiries();
    // The validity's whole seconds may start up to a second before it was issued.
    tokio::time::sleep(Duration::from_secs(48)).await;
    assert!(Arc::ptr_eq(&first, &store.held(&identity("a")).unwrap()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let renewed = store.held(&identity("a")).unwrap();
    assert_ne!(first.cert, renewed.cert);
    let after = store.expiries();
    assert_eq!(after[0].0, identity("a"));
    assert!(after[0].1 > before[0].1, "{before:?} {after:?}");
}

#[tokio::test]
async fn forget_drops_the_identity() {
    let (_dir, store, _) = store(Duration::from_secs(600));
    store.certificate(&identity("a")).await.unwrap();
    store.certificate(&identity("b")).await.unwrap();
    store.forget(&identity("a"));
    let held: Vec<Identity> = store.expiries().into_iter().map(|(id, _)| id).collect();
    assert_eq!(held, vec![identity("b")]);
    assert!(store.held(&identity("a")).is_none());
}

#[tokio::test]
async fn the_worker_ends_with_the_store() {
    let (_dir, store, source) = store(Duration::from_secs(3600));
    store.certificate(&identity("a")).await.unwrap();
    drop(store);
    // The worker holds the source until it ends.
    let ended = async {
        while source.upgrade().is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(2), ended)
        .await
        .expect("the worker outlived its store");
}

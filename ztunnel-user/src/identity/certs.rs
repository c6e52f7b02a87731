//! The certificates of the workloads on this node, one per identity, issued on first use and
//! renewed halfway through their lifetime. TLS configurations look the certificate up at each
//! handshake, so a renewal reaches new connections and leaves established ones alone.

use super::ca::{CaError, CertificateAuthority, WorkloadCertificate};
use super::spiffe::Identity;
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// How long the renewal task waits before trying again after the CA failed to issue.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// The least time between two rounds of renewals, so that even a lifetime of zero cannot make
/// the renewal task spin.
const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(1);

/// The current certificate of each identity in use on this node. Share it in an `Arc`.
#[derive(Debug)]
pub(crate) struct CertificateStore {
    ca: Arc<CertificateAuthority>,
    lifetime: Duration,
    certs: Mutex<HashMap<Identity, WorkloadCertificate>>,
    /// Wakes the renewal task: a first certificate to watch, or the store is gone.
    wake: Arc<Notify>,
}

impl CertificateStore {
    /// A store whose certificates, signed by `ca`, are valid for `lifetime`.
    pub(crate) fn new(ca: Arc<CertificateAuthority>, lifetime: Duration) -> Self {
        CertificateStore {
            ca,
            lifetime,
            certs: Mutex::new(HashMap::new()),
            wake: Arc::new(Notify::new()),
        }
    }

    /// The certificate and key of `identity` for a handshake: the held one, or a new one if
    /// there is none yet or the held one is past half its lifetime. While the CA cannot issue,
    /// a held certificate serves until it expires (the renewal task keeps trying).
    pub(crate) fn certified_key(&self, identity: &Identity) -> Result<Arc<CertifiedKey>, CaError> {
        let mut certs = self.lock();
        let now = SystemTime::now();
        if let Some(cert) = certs.get(identity)
            && now < cert.renew_at()
        {
            return Ok(cert.certified_key.clone());
        }
        let cert = match self.ca.issue(identity, self.lifetime) {
            Ok(cert) => cert,
            Err(error) => match certs.get(identity) {
                Some(held) if now < held.not_after => {
                    tracing::debug!(%identity, %error, "cannot renew; the held certificate is still valid");
                    return Ok(held.certified_key.clone());
                }
                _ => return Err(error),
            },
        };
        tracing::debug!(%identity, "issued a workload certificate");
        let key = cert.certified_key.clone();
        if certs.insert(identity.clone(), cert).is_none() {
            self.wake.notify_one();
        }
        Ok(key)
    }

    /// Drops the certificate of `identity` (its last workload left the node).
    pub(crate) fn forget(&self, identity: &Identity) {
        self.lock().remove(identity);
    }

    /// When each held certificate expires, by identity.
    pub(crate) fn expiries(&self) -> Vec<(Identity, SystemTime)> {
        let mut expiries: Vec<_> = self
            .lock()
            .values()
            .map(|cert| (cert.identity.clone(), cert.not_after))
            .collect();
        expiries.sort();
        expiries
    }

    /// Starts a task (on the current Tokio runtime) that renews every held certificate halfway
    /// through its lifetime, so that idle identities stay valid too. It ends once the store is
    /// dropped.
    pub(crate) fn spawn_renewal(self: Arc<Self>) -> JoinHandle<()> {
        let wake = self.wake.clone();
        // The task holds the store only while renewing, so that dropping it ends the task.
        let store = Arc::downgrade(&self);
        drop(self);
        tokio::spawn(async move {
            while let Some(held) = store.upgrade() {
                let next = held.renew_due();
                drop(held);
                let wait = async {
                    match next {
                        Some(at) => {
                            let delay = at.duration_since(SystemTime::now()).unwrap_or_default();
                            tokio::time::sleep(delay.max(MIN_RENEWAL_INTERVAL)).await;
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = wait => {}
                    () = wake.notified() => {}
                }
            }
        })
    }

    /// Renews the certificates that are due; returns when the next one is (None: none held).
    fn renew_due(&self) -> Option<SystemTime> {
        let mut certs = self.lock();
        let now = SystemTime::now();
        let mut next: Option<SystemTime> = None;
        for (identity, cert) in certs.iter_mut() {
            let due = if now < cert.renew_at() {
                cert.renew_at()
            } else {
                match self.ca.issue(identity, self.lifetime) {
                    Ok(renewed) => {
                        tracing::debug!(%identity, "renewed a workload certificate");
                        *cert = renewed;
                        cert.renew_at()
                    }
                    Err(error) => {
                        tracing::warn!(%identity, %error, "cannot renew a workload certificate");
                        now + RETRY_AFTER_FAILURE
                    }
                }
            };
            next = Some(next.map_or(due, |next| next.min(due)));
        }
        next
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Identity, WorkloadCertificate>> {
        // Nothing panics while holding the lock, and the map stays consistent if it did.
        self.certs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for CertificateStore {
    fn drop(&mut self) {
        // A permit is kept if the task is not waiting yet, so it cannot miss this.
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn store(lifetime: Duration) -> (tempfile::TempDir, Arc<CertificateStore>) {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        (dir, Arc::new(CertificateStore::new(Arc::new(ca), lifetime)))
    }

    fn identity(name: &str) -> Identity {
        format!("spiffe://cluster.local/ns/test/sa/{name}")
            .parse()
            .unwrap()
    }

    /// Polls `done` every 20 ms until it holds, for at most `limit`.
    async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        done()
    }

    #[test]
    fn keeps_a_certificate_until_half_its_lifetime() {
        let (_dir, store) = store(Duration::from_secs(600));
        let first = store.certified_key(&identity("a")).unwrap();
        let again = store.certified_key(&identity("a")).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let other = store.certified_key(&identity("b")).unwrap();
        assert_ne!(first.cert, other.cert);
    }

    #[test]
    fn a_failed_renewal_keeps_the_valid_certificate_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        let mut store = CertificateStore::new(Arc::new(ca), Duration::from_secs(2));
        let held = store.certified_key(&identity("a")).unwrap();
        // From now on the CA cannot issue (the lifetime is out of range).
        store.lifetime = Duration::MAX;
        std::thread::sleep(Duration::from_millis(1100));
        let during = store.certified_key(&identity("a")).unwrap();
        assert!(Arc::ptr_eq(&held, &during));
        // Once it expired, there is nothing to present.
        std::thread::sleep(Duration::from_millis(1000));
        assert!(store.certified_key(&identity("a")).is_err());
    }

    #[tokio::test]
    async fn reissues_at_use_after_half_its_lifetime() {
        let (_dir, store) = store(Duration::from_secs(1));
        let first = store.certified_key(&identity("a")).unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let renewed = store.certified_key(&identity("a")).unwrap();
        assert_ne!(first.cert, renewed.cert);
    }

    #[tokio::test]
    async fn renewal_task_renews_held_certificates() {
        let (_dir, store) = store(Duration::from_secs(2));
        store.certified_key(&identity("a")).unwrap();
        let before = store.expiries();
        let task = store.clone().spawn_renewal();
        let renewed = eventually(Duration::from_secs(3), || store.expiries() != before).await;
        assert!(renewed, "no renewal within 3 s: {before:?}");
        assert_eq!(store.expiries()[0].0, identity("a"));
        assert!(store.expiries()[0].1 > before[0].1);
        task.abort();
    }

    #[tokio::test]
    async fn renewal_task_ends_with_the_store() {
        let (_dir, store) = store(Duration::from_secs(3600));
        store.certified_key(&identity("a")).unwrap();
        let task = store.clone().spawn_renewal();
        drop(store);
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the renewal task outlived its store")
            .unwrap();
    }

    #[test]
    fn forget_drops_the_identity() {
        let (_dir, store) = store(Duration::from_secs(600));
        store.certified_key(&identity("a")).unwrap();
        store.certified_key(&identity("b")).unwrap();
        store.forget(&identity("a"));
        let held: Vec<Identity> = store.expiries().into_iter().map(|(id, _)| id).collect();
        assert_eq!(held, vec![identity("b")]);
    }
}

//! Readiness: the daemon is ready once everything it needs to serve pods correctly is in
//! place (the mesh config, the certificates of the pods it serves), and stops being ready
//! when it drains. Until then the CNI plugin's enrollments are refused, so no pod starts
//! with a wrong identity, and `/healthz/ready` says what is missing.

use std::collections::BTreeSet;
use std::sync::Mutex;

/// What is still missing.
#[derive(Default)]
pub struct Readiness {
    pending: Mutex<BTreeSet<String>>,
}

impl Readiness {
    /// Marks `what` as missing until `done(what)`.
    pub fn pending(&self, what: &str) {
        self.lock().insert(what.to_owned());
    }

    pub fn done(&self, what: &str) {
        let mut pending = self.lock();
        if pending.remove(what) && pending.is_empty() {
            tracing::info!("ready");
        }
    }

    /// Ok when ready, else what is missing.
    pub fn check(&self) -> Result<(), String> {
        let pending = self.lock();
        if pending.is_empty() {
            Ok(())
        } else {
            Err(pending.iter().cloned().collect::<Vec<_>>().join(", "))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_nothing_is_pending() {
        let readiness = Readiness::default();
        assert_eq!(readiness.check(), Ok(()));
        readiness.pending("mesh config /etc/mesh.yaml");
        readiness.pending("certificates");
        assert_eq!(
            readiness.check(),
            Err("certificates, mesh config /etc/mesh.yaml".into())
        );
        readiness.done("certificates");
        readiness.done("something never pending");
        assert!(readiness.check().is_err());
        readiness.done("mesh config /etc/mesh.yaml");
        assert_eq!(readiness.check(), Ok(()));
    }
}

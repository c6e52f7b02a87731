//! Readiness: the daemon is ready once everything it needs to serve pods correctly is in
//! place (the mesh config, the pods of its previous run), and stops being ready when it
//! drains. Until then the CNI plugin's enrollments are refused, so no pod starts with a wrong
//! identity, and `/healthz/ready` says what is missing.

use super::http::{Call, Reply};
use http::{Method, StatusCode};
use std::collections::BTreeSet;
use std::sync::Mutex;

/// What is still missing.
#[derive(Default)]
pub(crate) struct Readiness {
    pending: Mutex<BTreeSet<String>>,
}

/// Why the daemon is not ready: what it still waits for.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join(", "))]
pub(crate) struct NotReady(Vec<String>);

impl Readiness {
    /// Marks `what` as missing until `done(what)`.
    pub(crate) fn pending(&self, what: &str) {
        self.lock().insert(what.to_owned());
    }

    pub(crate) fn done(&self, what: &str) {
        let mut pending = self.lock();
        if pending.remove(what) && pending.is_empty() {
            tracing::info!("ready");
        }
    }

    /// Ok when ready, else what is missing.
    pub(crate) fn check(&self) -> Result<(), NotReady> {
        let pending = self.lock();
        if pending.is_empty() {
            Ok(())
        } else {
            Err(NotReady(pending.iter().cloned().collect()))
        }
    }

    /// `/healthz/ready`: 200 once ready, else 503 naming what is missing.
    pub(crate) fn handle(&self, call: &Call) -> Reply {
        match (&call.method, call.path.as_str()) {
            (&Method::GET, "/healthz/ready") => match self.check() {
                Ok(()) => Reply::text(StatusCode::OK, "ready\n"),
                Err(missing) => Reply::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: waiting for {missing}\n"),
                ),
            },
            _ => Reply::not_found(call),
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
            readiness.check().unwrap_err().to_string(),
            "certificates, mesh config /etc/mesh.yaml"
        );
        readiness.done("certificates");
        readiness.done("something never pending");
        assert!(readiness.check().is_err());
        readiness.done("mesh config /etc/mesh.yaml");
        assert_eq!(readiness.check(), Ok(()));
    }
}

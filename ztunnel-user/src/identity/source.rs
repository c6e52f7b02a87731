//! Where the workload certificates come from. Standalone, the built-in CA signs them on this
//! node; with istiod, Istio's CA signs a request per certificate (its client implements
//! `CertificateSource` above this module). The certificate store drives either through
//! `CertificateSource`, so that prefetching, renewal and retries are written once, and the TLS
//! verifiers trust whatever roots the source vouches for now.

use super::ca::{CertificateAuthority, WorkloadCertificate};
use super::spiffe::Identity;
use rustls::RootCertStore;
use std::error::Error;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// Why a source could not issue: the source's own error, naming the identity and the reason.
pub(crate) type IssueError = Box<dyn Error + Send + Sync + 'static>;

/// A certificate being issued.
pub(crate) type Issuing<'a> =
    Pin<Box<dyn Future<Output = Result<WorkloadCertificate, IssueError>> + Send + 'a>>;

/// Issues workload certificates, and names the roots that peers' certificates chain to.
pub(crate) trait CertificateSource: Send + Sync + 'static {
    /// A new certificate, with a new key, for `identity`.
    fn issue<'a>(&'a self, identity: &'a Identity) -> Issuing<'a>;

    /// The trust anchors of the mesh as this source knows them now (they may change as it
    /// issues).
    fn roots(&self) -> Arc<RootCertStore>;
}

/// The built-in CA, issuing certificates valid for `lifetime`.
pub(crate) struct BuiltInSource {
    ca: CertificateAuthority,
    lifetime: Duration,
}

impl BuiltInSource {
    pub(crate) fn new(ca: CertificateAuthority, lifetime: Duration) -> Self {
        BuiltInSource { ca, lifetime }
    }
}

impl CertificateSource for BuiltInSource {
    fn issue<'a>(&'a self, identity: &'a Identity) -> Issuing<'a> {
        // Signing here is a few hundred microseconds of CPU: not worth a blocking thread.
        let issued = self
            .ca
            .issue(identity, self.lifetime)
            .map_err(IssueError::from);
        Box::pin(std::future::ready(issued))
    }

    fn roots(&self) -> Arc<RootCertStore> {
        self.ca.roots()
    }
}

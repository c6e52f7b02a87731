//! Workload identities (SPIFFE), the built-in CA, the sources of certificates (the built-in CA
//! here; Istio's CA client lives above this module and implements `CertificateSource`), the
//! per-identity certificate store, and the mutual-TLS configurations of HBONE.

mod ca;
mod certs;
mod source;
mod spiffe;
pub(crate) mod tls;

pub(crate) use ca::CertificateAuthority;
pub(crate) use ca::WorkloadCertificate;
pub use ca::{ROOT_CERT_FILE, ROOT_KEY_FILE};
pub(crate) use certs::CertificateStore;
/// What `CertificateStore::certificate` fails with; only tests name it.
#[cfg(test)]
pub(crate) use certs::StoreError;
pub(crate) use source::{BuiltInSource, CertificateSource, IssueError, Issuing};
pub use spiffe::{Identity, IdentityError};

//! Workload identities (SPIFFE), the built-in CA, and the mutual-TLS configuration of HBONE.

mod ca;
mod certs;
mod spiffe;
pub mod tls;

pub use ca::{CaError, CertificateAuthority, ROOT_CERT_FILE, ROOT_KEY_FILE, WorkloadCertificate};
pub use certs::CertificateStore;
pub use spiffe::{Identity, IdentityError};

//! Workload identities (SPIFFE), the built-in CA, the sources of certificates, the
//! per-identity certificate store, and the mutual-TLS configurations of HBONE.

mod ca;
mod certs;
mod source;
mod spiffe;
pub(crate) mod tls;

pub(crate) use ca::CertificateAuthority;
pub use ca::{ROOT_CERT_FILE, ROOT_KEY_FILE};
pub(crate) use certs::CertificateStore;
pub(crate) use source::BuiltInSource;
pub use spiffe::{Identity, IdentityError};

//! What the daemon's clients of istiod (the xDS client, the CA client) share: the credentials
//! every request carries.

mod credentials;

pub use credentials::{Credentials, CredentialsError};

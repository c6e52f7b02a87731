//! What the daemon's clients of istiod (the xDS client, the CA client) share: the channel
//! (TLS, HTTP/2) and the credentials every request carries.

mod channel;
mod credentials;

pub use channel::{ChannelError, IstiodChannel, IstiodEndpoint, RootCertificates};
pub use credentials::{Credentials, CredentialsError};

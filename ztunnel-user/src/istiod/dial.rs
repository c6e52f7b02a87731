//! How a client of istiod reaches it: the clients ask a `Dial` for each call or stream, so
//! they know no transport (TLS to istiod in the daemon, a scripted server in memory in the
//! tests).

use super::{IstiodChannel, IstiodEndpoint};
use http::Uri;
use tonic::client::GrpcService;
use tonic::codegen::{Body as HttpBody, Bytes, StdError};

/// Gives a client of istiod a fresh channel each time it asks, over any channel tonic's
/// generated clients can call and stream on (with what the calls need to be `Send`).
pub trait Dial: Send + Sync + 'static {
    type Channel: GrpcService<
            tonic::body::Body,
            Error: Into<StdError>,
            ResponseBody: HttpBody<Data = Bytes, Error: Into<StdError> + Send> + Send + 'static,
            Future: Send,
        > + Send
        + 'static;

    /// A fresh channel, made into a generated client by `client` (its `with_origin`), given
    /// the origin of the requests: istiod's `https://host:port`, or none in memory.
    fn dial<Client>(
        &self,
        client: fn(Self::Channel, Uri) -> Client,
    ) -> impl Future<Output = Result<Client, StdError>> + Send;
}

/// Each dial makes a fresh channel, with istiod's roots as they are then: a rotated root file
/// is trusted from the next stream or request on. Dials are few (a stream opening, one
/// request per identity and half lifetime), so no channel is kept.
impl Dial for IstiodEndpoint {
    type Channel = IstiodChannel;

    async fn dial<Client>(
        &self,
        client: fn(IstiodChannel, Uri) -> Client,
    ) -> Result<Client, StdError> {
        Ok(client(self.channel()?, self.origin.clone()))
    }
}

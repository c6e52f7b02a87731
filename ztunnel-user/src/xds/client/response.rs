//! A `DeltaDiscoveryResponse` as the client decodes it: the fields it reads, each resource
//! left as its encoded bytes (slices of tonic's receive buffer, not copied), decoded one at a
//! time as it is converted. Decoded whole, a first push of 50,000 workloads would hold every
//! `Resource` at once (about 30 MB beside the 14.5 MB received) while the model is built
//! between them. The field numbers are envoy's; the fields not read are skipped.

use super::super::proto::envoy::service::discovery::v3::Resource;
use bytes::Bytes;
use prost::Message;

#[derive(Clone, PartialEq, Message)]
pub(super) struct DeltaResponse {
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub(super) resources: Vec<Bytes>,
    #[prost(string, tag = "4")]
    pub(super) type_url: String,
    #[prost(string, tag = "5")]
    pub(super) nonce: String,
    #[prost(string, repeated, tag = "6")]
    pub(super) removed_resources: Vec<String>,
}

/// One resource of a response, decoded.
pub(super) fn resource(bytes: Bytes) -> Result<Resource, prost::DecodeError> {
    Resource::decode(bytes)
}

//! The `DeltaAggregatedResources` call, made as tonic's generated client makes it except for
//! the requests: each is framed (gRPC's 5-byte prefix, then the message) into a buffer of its
//! own size, freed once sent. tonic encodes a stream's requests into one buffer that keeps
//! the capacity of the largest for the stream's life, and a stream's first request presents
//! every version held: 3.4 MB at 50,000 workloads, kept for as long as the stream lasts.
//! The responses are decoded by tonic, into `DeltaResponse`s.

use super::super::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use super::response::DeltaResponse;
use http::header::{CONTENT_TYPE, HeaderValue, TE};
use http::uri::PathAndQuery;
use http::{Method, Uri, Version};
use http_body_util::StreamBody;
use hyper::body::Frame;
use prost::Message;
use tokio::sync::mpsc::UnboundedReceiver;
use tonic::client::GrpcService;
use tonic::codec::{Codec, Streaming};
use tonic::codegen::tokio_stream::StreamExt;
use tonic::codegen::tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::codegen::{Body as HttpBody, Bytes, StdError};
use tonic::metadata::MetadataMap;
use tonic_prost::ProstCodec;

const PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// A channel to istiod and the origin of its requests (none in memory).
pub(super) struct Ads<C> {
    channel: C,
    origin: Uri,
}

impl<C> Ads<C>
where
    C: GrpcService<tonic::body::Body, Error: Into<StdError>>,
    C::ResponseBody: HttpBody<Data = Bytes, Error: Into<StdError> + Send> + Send + 'static,
{
    pub(super) fn new(channel: C, origin: Uri) -> Ads<C> {
        Ads { channel, origin }
    }

    /// Opens the stream with the headers `metadata`, sending each request `requests` gives
    /// until it ends; returns istiod's responses, each at most `max_response` bytes. A
    /// failure of the channel comes as a status whose source is the channel's error, as from
    /// the generated client.
    pub(super) async fn open(
        mut self,
        metadata: MetadataMap,
        requests: UnboundedReceiver<DeltaDiscoveryRequest>,
        max_response: usize,
    ) -> Result<Streaming<DeltaResponse>, tonic::Status> {
        let frames = UnboundedReceiverStream::new(requests).map(|request| framed(&request));
        let mut request = http::Request::new(tonic::body::Body::new(StreamBody::new(frames)));
        *request.method_mut() = Method::POST;
        *request.version_mut() = Version::HTTP_2;
        *request.uri_mut() = self.uri();
        let headers = request.headers_mut();
        headers.extend(metadata.into_headers());
        headers.insert(TE, HeaderValue::from_static("trailers"));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));

        let channel_failed = |err: C::Error| tonic::Status::from_error(err.into());
        std::future::poll_fn(|cx| self.channel.poll_ready(cx))
            .await
            .map_err(channel_failed)?;
        let response = self.channel.call(request).await.map_err(channel_failed)?;
        // A refusal comes in the headers alone (a "trailers-only" response).
        if let Some(status) = tonic::Status::from_header_map(response.headers())
            && status.code() != tonic::Code::Ok
        {
            return Err(status);
        }
        let status = response.status();
        let decoder = ProstCodec::<DeltaDiscoveryRequest, DeltaResponse>::default().decoder();
        Ok(Streaming::new_response(
            decoder,
            response.into_body(),
            status,
            None,
            Some(max_response),
        ))
    }

    /// The origin with the call's path, as tonic forms it.
    fn uri(&self) -> Uri {
        let mut parts = self.origin.clone().into_parts();
        let path = match &parts.path_and_query {
            Some(prefix) if prefix != "/" => format!("{}{PATH}", prefix.path()),
            _ => PATH.to_owned(),
        };
        parts.path_and_query = Some(PathAndQuery::try_from(path).expect("a valid path"));
        Uri::from_parts(parts).expect("a path alone is a valid URI")
    }
}

/// A request gRPC cannot frame: its length prefix has 32 bits. (Far beyond any mesh: the
/// largest request, the versions of 50,000 workloads, is 3.4 MB.) The stream fails with it.
#[derive(Debug, thiserror::Error)]
#[error("an xDS request of {0} bytes is over gRPC's 4 GiB message limit")]
struct RequestTooLarge(usize);

/// `request` as a gRPC message: not compressed, its length, then its bytes.
fn framed(request: &DeltaDiscoveryRequest) -> Result<Frame<Bytes>, RequestTooLarge> {
    let len = request.encoded_len();
    let prefix = u32::try_from(len).map_err(|_| RequestTooLarge(len))?;
    let mut frame = Vec::with_capacity(5 + len);
    frame.push(0);
    frame.extend_from_slice(&prefix.to_be_bytes());
    request
        .encode(&mut frame)
        .expect("a Vec sized for the message takes it");
    Ok(Frame::data(Bytes::from(frame)))
}

//! The HBONE server side, the wire only: the HTTP/2 handshake over an accepted mTLS
//! connection, then each CONNECT stream handed to the caller's handler as an `Incoming` request,
//! which the handler checks (`target`, `client`) and answers with the contract's status codes
//! (`accept`: 200, `refuse`: 400 or 503, `deny`: 401, `fail`: 503). GOAWAY on shutdown.

use super::OpenCounts;
use crate::relay::h2::io_error;
use bytes::Bytes;
use h2::server::{Connection, SendResponse};
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use ztunnel_common::ports;

/// The HTTP/2 handshake of an HBONE connection over its established mTLS stream.
pub(crate) async fn handshake<IO>(io: IO) -> Result<Connection<IO, Bytes>, h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    h2::server::Builder::new()
        .initial_window_size(super::INITIAL_STREAM_WINDOW)
        .initial_connection_window_size(super::INITIAL_CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME_SIZE)
        .max_concurrent_streams(super::SERVER_MAX_CONCURRENT_STREAMS)
        .handshake::<_, Bytes>(io)
        .await
}

/// Serves the CONNECT streams of one HBONE connection until the client closes it (or the
/// connection fails: the error is returned for the caller to log with what it knows), each
/// stream on a task of its own running what `serve` makes of it. After `shutdown` turns true:
/// GOAWAY, and the open streams may finish. The connection and its streams are counted in
/// `counts` while they are open.
///
/// An async block working on its captures in place, not an async fn, which would keep a
/// second copy of the connection (h2's state, 2.4 KB) for as long as it is open.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would store the connection twice"
)]
pub(crate) fn serve_connection<IO, Serve, Served>(
    mut connection: Connection<IO, Bytes>,
    mut shutdown: watch::Receiver<bool>,
    counts: Arc<OpenCounts>,
    serve: Serve,
) -> impl Future<Output = Result<(), h2::Error>> + Send
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Serve: Fn(Incoming) -> Served + Send,
    Served: Future<Output = ()> + Send + 'static,
{
    async move {
        OpenCounts::add(&counts.connections);
        let _open = Counted(&counts.connections);
        let mut draining = false;
        loop {
            tokio::select! {
                stream = connection.accept() => match stream {
                    Some(Ok((request, respond))) => {
                        let served = serve(Incoming { request, respond });
                        tokio::spawn(CountedStream::new(counts.clone(), served));
                    }
                    Some(Err(err)) => return Err(err),
                    None => return Ok(()),
                },
                _ = shutdown.wait_for(|stop| *stop), if !draining => {
                    connection.graceful_shutdown();
                    draining = true;
                }
            }
        }
    }
}

/// Takes one off a count when dropped.
struct Counted<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        OpenCounts::remove(self.0);
    }
}

pin_project! {
    /// A stream's task, counted while it lasts. Written out rather than as an async block,
    /// which would keep the served future twice (as its capture and as what it awaits).
    struct CountedStream<Served> {
        counts: Arc<OpenCounts>,
        #[pin]
        served: Served,
    }

    impl<Served> PinnedDrop for CountedStream<Served> {
        fn drop(this: Pin<&mut Self>) {
            OpenCounts::remove(&this.counts.streams);
        }
    }
}

impl<Served> CountedStream<Served> {
    fn new(counts: Arc<OpenCounts>, served: Served) -> CountedStream<Served> {
        OpenCounts::add(&counts.streams);
        CountedStream { counts, served }
    }
}

impl<Served: Future<Output = ()>> Future for CountedStream<Served> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.project().served.poll(cx)
    }
}

/// A CONNECT request, not answered yet.
pub(crate) struct Incoming {
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
}

impl Incoming {
    /// Where the request asks to go, if it may: `local` is where its connection arrived.
    pub(crate) fn target(&self, local: SocketAddr) -> Result<SocketAddr, Refusal> {
        target_of(&self.request, local)
    }

    /// The original client, from `forwarded`, else `peer` (the connection's).
    pub(crate) fn client(&self, peer: SocketAddr) -> SocketAddr {
        original_client(&self.request, peer)
    }

    /// 200: the stream carries the connection from now on.
    pub(crate) fn accept(mut self) -> io::Result<(SendStream<Bytes>, RecvStream)> {
        let send = self
            .respond
            .send_response(Response::new(()), false)
            .map_err(io_error)?;
        Ok((send, self.request.into_body()))
    }

    /// The request is malformed or asks for what it may not.
    pub(crate) fn refuse(self, refusal: &Refusal) {
        self.answer(refusal.status());
    }

    /// 401: authorization denied it.
    pub(crate) fn deny(self) {
        self.answer(StatusCode::UNAUTHORIZED);
    }

    /// 503: its target cannot be reached.
    pub(crate) fn fail(self) {
        self.answer(StatusCode::SERVICE_UNAVAILABLE);
    }

    fn answer(mut self, status: StatusCode) {
        let mut response = Response::new(());
        *response.status_mut() = status;
        if let Err(err) = self.respond.send_response(response, true) {
            tracing::debug!(%err, "client went away before the HBONE response");
        }
    }
}

/// Why a CONNECT request is refused, and with which status.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("method {0} is not CONNECT")]
    NotConnect(Method),
    #[error("authority {0:?} is not an IP:port")]
    BadAuthority(String),
    #[error("authority {target} is not the address the connection arrived on ({local})")]
    WrongAddress {
        target: SocketAddr,
        local: SocketAddr,
    },
    #[error("port {0} belongs to the proxy")]
    ProxyPort(u16),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::ProxyPort(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Where a CONNECT request asks to go, if it may.
pub fn target_of<B>(request: &Request<B>, local: SocketAddr) -> Result<SocketAddr, Refusal> {
    if request.method() != Method::CONNECT {
        return Err(Refusal::NotConnect(request.method().clone()));
    }
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let target: SocketAddr = authority
        .parse()
        .map_err(|_| Refusal::BadAuthority(authority.clone()))?;
    if target.ip() != local.ip() {
        return Err(Refusal::WrongAddress { target, local });
    }
    if ports::is_pod_port(target.port()) {
        return Err(Refusal::ProxyPort(target.port()));
    }
    Ok(target)
}

/// The original client from the `forwarded: for="ip:port"` header, else the TCP peer.
pub fn original_client<B>(request: &Request<B>, peer: SocketAddr) -> SocketAddr {
    request
        .headers()
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(';')
                .find_map(|part| part.trim().strip_prefix("for="))
        })
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, authority: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(authority)
            .body(())
            .unwrap()
    }

    #[test]
    fn status_codes_of_the_contract() {
        let local: SocketAddr = "10.244.2.2:15008".parse().unwrap();
        assert_eq!(
            target_of(&request(Method::CONNECT, "10.244.2.2:8080"), local),
            Ok("10.244.2.2:8080".parse().unwrap())
        );
        let refused = |r: Request<()>| target_of(&r, local).unwrap_err().status();
        assert_eq!(
            refused(request(Method::GET, "http://10.244.2.2:8080/")),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            refused(request(Method::CONNECT, "10.244.2.2")),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            refused(request(Method::CONNECT, "10.244.2.9:8080")),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            refused(request(Method::CONNECT, "10.244.2.2:15006")),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn the_original_client_comes_from_forwarded() {
        let peer: SocketAddr = "10.244.1.2:40000".parse().unwrap();
        let mut r = request(Method::CONNECT, "10.244.2.2:8080");
        assert_eq!(original_client(&r, peer), peer);
        r.headers_mut()
            .insert("forwarded", "for=\"10.244.1.2:51234\"".parse().unwrap());
        assert_eq!(
            original_client(&r, peer),
            "10.244.1.2:51234".parse().unwrap()
        );
    }
}

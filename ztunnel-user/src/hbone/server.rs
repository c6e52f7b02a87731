//! The HBONE server side: one HTTP/2 connection per mTLS connection accepted on a pod's 15008
//! listener; each CONNECT stream is authorized (401 if denied) and delivered to the app in
//! that pod.

use super::bridge::h2_error;
use crate::api::Direction;
use crate::connections::Subject;
use crate::identity::Identity;
use crate::metrics::{Observed, Reporter, TrafficLabels};
use crate::proxy::carry::{self, Carriage, Connected};
use crate::proxy::{PodProxy, ProxyContext, describe, sockets::connect_from};
use bytes::Bytes;
use h2::server::{Connection, SendResponse};
use http::{Method, Request, Response, StatusCode};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use ztunnel_common::ports;

/// Where an HBONE connection came from and arrived.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The TCP peer: the source pod's address, since the client connects from its netns.
    pub addr: SocketAddr,
    /// The local end: the destination pod's address and 15008.
    pub local: SocketAddr,
    /// The client's, from its certificate; shared with its streams' authorization subjects.
    pub identity: Arc<Identity>,
}

/// The HTTP/2 handshake of an HBONE connection over its established mTLS stream.
pub async fn handshake<IO>(io: IO) -> Result<Connection<IO, Bytes>, h2::Error>
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

/// Serves the CONNECT streams of one HBONE connection until the client closes it. An async
/// block working on its captures in place, not an async fn, which would keep a second copy
/// of the connection (h2's state, 2.4 KB) for as long as it is open.
pub fn serve_connection<IO>(
    mut connection: Connection<IO, Bytes>,
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    peer: Arc<Peer>,
) -> impl Future<Output = ()> + Send
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut shutdown = ctx.shutdown.clone();
    async move {
        let _open = ctx.hbone_connections.open();
        let mut draining = false;
        loop {
            tokio::select! {
                stream = connection.accept() => match stream {
                    Some(Ok((request, respond))) => {
                        tokio::spawn(serve_stream(ctx.clone(), pod.clone(), peer.clone(), request, respond));
                    }
                    Some(Err(err)) => {
                        tracing::debug!(pod = %pod.label, peer = %peer.addr, %err, "HBONE connection ended");
                        break;
                    }
                    None => break,
                },
                // On shutdown: GOAWAY, then keep serving the open streams until they end.
                _ = shutdown.wait_for(|stop| *stop), if !draining => {
                    connection.graceful_shutdown();
                    draining = true;
                }
            }
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
    pub fn status(&self) -> StatusCode {
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
    if ports::is_proxy_port(target.port()) {
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

/// Where the delivery to the app comes from: the peer's address, with the original client's
/// port when the peer says it is that client (a waypoint's or gateway's peer address is not
/// the client's, so the port says nothing there, and without a `forwarded` port there is none).
fn delivery_source(client: SocketAddr, peer: SocketAddr) -> SocketAddr {
    let port = if client != peer && client.ip() == peer.ip() {
        client.port()
    } else {
        0
    };
    SocketAddr::new(peer.ip(), port)
}

/// One stream's whole life, counted while it lasts. The set-up is made and boxed before the
/// async block, so that the block captures only the context and the box: an async block
/// keeps every value it captures for as long as it lives.
fn serve_stream(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    peer: Arc<Peer>,
    request: Request<h2::RecvStream>,
    respond: SendResponse<Bytes>,
) -> impl Future<Output = ()> + Send {
    let set_up = Box::pin(accept_stream(ctx.clone(), pod, peer, request, respond));
    async move {
        let _stream = ctx.hbone_streams.open();
        carry::serve(set_up).await;
    }
}

/// Checks, authorizes and delivers one CONNECT request, answering it; `None` if it was
/// refused or could not be delivered.
async fn accept_stream(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodProxy>,
    peer: Arc<Peer>,
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Option<Carriage> {
    let (ctx, pod, peer) = (&ctx, &pod, &peer);
    let target = match target_of(&request, peer.local) {
        Ok(target) => target,
        Err(refusal) => {
            tracing::info!(pod = %pod.label, peer = %peer.addr, identity = %peer.identity, %refusal, "HBONE request refused");
            reply(&mut respond, refusal.status());
            return None;
        }
    };
    let client = original_client(&request, peer.addr);
    let config = ctx.mesh.current();
    let labels = TrafficLabels::new(&Observed {
        reporter: Reporter::Destination,
        source: describe(&config, peer.addr.ip(), None),
        source_identity: Some(&peer.identity),
        destination: describe(&config, target.ip(), Some(pod)),
        destination_identity: Some(&pod.identity),
        service: None,
        mutual_tls: true,
    });
    let mut tracked =
        ctx.connections
            .record(Direction::Inbound, &pod.label, client, target, labels);
    let subject = Subject {
        namespace: pod.namespace.clone(),
        source: peer.addr.ip(),
        destination: target,
        identity: Some(peer.identity.clone()),
    };
    if let Err(denial) = ctx.authorize(&config, pod, &mut tracked, subject) {
        reply(&mut respond, StatusCode::UNAUTHORIZED);
        tracked.denied(&denial);
        return None;
    }
    // The 200 goes out only once the app accepted: the client learns of a refusal.
    let source = delivery_source(client, peer.addr);
    let app = match connect_from(ctx, &pod.netns, Some(source), target).await {
        Ok(app) => app,
        Err(err) => {
            tracing::info!(pod = %pod.label, %client, %target, %err, "delivery to the app failed");
            reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            tracked.failed(&err);
            return None;
        }
    };
    let delivered = respond
        .send_response(Response::new(()), false)
        .map_err(h2_error)
        .map(|send| Connected::to_app(app, send, request.into_body()));
    Carriage::after(tracked, delivered)
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Err(err) = respond.send_response(response, true) {
        tracing::debug!(%err, "client went away before the HBONE response");
    }
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

    #[test]
    fn delivery_keeps_the_port_of_a_client_that_is_the_peer() {
        let peer: SocketAddr = "10.0.1.2:40000".parse().unwrap();
        let client: SocketAddr = "10.0.1.2:51234".parse().unwrap();
        assert_eq!(delivery_source(client, peer), client);
        // No `forwarded` port: the client is the peer's connection, whose port says nothing.
        assert_eq!(delivery_source(peer, peer), "10.0.1.2:0".parse().unwrap());
        // Through a waypoint: the delivery comes from the waypoint, on a port of its own.
        let elsewhere: SocketAddr = "10.0.9.9:51234".parse().unwrap();
        assert_eq!(
            delivery_source(elsewhere, peer),
            "10.0.1.2:0".parse().unwrap()
        );
    }
}

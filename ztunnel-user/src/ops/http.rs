//! The small HTTP/1.1 plumbing behind the admin API, the metrics and the readiness endpoints:
//! serving a handler on a TCP listener, and the CLI's one-shot requests.
//!
//! None of these endpoints authenticates its clients, so each bounds what they can hold:
//! connections at a time (per source address and overall, and charged to the node's
//! descriptor budget), and how long a client may take to send a request's headers, or to
//! start its next request on a kept-alive connection (hyper's header-read timeout, which
//! needs a timer).

use crate::proxy::admission::{CapHit, Share, SourceCaps};
use crate::telemetry::refusals::{Refusal, Refusals};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Bodies of requests the endpoints accept (they take parameters in the query only).
const MAX_REQUEST_BODY: usize = 64 * 1024;
/// Connections an endpoint serves at a time (scrapers, probes and operators need a few).
const MAX_CONNECTIONS: usize = 256;
const MAX_CONNECTIONS_PER_SOURCE: usize = 16;

/// A request as the handlers see it: who sent it, method, path, query and headers.
#[derive(Debug)]
pub(crate) struct Call {
    pub peer: SocketAddr,
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: http::HeaderMap,
}

impl Call {
    /// The value of `name` in the query (`a=1&b=2`), if present, percent-decoded (`%2C`
    /// and friends, as curl or a browser may encode a log filter).
    pub(crate) fn param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find_map(|(key, value)| (key == name).then(|| value.into_owned()))
    }
}

/// What a handler answers.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub(crate) fn json(value: &impl serde::Serialize) -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type: "application/json",
            body: serde_json::to_string_pretty(value).expect("API values serialize"),
        }
    }

    pub(crate) fn not_found(call: &Call) -> Reply {
        Reply::text(
            StatusCode::NOT_FOUND,
            format!("no {} {} here\n", call.method, call.path),
        )
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {source}")]
pub(crate) struct BindError {
    pub addr: SocketAddr,
    pub what: &'static str,
    pub source: std::io::Error,
}

/// A listener whose accepted connections have the daemon's TCP options (they inherit them).
pub(crate) async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, BindError> {
    let listener = TcpListener::bind(addr).await;
    listener
        .and_then(|listener| crate::host::tcp::configure(&listener).map(|()| listener))
        .map_err(|source| BindError { addr, what, source })
}

/// What admits the connections of one endpoint.
pub(crate) struct Admittance {
    /// The endpoint, for the logs.
    pub name: &'static str,
    /// The node's share of the descriptor budget.
    pub share: Arc<Share>,
    pub refusals: Arc<Refusals>,
    /// How long a client may take to send a request's headers.
    pub header_timeout: Duration,
}

/// Serves `handler` on `listener` until the task is dropped.
pub(crate) async fn serve<Handler, Handled>(
    listener: TcpListener,
    admittance: Admittance,
    handler: Handler,
) where
    Handler: Fn(Call) -> Handled + Send + Sync + 'static,
    Handled: Future<Output = Reply> + Send + 'static,
{
    let handler = Arc::new(handler);
    let caps = SourceCaps::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(admittance.header_timeout);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(endpoint = admittance.name, %err, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admitted = caps
            .enter(peer.ip())
            .map_err(|cap| match cap {
                CapHit::Total => Refusal::HttpConnections,
                CapHit::PerSource => Refusal::HttpConnectionsPerSource,
            })
            .and_then(|entered| Ok((entered, admittance.share.admit()?)));
        let admitted = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => {
                admittance.refusals.refuse(refusal, admittance.name, peer);
                continue;
            }
        };
        let handler = handler.clone();
        let connection =
            http.serve_connection(
                TokioIo::new(stream),
                hyper::service::service_fn(move |request: Request<Incoming>| {
                    let handler = handler.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(answer(request, peer, &*handler).await)
                    }
                }),
            );
        tokio::spawn(async move {
            let _admitted = admitted;
            if let Err(err) = connection.await {
                tracing::debug!(%peer, %err, "HTTP connection ended with an error");
            }
        });
    }
}

async fn answer<Handler, Handled>(
    request: Request<Incoming>,
    peer: SocketAddr,
    handler: &Handler,
) -> Response<Full<Bytes>>
where
    Handler: Fn(Call) -> Handled,
    Handled: Future<Output = Reply>,
{
    let (parts, body) = request.into_parts();
    // Drain a (small) body so the connection can be reused; refuse a large one.
    let reply = match http_body_util::Limited::new(body, MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(_) => {
            handler(Call {
                peer,
                method: parts.method,
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().unwrap_or_default().to_owned(),
                headers: parts.headers,
            })
            .await
        }
        Err(_) => Reply::text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"),
    };
    Response::builder()
        .status(reply.status)
        .header(http::header::CONTENT_TYPE, reply.content_type)
        .body(Full::new(Bytes::from(reply.body)))
        .expect("a valid response")
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(
        "cannot reach the ztunnel admin API at {addr}: {source} (is `ztunnel run` running here, with --admin-addr {addr}?)"
    )]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the ztunnel admin API at {addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("talking to the ztunnel admin API at {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("the ztunnel admin API at {addr} answered {status} for {path}: {body}")]
    Status {
        addr: SocketAddr,
        path: String,
        status: StatusCode,
        body: String,
    },
}

/// One request to `addr`, answered within `timeout`; the body of a 2xx answer.
pub(crate) async fn request(
    addr: SocketAddr,
    method: Method,
    path_and_query: &str,
    timeout: Duration,
) -> Result<String, RequestError> {
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| RequestError::Unreachable { addr, source })?;
        let http = |source| RequestError::Http { addr, source };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, addr.to_string())
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            return Err(RequestError::Status {
                addr,
                path: path_and_query.to_owned(),
                status,
                body: body.trim().to_owned(),
            });
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| RequestError::Timeout { addr, timeout })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Limits;
    use crate::proxy::admission::Admission;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn admittance(header_timeout: Duration) -> Admittance {
        let settings = crate::settings::parse(&["--node", "n"]);
        Admittance {
            name: "test",
            share: Admission::new(Limits::new(1 << 20, &settings)).node_share(),
            refusals: Default::default(),
            header_timeout,
        }
    }

    async fn hello_server(header_timeout: Duration) -> (SocketAddr, Arc<Refusals>) {
        let listener = bind("127.0.0.1:0".parse().unwrap(), "test").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admittance = admittance(header_timeout);
        let refusals = admittance.refusals.clone();
        tokio::spawn(serve(listener, admittance, |_: Call| async move {
            Reply::text(StatusCode::OK, "hello")
        }));
        (addr, refusals)
    }

    /// Reads until the server closes the connection, or fails after `limit`.
    async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
        let mut received = Vec::new();
        tokio::time::timeout(limit, stream.read_to_end(&mut received))
            .await
            .expect("the server closed the connection in time")
            .expect("read");
        received
    }

    #[tokio::test]
    async fn a_silent_client_and_an_idle_kept_alive_one_are_closed() {
        let (addr, _) = hello_server(Duration::from_millis(300)).await;
        // Sends nothing at all.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        closed_within(&mut silent, Duration::from_secs(3)).await;
        // One request, answered, then nothing: the wait for the next request is bounded too.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let answered = closed_within(&mut idle, Duration::from_secs(3)).await;
        assert!(answered.starts_with(b"HTTP/1.1 200"), "{answered:?}");
    }

    #[tokio::test]
    async fn one_source_holds_a_bounded_number_of_connections() {
        let (addr, refusals) = hello_server(Duration::from_secs(30)).await;
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS_PER_SOURCE {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // The next is accepted by the kernel, then closed at once by the server.
        let mut over = TcpStream::connect(addr).await.unwrap();
        closed_within(&mut over, Duration::from_secs(3)).await;
        let refused: Vec<_> = refusals.counts().filter(|(_, count)| *count > 0).collect();
        assert_eq!(refused, [("http_connections_per_source", 1)]);
        // A connection that goes away makes room.
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let body = request(addr, Method::GET, "/", Duration::from_secs(5)).await;
        assert_eq!(body.unwrap(), "hello");
    }

    #[tokio::test]
    async fn serves_a_handler_and_the_client_reads_it() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), "test").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            admittance(Duration::from_secs(10)),
            |call: Call| async move {
                match (&call.method, call.path.as_str()) {
                    (&Method::GET, "/hello") => Reply::text(
                        StatusCode::OK,
                        format!("hello {}", call.param("name").unwrap_or_default()),
                    ),
                    _ => Reply::text(StatusCode::NOT_FOUND, "nothing here"),
                }
            },
        ));
        let timeout = Duration::from_secs(5);
        let body = request(addr, Method::GET, "/hello?x=1&name=ztunnel", timeout)
            .await
            .unwrap();
        assert_eq!(body, "hello ztunnel");
        let encoded = "/hello?name=info%2Cztunnel_user%3A%3Aproxy%3Ddebug";
        let body = request(addr, Method::GET, encoded, timeout).await.unwrap();
        assert_eq!(body, "hello info,ztunnel_user::proxy=debug");
        let err = request(addr, Method::GET, "/nope", timeout)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                RequestError::Status {
                    status: StatusCode::NOT_FOUND,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_closed_port_is_a_clear_error() {
        // Bind and drop, so nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = request(addr, Method::GET, "/", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("is `ztunnel run` running"),
            "{err}"
        );
    }
}

//! The small HTTP/1.1 plumbing behind the admin API, the metrics and the readiness endpoints:
//! serving a handler on a TCP listener, and the CLI's one-shot requests.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Bodies of requests the endpoints accept (they take parameters in the query only).
const MAX_REQUEST_BODY: usize = 64 * 1024;

/// A request as the handlers see it: method, path, query, and nothing they do not need.
#[derive(Debug)]
pub(crate) struct Call {
    pub method: Method,
    pub path: String,
    pub query: String,
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

pub(crate) async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, what, source })
}

/// Serves `handler` on `listener` until the task is dropped.
pub(crate) async fn serve<Handler, Handled>(listener: TcpListener, handler: Handler)
where
    Handler: Fn(Call) -> Handled + Send + Sync + 'static,
    Handled: Future<Output = Reply> + Send + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(%err, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let handler = handler.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(request, &*handler).await) }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%err, "HTTP connection ended with an error");
            }
        });
    }
}

async fn answer<Handler, Handled>(
    request: Request<Incoming>,
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
                method: parts.method,
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().unwrap_or_default().to_owned(),
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

    #[tokio::test]
    async fn serves_a_handler_and_the_client_reads_it() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), "test").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, |call: Call| async move {
            match (&call.method, call.path.as_str()) {
                (&Method::GET, "/hello") => Reply::text(
                    StatusCode::OK,
                    format!("hello {}", call.param("name").unwrap_or_default()),
                ),
                _ => Reply::text(StatusCode::NOT_FOUND, "nothing here"),
            }
        }));
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

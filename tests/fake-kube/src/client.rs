//! A small async client for tests and the lab: the writes a cluster's users make (namespaces,
//! pods, labels) and raw reads and watches, over HTTP to the server, so they travel the same
//! wire as the daemon's own requests.

use bytes::{Bytes, BytesMut};
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::net::SocketAddr;
use tokio::net::TcpStream;

/// A watch event or a response longer than this is refused (a real pod is a few kB).
const MAX_EVENT: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {address}: {source}")]
    Connect {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] http::Error),
    #[error("the server's answer is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("a watch event is longer than {MAX_EVENT} bytes")]
    TooLong,
    /// The server refused: its `Status`.
    #[error("{code} {reason}: {message}")]
    Status {
        code: u16,
        reason: String,
        message: String,
    },
}

impl ClientError {
    /// The HTTP code of a refusal, if it was one.
    pub fn code(&self) -> Option<u16> {
        match self {
            Self::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A client of one server; each request has a connection of its own.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    address: SocketAddr,
}

impl Client {
    pub fn new(address: SocketAddr) -> Self {
        Self { address }
    }

    /// Sends a request, JSON in (when `body` is given) and out; a non-2xx answer is an error.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let response = self.send(method, path, content_type, body).await?;
        let status = response.status();
        let bytes = http_body_util::Limited::new(response.into_body(), MAX_EVENT)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => ClientError::Http(*e),
                Err(_) => ClientError::TooLong,
            })?
            .to_bytes();
        if status.is_success() {
            Ok(serde_json::from_slice(&bytes)?)
        } else {
            Err(refusal(status.as_u16(), &bytes))
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<&Value>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let tcp =
            TcpStream::connect(self.address)
                .await
                .map_err(|source| ClientError::Connect {
                    address: self.address,
                    source,
                })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        // Drives the connection; it ends when the response has been read (or dropped).
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.address.to_string())
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let bytes = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        Ok(sender.send_request(request.body(Full::new(bytes))?).await?)
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.request(Method::GET, path, "", None).await
    }

    /// Merge-patches the object at `path`.
    pub async fn merge_patch(&self, path: &str, patch: &Value) -> Result<Value, ClientError> {
        self.request(
            Method::PATCH,
            path,
            "application/merge-patch+json",
            Some(patch),
        )
        .await
    }

    pub async fn create_namespace(
        &self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<Value, ClientError> {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        let namespace = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name, "labels": labels },
        });
        self.request(
            Method::POST,
            "/api/v1/namespaces",
            "application/json",
            Some(&namespace),
        )
        .await
    }

    /// Sets (`Some`) or removes (`None`) a namespace's label, as `kubectl label` does.
    pub async fn label_namespace(
        &self,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<Value, ClientError> {
        let patch = json!({ "metadata": { "labels": { key: value } } });
        self.merge_patch(&format!("/api/v1/namespaces/{name}"), &patch)
            .await
    }

    pub async fn delete_namespace(&self, name: &str) -> Result<Value, ClientError> {
        self.request(
            Method::DELETE,
            &format!("/api/v1/namespaces/{name}"),
            "",
            None,
        )
        .await
    }

    /// Creates a pod in the namespace its metadata names (`pod` builds one).
    pub async fn create_pod(&self, pod: &Value) -> Result<Value, ClientError> {
        let namespace = pod
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let path = format!("/api/v1/namespaces/{namespace}/pods");
        self.request(Method::POST, &path, "application/json", Some(pod))
            .await
    }

    pub async fn get_pod(&self, namespace: &str, name: &str) -> Result<Value, ClientError> {
        self.get(&format!("/api/v1/namespaces/{namespace}/pods/{name}"))
            .await
    }

    /// Sets (`Some`) or removes (`None`) a pod's annotation.
    pub async fn annotate_pod(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<Value, ClientError> {
        let patch = json!({ "metadata": { "annotations": { key: value } } });
        self.merge_patch(
            &format!("/api/v1/namespaces/{namespace}/pods/{name}"),
            &patch,
        )
        .await
    }

    pub async fn delete_pod(&self, namespace: &str, name: &str) -> Result<Value, ClientError> {
        let path = format!("/api/v1/namespaces/{namespace}/pods/{name}");
        self.request(Method::DELETE, &path, "", None).await
    }

    /// Starts a watch: `path` is the collection's, with its query (`?watch=true&…`).
    pub async fn watch(&self, path: &str) -> Result<WatchStream, ClientError> {
        let response = self.send(Method::GET, path, "", None).await?;
        if !response.status().is_success() {
            let code = response.status().as_u16();
            let bytes = response.into_body().collect().await?.to_bytes();
            return Err(refusal(code, &bytes));
        }
        Ok(WatchStream {
            body: response.into_body(),
            buffer: BytesMut::new(),
        })
    }
}

/// A refusal's error, from its `Status` body (what is readable of it).
fn refusal(code: u16, body: &[u8]) -> ClientError {
    let status: Value = serde_json::from_slice(body).unwrap_or_default();
    let text = |field: &str| {
        status
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    ClientError::Status {
        code,
        reason: text("reason"),
        message: text("message"),
    }
}

/// A pod as the lab's are: on a node, with an IP and fixed uid (which names its cgroup).
pub fn pod(namespace: &str, name: &str, uid: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "uid": uid },
        "spec": { "nodeName": node, "containers": [{ "name": "app", "image": "lab" }] },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] },
    })
}

/// A watch's events, one JSON object (`{"type":…,"object":…}`) at a time.
pub struct WatchStream {
    body: Incoming,
    buffer: BytesMut,
}

impl WatchStream {
    /// The next event; `None` once the server has ended the watch.
    pub async fn next(&mut self) -> Result<Option<Value>, ClientError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line = self.buffer.split_to(end + 1);
                return Ok(Some(serde_json::from_slice(&line[..end])?));
            }
            if self.buffer.len() > MAX_EVENT {
                return Err(ClientError::TooLong);
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                None if self.buffer.is_empty() => return Ok(None),
                None => {
                    let rest = self.buffer.split();
                    return Ok(Some(serde_json::from_slice(&rest)?));
                }
            }
        }
    }
}

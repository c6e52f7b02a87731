//! Serves the local control API (see `api`) on a Unix socket: the CNI plugin's enrollments
//! (refused while the daemon is not ready), and status for the CLI and the lab's tests.

use super::readiness::Readiness;
use crate::api::{CertificateInfo, CounterValue, Request, Response, Status};
use crate::kube::Kubernetes;
use crate::pods::Pods;
use crate::proxy::ProxyContext;
use crate::xds::client::XdsHandle;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;

/// Requests are one line; anything longer is not ours.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a refused client has to send its request before it is answered anyway.
const REFUSED_READ: std::time::Duration = std::time::Duration::from_secs(2);

pub(crate) struct ApiServer {
    pub(crate) pods: Arc<Mutex<Pods>>,
    /// With `--enrollment kubernetes`: the API whose labels say which pods are in the mesh.
    pub(crate) kubernetes: Option<Kubernetes>,
    pub(crate) ctx: Arc<ProxyContext>,
    pub(crate) readiness: Arc<Readiness>,
    /// The xDS client's view, when it runs.
    pub(crate) xds: Option<XdsHandle>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on the API socket {path}: {source}")]
pub(crate) struct BindError {
    path: PathBuf,
    source: std::io::Error,
}

/// Binds the socket (replacing a stale one), readable and writable by root only from the
/// moment it exists: the umask covers the instant between `bind` and `chmod`.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, BindError> {
    use nix::sys::stat::{Mode, umask};
    use std::os::unix::fs::PermissionsExt;
    let err = |source| BindError {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let previous = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(previous);
    let listener = bound.map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Why an API client is turned away.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("cannot tell who the API client is: {0}")]
    Unknown(std::io::Error),
    #[error("only root may use the ztunnel API; the client runs as uid {0}")]
    NotRoot(u32),
}

/// Only root (or the daemon's own user) may enroll and release pods: the socket's mode
/// says so too, but a loosened mode or a bind mount into a pod must not open it.
fn may_use(stream: &UnixStream) -> Result<(), Refusal> {
    let uid = stream.peer_cred().map_err(Refusal::Unknown)?.uid();
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        Ok(())
    } else {
        Err(Refusal::NotRoot(uid))
    }
}

/// Writes `response` as one line.
async fn reply(mut stream: UnixStream, response: Response) {
    let mut out = serde_json::to_vec(&response).expect("responses always serialize");
    out.push(b'\n');
    if let Err(err) = stream.write_all(&out).await {
        tracing::debug!(%err, "API client went away before the response");
    }
}

/// The request line, at most `MAX_REQUEST` bytes.
async fn read_request(stream: &mut UnixStream) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(stream.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    Ok(line)
}

/// Tells a client that may not use the API why, once it has sent its request (or after
/// `REFUSED_READ`): closing before reading it would fail the client's write (EPIPE) before it
/// could read the reason.
async fn refuse(mut stream: UnixStream, refused: Refusal) {
    let _ = tokio::time::timeout(REFUSED_READ, read_request(&mut stream)).await;
    let message = refused.to_string();
    reply(stream, Response::Error { message }).await;
}

impl ApiServer {
    pub(crate) async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => match may_use(&stream) {
                    Ok(()) => {
                        tokio::spawn(self.clone().answer(stream));
                    }
                    Err(refused) => {
                        tracing::warn!(%refused, "API request refused");
                        tokio::spawn(refuse(stream, refused));
                    }
                },
                Err(err) => {
                    tracing::warn!(%err, "API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn answer(self: Arc<Self>, mut stream: UnixStream) {
        let response = match read_request(&mut stream).await {
            Ok(line) => match serde_json::from_str::<Request>(&line) {
                Ok(request) => self.handle(request).await,
                Err(err) => Response::Error {
                    message: format!("malformed request: {err}"),
                },
            },
            Err(err) => Response::Error {
                message: format!("reading request: {err}"),
            },
        };
        reply(stream, response).await;
    }

    /// The enrolled pods, certificates, kernel counters and the mesh config's status.
    pub(crate) async fn status(&self) -> Status {
        Status {
            node: self.ctx.settings.node.clone(),
            pods: self.pods.lock().await.list(),
            certificates: self
                .ctx
                .tls
                .store
                .expiries()
                .into_iter()
                .map(|(identity, expiry)| CertificateInfo {
                    identity: identity.to_string(),
                    expires_unix: expiry
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                })
                .collect(),
            counters: self
                .ctx
                .capture
                .datapath()
                .counters()
                .into_iter()
                .map(|(c, value)| CounterValue {
                    name: c.name().to_owned(),
                    value,
                })
                .collect(),
            mesh: self.ctx.mesh.status(),
            xds: self.xds.as_ref().map(XdsHandle::status),
        }
    }

    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::Enroll { pod } => {
                let label = format!("{}/{}", pod.namespace, pod.name);
                // A pod enrolled now could get the wrong identity or policies, or none.
                if let Err(missing) = self.readiness.check() {
                    return Response::Error {
                        message: format!(
                            "ztunnel on {} is not ready to enroll {label}: waiting for {missing}",
                            self.ctx.settings.node
                        ),
                    };
                }
                if let Some(refusal) = self.outside_the_mesh(&pod.namespace, &pod.name).await {
                    return refusal;
                }
                match self.pods.lock().await.enroll(pod) {
                    Ok(pod) => Response::Enrolled { pod },
                    Err(err) => {
                        tracing::warn!(pod = %label, %err, "enrollment failed");
                        Response::Error {
                            message: format!("enrolling {label}: {err}"),
                        }
                    }
                }
            }
            Request::Disenroll { uid, container_id } => {
                let was_enrolled = self.pods.lock().await.disenroll(&uid, Some(&container_id));
                Response::Disenrolled { was_enrolled }
            }
            Request::Check {
                uid,
                container_id,
                namespace,
                name,
            } => {
                if self.pods.lock().await.is_enrolled(&uid, &container_id) {
                    return Response::Checked { enrolled: true };
                }
                let outside = self.outside_the_mesh(&namespace, &name).await;
                outside.unwrap_or(Response::Checked { enrolled: false })
            }
            Request::Status => Response::Status(self.status().await),
            Request::Connections => Response::Connections {
                connections: self.ctx.connections.snapshot(),
            },
        }
    }

    /// With Kubernetes enrollment, the answer for a pod of a CNI call that is not in the mesh
    /// (or whose labels cannot be read: the runtime retries the call).
    async fn outside_the_mesh(&self, namespace: &str, name: &str) -> Option<Response> {
        let kubernetes = self.kubernetes.as_ref()?;
        let label = format!("{namespace}/{name}");
        match kubernetes.admits(namespace, name).await {
            Ok(Ok(())) => None,
            Ok(Err(skip)) => Some(Response::NotInMesh {
                reason: skip.to_string(),
            }),
            Err(err) => Some(Response::Error {
                message: format!("cannot tell whether {label} is in the mesh: {err}"),
            }),
        }
    }
}

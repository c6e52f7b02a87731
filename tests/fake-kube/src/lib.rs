//! The Kubernetes API server as the daemon's Kubernetes enrollment needs it, for the tests and
//! the lab (there is no cluster here): core v1 namespaces and pods over plain HTTP, with the
//! real server's paths, JSON bodies, status codes, selectors, merge patches, resourceVersions
//! and watches (bookmarks, 410 Gone past the history kept), so kube-rs and kubectl work
//! against it unchanged.
//!
//! Deviations, all for want of the rest of a cluster: objects live in memory; a uid given on
//! creation is kept; pods are `Running` once created and deleted at once (no kubelet);
//! deleting a namespace deletes its pods at once (no namespace controller); lists come in
//! one page; strategic merge patches are read as merge patches; no authentication.

mod api;
pub mod client;
mod meta;
mod patch;
mod resource;
mod selector;
mod status;
mod store;
mod watch;

pub use status::ApiError;

use api::Api;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use store::Store;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch as signal;
use tokio::task::JoinHandle;

/// How the server keeps history and paces watches.
#[derive(Debug, Clone)]
pub struct Config {
    /// How many changes are kept for watches to resume from; older versions get 410 Gone.
    pub history_limit: usize,
    /// How many changes a watch may fall behind before it is ended (its client resumes).
    pub watch_backlog: usize,
    /// How often a watch that allows bookmarks gets one.
    pub bookmark_interval: Duration,
    /// A watch's length when the request gives no `timeoutSeconds`.
    pub watch_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            history_limit: 1000,
            watch_backlog: 1024,
            // The real server's pace.
            bookmark_interval: Duration::from_secs(60),
            // The real server's `--min-request-timeout`.
            watch_timeout: Duration::from_secs(1800),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listening on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("writing {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A running server; it stops when dropped (or, waiting for its connections, on `stop`).
pub struct FakeKube {
    address: SocketAddr,
    shutdown: signal::Sender<bool>,
    server: Option<JoinHandle<()>>,
}

impl FakeKube {
    /// Listens on `address` (port 0: any free port) with the default configuration.
    pub async fn start(address: SocketAddr) -> Result<Self, Error> {
        Self::start_with(address, Config::default()).await
    }

    pub async fn start_with(address: SocketAddr, config: Config) -> Result<Self, Error> {
        let listen_error = |source| Error::Listen { address, source };
        let listener = TcpListener::bind(address).await.map_err(listen_error)?;
        let address = listener.local_addr().map_err(listen_error)?;
        let (shutdown, stopping) = signal::channel(false);
        let api = Arc::new(Api {
            store: Arc::new(Store::new(config.history_limit, config.watch_backlog)),
            config,
            shutdown: stopping.clone(),
        });
        let server = tokio::spawn(serve(listener, api, stopping));
        Ok(Self {
            address,
            shutdown,
            server: Some(server),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The server's URL, as a kubeconfig names it.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn client(&self) -> client::Client {
        client::Client::new(self.address)
    }

    /// A kubeconfig for the server (one cluster, a user without credentials, one context,
    /// current), for kube-rs's `Config::infer` (through `KUBECONFIG`) or `kubectl`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake-kube\n  cluster:\n    server: {}\n\
             users:\n\
             - name: fake-kube\n  user: {{}}\n\
             contexts:\n\
             - name: fake-kube\n  context:\n    cluster: fake-kube\n    user: fake-kube\n    namespace: default\n\
             current-context: fake-kube\n",
            self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), Error> {
        std::fs::write(path, self.kubeconfig()).map_err(|source| Error::Kubeconfig {
            path: path.to_owned(),
            source,
        })
    }

    /// Stops accepting, ends every watch, and waits for the connections to finish.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

async fn serve(listener: TcpListener, api: Arc<Api>, mut stopping: signal::Receiver<bool>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                // Out of descriptors, most likely: wait for some to close.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopping.changed() => break,
        };
        // Finished connections' results are not kept.
        while connections.try_join_next().is_some() {}
        connections.spawn(connection(tcp, api.clone(), stopping.clone()));
    }
    while connections.join_next().await.is_some() {}
}

async fn connection(tcp: TcpStream, api: Arc<Api>, mut stopping: signal::Receiver<bool>) {
    let service = service_fn(move |request| {
        let api = api.clone();
        async move { Ok::<_, Infallible>(api.handle(request).await) }
    });
    let connection = http1::Builder::new().serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = stopping.changed() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

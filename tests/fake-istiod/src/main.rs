//! istiod as the lab needs it (there is no Kubernetes or istiod here): delta xDS and the Istio
//! CA on one TLS port, as istiod serves them on 15012, from the lab's mesh file instead of
//! the cluster's objects. The daemons run against it exactly as against istiod: the same
//! messages, names, versions, token and TLS. Each change of the file is pushed as a delta.

mod ca;
mod proxy_status;
mod resources;
mod token;
mod xds;

use anyhow::Context;
use clap::Parser;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use resources::Snapshot;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::codegen::Service;
use ztunnel_user::mesh::config::MeshFile;
use ztunnel_user::xds::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use ztunnel_user::xds::proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer;

/// How often the mesh file is looked at: a fake's simplicity, well under the time a test
/// waits for a change.
const FILE_POLL: Duration = Duration::from_millis(100);
/// The gRPC path prefix of the CA's service; every other call goes to xDS.
const CA_PATH: &str = "/istio.v1.auth.IstioCertificateService/";

#[derive(Parser, Debug)]
#[command(
    about = "A fake istiod for the lab: delta xDS and the Istio CA over TLS, from a mesh file"
)]
struct Args {
    /// Where to listen (istiod's port is 15012).
    #[arg(long)]
    listen: SocketAddr,
    /// The mesh file (Istio ztunnel's local config shape) whose entries are served.
    #[arg(long, value_name = "FILE")]
    mesh_config: PathBuf,
    /// The CA's root (root-cert.pem and root-key.pem, created there if absent).
    #[arg(long, value_name = "DIR")]
    ca_dir: PathBuf,
    /// The file holding the bearer token every call must carry (read at each call).
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// Where each proxy's synced version of the mesh file is written (JSON, by node).
    #[arg(long, value_name = "FILE")]
    proxy_status: PathBuf,
    /// The DNS name in istiod's certificate (its listening address is there too).
    #[arg(long, default_value = "istiod.istio-system.svc")]
    name: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let root = Arc::new(ca::Root::load_or_create(&args.ca_dir)?);
    let tls = root.server_config(vec![args.name.clone(), args.listen.ip().to_string()])?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let text = std::fs::read_to_string(&args.mesh_config)
        .with_context(|| format!("reading {}", args.mesh_config.display()))?;
    let first = snapshot(&args.mesh_config, &text)?;
    let (publish, snapshots) = watch::channel(Arc::new(first));
    tokio::spawn(watch_mesh(args.mesh_config.clone(), text, publish));

    let token = token::TokenFile(args.token_file.clone());
    let xds = AggregatedDiscoveryServiceServer::new(xds::Xds {
        snapshots: snapshots.clone(),
        token: token.clone(),
        status: proxy_status::ProxyStatus::new(args.proxy_status.clone()),
        streams: Arc::default(),
    });
    let ca = IstioCertificateServiceServer::new(ca::Ca {
        root,
        snapshots,
        token,
    });
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(listen = %args.listen, mesh = %args.mesh_config.display(), "serving");
    loop {
        let (tcp, peer) = listener.accept().await.context("accepting")?;
        let (acceptor, ads, ca) = (acceptor.clone(), xds.clone(), ca.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(err) => {
                    tracing::warn!(%peer, "TLS handshake failed: {err}");
                    return;
                }
            };
            let service = service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(xds::Peer(peer));
                let (mut ads, mut ca) = (ads.clone(), ca.clone());
                async move {
                    if request.uri().path().starts_with(CA_PATH) {
                        ca.call(request).await
                    } else {
                        ads.call(request).await
                    }
                }
            });
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
            if let Err(err) = served {
                tracing::info!(%peer, "connection ended: {err}");
            }
        });
    }
}

fn snapshot(path: &Path, text: &str) -> anyhow::Result<Snapshot> {
    let file = MeshFile::parse(path, text)?;
    Ok(Snapshot::of(
        &file,
        ztunnel_lab::istiod::digest(text.as_bytes()),
    ))
}

/// Publishes each new valid version of the file; a bad one is logged and the last good one
/// stays served, as istiod keeps serving the last good state of the cluster.
async fn watch_mesh(path: PathBuf, mut last: String, publish: watch::Sender<Arc<Snapshot>>) {
    loop {
        tokio::time::sleep(FILE_POLL).await;
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if text == last {
            continue;
        }
        match snapshot(&path, &text) {
            Ok(snapshot) => {
                tracing::info!(
                    version = %snapshot.version,
                    addresses = snapshot.addresses.len(),
                    authorizations = snapshot.authorizations.len(),
                    "the mesh file changed"
                );
                publish.send_replace(Arc::new(snapshot));
            }
            Err(err) => tracing::warn!("the mesh file is not served: {err:#}"),
        }
        last = text;
    }
}

//! istiod as the lab needs it (there is no Kubernetes or istiod here): delta xDS and the Istio
//! CA on one TLS port, as istiod serves them on 15012, from the lab's mesh file instead of
//! the cluster's objects. The daemons run against it exactly as against istiod: the same
//! messages, names, versions, token and TLS. Each change of the file is pushed as a delta.

mod ca;
mod faults;
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
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tonic::codegen::Service;
use ztunnel_lab::istiod::Faults;
use ztunnel_user::mesh::config::MeshFile;
use ztunnel_user::xds::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use ztunnel_user::xds::proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer;

/// How often the mesh file is looked at: a fake's simplicity, well under the time a test
/// waits for a change.
const FILE_POLL: Duration = Duration::from_millis(100);
/// How long after its GOAWAY a connection's streams are ended.
const GOAWAY_DRAIN: Duration = Duration::from_millis(50);
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
    /// The faults to show (JSON, `ztunnel_lab::istiod::Faults`), read at each use; absent:
    /// none. SIGUSR1 ends every xDS stream, SIGUSR2 sends GOAWAY on every connection.
    #[arg(long, value_name = "FILE")]
    faults: PathBuf,
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
    let names = vec![args.name.clone(), args.listen.ip().to_string()];
    let acceptor = TlsAcceptor::from(Arc::new(root.server_config(names)?));
    let faults = faults::FaultsFile(args.faults.clone());
    let text = std::fs::read_to_string(&args.mesh_config)
        .with_context(|| format!("reading {}", args.mesh_config.display()))?;
    let first = snapshot(&args.mesh_config, &text, &faults.read())?;
    let (publish, snapshots) = watch::channel(Arc::new(first));
    tokio::spawn(watch_mesh(
        args.mesh_config.clone(),
        text,
        faults.clone(),
        publish,
    ));
    let (drops, goaways) = on_signals()?;

    let token = token::TokenFile(args.token_file.clone());
    let xds = AggregatedDiscoveryServiceServer::new(xds::Xds {
        snapshots: snapshots.clone(),
        token: token.clone(),
        status: proxy_status::ProxyStatus::new(args.proxy_status.clone()),
        streams: Arc::default(),
        drops,
    });
    let ca = IstioCertificateServiceServer::new(ca::Ca {
        root: root.clone(),
        snapshots,
        token,
        faults: faults.clone(),
    });
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(listen = %args.listen, mesh = %args.mesh_config.display(), "serving");
    loop {
        let (tcp, peer) = listener.accept().await.context("accepting")?;
        let acceptor = match faults.read().serving_names {
            Some(names) => match root.server_config(names) {
                Ok(config) => TlsAcceptor::from(Arc::new(config)),
                Err(err) => {
                    tracing::warn!("the faults' serving names are not usable: {err:#}");
                    acceptor.clone()
                }
            },
            None => acceptor.clone(),
        };
        let connection = Connection {
            peer,
            xds: xds.clone(),
            ca: ca.clone(),
            goaways: goaways.clone(),
        };
        tokio::spawn(connection.serve(acceptor, tcp));
    }
}

/// One client's connection: xDS and the CA on its HTTP/2 streams, until it ends or a GOAWAY
/// (SIGUSR2) drains it.
struct Connection {
    peer: SocketAddr,
    xds: AggregatedDiscoveryServiceServer<xds::Xds>,
    ca: IstioCertificateServiceServer<ca::Ca>,
    goaways: watch::Receiver<u64>,
}

impl Connection {
    async fn serve(mut self, acceptor: TlsAcceptor, tcp: TcpStream) {
        let peer = self.peer;
        let tls = match acceptor.accept(tcp).await {
            Ok(tls) => tls,
            Err(err) => {
                tracing::warn!(%peer, "TLS handshake failed: {err}");
                return;
            }
        };
        let (xds, ca) = (self.xds, self.ca);
        let service = service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(xds::Peer(peer));
            let (mut xds, mut ca) = (xds.clone(), ca.clone());
            async move {
                if request.uri().path().starts_with(CA_PATH) {
                    ca.call(request).await
                } else {
                    xds.call(request).await
                }
            }
        });
        let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        let connection = builder.serve_connection(TokioIo::new(tls), service);
        tokio::pin!(connection);
        let served = tokio::select! {
            served = connection.as_mut() => served,
            _ = self.goaways.changed() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(err) = served {
            tracing::info!(%peer, "connection ended: {err}");
        }
    }
}

fn snapshot(path: &Path, text: &str, faults: &Faults) -> anyhow::Result<Snapshot> {
    let file = MeshFile::parse(path, text)?;
    let mut snapshot = Snapshot::of(&file, ztunnel_lab::istiod::digest(text.as_bytes()));
    if faults.bad_address {
        snapshot.add_bad_address();
    }
    for workload in &faults.withheld_workloads {
        snapshot.withhold_workload(workload);
    }
    Ok(snapshot)
}

/// What the fault signals ask: SIGUSR1 ends every xDS stream (the first receiver changes);
/// SIGUSR2 sends GOAWAY on every connection (the second), then ends their streams a moment
/// later, as a draining istiod does.
fn on_signals() -> anyhow::Result<(watch::Receiver<u64>, watch::Receiver<u64>)> {
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing a signal handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing a signal handler")?;
    let (drop, drops) = watch::channel(0);
    let (goaway, goaways) = watch::channel(0);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = usr1.recv() => tracing::info!("signalled: ending every xDS stream"),
                Some(()) = usr2.recv() => {
                    tracing::info!("signalled: GOAWAY on every connection, then ending the streams");
                    goaway.send_modify(|n| *n += 1);
                    tokio::time::sleep(GOAWAY_DRAIN).await;
                }
                else => return,
            }
            drop.send_modify(|n| *n += 1);
        }
    });
    Ok((drops, goaways))
}

/// Publishes each new valid version of the file, with the faults of that moment; a bad file
/// is logged and the last good one stays served, as istiod keeps serving the last good state
/// of the cluster.
async fn watch_mesh(
    path: PathBuf,
    first: String,
    faults: faults::FaultsFile,
    publish: watch::Sender<Arc<Snapshot>>,
) {
    let mut last = Some(first);
    loop {
        tokio::time::sleep(FILE_POLL).await;
        let now = std::fs::read_to_string(&path).ok();
        if now == last {
            continue;
        }
        last = now.clone();
        let Some(text) = now else {
            continue;
        };
        match snapshot(&path, &text, &faults.read()) {
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
    }
}

//! `ztunnel run`: the daemon's start-up order, its surfaces, and the drain when it stops.
//!
//! Start-up: logging, the kernel features check, the mesh config file's first read, the CA,
//! the pod records, the eBPF programs and maps, then the proxy's shared state, the config
//! reload loop, the xDS client, the control API, the admin, metrics and readiness endpoints, and the
//! take-over of the previous run's pods (once the mesh config is in force). Not ready until
//! all of that is done.

use crate::api::Limits;
use crate::capture::{Capture, Datapath};
use crate::delivery::{self, Connector};
use crate::hbone::client::Pool;
use crate::hbone::mtls::Mtls;
use crate::host::netns::Netns;
use crate::host::{features, limits};
use crate::identity::{BuiltInSource, CertificateAuthority, CertificateSource, CertificateStore};
use crate::istio_ca;
use crate::istiod::IstiodEndpoint;
use crate::kube::{self, Kubernetes};
use crate::mesh::Mesh;
use crate::mesh::config::MeshConfig;
use crate::mesh::config::reload::{self, ConfigFile};
use crate::ops::admin::Admin;
use crate::ops::api_server::{self, ApiServer};
use crate::ops::http;
use crate::ops::logging::{self};
use crate::ops::metrics::{self, NodeView};
use crate::ops::readiness::Readiness;
use crate::pods::records::PodStates;
use crate::pods::{PodCounts, Pods};
use crate::proxy::ProxyContext;
use crate::proxy::admission::Admission;
use crate::settings::{Enrollment, Settings};
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::connections::ConnectionLog;
use crate::telemetry::metrics::TrafficMetrics;
use crate::xds::{
    self,
    client::{XdsClient, XdsHandle},
};
use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};

/// What readiness waits for until the pods of the previous run are served again.
const TAKING_OVER: &str = "the pods of the previous run";
/// How often the pods waiting to be served are looked at (each has its own backoff).
const WAITING_POLL: Duration = Duration::from_secs(1);

/// Runs the daemon until SIGTERM, SIGINT or `/quitquitquit`, then drains.
pub fn run(mut settings: Settings) -> Result<()> {
    let log = logging::init(&settings.log_level, settings.ebpf_log).context("--log-level")?;
    let node = features::check(settings.cgroup_root.as_deref())?;
    tracing::info!(%node, "this node can run ztunnel");
    settings.cgroup_root = Some(node.pod_cgroups.clone());
    tracing::info!(settings = %serde_json::to_string(&settings)?, "starting");
    let settings = Arc::new(settings);
    let limits = Limits::new(limits::raise_open_files_limit(), &settings);
    tracing::info!(?limits, "connection limits");
    let admission = Admission::new(limits);
    Netns::home()?;

    let config_file = settings
        .config
        .clone()
        .map(|path| Arc::new(ConfigFile::new(path)));
    // A missing or bad file leaves the daemon up but not ready until it is fixed.
    let reading = Instant::now();
    let initial = config_file
        .as_ref()
        .and_then(|file| file.read_if_changed(&MeshConfig::default()));
    let read = reading.elapsed();
    let lifetime = Duration::from_secs(settings.cert_lifetime_secs);
    let env: Vec<(String, String)> = std::env::vars().collect();
    let istio_ca = istio_ca::from_settings(&settings.istiod, lifetime, &env)
        .context("--ca-address")?
        .map(Arc::new);
    let certificates: Arc<dyn CertificateSource> = match &istio_ca {
        Some(istio_ca) => {
            tracing::info!(ca = %settings.istiod.ca_address, "workload certificates from istiod's CA");
            istio_ca.clone()
        }
        None => Arc::new(BuiltInSource::new(built_in_ca(&settings)?, lifetime)),
    };
    // Checked before the programs are loaded: a bad setting changes nothing on the node.
    let xds = xds::client::from_settings(&settings.istiod, &settings.node, env)
        .context("--xds-address")?;
    let states = PodStates::open(&settings.state_dir).context("--state-dir")?;
    let datapath =
        Arc::new(Datapath::load(&settings, &node).context("loading the capture programs")?);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let traffic = Arc::new(TrafficMetrics::default());
        let access_log = AccessLog::start(
            settings.access_log_format,
            settings.access_log.clone(),
            traffic.access_log_dropped.clone(),
        )?;
        let store = CertificateStore::start(certificates);
        if let Some(istio_ca) = istio_ca {
            tokio::spawn(istio_ca.follow_root_file());
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        // A CONNECT's answer waits for the peer's connection to its app.
        let handshake_timeout = admission.handshake_timeout();
        let pool = Arc::new(Pool::new(
            handshake_timeout,
            handshake_timeout + delivery::CONNECT_TIMEOUT,
        ));
        pool.spawn_idle_release();
        let source = |current: &MeshConfig| {
            let version = initial.as_ref();
            version.map_or_else(Vec::new, |version| version.changes.changes(current))
        };
        let applying = Instant::now();
        let (mesh, initial) =
            match Mesh::new(source, config_file.clone(), &settings.node, datapath.as_ref()) {
                Ok(mesh) => (mesh, initial),
                // A file the kernel maps cannot take (a full one) is refused as it would be
                // later: the daemon stays up, not ready, says why, and tries it again.
                Err(err) if initial.is_some() => {
                    if let Some(file) = &config_file {
                        file.application_failed(err.to_string());
                    }
                    let empty = |_: &MeshConfig| Vec::new();
                    let mesh =
                        Mesh::new(empty, config_file.clone(), &settings.node, datapath.as_ref())
                            .context("writing the kernel maps")?;
                    (mesh, None)
                }
                Err(err) => return Err(err).context("writing the kernel maps"),
            };
        let took = reload::Took {
            read,
            apply: applying.elapsed(),
        };
        let ctx = Arc::new(ProxyContext {
            capture: Capture::new(&settings, datapath.clone()),
            connector: Connector::new(settings.mark, datapath.clone()),
            connections: ConnectionLog::new(traffic.clone(), access_log),
            mesh,
            tls: Mtls { store },
            pool,
            hbone_server: Default::default(),
            shutdown: shutdown_rx,
            local_pods: Default::default(),
            refusals: Default::default(),
            admission,
            settings: settings.clone(),
        });
        let readiness = Arc::new(Readiness::default());
        if let Some(file) = &config_file {
            let waiting = format!("the mesh config {}", file.path().display());
            match initial {
                Some(version) => file.applied(version, took),
                None => readiness.pending(&waiting),
            }
            let (in_force, reloading, ready) = (ctx.clone(), ctx.clone(), readiness.clone());
            let current = move || in_force.mesh.current();
            tokio::spawn(file.clone().watch(current, move |changes| {
                let applied = reloading.apply_changes(|current| changes.changes(current))?;
                // A valid file's entries fit together: the model refuses none of them.
                if let Some(refused) = applied.refused.first() {
                    anyhow::bail!("mesh config entry refused: {refused}");
                }
                ready.done(&waiting);
                anyhow::Ok(())
            }));
        }
        let xds = xds.map(|(config, istiod)| {
            start_xds(XdsClient::new(config, istiod, ctx.clone()), &settings, &readiness)
        });
        let kubernetes = match settings.enrollment {
            Enrollment::Cni => None,
            Enrollment::Kubernetes => Some(
                Kubernetes::connect(settings.kubeconfig.as_deref())
                    .await
                    .context("--enrollment kubernetes")?,
            ),
        };
        let listener = api_server::bind(&settings.api_socket)?;
        let pod_counts = Arc::new(PodCounts::default());
        let pods = Arc::new(tokio::sync::Mutex::new(Pods::new(
            ctx.clone(),
            states,
            node.pod_cgroups,
            pod_counts.clone(),
        )));
        if let Some(kubernetes) = &kubernetes {
            start_kubernetes_enrollment(kubernetes.clone(), &settings, pods.clone(), &readiness);
        }
        let server = Arc::new(ApiServer {
            pods,
            kubernetes,
            ctx: ctx.clone(),
            readiness: readiness.clone(),
            xds: xds.clone(),
        });
        readiness.pending(TAKING_OVER);
        tokio::spawn(take_over_previous_pods(server.clone(), config_file.clone(), xds));
        let quit = Arc::new(Notify::new());
        let node = NodeView {
            datapath,
            local_pods: ctx.local_pods.clone(),
            pool: ctx.pool.clone(),
            hbone_server: ctx.hbone_server.clone(),
            certificates: ctx.tls.store.clone(),
            refusals: ctx.refusals.clone(),
            pods: pod_counts,
            admission: ctx.admission.clone(),
            xds: server.xds.clone(),
        };
        let admin = Admin {
            api: server.clone(),
            log,
            quit: quit.clone(),
        };
        serve_http(
            &ctx,
            admin,
            metrics::registry(&traffic, node),
            readiness,
        )
        .await?;
        tracing::info!(node = %settings.node, api = %settings.api_socket.display(), admin = %settings.admin_addr, bpffs = %settings.bpffs.display(), "ztunnel started");
        let reason = tokio::select! {
            () = server.clone().serve(listener) => "the API server stopped",
            signal = shutdown_signal() => signal,
            () = quit.notified() => "/quitquitquit",
        };
        tracing::info!(reason, "draining; enrolled pods stay captured (their new connections are refused until ztunnel is back)");
        drain(&server, &shutdown, Duration::from_secs(settings.drain_timeout_secs)).await;
        let _ = std::fs::remove_file(&settings.api_socket);
        anyhow::Ok(())
    })
}

/// The built-in CA: the operator's, or the node's own (created on first start).
fn built_in_ca(settings: &Settings) -> Result<CertificateAuthority> {
    Ok(match (&settings.ca_cert, &settings.ca_key) {
        (Some(cert), Some(key)) => CertificateAuthority::from_files(cert, key)?,
        _ => CertificateAuthority::load_or_create(&settings.ca_dir, &settings.trust_domain)?,
    })
}

/// Starts the xDS client: the daemon is not ready until each type had one response applied.
fn start_xds(
    client: XdsClient<IstiodEndpoint, ProxyContext>,
    settings: &Settings,
    readiness: &Arc<Readiness>,
) -> XdsHandle {
    let handle = client.handle();
    let waiting = format!("istiod's xDS at {}", settings.istiod.xds_address);
    readiness.pending(&waiting);
    tokio::spawn(client.run());
    let (ready, xds) = (readiness.clone(), handle.clone());
    tokio::spawn(async move {
        xds.ready().await;
        tracing::info!("xds: every type applied; the mesh from istiod is in force");
        ready.done(&waiting);
    });
    handle
}

/// Starts enrolling pods by their labels in the Kubernetes API: the daemon is not ready until
/// the namespaces and this node's pods were listed, and enrolls none before it is ready.
fn start_kubernetes_enrollment(
    kubernetes: Kubernetes,
    settings: &Settings,
    pods: Arc<tokio::sync::Mutex<Pods>>,
    readiness: &Arc<Readiness>,
) {
    const LISTING: &str = "the Kubernetes API's namespaces and this node's pods";
    readiness.pending(LISTING);
    let (ready, listed) = (readiness.clone(), readiness.clone());
    let hooks = kube::Hooks {
        ready: Box::new(move || ready.check().is_ok()),
        listed: Box::new(move || listed.done(LISTING)),
    };
    let reconciler = kube::Reconciler::new(kubernetes, settings.node.clone(), pods, hooks);
    tokio::spawn(reconciler.run());
}

/// Serves the pods the previous run enrolled again, once the mesh config is in force from
/// each source (their identities and policies come from it). Until then they stay captured,
/// their new connections refused, and the daemon is not ready.
async fn take_over_previous_pods(
    server: Arc<ApiServer>,
    config_file: Option<Arc<ConfigFile>>,
    xds: Option<XdsHandle>,
) {
    if let Some(file) = &config_file {
        file.in_force().await;
    }
    if let Some(xds) = xds {
        xds.ready().await;
    }
    if let Err(err) = server.pods.lock().await.restore() {
        // Not ready, and the log says why: the pods stay captured and refused.
        tracing::error!(%err, "cannot take over the pods of the previous run");
        return;
    }
    server.readiness.done(TAKING_OVER);
    // Pods that could not be served yet stay captured, and are tried again until drain.
    let mut shutdown = server.ctx.shutdown.clone();
    let mut retry = tokio::time::interval(WAITING_POLL);
    loop {
        tokio::select! {
            _ = retry.tick() => server.pods.lock().await.retry_waiting(),
            _ = async { shutdown.wait_for(|stopping| *stopping).await.map(drop) } => return,
        }
    }
}

/// Starts the admin API, the metrics and the readiness endpoints.
async fn serve_http(
    ctx: &ProxyContext,
    admin: Admin,
    registry: prometheus_client::registry::Registry,
    readiness: Arc<Readiness>,
) -> Result<()> {
    let settings = &ctx.settings;
    let share = ctx.admission.node_share();
    let admittance = |name| http::Admittance {
        name,
        share: share.clone(),
        refusals: ctx.refusals.clone(),
        header_timeout: ctx.admission.handshake_timeout(),
    };
    let admin = Arc::new(admin);
    let listener = http::bind(settings.admin_addr, "admin API").await?;
    tokio::spawn(http::serve(
        listener,
        admittance("admin API"),
        move |call| admin.clone().handle(call),
    ));

    let registry = Arc::new(registry);
    let listener = http::bind(settings.metrics_addr, "metrics").await?;
    tokio::spawn(http::serve(listener, admittance("metrics"), move |call| {
        let reply = metrics::handle(&registry, &call);
        async move { reply }
    }));

    let listener = http::bind(settings.readiness_addr, "readiness").await?;
    tokio::spawn(http::serve(
        listener,
        admittance("readiness"),
        move |call| {
            let reply = readiness.handle(&call);
            async move { reply }
        },
    ));
    Ok(())
}

/// Graceful drain: not ready, listeners closed (the kernel refuses new connections of the
/// enrolled pods from now on, as while the daemon is down), GOAWAY to every HBONE peer, then
/// open connections may finish until `timeout`; what is left is cut when the process exits.
/// The pins stay, so the pods stay captured.
async fn drain(server: &ApiServer, shutdown: &watch::Sender<bool>, timeout: Duration) {
    let ctx = &server.ctx;
    server.readiness.pending("the end of the drain");
    server.pods.lock().await.stop_serving();
    let _ = shutdown.send(true);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut said = tokio::time::Instant::now();
    loop {
        // Proxied connections, and the HBONE connections peers carry them (or others) in.
        let (connections, hbone) = (ctx.connections.open(), ctx.hbone_server.connections());
        if connections + hbone == 0 {
            tracing::info!("drained: every connection finished");
            return;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            tracing::warn!(
                connections,
                hbone,
                "drain deadline reached; closing the connections still open"
            );
            return;
        }
        if now.duration_since(said) >= Duration::from_secs(1) {
            tracing::info!(
                connections,
                hbone,
                left_secs = (deadline - now).as_secs(),
                "draining"
            );
            said = now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

//! `ztunnel`: the node proxy daemon and the operator's CLI.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use std::ffi::c_char;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use ztunnel_user::access_log::{self, AccessLog};
use ztunnel_user::admin::{self, Admin, LogControl};
use ztunnel_user::api;
use ztunnel_user::api_server::{self, ApiServer};
use ztunnel_user::cli::{self, Section, View};
use ztunnel_user::config::MeshConfig;
use ztunnel_user::config::reload::{self, ConfigFile};
use ztunnel_user::connections::ConnectionLog;
use ztunnel_user::datapath::{self, Datapath, DatapathSettings};
use ztunnel_user::hbone::client::Pool;
use ztunnel_user::hbone::mtls::Mtls;
use ztunnel_user::identity::{CertificateAuthority, CertificateStore};
use ztunnel_user::iptables::Exclusions;
use ztunnel_user::mesh::Mesh;
use ztunnel_user::metrics::{self, TrafficMetrics};
use ztunnel_user::netns::Netns;
use ztunnel_user::pod_state::{self, PodStates};
use ztunnel_user::pods::Pods;
use ztunnel_user::proxy::{Capture, ProxyContext};
use ztunnel_user::{features, web};

/// jemalloc rather than glibc's malloc: its size classes fit what every open connection
/// holds (tokio's tasks and I/O registrations are 128-byte aligned, which glibc serves by
/// splitting off fragments that then lie between long-lived allocations), and its background
/// thread hands freed pages back to the kernel. The figures are in docs/PERFORMANCE.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` runs: pages freed for about a second go back to
/// the kernel, at once with `MADV_DONTNEED` (not `MADV_FREE`, which RSS would still count),
/// from a background thread rather than from the threads that free them.
#[unsafe(export_name = "_rjem_malloc_conf")]
static ALLOCATOR_OPTIONS: Option<&'static c_char> =
    // SAFETY: the pointer is to the first byte of a 'static, NUL-terminated C string literal.
    Some(unsafe { &*c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr() });

#[derive(Parser)]
#[command(
    name = "ztunnel",
    version,
    about = "Istio ambient node proxy with eBPF traffic capture"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon: load the capture programs and serve enrolled pods.
    Run(Box<RunArgs>),
    /// Readiness, the mesh config in force, enrolled pods, certificates, kernel counters.
    Status(ClientArgs),
    /// The enrolled pods, their identities and capture hooks.
    Pods(ClientArgs),
    /// The workloads of the mesh config in force.
    Workloads(ClientArgs),
    /// The services of the mesh config in force, with their healthy endpoints.
    Services(ClientArgs),
    /// The authorization policies in force.
    Policies(ClientArgs),
    /// The workload certificates the daemon holds, and when they expire.
    Certs(ClientArgs),
    /// The connections the daemon proxied (open and recent).
    Connections(ClientArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Name of this node (shown in status output).
    #[arg(long, env = "NODE_NAME", default_value = "node")]
    node: String,
    /// Unix socket for the CNI plugin and the CLI.
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    api_socket: PathBuf,
    /// The cgroup-v2 directory under which the kubelet creates pod cgroups.
    #[arg(long, default_value = "/sys/fs/cgroup/kubepods")]
    cgroup_root: PathBuf,
    /// bpffs directory for this daemon's maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/ztunnel")]
    bpffs: PathBuf,
    /// Directory of the enrolled pods' records, from which a restarted daemon takes over the
    /// pods its previous run captured.
    #[arg(long, default_value = pod_state::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// How pods' traffic is captured: eBPF (the product), or iptables REDIRECT rules in each
    /// pod's netns (the baseline benchmarks compare eBPF with).
    #[arg(long, value_enum, default_value_t = Capture::Ebpf)]
    capture: Capture,
    /// SO_MARK on every proxy socket; capture skips sockets carrying it.
    #[arg(long, default_value_t = ztunnel_common::ports::DEFAULT_MARK)]
    mark: u32,
    /// Destinations never captured (repeatable), e.g. the API server's address.
    #[arg(long = "exclude-cidr", value_name = "CIDR")]
    exclude_cidrs: Vec<IpNet>,
    /// Destination ports never captured outbound (repeatable).
    #[arg(long = "exclude-port", value_name = "PORT")]
    exclude_ports: Vec<u16>,
    /// Pod ports never captured inbound (repeatable).
    #[arg(long = "exclude-inbound-port", value_name = "PORT")]
    exclude_inbound_ports: Vec<u16>,
    /// Mesh config (workloads, in Istio ztunnel's local config shape). Without it, every
    /// destination is outside the mesh and pods get their namespace's `default` identity.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Trust domain of this node's workloads (for pods the mesh config does not list).
    #[arg(long, default_value = ztunnel_user::config::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Directory of the built-in CA: its root is created there on first start (0700/0600).
    #[arg(long, default_value = "/var/lib/ztunnel/ca")]
    ca_dir: PathBuf,
    /// An operator-given CA certificate (PEM) to issue workload certificates with, so several
    /// nodes share one trust root; needs --ca-key.
    #[arg(long, requires = "ca_key", value_name = "PEM")]
    ca_cert: Option<PathBuf>,
    /// The private key (PEM) of --ca-cert.
    #[arg(long, requires = "ca_cert", value_name = "PEM")]
    ca_key: Option<PathBuf>,
    /// Lifetime of workload certificates; each is renewed at half of it.
    #[arg(long, default_value_t = 24 * 3600, value_name = "SECONDS")]
    cert_lifetime_secs: u64,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `ztunnel_user=debug`; the admin
    /// API's `/logging` changes it at run time.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
    /// The admin API (config dump, log level, quit); keep it on localhost.
    #[arg(long, default_value = admin::DEFAULT_ADMIN_ADDR)]
    admin_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`, `/stats/prometheus`).
    #[arg(long, default_value = admin::DEFAULT_METRICS_ADDR)]
    metrics_addr: SocketAddr,
    /// Readiness (`/healthz/ready`).
    #[arg(long, default_value = admin::DEFAULT_READINESS_ADDR)]
    readiness_addr: SocketAddr,
    /// Access log lines, one per connection when it ends.
    #[arg(long, value_enum, default_value_t = access_log::Format::Text)]
    access_log_format: access_log::Format,
    /// Where access log lines go: `-` for standard output, or a file to append to.
    #[arg(long, default_value = "-", value_name = "PATH")]
    access_log: access_log::Output,
    /// On SIGTERM (or `/quitquitquit`): how long open connections may go on after the
    /// listeners closed and HBONE peers got GOAWAY, before the rest are cut.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    drain_timeout_secs: u64,
    /// The eBPF programs' capture decisions as debug lines in this log (target
    /// `ztunnel_ebpf`). Off, the kernel's verifier removes their logging code at load.
    #[arg(long, env = "ZTUNNEL_EBPF_LOG", value_parser = clap::builder::BoolishValueParser::new())]
    ebpf_log: bool,
}

#[derive(Args)]
struct ClientArgs {
    /// The daemon's admin API.
    #[arg(long, default_value = admin::DEFAULT_ADMIN_ADDR)]
    admin: SocketAddr,
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let view = match cli.command {
        Command::Run(args) => return run(*args),
        Command::Status(args) => (args, View::Dump(Section::Status)),
        Command::Pods(args) => (args, View::Dump(Section::Pods)),
        Command::Workloads(args) => (args, View::Dump(Section::Workloads)),
        Command::Services(args) => (args, View::Dump(Section::Services)),
        Command::Policies(args) => (args, View::Dump(Section::Policies)),
        Command::Certs(args) => (args, View::Dump(Section::Certs)),
        Command::Connections(args) => (args, View::Connections),
    };
    show(view.0, view.1)
}

/// Logs to stderr through a filter the admin API can change.
fn init_logging(filter: &str) -> Result<LogControl> {
    let parse = |filter: &str| {
        tracing_subscriber::EnvFilter::try_new(filter).map_err(|err| err.to_string())
    };
    let initial = parse(filter)
        .map_err(anyhow::Error::msg)
        .context("--log-level")?;
    let (filter_layer, handle) = tracing_subscriber::reload::Layer::new(initial);
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .init();
    Ok(LogControl::new(filter, move |filter| {
        handle.reload(parse(filter)?).map_err(|err| err.to_string())
    }))
}

fn run(args: RunArgs) -> Result<()> {
    let log = init_logging(&datapath::log_filter(&args.log_level, args.ebpf_log))?;
    ztunnel_user::limits::raise_open_files_limit();
    features::check(&args.cgroup_root)?;

    let config_file = args
        .config
        .clone()
        .map(|path| Arc::new(ConfigFile::new(path)));
    // A missing or bad file leaves the daemon up but not ready until it is fixed.
    let initial = config_file.as_ref().and_then(|file| file.poll());
    let ca = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => CertificateAuthority::from_files(cert, key)?,
        _ => CertificateAuthority::load_or_create(&args.ca_dir, &args.trust_domain)?,
    };
    let states = PodStates::open(&args.state_dir).context("--state-dir")?;
    let datapath = Datapath::load(&DatapathSettings {
        pin_dir: args.bpffs.clone(),
        mark: args.mark,
        excluded_cidrs: args.exclude_cidrs.clone(),
        excluded_outbound_ports: args.exclude_ports.clone(),
        excluded_inbound_ports: args.exclude_inbound_ports.clone(),
        ebpf_log: args.ebpf_log,
    })
    .context("loading the capture programs")?;
    let home = Netns::current()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let traffic = Arc::new(TrafficMetrics::default());
        let access_log = AccessLog::start(
            args.access_log_format,
            args.access_log.clone(),
            traffic.access_log_dropped.clone(),
        )?;
        let roots = ca.roots();
        let store = Arc::new(CertificateStore::new(Arc::new(ca), Duration::from_secs(args.cert_lifetime_secs)));
        store.clone().spawn_renewal();
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let pool = Arc::new(Pool::default());
        pool.spawn_idle_release();
        let (config, applied) = match initial {
            Some((hash, config)) => (config, Some(hash)),
            None => (MeshConfig::default(), None),
        };
        let summary = reload::summary(&config);
        let mesh = Mesh::new(config, config_file.clone(), &args.node, &datapath)
            .context("writing the mesh config to the kernel maps")?;
        let ctx = Arc::new(ProxyContext {
            capture: args.capture,
            exclusions: Exclusions {
                marks: vec![args.mark, ztunnel_common::ports::DELIVERY_MARK],
                outbound_ports: args.exclude_ports.clone(),
                inbound_ports: args.exclude_inbound_ports.clone(),
                cidrs: args.exclude_cidrs.clone(),
            },
            home,
            datapath: Arc::new(datapath),
            connections: ConnectionLog::new(traffic, access_log),
            mark: args.mark,
            mesh,
            trust_domain: args.trust_domain.clone(),
            tls: Mtls { store, roots },
            pool,
            shutdown: shutdown_rx,
            readiness: Default::default(),
            hbone_connections: Default::default(),
            hbone_streams: Default::default(),
            local_pods: Default::default(),
        });
        if let Some(file) = &config_file {
            let waiting = format!("the mesh config {}", file.path().display());
            match applied {
                Some(hash) => file.applied(hash, &summary),
                None => ctx.readiness.pending(&waiting),
            }
            let reloading = ctx.clone();
            tokio::spawn(file.clone().watch(move |config| {
                reloading.apply_config(config)?;
                reloading.readiness.done(&waiting);
                Ok(())
            }));
        }
        let listener = api_server::bind(&args.api_socket)?;
        let server = Arc::new(ApiServer {
            node: args.node.clone(),
            pods: tokio::sync::Mutex::new(Pods::new(ctx.clone(), args.cgroup_root.clone(), states)),
            ctx: ctx.clone(),
        });
        ctx.readiness.pending(TAKING_OVER);
        tokio::spawn(take_over_previous_pods(server.clone(), config_file.clone()));
        let quit = Arc::new(Notify::new());
        serve_http(&args, &ctx, &server, log, quit.clone()).await?;
        tracing::info!(node = %args.node, api = %args.api_socket.display(), admin = %args.admin_addr, bpffs = %args.bpffs.display(), "ztunnel started");
        let reason = tokio::select! {
            () = server.clone().serve(listener) => "the API server stopped",
            signal = shutdown_signal() => signal,
            () = quit.notified() => "/quitquitquit",
        };
        tracing::info!(reason, "draining; enrolled pods stay captured (their new connections are refused until ztunnel is back)");
        drain(&server, &shutdown, Duration::from_secs(args.drain_timeout_secs)).await;
        let _ = std::fs::remove_file(&args.api_socket);
        anyhow::Ok(())
    })
}

/// What readiness waits for until the pods of the previous run are served again.
const TAKING_OVER: &str = "the pods of the previous run";

/// Serves the pods the previous run enrolled again, once the mesh config is in force (their
/// identities and policies come from it). Until then they stay captured, their new
/// connections refused, and the daemon is not ready.
async fn take_over_previous_pods(server: Arc<ApiServer>, config_file: Option<Arc<ConfigFile>>) {
    while config_file
        .as_ref()
        .is_some_and(|file| file.status().generation == 0)
    {
        tokio::time::sleep(reload::POLL_INTERVAL).await;
    }
    match server.pods.lock().await.restore() {
        Ok(()) => server.ctx.readiness.done(TAKING_OVER),
        // Not ready, and the log says why: the pods stay captured and refused.
        Err(err) => tracing::error!(%err, "cannot take over the pods of the previous run"),
    }
}

/// Starts the admin API, the metrics and the readiness endpoints.
async fn serve_http(
    args: &RunArgs,
    ctx: &Arc<ProxyContext>,
    server: &Arc<ApiServer>,
    log: LogControl,
    quit: Arc<Notify>,
) -> Result<()> {
    let admin = Arc::new(Admin {
        api: server.clone(),
        log,
        quit,
    });
    let listener = web::bind(args.admin_addr, "admin API").await?;
    tokio::spawn(web::serve(listener, move |call| admin.clone().handle(call)));

    let registry = Arc::new(metrics::registry(ctx.clone()));
    let listener = web::bind(args.metrics_addr, "metrics").await?;
    tokio::spawn(web::serve(listener, move |call| {
        let reply = admin::metrics(&registry, &call);
        async move { reply }
    }));

    let ready = ctx.clone();
    let listener = web::bind(args.readiness_addr, "readiness").await?;
    tokio::spawn(web::serve(listener, move |call| {
        let reply = admin::readiness(&ready.readiness, &call);
        async move { reply }
    }));
    Ok(())
}

/// Graceful drain: not ready, listeners closed (the kernel refuses new connections of the
/// enrolled pods from now on, as while the daemon is down), GOAWAY to every HBONE peer, then
/// open connections may finish until `timeout`; what is left is cut when the process exits.
/// The pins stay, so the pods stay captured.
async fn drain(server: &ApiServer, shutdown: &tokio::sync::watch::Sender<bool>, timeout: Duration) {
    let ctx = &server.ctx;
    ctx.readiness.pending("the end of the drain");
    server.pods.lock().await.stop_serving();
    let _ = shutdown.send(true);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut said = tokio::time::Instant::now();
    loop {
        let open = ctx.connections.open() + ctx.hbone_connections.count();
        if open == 0 {
            tracing::info!("drained: every connection finished");
            return;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            tracing::warn!(
                open,
                "drain deadline reached; closing the connections still open"
            );
            return;
        }
        if now.duration_since(said) >= Duration::from_secs(1) {
            tracing::info!(open, left_secs = (deadline - now).as_secs(), "draining");
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

fn show(args: ClientArgs, view: View) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let json = matches!(args.output, Format::Json);
    let text = runtime.block_on(cli::show(args.admin, view, json))?;
    print!("{text}");
    Ok(())
}

//! `ztunnel`: the node proxy daemon and the operator's CLI.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use ztunnel_user::api::{self, Request, Response};
use ztunnel_user::api_server::{self, ApiServer};
use ztunnel_user::config::MeshConfig;
use ztunnel_user::config::reload::ConfigFile;
use ztunnel_user::connections::ConnectionLog;
use ztunnel_user::datapath::{Datapath, DatapathSettings};
use ztunnel_user::hbone::client::Pool;
use ztunnel_user::hbone::mtls::Mtls;
use ztunnel_user::identity::{CertificateAuthority, CertificateStore};
use ztunnel_user::mesh::Mesh;
use ztunnel_user::netns::Netns;
use ztunnel_user::pods::Pods;
use ztunnel_user::proxy::ProxyContext;
use ztunnel_user::{features, output};

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
    /// Show the enrolled pods and the kernel counters of a running daemon.
    Status(ClientArgs),
    /// Show the connections a running daemon proxied (open and recent).
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
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `ztunnel_user=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

#[derive(Args)]
struct ClientArgs {
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    api_socket: PathBuf,
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

/// How long shutdown waits for HBONE connections to close after their GOAWAY. (Draining
/// open streams to a deadline is the drain feature's work.)
const GOAWAY_GRACE: Duration = Duration::from_secs(2);

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Status(args) => show(&args, Request::Status),
        Command::Connections(args) => show(&args, Request::Connections),
    }
}

fn run(args: RunArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log_level).context("--log-level")?,
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    ztunnel_user::limits::raise_open_files_limit();
    features::check(&args.cgroup_root)?;

    let (config_file, config) = match &args.config {
        Some(path) => {
            let (file, config) = ConfigFile::load(path.clone())?;
            (Some(Arc::new(file)), config)
        }
        None => (None, MeshConfig::default()),
    };
    let ca = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => CertificateAuthority::from_files(cert, key)?,
        _ => CertificateAuthority::load_or_create(&args.ca_dir, &args.trust_domain)?,
    };
    let datapath = Datapath::load(&DatapathSettings {
        pin_dir: args.bpffs.clone(),
        mark: args.mark,
        excluded_cidrs: args.exclude_cidrs,
        excluded_outbound_ports: args.exclude_ports,
        excluded_inbound_ports: args.exclude_inbound_ports,
    })
    .context("loading the capture programs")?;
    let home = Netns::current()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let roots = ca.roots();
        let store = Arc::new(CertificateStore::new(Arc::new(ca), Duration::from_secs(args.cert_lifetime_secs)));
        store.clone().spawn_renewal();
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let pool = Arc::new(Pool::default());
        pool.spawn_idle_release();
        let mesh = Mesh::new(config, config_file, &args.node, &datapath)
            .context("writing the mesh config to the kernel maps")?;
        let ctx = Arc::new(ProxyContext {
            home,
            datapath: Arc::new(datapath),
            connections: ConnectionLog::default(),
            mark: args.mark,
            mesh,
            trust_domain: args.trust_domain,
            tls: Mtls { store, roots },
            pool,
            shutdown: shutdown_rx,
            hbone_connections: Default::default(),
            local_pods: Default::default(),
        });
        if let Some(file) = ctx.mesh.file() {
            let reloading = ctx.clone();
            tokio::spawn(file.watch(move |config| reloading.apply_config(config)));
        }
        let drained = ctx.clone();
        let listener = api_server::bind(&args.api_socket)?;
        let server = Arc::new(ApiServer {
            node: args.node.clone(),
            pods: tokio::sync::Mutex::new(Pods::new(ctx.clone(), args.cgroup_root)),
            ctx,
        });
        tracing::info!(node = %args.node, api = %args.api_socket.display(), bpffs = %args.bpffs.display(), "ztunnel ready");
        tokio::select! {
            () = server.serve(listener) => {}
            signal = shutdown_signal() => {
                tracing::info!(signal, "shutting down; enrolled pods stay captured (their connections are refused until ztunnel is back)");
            }
        }
        // Tell HBONE peers (GOAWAY) and give the connections a moment to say it.
        let _ = shutdown.send(true);
        let deadline = tokio::time::Instant::now() + GOAWAY_GRACE;
        while drained.hbone_connections.count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::fs::remove_file(&args.api_socket);
        anyhow::Ok(())
    })
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

fn show(args: &ClientArgs, request: Request) -> Result<()> {
    let response = api::call(&args.api_socket, &request, Duration::from_secs(10))?;
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&response)?),
        Format::Table => match response {
            Response::Status(status) => print!("{}", output::status_table(&status)),
            Response::Connections { connections } => {
                print!("{}", output::connections_table(&connections))
            }
            other => anyhow::bail!("unexpected response from the daemon: {other:?}"),
        },
    }
    Ok(())
}

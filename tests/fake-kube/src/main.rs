//! `fake-kube-apiserver`: the in-memory Kubernetes API server (namespaces and pods) for the
//! lab, on plain HTTP. Its first line on stdout is `listening on <address>`.

use anyhow::Context;
use clap::Parser;
use fake_kube_apiserver::{Config, FakeKube};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(
    about = "A fake Kubernetes API server: core v1 namespaces and pods, in memory, over HTTP"
)]
struct Args {
    /// Where to listen (port 0: any free port; the first line on stdout says which).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to write a kubeconfig for the server once it listens.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Seconds between a watch's bookmarks.
    #[arg(long, default_value_t = 60)]
    bookmark_interval: u64,
    /// How many changes are kept for watches to resume from.
    #[arg(long, default_value_t = 1000)]
    history: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config {
        history_limit: args.history,
        bookmark_interval: Duration::from_secs(args.bookmark_interval.max(1)),
        ..Config::default()
    };
    let server = FakeKube::start_with(args.listen, config).await?;
    if let Some(path) = &args.kubeconfig {
        server.write_kubeconfig(path)?;
    }
    // The kubeconfig is written first: a parent that read this line may use it at once.
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {}", server.address())
        .and_then(|()| stdout.flush())
        .context("writing to stdout")?;
    let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    tokio::select! {
        _ = terminate.recv() => {}
        interrupted = tokio::signal::ctrl_c() => interrupted.context("handling SIGINT")?,
    }
    server.stop().await;
    Ok(())
}

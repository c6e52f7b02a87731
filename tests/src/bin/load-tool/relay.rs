//! A plain relay, the reference the benchmark holds the mesh against: each accepted connection
//! is copied both ways to a fixed destination by tokio, with no TLS and no HTTP/2. Two of them
//! in a row (one in the client's pod, one in the server's) have the mesh's three TCP legs.

use anyhow::{Context, Result, anyhow};
use std::net::SocketAddrV4;
use std::str::FromStr;
use tokio::net::{TcpListener, TcpStream};

/// `LISTEN=TO`, both IP:PORT.
#[derive(Clone, Copy, Debug)]
pub struct Forward {
    listen: SocketAddrV4,
    to: SocketAddrV4,
}

impl FromStr for Forward {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        let (listen, to) = text
            .split_once('=')
            .ok_or_else(|| anyhow!("expected LISTEN=TO (both IP:PORT), got {text:?}"))?;
        Ok(Self {
            listen: listen
                .parse()
                .with_context(|| format!("LISTEN in {text:?}"))?,
            to: to.parse().with_context(|| format!("TO in {text:?}"))?,
        })
    }
}

pub fn relay(forwards: Vec<Forward>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_io()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let mut accepting = tokio::task::JoinSet::new();
        for forward in forwards {
            let listener = TcpListener::bind(forward.listen)
                .await
                .with_context(|| format!("listening on {}", forward.listen))?;
            accepting.spawn(accept(listener, forward.to));
        }
        super::announce("ready");
        while let Some(accepted) = accepting.join_next().await {
            accepted.context("an accept loop panicked")??;
        }
        Ok(())
    })
}

async fn accept(listener: TcpListener, to: SocketAddrV4) -> Result<()> {
    loop {
        let (client, _) = listener.accept().await.context("accepting")?;
        tokio::spawn(async move {
            match carry(client, to).await {
                // How iperf3 ends its connections; the clients report their own failures.
                Err(err) if is_abrupt_end(&err) => {}
                Err(err) => eprintln!("relay to {to}: {err}"),
                Ok(()) => {}
            }
        });
    }
}

async fn carry(mut client: TcpStream, to: SocketAddrV4) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut upstream = TcpStream::connect(to).await?;
    upstream.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

fn is_abrupt_end(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
    )
}

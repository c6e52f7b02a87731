//! The server side of every benchmark client: an echo port and a reply-then-close port.

use super::REQUEST_BYTES;
use anyhow::{Context, Result};
use std::net::{Ipv4Addr, SocketAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Deep enough for the connection-rate workers and the idle connections opened back to back.
const BACKLOG: u32 = 4096;

pub fn serve(echo_port: u16, reply_port: u16) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_io()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let echo = listen(echo_port)?;
        let reply = listen(reply_port)?;
        super::announce("ready");
        tokio::try_join!(accept(echo, echo_back), accept(reply, reply_once))?;
        Ok(())
    })
}

fn listen(port: u16) -> Result<TcpListener> {
    let address = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let socket = TcpSocket::new_v4().context("creating a socket")?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(address)
        .with_context(|| format!("binding {address}"))?;
    socket
        .listen(BACKLOG)
        .with_context(|| format!("listening on {address}"))
}

async fn accept<Serve, Served>(listener: TcpListener, serve: Serve) -> Result<()>
where
    Serve: Fn(TcpStream) -> Served,
    Served: Future<Output = std::io::Result<()>> + Send + 'static,
{
    loop {
        let (stream, _) = listener.accept().await.context("accepting")?;
        // Replies go out at once, not after Nagle's delay.
        stream.set_nodelay(true)?;
        tokio::spawn(serve(stream));
    }
}

async fn echo_back(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buffer = [0u8; 4096];
    loop {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        stream.write_all(&buffer[..read]).await?;
    }
}

/// One request, its reply, and the server's close.
async fn reply_once(mut stream: TcpStream) -> std::io::Result<()> {
    let mut request = [0u8; REQUEST_BYTES];
    stream.read_exact(&mut request).await?;
    stream.write_all(&request).await
}

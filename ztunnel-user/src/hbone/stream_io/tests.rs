//! An HTTP/2 connection inside a CONNECT stream of another, both through the client's pool, to
//! an echo server that runs the inner connection's server over the outer stream: bytes come back
//! whole through both layers' flow control, and each end sees the other's END_STREAM.

use super::*;
use crate::hbone::client::{ConnectRequest, Pool, PoolKey};
use crate::identity::Identity;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The authority that asks the server to run an inner connection over the stream.
const INNER_HBONE: &str = "10.0.0.2:15008";
/// More than one stream window (4 MiB), so both layers wait for credit.
const BYTES: usize = 6 * 1024 * 1024;

/// Sends back what `recv` brings, then END_STREAM.
async fn echo(mut send: SendStream<Bytes>, mut recv: RecvStream) {
    while let Some(Ok(mut data)) = recv.data().await {
        let _ = recv.flow_control().release_capacity(data.len());
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let Some(Ok(granted)) = std::future::poll_fn(|cx| send.poll_capacity(cx)).await else {
                return;
            };
            let _ = send.send_data(data.split_to(granted.min(data.len())), false);
        }
    }
    let _ = send.send_data(Bytes::new(), true);
}

/// Serves one HTTP/2 connection over `io`, answering every CONNECT 200 and handing its stream
/// to `handle` with its authority.
async fn serve<IO, Handle, Handled>(io: IO, handle: Handle)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    Handle: Fn(String, SendStream<Bytes>, RecvStream) -> Handled,
    Handled: std::future::Future<Output = ()> + Send + 'static,
{
    let Ok(mut connection) = h2::server::handshake(io).await else {
        return;
    };
    while let Some(Ok((request, mut respond))) = connection.accept().await {
        let authority = request.uri().authority().map(|a| a.to_string());
        let recv = request.into_body();
        if let Ok(send) = respond.send_response(http::Response::new(()), false) {
            tokio::spawn(handle(authority.unwrap_or_default(), send, recv));
        }
    }
}

/// The gateway's side: a CONNECT to `INNER_HBONE` carries a connection whose streams are
/// echoed; any other stream is echoed itself.
async fn serve_gateway(tcp: TcpStream) {
    serve(tcp, |authority, send, recv| async move {
        if authority == INNER_HBONE {
            let inner = StreamIo::new(send, recv, ());
            serve(inner, |_, send, recv| echo(send, recv)).await;
        } else {
            echo(send, recv).await;
        }
    })
    .await;
}

fn key(destination: &str) -> PoolKey {
    PoolKey {
        source_identity: Arc::new(Identity {
            trust_domain: "cluster.local".into(),
            namespace: "demo".into(),
            service_account: "sa-a".into(),
        }),
        destination_identities: Vec::new(),
        destination: destination.parse().unwrap(),
        source_ip: "127.0.0.1".parse().unwrap(),
    }
}

fn request(authority: &str) -> ConnectRequest {
    ConnectRequest {
        authority: authority.parse().unwrap(),
        client: "10.0.0.1:40000".parse().unwrap(),
        baggage: String::new(),
    }
}

#[tokio::test]
async fn an_hbone_connection_runs_inside_a_connect_stream() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve_gateway(tcp));
        }
    });
    let timeout = Duration::from_secs(10);
    let pool = Arc::new(Pool::new(timeout, timeout));
    let outer_key = key(&gateway.to_string());
    let connect_outer = || TcpStream::connect(gateway);
    let connect_inner = || async {
        let outer = pool
            .open(&outer_key, &request(INNER_HBONE), connect_outer)
            .await?;
        Ok(outer.into_io())
    };
    let stream = pool
        .open(&key(INNER_HBONE), &request("10.0.0.2:8080"), connect_inner)
        .await
        .unwrap();

    let (mut reader, mut writer) = tokio::io::split(stream.into_io());
    let sent: Vec<u8> = (0..BYTES).map(|i| (i % 251) as u8).collect();
    let write = async {
        writer.write_all(&sent).await?;
        writer.shutdown().await
    };
    let read = async {
        let mut echoed = Vec::new();
        reader.read_to_end(&mut echoed).await.map(|_| echoed)
    };
    let both = async { tokio::try_join!(write, read) };
    let ((), echoed) = tokio::time::timeout(timeout, both).await.unwrap().unwrap();
    assert_eq!(echoed.len(), sent.len());
    assert!(echoed == sent, "the bytes came back changed");
}

//! The HBONE client side: a pool of mTLS HTTP/2 connections, and CONNECT streams over them.
//!
//! Connections are shared by every stream with the same key (source identity, destination
//! identities, destination address, source address) up to `CLIENT_STREAMS_PER_CONNECTION`
//! streams each; then another connection is opened. Connections idle for
//! `POOL_IDLE_TIMEOUT` are closed.
//!
//! A stream the peer did not process (its connection was retired by GOAWAY, or refused with
//! REFUSED_STREAM) is sent again, on another connection, up to `STREAM_ATTEMPTS` times: no
//! byte of it has left yet, and the application should not pay for the peer's housekeeping.
//!
//! A peer that accepts TCP and then stalls holds nothing up for long: opening a connection
//! (TCP, TLS and HTTP/2 handshakes) has the handshake timeout, a CONNECT's answer a timeout of
//! its own, and no lock is held across either. While one stream opens a key's connection,
//! the streams that want the same key wait for that one and share its outcome.

use super::OpenCounts;
use super::stream_io::StreamIo;
use crate::identity::Identity;
use crate::relay::h2::io_error;
use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub(crate) source_identity: Arc<Identity>,
    pub(crate) destination_identities: Vec<Identity>,
    /// The peer's HBONE address (`<ip>:15008`).
    pub(crate) destination: SocketAddr,
    pub(crate) source_ip: IpAddr,
}

/// What goes into one CONNECT request.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// `:authority`: the target pod address and port.
    pub authority: SocketAddr,
    /// The application's client address (for `forwarded`).
    pub client: SocketAddr,
    pub baggage: String,
}

impl ConnectRequest {
    pub fn to_http(&self) -> Request<()> {
        let mut request = Request::new(());
        *request.method_mut() = Method::CONNECT;
        *request.uri_mut() = http::Uri::builder()
            .authority(self.authority.to_string())
            .build()
            .expect("an IP:port is a valid authority");
        let headers = request.headers_mut();
        let value = |text: String| http::HeaderValue::from_str(&text).expect("ASCII header value");
        // Values no later stream repeats go out as never-indexed literals: indexed, they
        // would only churn both ends' HPACK tables, which every pooled connection keeps.
        let unrepeated = |text: String| {
            let mut value = value(text);
            value.set_sensitive(true);
            value
        };
        headers.insert("forwarded", unrepeated(format!("for=\"{}\"", self.client)));
        headers.insert("baggage", value(self.baggage.clone()));
        headers.insert("traceparent", unrepeated(traceparent()));
        request
    }
}

/// A fresh W3C trace context: version 00, random trace and span ids, sampled.
fn traceparent() -> String {
    let trace: u128 = rand::random();
    let span: u64 = rand::random();
    format!("00-{trace:032x}-{span:016x}-01")
}

/// An open CONNECT stream. Holding its slot keeps the connection's stream count.
pub(crate) struct HboneStream {
    pub(crate) send: SendStream<Bytes>,
    pub(crate) recv: RecvStream,
    pub(crate) slot: StreamSlot,
}

impl HboneStream {
    /// The stream as a byte stream, for a connection carried inside it.
    pub(crate) fn into_io(self) -> StreamIo<StreamSlot> {
        StreamIo::new(self.send, self.recv, self.slot)
    }
}

struct PooledConnection {
    sender: SendRequest<Bytes>,
    counts: Arc<OpenCounts>,
    streams: AtomicUsize,
    closed: AtomicBool,
    last_used: Mutex<Instant>,
}

impl PooledConnection {
    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
            && self.streams.load(Ordering::Acquire) < super::CLIENT_STREAMS_PER_CONNECTION
    }
}

/// One stream's share of a connection, returned on drop.
pub(crate) struct StreamSlot(Arc<PooledConnection>);

impl StreamSlot {
    fn take(connection: &Arc<PooledConnection>) -> StreamSlot {
        connection.streams.fetch_add(1, Ordering::AcqRel);
        OpenCounts::add(&connection.counts.streams);
        StreamSlot(connection.clone())
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
        OpenCounts::remove(&self.0.counts.streams);
        *self.0.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }
}

/// The connections of one key, and the one being opened, if any.
#[derive(Default)]
struct KeyConnections {
    open: Vec<Arc<PooledConnection>>,
    /// Says how the opening went, once it is over.
    opening: Option<watch::Receiver<Option<Opened>>>,
}

/// How opening a connection went, for the streams that waited on it.
type Opened = Result<(), Arc<io::Error>>;

/// Where a stream gets its slot.
enum Next {
    Slot(StreamSlot),
    /// Another stream is opening a connection of the key.
    Wait(watch::Receiver<Option<Opened>>),
    /// Open one: this stream is the opener.
    Open(watch::Sender<Option<Opened>>),
}

/// How many connections a stream is offered to, when the peer did not process it.
const STREAM_ATTEMPTS: usize = 3;

/// How one attempt to open a stream failed.
enum Attempt {
    /// The peer did not process the stream: it may go again, elsewhere.
    Unprocessed(io::Error),
    Failed(io::Error),
}

pub(crate) struct Pool {
    keys: Mutex<HashMap<PoolKey, KeyConnections>>,
    counts: Arc<OpenCounts>,
    /// Bound on opening a connection: TCP, TLS and HTTP/2 handshakes.
    handshake_timeout: Duration,
    /// Bound on a CONNECT's answer (the peer connects to its app first).
    response_timeout: Duration,
}

impl Pool {
    pub(crate) fn new(handshake_timeout: Duration, response_timeout: Duration) -> Pool {
        Pool {
            keys: Mutex::default(),
            counts: Arc::default(),
            handshake_timeout,
            response_timeout,
        }
    }

    /// Opens a CONNECT stream to `key.destination`, over a pooled connection or over a new one
    /// made by `connect` (which returns the established mTLS stream). Returns the stream once
    /// the server answered 200.
    pub(crate) async fn open<IO, Connect, Connecting>(
        &self,
        key: &PoolKey,
        request: &ConnectRequest,
        connect: Connect,
    ) -> io::Result<HboneStream>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        Connect: Fn() -> Connecting,
        Connecting: Future<Output = io::Result<IO>>,
    {
        let mut attempt = 1;
        loop {
            let slot = self.reserve(key, &connect).await?;
            match self.request(key, request, slot).await {
                Ok(stream) => return Ok(stream),
                Err(Attempt::Unprocessed(err)) if attempt < STREAM_ATTEMPTS => {
                    tracing::debug!(%err, destination = %key.destination, attempt, "HBONE stream not processed by the peer; sending it again");
                    attempt += 1;
                }
                Err(Attempt::Unprocessed(err) | Attempt::Failed(err)) => return Err(err),
            }
        }
    }

    /// Sends the CONNECT on `slot`'s connection and waits for its answer.
    async fn request(
        &self,
        key: &PoolKey,
        request: &ConnectRequest,
        slot: StreamSlot,
    ) -> Result<HboneStream, Attempt> {
        // A connection that takes no new stream (the peer said GOAWAY, or it broke) is not
        // offered again, and the stream never left.
        let retired = |err: h2::Error| {
            slot.0.closed.store(true, Ordering::Release);
            Attempt::Unprocessed(io_error(err))
        };
        let mut sender = slot.0.sender.clone().ready().await.map_err(retired)?;
        let (response, send) = sender
            .send_request(request.to_http(), false)
            .map_err(retired)?;
        let response = tokio::time::timeout(self.response_timeout, response)
            .await
            .map_err(|_| {
                Attempt::Failed(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "HBONE peer {} did not answer the CONNECT to {} within {:?}",
                        key.destination, request.authority, self.response_timeout
                    ),
                ))
            })?
            .map_err(|err| {
                // Above the last stream id of the peer's GOAWAY, or refused outright: the
                // peer says it did nothing with the stream.
                if err.is_go_away() || err.reason() == Some(h2::Reason::REFUSED_STREAM) {
                    retired(err)
                } else {
                    Attempt::Failed(io_error(err))
                }
            })?;
        if response.status() != StatusCode::OK {
            // A 401 is the peer's authorization saying no; anything else, that it cannot
            // deliver.
            let kind = if response.status() == StatusCode::UNAUTHORIZED {
                io::ErrorKind::PermissionDenied
            } else {
                io::ErrorKind::ConnectionRefused
            };
            return Err(Attempt::Failed(io::Error::new(
                kind,
                format!(
                    "HBONE peer {} answered {} for {}",
                    key.destination,
                    response.status(),
                    request.authority
                ),
            )));
        }
        Ok(HboneStream {
            send,
            recv: response.into_body(),
            slot,
        })
    }

    /// A slot on a connection of `key`: a pooled one with room, else the one another stream
    /// is opening (waited for, not joined by a second attempt), else a new one, opened here
    /// with `connect`. Its opening failure is every waiting stream's.
    async fn reserve<IO, Connect, Connecting>(
        &self,
        key: &PoolKey,
        connect: Connect,
    ) -> io::Result<StreamSlot>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        Connect: FnOnce() -> Connecting,
        Connecting: Future<Output = io::Result<IO>>,
    {
        let mut connect = Some(connect);
        loop {
            let opened = match self.next(key) {
                Next::Slot(slot) => return Ok(slot),
                Next::Wait(mut opening) => {
                    // A dropped opener (its client went away) leaves the channel closed:
                    // look again, and open if nobody does.
                    match opening.wait_for(Option::is_some).await {
                        Ok(outcome) => outcome.clone().unwrap_or(Ok(())),
                        Err(_) => Ok(()),
                    }
                }
                Next::Open(done) => {
                    let connect = connect.take().expect("a stream opens at most once");
                    return self.open_connection(key, connect, done).await;
                }
            };
            if let Err(err) = opened {
                return Err(io::Error::new(err.kind(), err.to_string()));
            }
        }
    }

    fn next(&self, key: &PoolKey) -> Next {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let entry = keys.entry(key.clone()).or_default();
        entry.open.retain(|c| !c.closed.load(Ordering::Acquire));
        if let Some(connection) = entry.open.iter().find(|c| c.usable()) {
            return Next::Slot(StreamSlot::take(connection));
        }
        if let Some(opening) = entry.opening.as_ref().filter(|o| o.has_changed().is_ok()) {
            return Next::Wait(opening.clone());
        }
        let (done, opening) = watch::channel(None);
        entry.opening = Some(opening);
        Next::Open(done)
    }

    /// Opens a connection of `key` with `connect`, within the handshake timeout, pools it and
    /// tells the streams that waited (through `done`) how it went.
    async fn open_connection<IO, Connect, Connecting>(
        &self,
        key: &PoolKey,
        connect: Connect,
        done: watch::Sender<Option<Opened>>,
    ) -> io::Result<StreamSlot>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        Connect: FnOnce() -> Connecting,
        Connecting: Future<Output = io::Result<IO>>,
    {
        let opening = async { handshake(connect().await?, self.counts.clone()).await };
        let opened = tokio::time::timeout(self.handshake_timeout, opening)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "HBONE peer {} did not complete the handshakes within {:?}",
                        key.destination, self.handshake_timeout
                    ),
                ))
            });
        let slot = {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            let entry = keys.entry(key.clone()).or_default();
            entry.opening = None;
            opened.as_ref().ok().map(|connection| {
                entry.open.push(connection.clone());
                tracing::debug!(destination = %key.destination, connections = entry.open.len(), "new HBONE connection");
                StreamSlot::take(connection)
            })
        };
        let outcome = opened.map(drop).map_err(Arc::new);
        done.send_replace(Some(outcome.clone()));
        match slot {
            Some(slot) => Ok(slot),
            None => Err(outcome
                .err()
                .map(|err| io::Error::new(err.kind(), err.to_string()))
                .expect("no slot means the opening failed")),
        }
    }

    /// Open pooled connections (their driving tasks) and streams.
    pub(crate) fn counts(&self) -> &OpenCounts {
        &self.counts
    }

    /// Closes connections without streams that have been idle for `POOL_IDLE_TIMEOUT`.
    fn release_idle(&self) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.retain(|_, entry| {
            entry.open.retain(|c| {
                let idle = c.streams.load(Ordering::Acquire) == 0
                    && c.last_used
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .elapsed()
                        >= super::POOL_IDLE_TIMEOUT;
                !(idle || c.closed.load(Ordering::Acquire))
            });
            // A key being opened is certainly not idle.
            !entry.open.is_empty() || entry.opening.is_some()
        });
    }

    /// Calls `release_idle` periodically for as long as the pool exists.
    pub(crate) fn spawn_idle_release(self: &Arc<Self>) {
        let pool: Weak<Pool> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(super::POOL_IDLE_TIMEOUT / 10).await;
                match pool.upgrade() {
                    Some(pool) => pool.release_idle(),
                    None => return,
                }
            }
        });
    }
}

/// The HTTP/2 handshake over an established mTLS stream, and the task that drives the
/// connection (with keepalive PINGs) until it ends.
async fn handshake<IO>(io: IO, counts: Arc<OpenCounts>) -> io::Result<Arc<PooledConnection>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, mut connection) = h2::client::Builder::new()
        .initial_window_size(super::INITIAL_STREAM_WINDOW)
        .initial_connection_window_size(super::INITIAL_CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME_SIZE)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(io_error)?;
    OpenCounts::add(&counts.connections);
    let pooled = Arc::new(PooledConnection {
        sender,
        counts: counts.clone(),
        streams: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        last_used: Mutex::new(Instant::now()),
    });
    let ping_pong = connection
        .ping_pong()
        .expect("ping_pong is taken only here");
    let watched = Arc::downgrade(&pooled);
    tokio::spawn(async move {
        tokio::select! {
            result = &mut connection => {
                if let Err(err) = result {
                    tracing::debug!(%err, "HBONE connection ended");
                }
            }
            () = super::keepalive(ping_pong) => {}
        }
        if let Some(pooled) = watched.upgrade() {
            pooled.closed.store(true, Ordering::Release);
        }
        OpenCounts::remove(&counts.connections);
    });
    Ok(pooled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    fn key(destination: SocketAddr) -> PoolKey {
        let identity = Identity {
            trust_domain: "cluster.local".into(),
            namespace: "demo".into(),
            service_account: "sa-a".into(),
        };
        PoolKey {
            source_identity: Arc::new(identity),
            destination_identities: Vec::new(),
            destination,
            source_ip: "127.0.0.1".parse().unwrap(),
        }
    }

    /// A peer that accepts TCP and never says a word: every stream to it fails within the
    /// handshake timeout, over one attempt to connect, and no lock keeps another key waiting.
    #[tokio::test]
    async fn a_stalled_peer_fails_its_streams_in_time_over_one_attempt() {
        let stalled = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = stalled.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut accepted = Vec::new();
            while let Ok((stream, _)) = stalled.accept().await {
                accepted.push(stream);
            }
        });
        let timeout = Duration::from_millis(500);
        let pool = Arc::new(Pool::new(timeout, timeout));
        let attempts = Arc::new(AtomicUsize::new(0));
        let request = ConnectRequest {
            authority: "10.244.2.2:8080".parse().unwrap(),
            client: "10.244.1.2:41000".parse().unwrap(),
            baggage: String::new(),
        };
        let started = Instant::now();
        let streams: Vec<_> = (0..3)
            .map(|_| {
                let (pool, attempts, request) = (pool.clone(), attempts.clone(), request.clone());
                tokio::spawn(async move {
                    let connect = || async {
                        attempts.fetch_add(1, Ordering::SeqCst);
                        TcpStream::connect(addr).await
                    };
                    pool.open(&key(addr), &request, connect).await.map(drop)
                })
            })
            .collect();
        // Meanwhile another peer's key goes its own way at once (here: refused outright).
        let elsewhere = key("127.0.0.1:1".parse().unwrap());
        let refused = pool
            .open(&elsewhere, &request, || TcpStream::connect("127.0.0.1:1"))
            .await
            .map(drop);
        assert!(refused.is_err() && started.elapsed() < timeout);
        for stream in streams {
            let err = stream.await.unwrap().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        }
        assert!(started.elapsed() < timeout * 3, "{:?}", started.elapsed());
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        held.abort();
    }

    #[test]
    fn connect_request_headers() {
        let request = ConnectRequest {
            authority: "10.244.2.2:8080".parse().unwrap(),
            client: "10.244.1.2:41000".parse().unwrap(),
            baggage: "k8s.namespace.name=demo,k8s.pod.name=a1".into(),
        }
        .to_http();
        assert_eq!(request.method(), Method::CONNECT);
        assert_eq!(
            request.uri().authority().unwrap().as_str(),
            "10.244.2.2:8080"
        );
        assert!(request.uri().scheme().is_none() && request.uri().path_and_query().is_none());
        assert_eq!(request.headers()["forwarded"], "for=\"10.244.1.2:41000\"");
        assert_eq!(
            request.headers()["baggage"],
            "k8s.namespace.name=demo,k8s.pod.name=a1"
        );
        assert!(request.headers()["forwarded"].is_sensitive());
        assert!(!request.headers()["baggage"].is_sensitive());
        assert!(request.headers()["traceparent"].is_sensitive());
        let traceparent = request.headers()["traceparent"].to_str().unwrap();
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [2, 32, 16, 2]
        );
    }
}

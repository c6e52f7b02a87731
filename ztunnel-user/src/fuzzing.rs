//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`, which no build of the
//! product enables): the few things they drive that the crate otherwise keeps to itself. The
//! parsers the targets fuzz are public already (`mesh::config::MeshConfig::parse`, `cni::run`,
//! the `api` types); a new version of the mesh file is read against the one in force
//! (`mesh_file_versions`); the HBONE server's handshake, connection loop and `Incoming` are not, so
//! `hbone_connection` serves one connection with them the way the proxy's 15008 handler does at
//! the wire level.

use crate::cni::NetConf;
use crate::hbone::OpenCounts;
use crate::hbone::server::{Incoming, handshake, serve_connection};
use crate::mesh::config::{ConfigError, FileIndex, MeshConfig};
use bytes::Bytes;
use h2::{RecvStream, SendStream};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

/// The daemon socket the CNI plugin would call for this network configuration (its stdin), if
/// the configuration parses: a target checks it before letting the plugin run.
pub fn cni_daemon_socket(stdin: &[u8]) -> Option<PathBuf> {
    NetConf::parse(stdin).ok().map(|conf| conf.api_socket)
}

/// The model the mesh file's versions `first` then `second` leave in force, each read as the
/// daemon reads a new version of its file (compared with the one before entry by entry where
/// it can be): a target checks it against the whole parse of `second`.
pub fn mesh_file_versions(first: &str, second: &str) -> Result<MeshConfig, ConfigError> {
    let path = Path::new("fuzz/mesh.yaml");
    let mut index = FileIndex::default();
    let mut model = MeshConfig::default();
    for text in [first, second] {
        let (changes, update) = index.read(path, text, &model)?;
        model = model.updated(changes.changes(&model)).config;
        index.commit(update);
    }
    Ok(model)
}

/// How the handler answers a CONNECT whose target the server's checks allow (where the proxy
/// would authorize it and connect to the app).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// 200, then the stream's bytes are echoed until the client ends it.
    Accept,
    /// 401.
    Deny,
    /// 503.
    Fail,
}

/// One HBONE connection as the server and the handler saw it.
#[derive(Debug, Default)]
pub struct HboneOutcome {
    /// Why the HTTP/2 handshake or the connection ended with an error, if it did.
    pub error: Option<String>,
    /// The streams answered 200, by id, with the target the server's checks returned.
    pub accepted: Vec<(u32, SocketAddr)>,
    /// Requests refused by the server's checks (400 or 503).
    pub refused: usize,
    /// Requests answered 401.
    pub denied: usize,
    /// Requests answered 503 by the handler.
    pub failed: usize,
    /// Streams `accept` could not answer (the client had reset them).
    pub accept_errors: usize,
    /// The open connection and stream counts once everything ended (both should be 0).
    pub open_after: (usize, usize),
}

/// Serves one HBONE connection over `io` (already past TLS) as a pod's 15008 server does:
/// the HTTP/2 handshake, then every CONNECT stream on a task of its own whose handler checks
/// the request's target against `local` (the address the connection arrived on) and refuses
/// it as the server's checks say, else answers as `answer` says for that target. `shutdown`
/// turning true drains the connection (GOAWAY). Returns once the connection ended and every
/// stream's task finished.
pub async fn hbone_connection<IO>(
    io: IO,
    local: SocketAddr,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    answer: fn(SocketAddr) -> Answer,
) -> HboneOutcome
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let outcome = Arc::new(Mutex::new(HboneOutcome::default()));
    let counts = Arc::new(OpenCounts::default());
    let ended = match handshake(io).await {
        Err(err) => Err(format!("handshake: {err}")),
        Ok(connection) => {
            let record = outcome.clone();
            let serve =
                move |incoming: Incoming| handle(incoming, local, peer, answer, record.clone());
            serve_connection(connection, shutdown, counts.clone(), serve)
                .await
                .map_err(|err| format!("connection: {err}"))
        }
    };
    // The streams' tasks end once the connection is gone; a task that does not is a hang the
    // caller's time bound reports.
    while counts.streams() > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let mut outcome = std::mem::take(&mut *lock(&outcome));
    outcome.error = ended.err();
    outcome.open_after = (counts.connections(), counts.streams());
    outcome
}

/// One stream, as the proxy's handler treats it on the wire.
async fn handle(
    incoming: Incoming,
    local: SocketAddr,
    peer: SocketAddr,
    answer: fn(SocketAddr) -> Answer,
    outcome: Arc<Mutex<HboneOutcome>>,
) {
    let target = match incoming.target(local) {
        Ok(target) => target,
        Err(refusal) => {
            incoming.refuse(&refusal);
            lock(&outcome).refused += 1;
            return;
        }
    };
    // The proxy reads the original client before it authorizes.
    let _client = incoming.client(peer);
    match answer(target) {
        Answer::Deny => {
            incoming.deny();
            lock(&outcome).denied += 1;
        }
        Answer::Fail => {
            incoming.fail();
            lock(&outcome).failed += 1;
        }
        Answer::Accept => match incoming.accept() {
            Ok((send, recv)) => {
                lock(&outcome)
                    .accepted
                    .push((send.stream_id().into(), target));
                echo(send, recv).await;
            }
            Err(_) => lock(&outcome).accept_errors += 1,
        },
    }
}

/// Sends back what the client sends on the stream, then ends it when the client does.
async fn echo(mut send: SendStream<Bytes>, mut recv: RecvStream) {
    while let Some(data) = recv.data().await {
        let Ok(data) = data else {
            return;
        };
        if recv.flow_control().release_capacity(data.len()).is_err()
            || send.send_data(data, false).is_err()
        {
            return;
        }
    }
    let _ = send.send_data(Bytes::new(), true);
}

fn lock(outcome: &Mutex<HboneOutcome>) -> std::sync::MutexGuard<'_, HboneOutcome> {
    outcome.lock().unwrap_or_else(PoisonError::into_inner)
}

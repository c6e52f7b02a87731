//! The life of every proxied connection as the daemon reports it: a record for
//! `ztunnel connections` (the open ones and the most recent closed ones), Istio's TCP metrics
//! when it opens and closes, and an access log line when it ends; and the open connections
//! that authorization let in, so a policy change can re-check them and close the ones it now
//! denies.

use super::access_log::{self, AccessLog, Entry};
use super::labels::{ResponseFlags, TrafficLabels};
use super::metrics::TrafficMetrics;
use crate::api::{ConnectionRecord, Direction};
use crate::mesh::authz::{Denial, Subject};
use crate::mesh::config::Unroutable;
use atomic_waker::AtomicWaker;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

/// How many connections are remembered (open ones first in line to stay, see `record`).
const CAPACITY: usize = 4096;

/// Why a connection ended before, or instead of, carrying all its bytes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectionError {
    /// Authorization refused it.
    #[error("denied: {0}")]
    Denied(Denial),
    /// A policy change revoked it while it was open.
    #[error("closed: the policy in force now denies it ({0})")]
    Revoked(Denial),
    /// The mesh config offers nothing that can take it.
    #[error(transparent)]
    Unroutable(#[from] Unroutable),
    /// A socket, TLS or HTTP/2 failure, or a peer's refusal.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl ConnectionError {
    /// Istio's response flags for a connection this ended.
    fn response_flags(&self) -> ResponseFlags {
        use io::ErrorKind::*;
        match self {
            ConnectionError::Denied(_) | ConnectionError::Revoked(_) => ResponseFlags::Denied,
            ConnectionError::Unroutable(_) => ResponseFlags::ConnectFailed,
            ConnectionError::Io(err) => match err.kind() {
                // An HBONE peer's 401: its authorization said no.
                PermissionDenied => ResponseFlags::Denied,
                ConnectionRefused | TimedOut | HostUnreachable | NetworkUnreachable
                | AddrNotAvailable => ResponseFlags::ConnectFailed,
                _ => ResponseFlags::None,
            },
        }
    }
}

pub(crate) struct ConnectionLog {
    entries: Mutex<VecDeque<Arc<Mutex<Live>>>>,
    /// Every open authorized connection, however many: not bounded by `CAPACITY`.
    authorized: Arc<Registry>,
    next_id: AtomicU64,
    reporting: Arc<Reporting>,
}

/// A connection as the log keeps it: small, with what it shares with others (the pod's
/// name, the labels) shared. `ConnectionRecord` is made from it when someone asks.
struct Live {
    direction: Direction,
    pod: Arc<str>,
    source: SocketAddr,
    original_destination: SocketAddr,
    labels: Arc<TrafficLabels>,
    bytes_sent: u64,
    bytes_received: u64,
    open: bool,
    flags: ResponseFlags,
    error: Option<String>,
}

impl Live {
    fn record(&self) -> ConnectionRecord {
        ConnectionRecord {
            direction: self.direction,
            pod: self.pod.to_string(),
            source: self.source,
            original_destination: self.original_destination,
            source_identity: self.labels.source_principal().to_owned(),
            destination_identity: self.labels.destination_principal().to_owned(),
            bytes_sent: self.bytes_sent,
            bytes_received: self.bytes_received,
            open: self.open,
            response_flags: self.flags.label().to_owned(),
            error: self.error.clone(),
        }
    }
}

/// Where a finished connection is reported.
struct Reporting {
    metrics: Arc<TrafficMetrics>,
    access_log: AccessLog,
    /// Connections not yet finished.
    open: AtomicUsize,
}

/// Open authorized connections by id.
type Registry = Mutex<HashMap<u64, Arc<Authorized>>>;

struct Authorized {
    subject: Subject,
    /// Why a policy change now denies it, once one did.
    revoked: OnceLock<Denial>,
    /// The task carrying the connection, woken when `revoked` is set. A waker slot rather
    /// than a notification to wait on: that wait would be part of every open connection's
    /// task, this is here only for the authorized ones.
    carrier: AtomicWaker,
}

/// A live connection; it is reported when it finishes (or, failing that, when dropped).
pub(crate) struct Tracked {
    record: Arc<Mutex<Live>>,
    labels: Arc<TrafficLabels>,
    started: Instant,
    reporting: Arc<Reporting>,
    reported: bool,
    /// Its id and entry in the registry, once authorized.
    authorized: Option<(u64, Arc<Authorized>, Arc<Registry>)>,
}

impl ConnectionLog {
    pub(crate) fn new(metrics: Arc<TrafficMetrics>, access_log: AccessLog) -> ConnectionLog {
        ConnectionLog {
            entries: Mutex::default(),
            authorized: Arc::default(),
            next_id: AtomicU64::new(0),
            reporting: Arc::new(Reporting {
                metrics,
                access_log,
                open: AtomicUsize::new(0),
            }),
        }
    }

    /// A connection the proxy took on for `pod`; counted as opened at once.
    pub(crate) fn record(
        &self,
        direction: Direction,
        pod: &Arc<str>,
        source: SocketAddr,
        original_destination: SocketAddr,
        labels: TrafficLabels,
    ) -> Tracked {
        let labels = self.reporting.metrics.opened(pod, labels);
        let record = Arc::new(Mutex::new(Live {
            direction,
            pod: pod.clone(),
            source,
            original_destination,
            labels: labels.clone(),
            bytes_sent: 0,
            bytes_received: 0,
            open: true,
            flags: ResponseFlags::None,
            error: None,
        }));
        let mut entries = lock(&self.entries);
        if entries.len() >= CAPACITY {
            entries.pop_front();
        }
        entries.push_back(record.clone());
        drop(entries);
        self.reporting.open.fetch_add(1, Ordering::AcqRel);
        Tracked {
            record,
            labels,
            started: Instant::now(),
            reporting: self.reporting.clone(),
            reported: false,
            authorized: None,
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<ConnectionRecord> {
        lock(&self.entries)
            .iter()
            .map(|e| lock(e).record())
            .collect()
    }

    /// `pod` left the node: its metric series go (as its last connections close).
    pub(crate) fn forget_pod(&self, pod: &str) {
        self.reporting.metrics.forget_pod(pod);
    }

    /// Connections not yet finished.
    pub(crate) fn open(&self) -> usize {
        self.reporting.open.load(Ordering::Acquire)
    }

    /// Decides again on every open authorized connection with `authorize`, and closes the
    /// ones it now denies. Returns how many were closed (not counting ones an earlier change
    /// already closed).
    pub(crate) fn revalidate(&self, authorize: impl Fn(&Subject) -> Result<(), Denial>) -> usize {
        let open: Vec<Arc<Authorized>> = lock(&self.authorized).values().cloned().collect();
        let mut closed = 0;
        for connection in open {
            if let Err(denial) = authorize(&connection.subject)
                && connection.revoked.set(denial).is_ok()
            {
                connection.carrier.wake();
                closed += 1;
            }
        }
        closed
    }

    /// Puts `tracked` under `revalidate`: from now on a policy change can revoke it.
    pub(crate) fn authorized(&self, tracked: &mut Tracked, subject: Subject) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Authorized {
            subject,
            revoked: OnceLock::new(),
            carrier: AtomicWaker::new(),
        });
        lock(&self.authorized).insert(id, entry.clone());
        tracked.authorized = Some((id, entry, self.authorized.clone()));
    }
}

impl Tracked {
    /// Ready once a policy change revoked the connection, with the reason; never for a
    /// connection that was not authorized. The revocation wakes the task that polled last.
    pub(crate) fn poll_revoked(&self, cx: &mut Context<'_>) -> Poll<ConnectionError> {
        let Some((_, entry, _)) = &self.authorized else {
            return Poll::Pending;
        };
        entry.carrier.register(cx.waker());
        match entry.revoked.get() {
            Some(denial) => Poll::Ready(ConnectionError::Revoked(denial.clone())),
            None => Poll::Pending,
        }
    }

    /// Logs the error that ended the connection, with what it was.
    pub(crate) fn log_failure(&self, err: &ConnectionError) {
        let live = lock(&self.record);
        tracing::info!(pod = %live.pod, direction = ?live.direction, source = %live.source,
            destination = %live.original_destination, %err, "connection ended with an error");
    }

    /// Reports how the connection ended: `Ok((sent, received))`, where `sent` went from the
    /// client to the destination and `received` the other way, or the error that ended it.
    pub(crate) fn finish_with(mut self, outcome: &Result<(u64, u64), ConnectionError>) {
        match outcome {
            Ok((sent, received)) => self.report(*sent, *received, ResponseFlags::None, None),
            Err(err) => self.failed(err),
        }
    }

    /// The connection ended with `err` before or instead of carrying anything.
    pub(crate) fn failed(mut self, err: &ConnectionError) {
        self.report(0, 0, err.response_flags(), Some(err.to_string()));
    }

    fn report(&mut self, sent: u64, received: u64, flags: ResponseFlags, error: Option<String>) {
        self.reported = true;
        let mut record = lock(&self.record);
        record.bytes_sent = sent;
        record.bytes_received = received;
        record.open = false;
        record.flags = flags;
        record.error = error;
        let reporting = &self.reporting;
        reporting
            .metrics
            .closed(&self.labels, flags, sent, received);
        let direction = match record.direction {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        };
        let labels = &self.labels;
        reporting.access_log.write(&Entry {
            time: access_log::now_rfc3339(),
            direction,
            pod: &record.pod,
            src_addr: record.source.to_string(),
            dst_addr: record.original_destination.to_string(),
            src_workload: labels.source_workload(),
            src_namespace: labels.source_namespace(),
            src_identity: labels.source_principal(),
            dst_workload: labels.destination_workload(),
            dst_namespace: labels.destination_namespace(),
            dst_identity: labels.destination_principal(),
            dst_service: labels.destination_service(),
            bytes_sent: sent,
            bytes_received: received,
            duration_ms: self.started.elapsed().as_millis() as u64,
            response_flags: flags.label(),
            error: record.error.as_deref(),
        });
        reporting.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some((id, _, registry)) = &self.authorized {
            lock(registry).remove(id);
        }
        if !self.reported {
            // The task serving it was cancelled (shutdown): it ended with whatever it had.
            let error = Some("the proxy stopped serving it".to_owned());
            self.report(0, 0, ResponseFlags::None, error);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

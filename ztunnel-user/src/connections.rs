//! The life of every proxied connection as the daemon reports it: a record for
//! `ztunnel connections` (the open ones and the most recent closed ones), Istio's TCP metrics
//! when it opens and closes, and an access log line when it ends; and the open connections
//! that authorization let in, so a policy change can re-check them and close the ones it now
//! denies.

use crate::access_log::{self, AccessLog, Entry};
use crate::api::{ConnectionRecord, Direction};
use crate::identity::Identity;
use crate::metrics::{ResponseFlags, TrafficLabels, TrafficMetrics};
use atomic_waker::AtomicWaker;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

/// How many connections are remembered (open ones first in line to stay, see `record`).
const CAPACITY: usize = 4096;

pub struct ConnectionLog {
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
    open: OpenCount,
}

/// What authorization decided on, kept to decide again when policies change.
#[derive(Clone, Debug)]
pub struct Subject {
    /// The destination pod's namespace (for a pod the mesh config does not list).
    pub namespace: Arc<str>,
    pub source: IpAddr,
    pub destination: SocketAddr,
    pub identity: Option<Arc<Identity>>,
}

/// Open authorized connections by id.
type Registry = Mutex<HashMap<u64, Arc<Authorized>>>;

struct Authorized {
    subject: Subject,
    /// Why a policy change now denies it, once one did.
    revoked: OnceLock<String>,
    /// The task carrying the connection, woken when `revoked` is set. A waker slot rather
    /// than a notification to wait on: that wait would be part of every open connection's
    /// task, this is here only for the authorized ones.
    carrier: AtomicWaker,
}

/// A live connection; it is reported when it finishes (or, failing that, when dropped).
pub struct Tracked {
    record: Arc<Mutex<Live>>,
    labels: Arc<TrafficLabels>,
    started: Instant,
    reporting: Arc<Reporting>,
    reported: bool,
    /// Its id and entry in the registry, once authorized.
    authorized: Option<(u64, Arc<Authorized>, Arc<Registry>)>,
}

impl ConnectionLog {
    pub fn new(metrics: Arc<TrafficMetrics>, access_log: AccessLog) -> ConnectionLog {
        ConnectionLog {
            entries: Mutex::default(),
            authorized: Arc::default(),
            next_id: AtomicU64::new(0),
            reporting: Arc::new(Reporting {
                metrics,
                access_log,
                open: OpenCount::default(),
            }),
        }
    }

    pub fn metrics(&self) -> &TrafficMetrics {
        &self.reporting.metrics
    }

    /// A connection the proxy took on for `pod`; counted as opened at once.
    pub fn record(
        &self,
        direction: Direction,
        pod: &Arc<str>,
        source: SocketAddr,
        original_destination: SocketAddr,
        labels: TrafficLabels,
    ) -> Tracked {
        let labels = self.reporting.metrics.intern(labels);
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
        self.reporting.metrics.opened(&labels);
        self.reporting.open.add();
        Tracked {
            record,
            labels,
            started: Instant::now(),
            reporting: self.reporting.clone(),
            reported: false,
            authorized: None,
        }
    }

    pub fn snapshot(&self) -> Vec<ConnectionRecord> {
        lock(&self.entries)
            .iter()
            .map(|e| lock(e).record())
            .collect()
    }

    /// Connections not yet finished.
    pub fn open(&self) -> usize {
        self.reporting.open.count()
    }

    /// Decides again on every open authorized connection; `denies` returns why a subject is
    /// now refused. Returns how many connections were closed (not counting ones an earlier
    /// change already closed).
    pub fn revalidate(&self, denies: impl Fn(&Subject) -> Option<String>) -> usize {
        let open: Vec<Arc<Authorized>> = lock(&self.authorized).values().cloned().collect();
        let mut closed = 0;
        for connection in open {
            if let Some(why) = denies(&connection.subject)
                && connection.revoked.set(why).is_ok()
            {
                connection.carrier.wake();
                closed += 1;
            }
        }
        closed
    }

    /// Puts `tracked` under `revalidate`: from now on a policy change can revoke it.
    pub fn authorized(&self, tracked: &mut Tracked, subject: Subject) {
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
    pub fn poll_revoked(&self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some((_, entry, _)) = &self.authorized else {
            return Poll::Pending;
        };
        entry.carrier.register(cx.waker());
        match entry.revoked.get() {
            Some(why) => Poll::Ready(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("closed: the policy in force now denies it ({why})"),
            )),
            None => Poll::Pending,
        }
    }

    /// Logs the error that ended the connection, with what it was.
    pub fn log_failure(&self, err: &io::Error) {
        let live = lock(&self.record);
        tracing::info!(pod = %live.pod, direction = ?live.direction, source = %live.source,
            destination = %live.original_destination, %err, "connection ended with an error");
    }

    /// Reports how the connection ended: `Ok((sent, received))`, where `sent` went from the
    /// client to the destination and `received` the other way, or the error that ended it.
    pub fn finish_with(mut self, outcome: &io::Result<(u64, u64)>) {
        match outcome {
            Ok((sent, received)) => self.report(*sent, *received, ResponseFlags::None, None),
            Err(err) => self.failed(err),
        }
    }

    /// The connection ended with `err` before or instead of carrying anything.
    pub fn failed(mut self, err: &io::Error) {
        self.report(0, 0, flags_of(err), Some(err.to_string()));
    }

    /// Authorization refused the connection.
    pub fn denied(mut self, why: &str) {
        self.report(0, 0, ResponseFlags::Denied, Some(format!("denied: {why}")));
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
        let flagged;
        let closed = match flags {
            ResponseFlags::None => &*self.labels,
            other => {
                flagged = self.labels.with_flags(other);
                &flagged
            }
        };
        reporting.metrics.closed(closed, sent, received);
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
        reporting.open.remove();
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

/// Istio's response flags for an error that ended a connection.
fn flags_of(err: &io::Error) -> ResponseFlags {
    use io::ErrorKind::*;
    match err.kind() {
        PermissionDenied => ResponseFlags::Denied,
        ConnectionRefused | TimedOut | HostUnreachable | NetworkUnreachable | NotFound
        | AddrNotAvailable => ResponseFlags::ConnectFailed,
        _ => ResponseFlags::None,
    }
}

/// A count of open things (connections, streams), for metrics and for drain to wait on.
#[derive(Default)]
pub struct OpenCount(AtomicUsize);

/// One open thing; dropping it takes it off the count.
pub struct Open<'a>(&'a OpenCount);

impl OpenCount {
    pub fn open(&self) -> Open<'_> {
        self.add();
        Open(self)
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    fn add(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    fn remove(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.remove();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

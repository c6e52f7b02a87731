//! The daemon's record of the connections it proxied: the open ones and the most recent
//! closed ones, for `ztunnel connections` and the tests; and the open connections that
//! authorization let in, so a policy change can re-check them and close the ones it now denies.

use crate::api::{ConnectionRecord, Direction};
use crate::identity::Identity;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// How many connections are remembered (open ones first in line to stay, see `record`).
const CAPACITY: usize = 4096;

#[derive(Default)]
pub struct ConnectionLog {
    entries: Mutex<VecDeque<Arc<Mutex<ConnectionRecord>>>>,
    /// Every open authorized connection, however many: not bounded by `CAPACITY`.
    authorized: Arc<Registry>,
    next_id: AtomicU64,
}

/// What authorization decided on, kept to decide again when policies change.
#[derive(Clone, Debug)]
pub struct Subject {
    /// The destination pod's namespace (for a pod the mesh config does not list).
    pub namespace: String,
    pub source: IpAddr,
    pub destination: SocketAddr,
    pub identity: Option<Identity>,
}

/// Open authorized connections by id.
type Registry = Mutex<HashMap<u64, Arc<Authorized>>>;

struct Authorized {
    subject: Subject,
    revoked: Notify,
    why: Mutex<Option<String>>,
}

/// A live connection's entry; the relay fills in the outcome when it ends.
pub struct Tracked {
    record: Arc<Mutex<ConnectionRecord>>,
    /// Its id and entry in the registry, once authorized.
    authorized: Option<(u64, Arc<Authorized>, Arc<Registry>)>,
}

impl ConnectionLog {
    pub fn record(
        &self,
        direction: Direction,
        pod: &str,
        source: SocketAddr,
        original_destination: SocketAddr,
    ) -> Tracked {
        let record = Arc::new(Mutex::new(ConnectionRecord {
            direction,
            pod: pod.to_owned(),
            source,
            original_destination,
            bytes_sent: 0,
            bytes_received: 0,
            open: true,
            error: None,
        }));
        let mut entries = lock(&self.entries);
        if entries.len() >= CAPACITY {
            entries.pop_front();
        }
        entries.push_back(record.clone());
        Tracked {
            record,
            authorized: None,
        }
    }

    pub fn snapshot(&self) -> Vec<ConnectionRecord> {
        lock(&self.entries)
            .iter()
            .map(|e| lock(e).clone())
            .collect()
    }

    /// Decides again on every open authorized connection; `denies` returns why a subject is
    /// now refused. Returns how many connections were closed.
    pub fn revalidate(&self, denies: impl Fn(&Subject) -> Option<String>) -> usize {
        let open: Vec<Arc<Authorized>> = lock(&self.authorized).values().cloned().collect();
        let mut closed = 0;
        for connection in open {
            if let Some(why) = denies(&connection.subject) {
                *lock(&connection.why) = Some(why);
                connection.revoked.notify_one();
                closed += 1;
            }
        }
        closed
    }
}

impl Tracked {
    /// Puts the connection under `revalidate`: from now on a policy change can revoke it.
    pub fn authorized(&mut self, log: &ConnectionLog, subject: Subject) {
        let id = log.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Authorized {
            subject,
            revoked: Notify::new(),
            why: Mutex::new(None),
        });
        lock(&log.authorized).insert(id, entry.clone());
        self.authorized = Some((id, entry, log.authorized.clone()));
    }

    /// Completes when a policy change revoked the connection, with the reason; never for a
    /// connection that was not authorized.
    pub async fn revoked(&self) -> std::io::Error {
        match &self.authorized {
            Some((_, entry, _)) => {
                entry.revoked.notified().await;
                let why = lock(&entry.why).clone().unwrap_or_default();
                std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("closed: the policy in force now denies it ({why})"),
                )
            }
            None => std::future::pending().await,
        }
    }

    /// Runs `relay` until it ends or the connection is revoked (which drops, so closes, both
    /// sides).
    pub async fn relay_until_revoked<F>(&self, relay: F) -> std::io::Result<(u64, u64)>
    where
        F: Future<Output = std::io::Result<(u64, u64)>>,
    {
        tokio::select! {
            outcome = relay => outcome,
            err = self.revoked() => Err(err),
        }
    }

    /// Records how a relay ended: `Ok((sent, received))`, where `sent` went from the client to
    /// the destination and `received` the other way, or the error that ended it.
    pub fn finish_with(&self, outcome: &std::io::Result<(u64, u64)>) {
        match outcome {
            Ok((sent, received)) => self.finish(*sent, *received, None),
            Err(err) => self.finish(0, 0, Some(err.to_string())),
        }
    }

    /// `sent` is what went from the client to the destination, `received` the other way.
    pub fn finish(&self, sent: u64, received: u64, error: Option<String>) {
        let mut record = lock(&self.record);
        record.bytes_sent = sent;
        record.bytes_received = received;
        record.open = false;
        record.error = error;
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some((id, _, registry)) = &self.authorized {
            lock(registry).remove(id);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

//! The certificates of the workloads on this node, one per identity, kept as Istio's ztunnel
//! keeps them (`src/identity/manager.rs`):
//! - fetched in the background from the `CertificateSource`: `prefetch` when a workload with
//!   that identity is enrolled, `certificate().await` before a handshake (it waits for a fetch
//!   in flight);
//! - only read at each handshake (`held`), never issued there: rustls asks for the certificate
//!   in a synchronous callback, where waiting for a CA would block a runtime thread;
//! - renewed halfway through their validity (at once if it starts in the future, but never
//!   within a second of the last one, so a CA with a skewed clock cannot make us spin), so
//!   idle identities stay valid and a renewal reaches new connections only;
//! - when a fetch fails, the held certificate serves until it expires, and the fetch is
//!   retried for that identity after 0.5 s, doubling up to 150 s, back to 0.5 s after a
//!   success;
//! - at most 8 fetches at a time, the others waiting their turn in order;
//! - dropped with the last workload of their identity (`forget`).
//!
//! One task, the worker, schedules every fetch. It and the store's handles share a map of
//! per-identity states, each in a `watch` channel so that waiters wake when a fetch settles.
//! Renewal and expiry are tokio `Instant`s, placed when the certificate arrives, so that tests
//! drive them with the paused clock.

use super::ca::WorkloadCertificate;
use super::source::CertificateSource;
use super::spiffe::Identity;
use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use std::collections::{HashMap, VecDeque};
use std::error::Error;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::Instant;

/// How many fetches run at once, as in Istio's ztunnel.
const MAX_CONCURRENT_FETCHES: usize = 8;
/// The delay after a first failure, doubled at each failure in a row up to `MAX_BACKOFF`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(150);
/// How long a fetch may take before it counts as failed (and frees its place).
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// The least time between receiving a certificate and renewing it.
const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(1);
/// Where a validity that ends further away than this is placed (an `Instant` cannot hold
/// every `SystemTime`).
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// Why there is no certificate for an identity.
#[derive(Clone, Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// The source's error, which names the identity and the reason.
    #[error(transparent)]
    Issue(Arc<dyn Error + Send + Sync>),
    #[error("the CA did not answer for {identity} within {after:?}")]
    TimedOut { identity: Identity, after: Duration },
    #[error("the fetch of a certificate for {identity} failed: {reason}")]
    Crashed { identity: Identity, reason: String },
    #[error(
        "the certificate issued for {identity} has expired already (is the CA's clock or \
         validity off?); a new one is due within a second"
    )]
    Expired { identity: Identity },
    #[error("the certificate of {0} was dropped while awaited: its last workload left the node")]
    Forgotten(Identity),
}

/// The current certificate of each identity in use on this node. Share it in an `Arc`.
pub(crate) struct CertificateStore {
    source: Arc<dyn CertificateSource>,
    slots: Arc<Slots>,
    /// To the worker; it ends when this is dropped with the store.
    requests: mpsc::UnboundedSender<Request>,
}

/// Each identity in use, with its state. An identity is in use from its first `prefetch` or
/// `certificate` until `forget`.
type Slots = Mutex<HashMap<Identity, watch::Sender<CertState>>>;

#[derive(Clone, Default)]
struct CertState {
    held: Option<Held>,
    /// Why the last fetch failed; cleared by a success.
    failure: Option<StoreError>,
    /// A fetch is due: queued or running.
    fetching: bool,
}

impl CertState {
    /// The held certificate, if it has not expired.
    fn valid(&self) -> Option<&Held> {
        self.held
            .as_ref()
            .filter(|held| Instant::now() < held.expires_at)
    }
}

/// A certificate, with when to renew it and when it expires.
#[derive(Clone)]
struct Held {
    cert: WorkloadCertificate,
    renew_at: Instant,
    expires_at: Instant,
}

impl Held {
    /// Places the validity of a certificate received `now` on tokio's clock.
    fn new(cert: WorkloadCertificate, now: Instant) -> Held {
        let wall = SystemTime::now();
        let at = |time: SystemTime| match time.duration_since(wall) {
            Ok(ahead) => now + ahead.min(FAR_FUTURE),
            Err(behind) => now.checked_sub(behind.duration()).unwrap_or(now),
        };
        let renew_at = if cert.not_before > wall {
            now
        } else {
            at(cert.renew_at())
        };
        Held {
            renew_at: renew_at.max(now + MIN_RENEWAL_INTERVAL),
            expires_at: at(cert.not_after),
            cert,
        }
    }
}

enum Request {
    /// The identity has just come into use: fetch its first certificate.
    Fetch(Identity),
    /// The identity is no longer in use.
    Forget(Identity),
}

impl CertificateStore {
    /// A store of certificates from `source`, with its worker started on the current Tokio
    /// runtime. The worker ends when the store is dropped.
    pub(crate) fn start(source: Arc<dyn CertificateSource>) -> Arc<CertificateStore> {
        let slots = Arc::new(Slots::default());
        let (requests, incoming) = mpsc::unbounded_channel();
        let worker = Worker {
            source: source.clone(),
            slots: slots.clone(),
            requests: incoming,
            queue: VecDeque::new(),
            running: HashMap::new(),
            fetches: JoinSet::new(),
            due: HashMap::new(),
            backoff: HashMap::new(),
        };
        tokio::spawn(worker.run());
        Arc::new(CertificateStore {
            source,
            slots,
            requests,
        })
    }

    /// Starts fetching `identity`'s certificate if it is not in use yet; returns at once. Call
    /// it when a workload with this identity is enrolled, so that its first inbound handshake
    /// finds the certificate held.
    pub(crate) fn prefetch(&self, identity: &Identity) {
        self.subscribe(identity);
    }

    /// `identity`'s certificate and key: the held one while it is valid, else the outcome of
    /// the fetch under way (one is started if the identity was not in use). Without a fetch
    /// under way, the last failure is returned at once: the retries go on in the background.
    pub(crate) async fn certificate(
        &self,
        identity: &Identity,
    ) -> Result<Arc<CertifiedKey>, StoreError> {
        let mut state = self.subscribe(identity);
        let settled = state
            .wait_for(|state| !state.fetching || state.valid().is_some())
            .await
            .map_err(|_| StoreError::Forgotten(identity.clone()))?;
        if let Some(held) = settled.valid() {
            return Ok(held.cert.certified_key.clone());
        }
        Err(settled
            .failure
            .clone()
            .unwrap_or_else(|| StoreError::Expired {
                identity: identity.clone(),
            }))
    }

    /// The certificate held for `identity`, if it is valid: what a handshake presents. This
    /// never fetches.
    pub(crate) fn held(&self, identity: &Identity) -> Option<Arc<CertifiedKey>> {
        let slots = lock(&self.slots);
        let slot = slots.get(identity)?;
        let state = slot.borrow();
        state.valid().map(|held| held.cert.certified_key.clone())
    }

    /// Drops the certificate of `identity` and stops renewing it (its last workload left the
    /// node). Whoever awaits it gets `StoreError::Forgotten`.
    pub(crate) fn forget(&self, identity: &Identity) {
        if lock(&self.slots).remove(identity).is_some() {
            // The worker lives as long as the store.
            let _ = self.requests.send(Request::Forget(identity.clone()));
        }
    }

    /// When each held certificate expires (or expired), by identity.
    pub(crate) fn expiries(&self) -> Vec<(Identity, SystemTime)> {
        let mut expiries: Vec<_> = lock(&self.slots)
            .iter()
            .filter_map(|(identity, slot)| {
                let state = slot.borrow();
                let held = state.held.as_ref()?;
                Some((identity.clone(), held.cert.not_after))
            })
            .collect();
        expiries.sort();
        expiries
    }

    /// The roots to verify peers against, as the source knows them now.
    pub(crate) fn roots(&self) -> Arc<RootCertStore> {
        self.source.roots()
    }

    /// A view of `identity`'s state, putting it in use (and its first fetch under way) if it
    /// was not.
    fn subscribe(&self, identity: &Identity) -> watch::Receiver<CertState> {
        let mut slots = lock(&self.slots);
        if let Some(slot) = slots.get(identity) {
            return slot.subscribe();
        }
        let (slot, state) = watch::channel(CertState {
            fetching: true,
            ..CertState::default()
        });
        slots.insert(identity.clone(), slot);
        let _ = self.requests.send(Request::Fetch(identity.clone()));
        state
    }
}

impl fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateStore")
            .field("identities", &lock(&self.slots).len())
            .finish_non_exhaustive()
    }
}

fn lock(slots: &Slots) -> MutexGuard<'_, HashMap<Identity, watch::Sender<CertState>>> {
    // Nothing panics while holding the lock, and the map stays consistent if it did.
    slots.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Schedules the fetches: first ones, renewals and retries.
struct Worker {
    source: Arc<dyn CertificateSource>,
    slots: Arc<Slots>,
    requests: mpsc::UnboundedReceiver<Request>,
    /// The identities whose fetch is due, in the order they became due.
    queue: VecDeque<Identity>,
    /// The identity each running fetch is for.
    running: HashMap<Id, Identity>,
    fetches: JoinSet<Result<WorkloadCertificate, StoreError>>,
    /// When each identity's next fetch (a renewal or a retry) is due.
    due: HashMap<Identity, Instant>,
    /// The delay after the next failure, for each identity whose last fetch failed.
    backoff: HashMap<Identity, Duration>,
}

/// What woke the worker.
enum Event {
    Request(Option<Request>),
    Settled(Result<(Id, Result<WorkloadCertificate, StoreError>), JoinError>),
    Due,
}

impl Worker {
    async fn run(mut self) {
        loop {
            self.start_fetches();
            let next_due = self.due.values().min().copied();
            let event = tokio::select! {
                request = self.requests.recv() => Event::Request(request),
                Some(settled) = self.fetches.join_next_with_id() => Event::Settled(settled),
                () = sleep_until(next_due) => Event::Due,
            };
            match event {
                Event::Request(Some(Request::Fetch(identity))) => self.enqueue(identity),
                Event::Request(Some(Request::Forget(identity))) => self.unschedule(&identity),
                // The store is gone; dropping the `JoinSet` aborts the running fetches.
                Event::Request(None) => return,
                Event::Settled(settled) => self.settle(settled),
                Event::Due => self.enqueue_due(),
            }
        }
    }

    /// Starts the queued fetches while fewer than `MAX_CONCURRENT_FETCHES` run.
    fn start_fetches(&mut self) {
        while self.running.len() < MAX_CONCURRENT_FETCHES {
            let Some(identity) = self.queue.pop_front() else {
                return;
            };
            if !lock(&self.slots).contains_key(&identity) {
                continue;
            }
            let source = self.source.clone();
            let fetching = identity.clone();
            let task = self.fetches.spawn(async move {
                let issued = tokio::time::timeout(FETCH_TIMEOUT, source.issue(&fetching)).await;
                match issued {
                    Ok(issued) => issued.map_err(|error| StoreError::Issue(Arc::from(error))),
                    Err(_) => Err(StoreError::TimedOut {
                        identity: fetching,
                        after: FETCH_TIMEOUT,
                    }),
                }
            });
            self.running.insert(task.id(), identity);
        }
    }

    /// Queues a fetch of `identity`, unless one is queued or running already.
    fn enqueue(&mut self, identity: Identity) {
        let running = self.running.values().any(|other| *other == identity);
        if running || self.queue.contains(&identity) {
            return;
        }
        if let Some(slot) = lock(&self.slots).get(&identity) {
            slot.send_if_modified(|state| !std::mem::replace(&mut state.fetching, true));
        }
        self.due.remove(&identity);
        self.queue.push_back(identity);
    }

    /// Queues the fetches that are due, earliest first.
    fn enqueue_due(&mut self) {
        let now = Instant::now();
        let mut due: Vec<(Instant, Identity)> = self
            .due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(identity, at)| (*at, identity.clone()))
            .collect();
        due.sort();
        for (_, identity) in due {
            self.enqueue(identity);
        }
    }

    /// Stops scheduling `identity`, unless it came back in use since it was forgotten. A
    /// running fetch finishes, and its certificate is dropped.
    fn unschedule(&mut self, identity: &Identity) {
        if lock(&self.slots).contains_key(identity) {
            return;
        }
        self.due.remove(identity);
        self.backoff.remove(identity);
        self.queue.retain(|queued| queued != identity);
    }

    /// Takes a fetch's outcome: holds the certificate and schedules its renewal, or keeps the
    /// held one and schedules a retry.
    fn settle(
        &mut self,
        settled: Result<(Id, Result<WorkloadCertificate, StoreError>), JoinError>,
    ) {
        let (task, outcome) = match settled {
            Ok((task, outcome)) => (task, Ok(outcome)),
            Err(error) => (error.id(), Err(error)),
        };
        let Some(identity) = self.running.remove(&task) else {
            return;
        };
        let outcome = outcome.unwrap_or_else(|error| {
            Err(StoreError::Crashed {
                identity: identity.clone(),
                reason: error.to_string(),
            })
        });
        let slots = lock(&self.slots);
        let Some(slot) = slots.get(&identity) else {
            // Forgotten while it was fetched.
            return;
        };
        let now = Instant::now();
        let next = match outcome {
            Ok(cert) => {
                self.backoff.remove(&identity);
                let held = Held::new(cert, now);
                tracing::info!(%identity, not_after = ?held.cert.not_after, "workload certificate issued");
                let renew_at = held.renew_at;
                slot.send_modify(|state| {
                    state.held = Some(held);
                    state.failure = None;
                    state.fetching = false;
                });
                renew_at
            }
            Err(error) => {
                let delay = self
                    .backoff
                    .get(&identity)
                    .copied()
                    .unwrap_or(INITIAL_BACKOFF);
                self.backoff
                    .insert(identity.clone(), delay.saturating_mul(2).min(MAX_BACKOFF));
                slot.send_modify(|state| {
                    let held_until = state.valid().map(|held| held.cert.not_after);
                    tracing::warn!(%identity, %error, retry_in = ?delay, ?held_until,
                        "cannot fetch a workload certificate");
                    state.failure = Some(error);
                    state.fetching = false;
                });
                now + delay
            }
        };
        drop(slots);
        self.due.insert(identity, next);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;

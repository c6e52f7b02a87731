//! What the client keeps across streams: per type, the name -> version of every resource held
//! and accepted (echoed in `initial_resource_versions` at each reconnect), whether a response
//! of it was ever ACKed (readiness), and what operators see (`XdsStatus`).

use super::sink::ResourceKind;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// The client's connection and resources, as operators see them (`XdsHandle::status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdsStatus {
    /// Whether a stream to istiod is open.
    pub connected: bool,
    /// Since when it is open, or not (milliseconds since the Unix epoch): the last opening or
    /// end of a stream, else the client's creation.
    pub since_unix_ms: u64,
    /// Stream openings tried so far.
    pub attempts: u64,
    /// Why the last attempt failed or the last stream ended.
    pub last_error: Option<String>,
    /// Every type has had one ACKed response.
    pub ready: bool,
    pub types: Vec<XdsTypeStatus>,
}

/// One type's resources and the last response of it that was ACKed, and NACKed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdsTypeStatus {
    pub type_url: String,
    /// Resources held and accepted.
    pub resources: usize,
    pub last_ack: Option<XdsAck>,
    pub last_nack: Option<XdsNack>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdsAck {
    pub nonce: String,
    pub at_unix_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdsNack {
    pub nonce: String,
    /// The NACK's `error_detail.message`: `<name>: <reason>; ...`.
    pub message: String,
    pub at_unix_ms: u64,
}

/// A view of a running client: its status and its readiness. Cheap to clone.
#[derive(Clone)]
pub struct XdsHandle {
    shared: Arc<Shared>,
}

impl XdsHandle {
    pub(super) fn new(shared: Arc<Shared>) -> XdsHandle {
        XdsHandle { shared }
    }

    pub fn status(&self) -> XdsStatus {
        let state = self.shared.lock();
        XdsStatus {
            connected: state.connected,
            since_unix_ms: state.since_unix_ms,
            attempts: state.attempts,
            last_error: state.last_error.clone(),
            ready: *self.shared.ready.borrow(),
            types: state
                .types
                .iter()
                .map(|(kind, held)| XdsTypeStatus {
                    type_url: kind.type_url().to_owned(),
                    resources: held.versions.len(),
                    last_ack: held.last_ack.clone(),
                    last_nack: held.last_nack.clone(),
                })
                .collect(),
        }
    }

    /// The name -> version of the resources of `kind` held and accepted: what the next stream
    /// sends as `initial_resource_versions`.
    pub fn versions(&self, kind: ResourceKind) -> HashMap<String, String> {
        self.shared.versions(kind)
    }

    /// Whether every type has had one ACKed response (on any stream). Once ready, the client
    /// stays ready across reconnects: the model keeps what it was given.
    pub fn is_ready(&self) -> bool {
        *self.shared.ready.borrow()
    }

    /// Waits until `is_ready`. A response with a NACK does not count: its type must still
    /// have one fully accepted response, as in Istio's ztunnel.
    pub async fn ready(&self) {
        let mut ready = self.shared.ready.subscribe();
        // The sender lives in `shared`, which this handle holds: it cannot close.
        let _ = ready.wait_for(|ready| *ready).await;
    }
}

/// The state the client's loop and its handles share.
pub(super) struct Shared {
    state: Mutex<State>,
    ready: watch::Sender<bool>,
}

struct State {
    connected: bool,
    since_unix_ms: u64,
    attempts: u64,
    last_error: Option<String>,
    types: BTreeMap<ResourceKind, Held>,
}

/// One type's resources held and what was said about its responses.
#[derive(Default)]
struct Held {
    /// Name -> version of the resources accepted. A workload's name is the model's own uid
    /// string; versions are boxed strings, 8 bytes less each than `String`s.
    versions: BTreeMap<Arc<str>, Box<str>>,
    /// A response was ACKed.
    acked: bool,
    last_ack: Option<XdsAck>,
    last_nack: Option<XdsNack>,
}

impl Held {
    /// Holds the versions `accepted`, each under its name (a later one of a name wins).
    fn take(&mut self, accepted: Vec<(Arc<str>, String)>) {
        let entries = accepted
            .into_iter()
            .map(|(name, version)| (name, version.into_boxed_str()));
        // A batch as large as a quarter of what is held (a first push) is merged in one
        // pass into a tree of full nodes: inserted one by one in istiod's order (by name),
        // the B-tree's nodes would stay about half full (64 bytes a name against 35). A
        // smaller one costs what it inserts, not what is held.
        if entries.len() * 4 < self.versions.len() {
            for (name, version) in entries {
                // Removed first: an insert over an existing entry would keep the old key,
                // the uid of a workload the model has replaced.
                self.versions.remove(&name);
                self.versions.insert(name, version);
            }
            return;
        }
        let mut batch: BTreeMap<_, _> = entries.collect();
        // Likewise, so that the merge has no key to choose (nothing to remove from an empty
        // tree: the first push).
        if !self.versions.is_empty() {
            for name in batch.keys() {
                self.versions.remove(name);
            }
        }
        self.versions.append(&mut batch);
    }
}

/// How a response was taken: the resources accepted (name, version) and the names removed,
/// and the NACK's message if anything was rejected.
pub(super) struct Settled {
    pub(super) accepted: Vec<(Arc<str>, String)>,
    pub(super) removed: Vec<String>,
    pub(super) nonce: String,
    pub(super) nack: Option<String>,
}

impl Shared {
    pub(super) fn new() -> Shared {
        Shared {
            state: Mutex::new(State {
                connected: false,
                since_unix_ms: unix_ms(),
                attempts: 0,
                last_error: None,
                types: ResourceKind::ALL
                    .into_iter()
                    .map(|kind| (kind, Held::default()))
                    .collect(),
            }),
            ready: watch::Sender::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn versions(&self, kind: ResourceKind) -> HashMap<String, String> {
        self.lock()
            .types
            .get(&kind)
            .map_or_else(HashMap::new, |held| {
                held.versions
                    .iter()
                    .map(|(name, version)| (name.to_string(), version.to_string()))
                    .collect()
            })
    }

    pub(super) fn attempting(&self) {
        self.lock().attempts += 1;
    }

    pub(super) fn connected(&self) {
        let mut state = self.lock();
        state.connected = true;
        state.since_unix_ms = unix_ms();
    }

    /// An attempt failed or a stream ended, for `reason`.
    pub(super) fn disconnected(&self, reason: String) {
        let mut state = self.lock();
        if state.connected {
            state.connected = false;
            state.since_unix_ms = unix_ms();
        }
        state.last_error = Some(reason);
    }

    /// Records how a response of `kind` was taken; the client becomes ready with the first
    /// ACK of the last type that had none (then returns true).
    pub(super) fn settle(&self, kind: ResourceKind, settled: Settled) -> bool {
        let mut state = self.lock();
        let Some(held) = state.types.get_mut(&kind) else {
            return false;
        };
        held.take(settled.accepted);
        for name in &settled.removed {
            held.versions.remove(name.as_str());
        }
        let at_unix_ms = unix_ms();
        match settled.nack {
            None => {
                held.acked = true;
                held.last_ack = Some(XdsAck {
                    nonce: settled.nonce,
                    at_unix_ms,
                });
            }
            Some(message) => {
                held.last_nack = Some(XdsNack {
                    nonce: settled.nonce,
                    message,
                    at_unix_ms,
                });
            }
        }
        state.types.values().all(|held| held.acked)
            && self
                .ready
                .send_if_modified(|ready| !std::mem::replace(ready, true))
    }
}

fn unix_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(round: &str) -> Vec<Arc<str>> {
        (0..10)
            .map(|i| Arc::from(format!("w{i}")))
            .chain([Arc::from(round)])
            .collect()
    }

    fn held_name(held: &Held, name: &str) -> (Arc<str>, String) {
        let (key, version) = held.versions.get_key_value(name).unwrap();
        (key.clone(), version.to_string())
    }

    /// A version taken replaces the one held, under the name it came with (the model's new
    /// uid string), whether its batch is merged whole or inserted one by one; in a batch, the
    /// last of a name wins.
    #[test]
    fn versions_are_held_under_the_names_they_came_with() {
        let mut held = Held::default();
        let first = names("a");
        held.take(first.iter().map(|n| (n.clone(), "1".to_owned())).collect());
        assert_eq!(held.versions.len(), 11);

        // One of eleven held: inserted.
        let w3: Arc<str> = Arc::from("w3");
        held.take(vec![(w3.clone(), "2".to_owned())]);
        let (key, version) = held_name(&held, "w3");
        assert!(Arc::ptr_eq(&key, &w3) && version == "2");

        // All again, and one more: merged whole.
        let again = names("b");
        let batch = again
            .iter()
            .map(|n| (n.clone(), "3".to_owned()))
            .chain([(again[0].clone(), "4".to_owned())])
            .collect();
        held.take(batch);
        assert_eq!(held.versions.len(), 12);
        for name in &again {
            let (key, version) = held_name(&held, name);
            assert!(Arc::ptr_eq(&key, name));
            assert_eq!(version, if **name == *"w0" { "4" } else { "3" });
        }
        assert_eq!(held_name(&held, "a").1, "1");
    }
}

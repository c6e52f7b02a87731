//! A watch's stream: newline-delimited `{"type":…,"object":…}` events, as the real server
//! sends them, from a subscription to the store until the watch's timeout, the server's
//! shutdown, or the client leaving.

use crate::resource::Resource;
use crate::selector::Filter;
use crate::status::ApiError;
use crate::store::{Change, ChangeType, Start, Subscription};
use bytes::Bytes;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::{Instant, sleep_until, timeout_at};

/// The annotation on the bookmark that ends a streaming list's initial events.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

pub struct Watch {
    pub resource: Resource,
    pub filter: Filter,
    /// `allowWatchBookmarks`.
    pub bookmarks: bool,
    /// `sendInitialEvents`: a bookmark marks the end of the synthetic additions.
    pub initial_events_end: bool,
    pub bookmark_interval: Duration,
    pub deadline: Instant,
}

/// One event's line.
fn line(event_type: &str, object: &Value) -> Bytes {
    let mut text = json!({ "type": event_type, "object": object }).to_string();
    text.push('\n');
    Bytes::from(text)
}

/// The `ERROR` event a watch that cannot start gets (the real server's answer to a version
/// too old: HTTP 200, then this).
pub fn error_line(error: &ApiError) -> Bytes {
    line("ERROR", &error.status())
}

impl Watch {
    /// Sends the watch's events into `out` until it ends.
    pub async fn run(
        self,
        subscription: Subscription,
        out: mpsc::Sender<Bytes>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Subscription {
            start,
            resource_version,
            mut changes,
        } = subscription;
        // The newest version this watch has seen, of any resource: what a bookmark reports.
        let mut seen = resource_version;
        let mut initial = Vec::new();
        match start {
            Start::Now(objects) => {
                initial.extend(
                    objects
                        .iter()
                        .filter(|object| self.filter.matches(object))
                        .map(|object| line(ChangeType::Added.as_str(), object)),
                );
                if self.initial_events_end && self.bookmarks {
                    initial.push(self.bookmark(seen, true));
                }
            }
            Start::After(kept) => {
                initial.extend(kept.iter().filter_map(|change| self.event(change)));
            }
        }
        for event in initial {
            if !self.send(&out, event).await {
                return;
            }
        }
        let mut next_bookmark = Instant::now() + self.bookmark_interval;
        loop {
            let event = tokio::select! {
                _ = sleep_until(self.deadline) => {
                    // As the real server does, a last bookmark just before the timeout, so
                    // the client resumes from the newest version.
                    if self.bookmarks {
                        self.send(&out, self.bookmark(seen, false)).await;
                    }
                    return;
                }
                _ = shutdown.changed() => return,
                _ = sleep_until(next_bookmark), if self.bookmarks => {
                    next_bookmark = Instant::now() + self.bookmark_interval;
                    self.bookmark(seen, false)
                }
                received = changes.recv() => match received {
                    Ok(change) => {
                        seen = change.resource_version;
                        match self.event(&change) {
                            Some(event) => event,
                            None => continue,
                        }
                    }
                    // Too far behind: ended, as the real server ends a slow watch; the
                    // client resumes from the last version it saw.
                    Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => return,
                },
            };
            if !self.send(&out, event).await {
                return;
            }
        }
    }

    /// False once the client has gone or stopped reading past the watch's end.
    async fn send(&self, out: &mpsc::Sender<Bytes>, event: Bytes) -> bool {
        matches!(timeout_at(self.deadline, out.send(event)).await, Ok(Ok(())))
    }

    /// What this watch sees of a change: a modification that moves an object into its
    /// selection is an addition, out of it a deletion.
    fn event(&self, change: &Change) -> Option<Bytes> {
        if change.resource != self.resource {
            return None;
        }
        let now = self.filter.matches(&change.object);
        let event_type = match change.change_type {
            ChangeType::Added | ChangeType::Deleted if now => change.change_type,
            ChangeType::Modified => {
                let before = change
                    .previous
                    .as_ref()
                    .is_some_and(|previous| self.filter.matches(previous));
                match (before, now) {
                    (true, true) => ChangeType::Modified,
                    (false, true) => ChangeType::Added,
                    (true, false) => ChangeType::Deleted,
                    (false, false) => return None,
                }
            }
            _ => return None,
        };
        Some(line(event_type.as_str(), &change.object))
    }

    /// A bookmark: an object of the watched kind with only its resourceVersion.
    fn bookmark(&self, resource_version: u64, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({ "resourceVersion": resource_version.to_string() });
        if initial_events_end {
            metadata["annotations"] = json!({ INITIAL_EVENTS_END: "true" });
        }
        let object = json!({
            "kind": self.resource.kind(),
            "apiVersion": "v1",
            "metadata": metadata,
        });
        line("BOOKMARK", &object)
    }
}

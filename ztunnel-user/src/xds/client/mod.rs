//! The delta ADS client: one bidirectional `DeltaAggregatedResources` stream to istiod at a
//! time, subscribed to every `Address` and `Authorization` (wildcard), whose responses go to an
//! `XdsSink` (the mesh model) and are ACKed or NACKed by name; reopened for ever with the state
//! kept. The channel is the caller's (`istiod::Dial`: a fresh one per attempt, in memory in the
//! tests, TLS to istiod in the daemon), so nothing here knows the transport.
//!
//! The flow, as Istio's ztunnel's (`src/xds/client.rs`):
//! - At each opening: the headers `authorization: Bearer <token>` (the token file read again,
//!   `istiod::Credentials`) and `clusterid`; then one request per type with the `Node`, the
//!   `type_url`, no names (wildcard), and `initial_resource_versions`, the name -> version of
//!   every resource held and accepted.
//! - Each response: every resource is converted (`convert`), the good ones go to the sink as one
//!   `XdsBatch` (upserts, then the removed names), and the response is ACKed, or NACKed with
//!   `error_detail.message = "<name>: <reason>; ..."` naming the resources not taken (refused by
//!   the conversion or the model; all of them if the sink failed as a whole). The good
//!   resources of a NACKed response stay applied. The version map takes the accepted ones and
//!   drops the removed names; a rejected one keeps the version held before, if any, so a
//!   reconnect fetches it again. A response of a type not subscribed to is NACKed.
//! - Readiness (`XdsHandle::ready`): each type has had one ACKed response; a NACK does not
//!   count.
//! - Reconnecting: at once (after a random spread under 10 ms) when istiod ends the stream
//!   cleanly or with Unknown, Cancelled, DeadlineExceeded or Unavailable (a restart, a GOAWAY,
//!   its connection age limit); after a backoff otherwise (the token or the channel could not
//!   be had, the opening failed whatever its status, as in Istio's ztunnel, or the stream ended
//!   with another status): 10 ms doubling to 15 s, each delay jittered down to half of it. A
//!   routine end resets the backoff. Every failure is logged once, with why.
//! - Renewing: after a response over 4 MiB (a big cluster's first push) the client ends its
//!   side of the stream once istiod has sent nothing for a second, and opens a new one when
//!   istiod ends it (at most once in 10 minutes): tonic keeps a receive buffer as large as the
//!   largest response for the stream's life, and the new stream, presenting the versions
//!   held, costs istiod a comparison and no push.

mod call;
mod connect;
mod node;
mod response;
mod sink;
mod state;
#[cfg(test)]
mod tests;

pub use connect::from_settings;
pub use node::{NodeFacts, XdsConfig};
pub(crate) use sink::{MeshBatch, apply_to_model};
pub use sink::{Rejected, ResourceKind, SinkError, Upsert, XdsBatch, XdsSink};
pub use state::{XdsAck, XdsHandle, XdsNack, XdsStatus, XdsTypeStatus};

use super::proto::envoy::config::core::v3::Node;
use super::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use super::proto::google::rpc::Status;
use crate::istiod::{CredentialsError, Dial, channel_failure};
use bytes::Bytes;
use call::Ads;
use rand::Rng;
use response::DeltaResponse;
use state::{Settled, Shared};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::codegen::StdError;

/// The largest response taken, as in Istio's ztunnel (tonic's default is 4 MiB).
const MAX_RESPONSE_BYTES: usize = 200 * 1024 * 1024;
/// After a response larger than this the stream is renewed: tonic's decoder keeps a receive
/// buffer the size of the largest message for the stream's life (11 MB, 220 bytes a workload,
/// after the first push of a 50,000-workload mesh).
const RENEW_AFTER_BYTES: usize = 4 * 1024 * 1024;
/// At most one renewal in this long: an istiod that answered each new stream with the whole
/// mesh again would otherwise be asked for it for ever.
const RENEWAL_INTERVAL: Duration = Duration::from_secs(600);
/// A renewal waits until istiod has sent nothing for this long (it sends each type's
/// response in turn), so that every response is ACKed on the stream it came on.
const RENEW_QUIET: Duration = Duration::from_secs(1);
/// The first delay after a failure, doubled at each failure in a row up to `MAX_BACKOFF`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// A NACK names at most this many resources, then says how many more.
const NACK_NAMES_MAX: usize = 100;

/// The delta ADS client. `handle` gives its status and readiness; `run` streams for ever.
pub struct XdsClient<D, S: ?Sized> {
    config: XdsConfig,
    istiod: D,
    sink: Arc<S>,
    shared: Arc<Shared>,
}

/// Why a stream opening failed or a stream ended.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error(transparent)]
    Headers(#[from] CredentialsError),
    #[error("cannot connect to istiod: {0}")]
    Connect(StdError),
    #[error("istiod refused the stream: {}", status_text(.0))]
    Refused(tonic::Status),
    #[error("the stream failed: {}", status_text(.0))]
    Failed(tonic::Status),
    #[error("istiod ended the stream")]
    Closed,
    #[error("renewed after a response of {0} bytes, to free its receive buffer")]
    Renewed(usize),
}

impl Ended {
    /// A routine end of an open stream (istiod restarting, going away, closing old streams):
    /// reconnect at once.
    fn routine(&self) -> bool {
        match self {
            Ended::Failed(status) => matches!(
                status.code(),
                tonic::Code::Unknown
                    | tonic::Code::Cancelled
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unavailable
            ),
            Ended::Closed | Ended::Renewed(_) => true,
            Ended::Headers(_) | Ended::Connect(_) | Ended::Refused(_) => false,
        }
    }
}

/// Our side of a stream: answering istiod, a renewal due or not; or closed for a renewal,
/// waiting for istiod to end the stream.
enum OurSide {
    Open {
        requests: mpsc::UnboundedSender<DeltaDiscoveryRequest>,
        renewal: Option<Renewal>,
    },
    /// Closed after a response of `bytes`.
    Closed { bytes: usize },
}

/// A renewal asked for by a response of `bytes`: our side closes at `close_at`, once istiod
/// has been quiet for `RENEW_QUIET`.
struct Renewal {
    close_at: Instant,
    bytes: usize,
}

impl OurSide {
    fn close_at(&self) -> Option<Instant> {
        match self {
            OurSide::Open {
                renewal: Some(renewal),
                ..
            } => Some(renewal.close_at),
            _ => None,
        }
    }

    /// Ends our side (the requests' sender dropped) for the renewal due.
    fn closed(self) -> OurSide {
        match self {
            OurSide::Open {
                renewal: Some(renewal),
                ..
            } => OurSide::Closed {
                bytes: renewal.bytes,
            },
            other => other,
        }
    }
}

/// Sleeps until `at`; never returns without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

impl<D: Dial, S: XdsSink + ?Sized> XdsClient<D, S> {
    pub fn new(config: XdsConfig, istiod: D, sink: Arc<S>) -> XdsClient<D, S> {
        XdsClient {
            config,
            istiod,
            sink,
            shared: Arc::new(Shared::new()),
        }
    }

    pub fn handle(&self) -> XdsHandle {
        XdsHandle::new(self.shared.clone())
    }

    /// Opens a stream, takes its responses until it ends, and opens the next one (see the
    /// module's doc for when), for ever. Drop the future to stop.
    pub async fn run(self) {
        let mut backoff = Backoff::default();
        let mut attempt: u64 = 0;
        let mut last_renewal = None;
        loop {
            attempt = attempt.wrapping_add(1);
            self.shared.attempting();
            let ended = self.stream(attempt, &mut last_renewal).await;
            let delay = if ended.routine() {
                let delay = backoff.reset();
                tracing::info!(attempt, reason = %ended, ?delay, "xds: reconnecting to istiod");
                delay
            } else {
                let delay = backoff.failed();
                tracing::warn!(attempt, reason = %ended, ?delay, "xds: retrying istiod after a delay");
                delay
            };
            self.shared.disconnected(ended.to_string());
            tokio::time::sleep(delay).await;
        }
    }

    /// One stream, from its opening to its end: istiod's, or a renewal's (after a response
    /// over `RENEW_AFTER_BYTES`, at most once per `RENEWAL_INTERVAL`: once istiod has been
    /// quiet for `RENEW_QUIET`, the client ends its side, its ACKs sent, and istiod then ends
    /// the stream).
    async fn stream(&self, attempt: u64, last_renewal: &mut Option<Instant>) -> Ended {
        let headers = match self.config.credentials.metadata().await {
            Ok(headers) => headers,
            Err(err) => return err.into(),
        };
        let ads = match self.istiod.dial(Ads::new).await {
            Ok(ads) => ads,
            Err(err) => return Ended::Connect(err),
        };
        let (requests, outbound) = mpsc::unbounded_channel();
        let node = self.config.node();
        for kind in ResourceKind::ALL {
            let versions = self.shared.versions(kind);
            tracing::debug!(
                attempt,
                type_url = kind.type_url(),
                held = versions.len(),
                "xds: subscribing"
            );
            // The receiver is ours until the stream ends.
            let _ = requests.send(initial_request(kind, &node, versions));
        }
        let mut responses = match ads.open(headers, outbound, MAX_RESPONSE_BYTES).await {
            Ok(responses) => responses,
            // The channel connects at the first call: its failure comes as a status that
            // carries the channel's error, not one istiod sent.
            Err(status) => {
                return match channel_failure(&status) {
                    Some(failure) => Ended::Connect(failure.into()),
                    None => Ended::Refused(status),
                };
            }
        };
        self.shared.connected();
        tracing::info!(attempt, "xds: stream to istiod open");
        let mut side = OurSide::Open {
            requests,
            renewal: None,
        };
        loop {
            let next = tokio::select! {
                next = responses.message() => next,
                () = sleep_until(side.close_at()) => {
                    tracing::info!(attempt, "xds: renewing the stream after a large response, once istiod ends it");
                    *last_renewal = Some(Instant::now());
                    side = side.closed();
                    continue;
                }
            };
            let response = match (next, &side) {
                (Ok(Some(response)), _) => response,
                (Ok(None) | Err(_), OurSide::Closed { bytes }) => return Ended::Renewed(*bytes),
                (Ok(None), OurSide::Open { .. }) => return Ended::Closed,
                (Err(status), OurSide::Open { .. }) => return Ended::Failed(status),
            };
            // Only a response that could ask for a renewal is measured.
            let may_renew = matches!(side, OurSide::Open { renewal: None, .. })
                && last_renewal.is_none_or(|at| at.elapsed() >= RENEWAL_INTERVAL);
            let bytes = may_renew.then(|| prost::Message::encoded_len(&response));
            // A resource that does not decode fails the response whole, nothing of it
            // applied, as when tonic decoded the response whole.
            let reply = match self.take(response) {
                Ok(reply) => reply,
                Err(err) => return Ended::Failed(tonic::Status::internal(err.to_string())),
            };
            let (requests, renewal) = match &mut side {
                // Taken, but no longer answerable: the next stream says what is held.
                OurSide::Closed { bytes } => return Ended::Renewed(*bytes),
                OurSide::Open { requests, renewal } => (requests, renewal),
            };
            // If the stream is gone, the next read says why.
            let _ = requests.send(reply);
            let quiet_from_now = Instant::now() + RENEW_QUIET;
            match renewal {
                // istiod is still sending: wait for it to be done.
                Some(due) => due.close_at = quiet_from_now,
                None => {
                    if let Some(bytes) = bytes.filter(|bytes| *bytes > RENEW_AFTER_BYTES) {
                        *renewal = Some(Renewal {
                            close_at: quiet_from_now,
                            bytes,
                        });
                    }
                }
            }
        }
    }

    /// Takes one response; returns its ACK or NACK, or why a resource of it does not decode.
    fn take(&self, response: DeltaResponse) -> Result<DeltaDiscoveryRequest, prost::DecodeError> {
        let DeltaResponse {
            type_url,
            nonce,
            resources,
            removed_resources,
        } = response;
        let started = Instant::now();
        let (upserted, removed) = (resources.len(), removed_resources.len());
        let nack = match ResourceKind::from_type_url(&type_url) {
            Some(kind) => self.apply(kind, &nonce, resources, removed_resources)?,
            None => Some(format!("{type_url}: not a type this client subscribes to")),
        };
        // The daemon's own time for a response, from its arrival to its answer: converting it
        // and applying it to the model and the kernel's maps (the scale benchmark reads it).
        let took_us = started.elapsed().as_micros();
        match &nack {
            None => tracing::info!(
                type_url,
                nonce,
                upserted,
                removed,
                took_us,
                "xds: response applied"
            ),
            Some(message) => {
                tracing::warn!(type_url, nonce, upserted, removed, took_us, %message, "xds: NACK")
            }
        }
        Ok(DeltaDiscoveryRequest {
            type_url,
            response_nonce: nonce,
            error_detail: nack.map(|message| Status {
                code: tonic::Code::InvalidArgument as i32,
                message,
                details: Vec::new(),
            }),
            ..DeltaDiscoveryRequest::default()
        })
    }

    /// Applies a response of `kind` and records it; returns the NACK's message, if any. If a
    /// resource does not decode, nothing is applied or recorded.
    fn apply(
        &self,
        kind: ResourceKind,
        nonce: &str,
        resources: Vec<Bytes>,
        removed: Vec<String>,
    ) -> Result<Option<String>, prost::DecodeError> {
        let sink::Converted {
            upserts: converted,
            mut rejected,
        } = sink::convert(kind, resources)?;
        let (upserts, versions): (Vec<Upsert>, Vec<String>) = converted.into_iter().unzip();
        let names: Vec<Arc<str>> = upserts.iter().map(Upsert::held_name).collect();
        let batch = XdsBatch {
            kind,
            upserts,
            removed: removed.clone(),
        };
        let (accepted, removed) = match self.sink.apply(batch) {
            Ok(refused) => {
                let refused_names: HashSet<&str> =
                    refused.iter().map(|r| r.name.as_str()).collect();
                let accepted = names
                    .into_iter()
                    .zip(versions)
                    .filter(|(name, _)| !refused_names.contains(&**name))
                    .collect();
                rejected.extend(refused);
                (accepted, removed)
            }
            Err(err) => {
                // Nothing was applied: the versions held stay as they were.
                let reason = format!("not applied: {err}");
                rejected.extend(
                    names
                        .iter()
                        .map(|name| Rejected::new(&**name, &reason))
                        .chain(removed.iter().map(|name| Rejected::new(name, &reason))),
                );
                (Vec::new(), Vec::new())
            }
        };
        let nack = (!rejected.is_empty()).then(|| nack_message(&rejected));
        let settled = Settled {
            accepted,
            removed,
            nonce: nonce.to_owned(),
            nack: nack.clone(),
        };
        if self.shared.settle(kind, settled) {
            tracing::info!("xds: every type has had an accepted response: ready");
        }
        Ok(nack)
    }
}

/// The first request of `kind` on a stream: wildcard, with the versions held.
fn initial_request(
    kind: ResourceKind,
    node: &Node,
    versions: HashMap<String, String>,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(node.clone()),
        type_url: kind.type_url().to_owned(),
        initial_resource_versions: versions,
        ..DeltaDiscoveryRequest::default()
    }
}

/// `<name>: <reason>; ...`, at most `NACK_NAMES_MAX` of them.
fn nack_message(rejected: &[Rejected]) -> String {
    let mut message = rejected
        .iter()
        .take(NACK_NAMES_MAX)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if let Some(more) = rejected
        .len()
        .checked_sub(NACK_NAMES_MAX)
        .filter(|n| *n > 0)
    {
        message.push_str(&format!("; and {more} more"));
    }
    message
}

/// The delay before the next attempt.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            next: INITIAL_BACKOFF,
        }
    }
}

impl Backoff {
    /// After a failure: the delay due, jittered between half of it and all of it; the next
    /// one doubles, up to `MAX_BACKOFF`.
    fn failed(&mut self) -> Duration {
        let due = self.next;
        self.next = due.saturating_mul(2).min(MAX_BACKOFF);
        rand::rng().random_range(due / 2..=due)
    }

    /// After a routine end: back to the first delay; wait only a random spread under it, so
    /// the nodes istiod drops at once do not all come back at once.
    fn reset(&mut self) -> Duration {
        self.next = INITIAL_BACKOFF;
        rand::rng().random_range(Duration::ZERO..INITIAL_BACKOFF)
    }
}

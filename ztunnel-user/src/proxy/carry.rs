//! The long-lived part of every proxied connection: bytes moving between its two sides until
//! both are done or a policy change revokes it, then its records closed. The steps that set a
//! connection up (routing, authorization, connects, TLS, opening an HBONE stream) run boxed
//! before and are freed once it carries bytes: what an open connection costs is this state
//! and its relay's, nothing of the set-up.

use super::admission::Admitted;
use crate::delivery::{Announcement, Delivery};
use crate::hbone::client::{HboneStream, StreamSlot};
use crate::relay::Carrier;
use crate::relay::h2::bridge;
use crate::relay::tcp::relay;
use crate::telemetry::connections::{ConnectionError, Tracked};
use bytes::Bytes;
use h2::{RecvStream, SendStream};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::TcpStream;

/// What a connection's set-up made: the carrier and what must live as long as it.
pub(super) struct Connected {
    pub(super) carrier: Carrier,
    /// On the same-node path, the destination pod's record of it (the one authorized).
    /// Boxed: only that path has one, and inline it would make every connection's task a
    /// size class larger.
    pub(super) delivered: Option<Box<Tracked>>,
    /// An outbound HBONE stream's share of its pooled connection, held while it is open.
    pub(super) slot: Option<StreamSlot>,
    /// A delivery's announcement to `sk_lookup`, held while it is open (boxed as `delivered`).
    pub(super) _announcement: Option<Box<Announcement>>,
}

impl Connected {
    /// Two TCP connections, relayed.
    pub(super) fn tcp(client: TcpStream, server: TcpStream) -> Connected {
        Connected {
            carrier: Carrier::Tcp(relay(client, server)),
            delivered: None,
            slot: None,
            _announcement: None,
        }
    }

    /// A client's TCP connection carried over the HBONE stream it opened.
    pub(super) fn over_hbone(tcp: TcpStream, stream: HboneStream) -> Connected {
        Connected {
            carrier: Carrier::H2 {
                bridge: bridge(tcp, stream.send, stream.recv),
                tcp_is_client: true,
            },
            delivered: None,
            slot: Some(stream.slot),
            _announcement: None,
        }
    }

    /// A client's TCP connection delivered to the app's.
    pub(super) fn delivered(client: TcpStream, delivery: Delivery) -> Connected {
        Connected {
            _announcement: Some(Box::new(delivery.announcement)),
            ..Connected::tcp(client, delivery.app)
        }
    }

    /// An HBONE stream delivered to the app's TCP connection.
    pub(super) fn to_app(
        delivery: Delivery,
        send: SendStream<Bytes>,
        recv: RecvStream,
    ) -> Connected {
        Connected {
            carrier: Carrier::H2 {
                bridge: bridge(delivery.app, send, recv),
                tcp_is_client: false,
            },
            delivered: None,
            slot: None,
            _announcement: Some(Box::new(delivery.announcement)),
        }
    }
}

/// Serves a connection: its set-up (boxed, so that its state is freed once it is done), then,
/// if that made a connection, the carrying.
pub(super) async fn serve<SetUp>(set_up: Pin<Box<SetUp>>)
where
    SetUp: Future<Output = Option<Carriage>>,
{
    // let-else, not if-let: the scrutinee's temporary would stay in the task's state.
    let Some(mut carriage) = set_up.await else {
        return;
    };
    let outcome = std::future::poll_fn(|cx| carriage.poll_carry(cx)).await;
    carriage.finish(outcome);
}

/// A connection carrying bytes, and its records.
pub(super) struct Carriage {
    connected: Connected,
    /// The connection as the side that accepted it records it.
    tracked: Tracked,
    /// Its charge on its pod's share of the descriptor budget.
    _admitted: Admitted,
}

impl Carriage {
    /// The connection `tracked` as its set-up left it: carried from here, or, if it failed,
    /// logged and recorded with its error (and its charge given back).
    pub(super) fn after(
        tracked: Tracked,
        admitted: Admitted,
        connected: Result<Connected, ConnectionError>,
    ) -> Option<Carriage> {
        match connected {
            Ok(connected) => Some(Carriage {
                connected,
                tracked,
                _admitted: admitted,
            }),
            Err(err) => {
                tracked.log_failure(&err);
                tracked.failed(&err);
                None
            }
        }
    }

    /// Carries until both sides are done or the authorized record is revoked. Polled in
    /// place, on the handler's own `Carriage`: a future of its own (an async fn, a select)
    /// would be part of the task's state for as long as the connection lives.
    fn poll_carry(&mut self, cx: &mut Context<'_>) -> Poll<Result<(u64, u64), ConnectionError>> {
        let authorized = self.connected.delivered.as_deref().unwrap_or(&self.tracked);
        if let Poll::Ready(err) = authorized.poll_revoked(cx) {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut self.connected.carrier)
            .poll(cx)
            .map_err(ConnectionError::Io)
    }

    /// Closes both sides (if a revocation ended the carrying, that is what closes them) and
    /// reports how the connection ended on every record.
    fn finish(self, outcome: Result<(u64, u64), ConnectionError>) {
        let Carriage {
            connected, tracked, ..
        } = self;
        drop((connected.carrier, connected.slot));
        if let Err(err) = &outcome {
            tracked.log_failure(err);
        }
        if let Some(delivered) = connected.delivered {
            delivered.finish_with(&outcome);
        }
        tracked.finish_with(&outcome);
    }
}

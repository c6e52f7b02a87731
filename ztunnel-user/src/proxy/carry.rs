//! The long-lived part of every proxied connection: bytes moving between its two sides until
//! both are done or a policy change revokes it, then its records closed. The steps that set a
//! connection up (routing, authorization, connects, TLS, opening an HBONE stream) run boxed
//! before and are freed once it carries bytes: what an open connection costs is this state
//! and its relay's, nothing of the set-up.

use super::relay::Relay;
use crate::connections::Tracked;
use crate::hbone::bridge::{Bridge, bridge};
use crate::hbone::client::{HboneStream, StreamSlot};
use bytes::Bytes;
use h2::{RecvStream, SendStream};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::TcpStream;

/// What moves the bytes. Resolves to (client -> server, server -> client).
pub enum Carrier {
    /// TCP to TCP, spliced.
    Splice(Relay),
    /// TCP to an HBONE stream. `tcp_is_client`: the TCP side is the connection's client (an
    /// outbound connection) rather than its server (the app an HBONE stream is delivered to).
    Bridge { bridge: Bridge, tcp_is_client: bool },
}

impl Future for Carrier {
    type Output = io::Result<(u64, u64)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Carrier::Splice(relay) => Pin::new(relay).poll(cx),
            Carrier::Bridge {
                bridge,
                tcp_is_client,
            } => {
                let tcp_is_client = *tcp_is_client;
                Pin::new(bridge).poll(cx).map_ok(|(from_tcp, to_tcp)| {
                    if tcp_is_client {
                        (from_tcp, to_tcp)
                    } else {
                        (to_tcp, from_tcp)
                    }
                })
            }
        }
    }
}

/// What a connection's set-up made: the carrier and what must live as long as it.
pub struct Connected {
    pub carrier: Carrier,
    /// On the same-node path, the destination pod's record of it (the one authorized).
    /// Boxed: only that path has one, and inline it would make every connection's task a
    /// size class larger.
    pub delivered: Option<Box<Tracked>>,
    /// An outbound HBONE stream's share of its pooled connection, held while it is open.
    pub slot: Option<StreamSlot>,
}

impl Connected {
    pub fn splice(relay: Relay) -> Connected {
        Connected {
            carrier: Carrier::Splice(relay),
            delivered: None,
            slot: None,
        }
    }

    /// A client's TCP connection carried over the HBONE stream it opened.
    pub fn over_hbone(tcp: TcpStream, stream: HboneStream) -> Connected {
        Connected {
            carrier: Carrier::Bridge {
                bridge: bridge(tcp, stream.send, stream.recv),
                tcp_is_client: true,
            },
            delivered: None,
            slot: Some(stream.slot),
        }
    }

    /// An HBONE stream delivered to the app's TCP connection.
    pub fn to_app(app: TcpStream, send: SendStream<Bytes>, recv: RecvStream) -> Connected {
        Connected {
            carrier: Carrier::Bridge {
                bridge: bridge(app, send, recv),
                tcp_is_client: false,
            },
            delivered: None,
            slot: None,
        }
    }
}

/// Serves a connection: its set-up (boxed, so that its state is freed once it is done), then,
/// if that made a connection, the carrying.
pub async fn serve<SetUp>(set_up: Pin<Box<SetUp>>)
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
pub struct Carriage {
    connected: Connected,
    /// The connection as the side that accepted it records it.
    tracked: Tracked,
}

impl Carriage {
    /// The connection `tracked` as its set-up left it: carried from here, or, if it failed,
    /// logged and recorded with its error.
    pub fn after(tracked: Tracked, connected: io::Result<Connected>) -> Option<Carriage> {
        match connected {
            Ok(connected) => Some(Carriage { connected, tracked }),
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
    fn poll_carry(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(u64, u64)>> {
        let authorized = self.connected.delivered.as_deref().unwrap_or(&self.tracked);
        if let Poll::Ready(err) = authorized.poll_revoked(cx) {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut self.connected.carrier).poll(cx)
    }

    /// Closes both sides (if a revocation ended the carrying, that is what closes them) and
    /// reports how the connection ended on every record.
    fn finish(self, outcome: io::Result<(u64, u64)>) {
        let Carriage { connected, tracked } = self;
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

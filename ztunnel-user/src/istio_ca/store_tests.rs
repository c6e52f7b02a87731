//! The certificate store over Istio's CA, as the daemon runs it with istiod, against the fake
//! CA in memory: fetches shared and limited, renewal at half-life, retries with backoff while
//! the held certificate serves, and handshakes that never reach the CA. Time is tokio's paused
//! clock where it matters: the schedule is checked without waiting it.

use super::fake::{Answer, FakeCa};
use crate::identity::tls::{client_config, server_config};
use crate::identity::{CertificateStore, Identity, StoreError};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep};

/// What "at that time" allows on tokio's millisecond timers.
const TIMER: Duration = Duration::from_millis(2);

fn identity(name: &str) -> Identity {
    format!("spiffe://cluster.local/ns/shop/sa/{name}")
        .parse()
        .unwrap()
}

fn store(ca: &FakeCa, ttl: Duration) -> Arc<CertificateStore> {
    CertificateStore::start(Arc::new(ca.client(ttl, None, None)))
}

/// When the CA saw each request, from `start`.
fn arrivals(ca: &FakeCa, start: Instant) -> Vec<Duration> {
    ca.seen().iter().map(|seen| seen.at - start).collect()
}

fn assert_near(actual: Duration, expected: Duration, within: Duration) {
    assert!(
        actual.abs_diff(expected) <= within,
        "{actual:?} is not {expected:?} (within {within:?})"
    );
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_for_one_identity_make_one_fetch() {
    let ca = FakeCa::new();
    ca.delay(Duration::from_secs(1));
    let store = store(&ca, Duration::from_secs(3600));
    let mut waiters = JoinSet::new();
    for _ in 0..10 {
        let store = store.clone();
        waiters.spawn(async move { store.certificate(&identity("checkout")).await });
    }
    store.prefetch(&identity("checkout"));
    let keys = waiters.join_all().await;
    let first = keys[0].as_ref().unwrap();
    for key in &keys {
        assert!(Arc::ptr_eq(first, key.as_ref().unwrap()));
    }
    assert_eq!(ca.seen().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn at_most_eight_fetches_run_at_once() {
    let ca = FakeCa::new();
    ca.delay(Duration::from_secs(1));
    let store = store(&ca, Duration::from_secs(3600));
    let start = Instant::now();
    let identities: Vec<Identity> = (0..20).map(|n| identity(&format!("sa{n}"))).collect();
    for identity in &identities {
        store.prefetch(identity);
    }
    for identity in &identities {
        store.certificate(identity).await.unwrap();
    }
    assert_eq!(ca.most_running(), 8);
    let seconds: Vec<u64> = arrivals(&ca, start).iter().map(|at| at.as_secs()).collect();
    let expected: Vec<u64> = [(0, 8), (1, 8), (2, 4)]
        .into_iter()
        .flat_map(|(second, count)| std::iter::repeat_n(second, count))
        .collect();
    assert_eq!(seconds, expected, "in order, 8 at a time");
}

#[tokio::test(start_paused = true)]
async fn renews_at_half_life() {
    let ca = FakeCa::new();
    let store = store(&ca, Duration::from_secs(100));
    let start = Instant::now();
    let first = store.certificate(&identity("checkout")).await.unwrap();
    sleep(Duration::from_secs(48)).await;
    assert_eq!(ca.seen().len(), 1);
    sleep(Duration::from_secs(3)).await;
    let renewed = store.held(&identity("checkout")).unwrap();
    assert_ne!(first.cert, renewed.cert);
    // Half of the validity, whose whole seconds may start up to a second early.
    let at = arrivals(&ca, start);
    assert_eq!(at.len(), 2);
    assert_near(
        at[1],
        Duration::from_millis(49_500),
        Duration::from_millis(501),
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_ca_leaves_the_certificate_in_use_until_it_expires_then_recovers() {
    let ca = FakeCa::new();
    let store = store(&ca, Duration::from_secs(100));
    let checkout = identity("checkout");
    let start = Instant::now();
    let first = store.certificate(&checkout).await.unwrap();
    ca.answer(Answer::Refuse(tonic::Code::Unavailable));

    // Renewal failed at half-life and is being retried: the certificate still serves.
    sleep(Duration::from_secs(98)).await;
    assert!(ca.seen().len() > 2);
    assert!(Arc::ptr_eq(&first, &store.held(&checkout).unwrap()));
    assert!(Arc::ptr_eq(
        &first,
        &store.certificate(&checkout).await.unwrap()
    ));

    // Expired: nothing to present, and the last failure at once (no fetch is running).
    sleep(Duration::from_secs(3)).await;
    assert!(store.held(&checkout).is_none());
    let asked = Instant::now();
    let error = store.certificate(&checkout).await.unwrap_err();
    assert_eq!(Instant::now(), asked);
    assert!(matches!(error, StoreError::Issue(_)), "{error}");
    let message = error.to_string();
    assert!(message.contains(&checkout.to_string()), "{message}");
    assert!(message.contains("Unavailable"), "{message}");

    // The retries: 0.5 s after the failed renewal, doubling up to 150 s.
    sleep(Duration::from_secs(600)).await;
    ca.answer(Answer::Sign);
    sleep(Duration::from_secs(60)).await;
    let at = arrivals(&ca, start);
    let gaps: Vec<Duration> = at[1..].windows(2).map(|pair| pair[1] - pair[0]).collect();
    let expected_ms = [
        500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 150_000, 150_000, 150_000,
    ];
    assert_eq!(gaps.len(), expected_ms.len(), "{gaps:?}");
    for (gap, ms) in gaps.iter().zip(expected_ms) {
        assert_near(*gap, Duration::from_millis(ms), TIMER);
    }
    // Back: the last retry succeeded.
    let recovered = store
        .held(&checkout)
        .expect("a certificate once the CA is back");
    assert_ne!(recovered.cert, first.cert);
    assert!(Arc::ptr_eq(
        &recovered,
        &store.certificate(&checkout).await.unwrap()
    ));

    // The success reset the backoff: the next failed renewal is retried after 0.5 s.
    ca.answer(Answer::Refuse(tonic::Code::Unavailable));
    let renewed_at = at.len();
    sleep(Duration::from_secs(46)).await;
    let at = arrivals(&ca, start);
    assert!(at.len() >= renewed_at + 2, "{at:?}");
    assert_near(
        at[renewed_at + 1] - at[renewed_at],
        Duration::from_millis(500),
        TIMER,
    );
}

#[tokio::test(start_paused = true)]
async fn a_ca_that_does_not_answer_times_out() {
    let ca = FakeCa::new();
    ca.delay(Duration::from_secs(3600));
    let store = store(&ca, Duration::from_secs(3600));
    let start = Instant::now();
    let error = store.certificate(&identity("checkout")).await.unwrap_err();
    assert!(matches!(error, StoreError::TimedOut { .. }), "{error}");
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(60),
        "the store's fetch timeout"
    );
}

#[tokio::test(start_paused = true)]
async fn forgetting_an_identity_ends_its_waits_and_drops_its_certificate() {
    let ca = FakeCa::new();
    ca.delay(Duration::from_secs(1));
    let store = store(&ca, Duration::from_secs(3600));
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.certificate(&identity("checkout")).await })
    };
    sleep(Duration::from_millis(100)).await;
    store.forget(&identity("checkout"));
    let error = waiter.await.unwrap().unwrap_err();
    assert!(matches!(error, StoreError::Forgotten(_)), "{error}");
    // The fetch under way ends, and its certificate is not kept.
    sleep(Duration::from_secs(2)).await;
    assert_eq!(ca.seen().len(), 1);
    assert!(store.held(&identity("checkout")).is_none());
    assert!(store.expiries().is_empty());
}

/// A TLS handshake in memory between the two configurations.
fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Result<(), rustls::Error> {
    let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let mut client = Connection::Client(ClientConnection::new(client, name)?);
    let mut server = Connection::Server(ServerConnection::new(server)?);
    while client.is_handshaking() || server.is_handshaking() {
        let moved = transfer(&mut client, &mut server)? + transfer(&mut server, &mut client)?;
        if moved == 0 {
            return Err(rustls::Error::General("the handshake stalled".into()));
        }
    }
    Ok(())
}

/// Moves what `from` has to send to `to`; returns how many bytes.
fn transfer(from: &mut Connection, to: &mut Connection) -> Result<usize, rustls::Error> {
    let io = |error: std::io::Error| rustls::Error::General(error.to_string());
    let mut bytes = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut bytes).map_err(io)?;
    }
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        to.read_tls(&mut rest).map_err(io)?;
        to.process_new_packets()?;
    }
    Ok(bytes.len())
}

#[tokio::test]
async fn handshakes_never_call_the_ca_and_a_server_takes_the_roots_that_come_later() {
    let ca = FakeCa::new();
    let store = store(&ca, Duration::from_secs(3600));
    let (server, client) = (identity("checkout"), identity("frontend"));
    // A client's configuration is made per connection, with the roots of that moment.
    let client_side = || {
        client_config(
            store.clone(),
            client.clone(),
            store.roots(),
            vec![server.clone()],
        )
    };
    // A server's lives as long as its pod: it must take the roots that come later.
    let server_side = server_config(store.clone(), server.clone());
    assert!(handshake(client_side(), server_side.clone()).is_err());
    sleep(Duration::from_millis(50)).await;
    assert!(ca.seen().is_empty(), "the resolver asked the CA");

    store.certificate(&server).await.unwrap();
    store.certificate(&client).await.unwrap();
    // The roots came with the CA's answers, after the server's configuration was made.
    handshake(client_side(), server_side.clone()).unwrap();
    handshake(client_side(), server_side).unwrap();
    assert_eq!(ca.seen().len(), 2);
}

//! The HBONE server (`hbone::server`: the HTTP/2 handshake, the connection loop, each CONNECT's
//! checks and answers) on arbitrary client bytes, over an in-memory stream: no socket, no TLS.
//! The handler does what the proxy's 15008 handler does on the wire: the request's target
//! against the address the connection arrived on, refused as the server's checks say, else
//! 401, 503 or 200 by the target's port (then the stream's bytes are echoed).
//!
//! The input: one byte of options, then the client's bytes.
//! - bit 0: send the HTTP/2 client preface before the bytes (else the bytes are all there is);
//! - bit 1: the connection arrived on an IPv6 address (else IPv4);
//! - bit 2: drain (GOAWAY) from the start; bit 3: drain once the bytes are sent;
//! - bits 4-5: the in-memory stream's buffer: 64 B, 1 KiB, 16 KiB or 64 KiB (small buffers split
//!   the frames across reads).
//!
//! The client waits until the server is idle before it ends its stream (and between its other
//! steps). The server must then finish within the bound, never panic, answer
//! 200 only on the streams the handler accepted (so never to a request its checks refuse),
//! answer each stream at most once, send DATA only on accepted streams, and leave no
//! connection or stream counted open. With `ZTUNNEL_FUZZ_DEBUG` set, each input's outcome and
//! responses are printed (to replay one: `cargo +nightly fuzz run hbone_server FILE`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use ztunnel_fuzz::{bounded, wire};
use ztunnel_user::fuzzing::{Answer, HboneOutcome, hbone_connection};
use ztunnel_user::hbone::server::target_of;

/// How long a connection may take, on the runtime's paused clock: it moves only while every
/// task waits, so a server that waits for nothing that can come is caught at once.
const BOUND: Duration = Duration::from_secs(5);
/// How long the client waits (paused clock: until nothing else can run) before its next step.
const SETTLE: Duration = Duration::from_millis(100);
/// The watchdog's, for a thread stuck where the runtime's timer cannot fire.
const HARD_BOUND: Duration = Duration::from_secs(10);
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const WITH_PREFACE: u8 = 1;
const IPV6: u8 = 1 << 1;
const DRAIN_FIRST: u8 = 1 << 2;
const DRAIN_AFTER: u8 = 1 << 3;
const BUFFERS: [usize; 4] = [64, 1024, 16 * 1024, 64 * 1024];

/// What the proxy would decide for a target its checks allow; here the port decides, so the
/// input chooses: a multiple of 3 is accepted, one more is denied, two more fails.
fn answer(target: SocketAddr) -> Answer {
    match target.port() % 3 {
        0 => Answer::Accept,
        1 => Answer::Deny,
        _ => Answer::Fail,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&options, bytes)) = data.split_first() else {
        return;
    };
    let mut client_bytes = Vec::with_capacity(PREFACE.len() + bytes.len());
    if options & WITH_PREFACE != 0 {
        client_bytes.extend_from_slice(PREFACE);
    }
    client_bytes.extend_from_slice(bytes);
    let (local, peer): (SocketAddr, SocketAddr) = if options & IPV6 != 0 {
        (
            "[fd00::2:2]:15008".parse().unwrap(),
            "[fd00::1:2]:40000".parse().unwrap(),
        )
    } else {
        (
            "10.244.2.2:15008".parse().unwrap(),
            "10.244.1.2:40000".parse().unwrap(),
        )
    };
    let buffer = BUFFERS[usize::from(options >> 4) & 3];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
    let (outcome, output) = bounded("the HBONE server", HARD_BOUND, || {
        runtime.block_on(async {
            let session = serve(client_bytes, local, peer, options, buffer);
            match tokio::time::timeout(BOUND, session).await {
                Ok(served) => served,
                Err(_) => panic!("the HBONE server did not finish within {BOUND:?}: a hang"),
            }
        })
    });
    drop(runtime);
    check(&outcome, &output, local);
});

/// One connection: the client's bytes in (then the end of its stream), everything the server
/// writes collected.
async fn serve(
    client_bytes: Vec<u8>,
    local: SocketAddr,
    peer: SocketAddr,
    options: u8,
    buffer: usize,
) -> (HboneOutcome, Vec<u8>) {
    let (client, server) = tokio::io::duplex(buffer);
    let (mut from_server, mut to_server) = tokio::io::split(client);
    // Held until the end: a dropped sender would read as a shutdown.
    let (drain, shutdown) = watch::channel(options & DRAIN_FIRST != 0);
    let send = async {
        // The server may stop reading (a connection error): the rest is not sent.
        let sent = to_server.write_all(&client_bytes).await.is_ok();
        // The clock is paused and moves only when every task waits: the server has taken in
        // and answered all it could (h2 drops requests not yet accepted when the stream ends).
        tokio::time::sleep(SETTLE).await;
        if options & DRAIN_AFTER != 0 {
            let _ = drain.send(true);
            tokio::time::sleep(SETTLE).await;
        }
        if sent {
            let _ = to_server.shutdown().await;
        }
    };
    let receive = async {
        let mut output = Vec::new();
        let _ = from_server.read_to_end(&mut output).await;
        output
    };
    let (outcome, (), output) = tokio::join!(
        hbone_connection(server, local, peer, shutdown, answer),
        send,
        receive
    );
    (outcome, output)
}

fn check(outcome: &HboneOutcome, output: &[u8], local: SocketAddr) {
    assert_eq!(
        outcome.open_after,
        (0, 0),
        "counted open after the end: {outcome:?}"
    );
    let accepted: HashMap<u32, SocketAddr> = outcome.accepted.iter().copied().collect();
    for (stream, target) in &accepted {
        let request = http::Request::connect(target.to_string()).body(()).unwrap();
        assert_eq!(
            target_of(&request, local).as_ref(),
            Ok(target),
            "stream {stream} was accepted for a target the checks refuse"
        );
    }
    let (responses, data_streams) = match wire::responses(output) {
        Ok(read) => read,
        Err(err) => panic!("the server wrote what a client cannot read: {err}; {outcome:?}"),
    };
    if std::env::var_os("ZTUNNEL_FUZZ_DEBUG").is_some() {
        eprintln!("{outcome:?}\nresponses: {responses:?}\nDATA on streams {data_streams:?}");
    }
    let mut answered = HashSet::new();
    for response in &responses {
        let Some(status) = &response.status else {
            continue;
        };
        assert!(
            answered.insert(response.stream),
            "stream {} answered twice ({status}): {responses:?}",
            response.stream
        );
        if status == "200" {
            assert!(
                accepted.contains_key(&response.stream),
                "200 on stream {}, which the handler did not accept: {outcome:?}",
                response.stream
            );
        }
    }
    for stream in data_streams {
        assert!(
            accepted.contains_key(&stream),
            "DATA on stream {stream}, which the handler did not accept: {outcome:?}"
        );
    }
}

//! Both sides of the HBONE wire contract, checked against the independent Python peer
//! (`tests/hbone_peer/peer.py`): it drives our server as a client, and plays a node running
//! Istio's ztunnel (pod `w1`) for our client. Its certificates are issued from the lab's
//! shared CA with the `openssl` command line, not by our code.

mod support;

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::*;
use ztunnel_common::ports::DEFAULT_MARK;
use ztunnel_lab::mesh::MeshChanges;
use ztunnel_lab::send_from;
use ztunnel_lab::topology::{CA_DIR, STATE_DIR, TRUST_DOMAIN, workspace_root};
use ztunnel_user::api::Direction;
use ztunnel_user::identity::{ROOT_CERT_FILE, ROOT_KEY_FILE};

fn peer_script() -> String {
    workspace_root()
        .join("tests/hbone_peer/peer.py")
        .display()
        .to_string()
}

/// A key and certificate for `spiffe_id`, signed by the lab's root with openssl.
fn peer_certificate(name: &str, spiffe_id: &str) -> (PathBuf, PathBuf) {
    let dir = Path::new(STATE_DIR).join("peer");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, csr, cert, ext) = (
        dir.join(format!("{name}-key.pem")),
        dir.join(format!("{name}.csr")),
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}.ext")),
    );
    std::fs::write(&ext, format!("subjectAltName=URI:{spiffe_id}\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n")).unwrap();
    let ca = Path::new(CA_DIR);
    let root_cert = ca.join(ROOT_CERT_FILE);
    let root_key = ca.join(ROOT_KEY_FILE);
    let steps: [Vec<&str>; 3] = [
        vec![
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            key.to_str().unwrap(),
        ],
        vec![
            "req",
            "-new",
            "-key",
            key.to_str().unwrap(),
            "-subj",
            "/O=hbone-peer",
            "-out",
            csr.to_str().unwrap(),
        ],
        vec![
            "x509",
            "-req",
            "-in",
            csr.to_str().unwrap(),
            "-CA",
            root_cert.to_str().unwrap(),
            "-CAkey",
            root_key.to_str().unwrap(),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ],
    ];
    for args in steps {
        let output = std::process::Command::new("openssl")
            .args(&args)
            .output()
            .expect("running openssl");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    (cert, key)
}

fn spiffe(namespace: &str, service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}")
}

/// The peer as a client in u1 (an unenrolled pod: its connection to b1:15008 is not captured
/// anywhere), with its own certificate, running `checks` against b1's HBONE server.
fn peer_client_against_b1(s: &LabSession, checks: Value, extra: &[&str]) -> std::process::Command {
    let (cert, key) = peer_certificate("client", &spiffe("legacy", "default"));
    let spec = Path::new(STATE_DIR).join("peer").join("checks.json");
    std::fs::write(&spec, checks.to_string()).unwrap();
    let root = Path::new(CA_DIR).join(ROOT_CERT_FILE);
    let b1 = s.ip("b1");
    let mut argv = vec![
        "python3".to_owned(),
        peer_script(),
        "client".into(),
        "--connect".into(),
        format!("{b1}:15008"),
        "--ca".into(),
        root.display().to_string(),
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
        "--expect-identity".into(),
        spiffe("demo", "sa-b"),
        "--check".into(),
        spec.display().to_string(),
    ];
    argv.extend(extra.iter().map(|a| a.to_string()));
    ztunnel_lab::exec("u1", &argv).unwrap()
}

#[test]
fn our_server_follows_the_contract() {
    let s = LabSession::start();
    let _server = serve("b1", APP_PORT);
    let b1 = s.ip("b1");
    let a1 = s.ip("a1");
    // The peer's identity may not reach b1's port 9999 (no app listens there: the 401 comes
    // before any delivery is tried).
    apply_mesh(
        &s.lab,
        &MeshChanges {
            sections: "policies:\n- {name: no-9999, namespace: demo, scope: Namespace, action: Deny,\n   rules: [[[{principals: [{Exact: cluster.local/ns/legacy/sa/default}], destinationPorts: [9999]}]]]}\n",
            ..MeshChanges::default()
        },
    );
    let checks = json!([
        {"name": "denied by policy", "authority": format!("{b1}:9999"), "expect_status": 401},
        {"name": "echo", "authority": format!("{b1}:{APP_PORT}"), "expect_status": 200, "send": 3 * MIB, "expect_reply_json": true},
        {"name": "not CONNECT", "method": "GET", "authority": format!("{b1}:{APP_PORT}"), "expect_status": 400},
        {"name": "authority without port", "authority": b1.to_string(), "expect_status": 400},
        {"name": "another pod's address", "authority": format!("{a1}:{APP_PORT}"), "expect_status": 400},
        {"name": "proxy port", "authority": format!("{b1}:15006"), "expect_status": 503},
        {"name": "nothing listens", "authority": format!("{b1}:9"), "expect_status": 503},
    ]);
    let requests = checks.as_array().unwrap().len();
    let output = peer_client_against_b1(&s, checks, &[]).output().unwrap();
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "peer report: {e}; stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["tls_version"], "TLSv1.3");
    assert_eq!(report["alpn"], "h2");
    assert_eq!(
        report["checks"].as_array().unwrap().len(),
        requests + 1,
        "every request and the settings check"
    );
}

/// The peer in w1 in `mode` (`server` or `waypoint`, with `extra` options), on w1's 15008 and
/// as w1's identity (`foreign/default`, as the mesh config has it), once it says it is ready;
/// with its stdout.
fn peer_in_w1(
    s: &LabSession,
    mode: &str,
    extra: &[&str],
) -> (Child, Lines<BufReader<ChildStdout>>) {
    peer_in_w1_on(s, mode, 15008, extra)
}

/// `peer_in_w1`, listening on `port`.
fn peer_in_w1_on(
    s: &LabSession,
    mode: &str,
    port: u16,
    extra: &[&str],
) -> (Child, Lines<BufReader<ChildStdout>>) {
    peer_in(s, "w1", mode, port, extra)
}

/// The peer in `pod` (unenrolled, in namespace `foreign` with the default service account, as
/// w1 and g1 are), as the pod's identity, listening on `port`.
fn peer_in(
    s: &LabSession,
    pod: &str,
    mode: &str,
    port: u16,
    extra: &[&str],
) -> (Child, Lines<BufReader<ChildStdout>>) {
    let ip = s.ip(pod);
    let name = format!("{pod}-{mode}-{port}");
    let (cert, key) = peer_certificate(&name, &spiffe("foreign", "default"));
    let root = Path::new(CA_DIR).join(ROOT_CERT_FILE);
    let argv = [
        "python3",
        &peer_script(),
        mode,
        "--listen",
        &format!("{ip}:{port}"),
        "--ca",
        root.to_str().unwrap(),
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--expect-client-trust-domain",
        TRUST_DOMAIN,
    ];
    let mut peer = ztunnel_lab::exec(pod, &[&argv[..], extra].concat())
        .unwrap()
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(peer.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    (peer, lines)
}

fn next_json(lines: &mut Lines<BufReader<ChildStdout>>) -> Value {
    serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap()
}

#[test]
fn our_client_talks_to_an_istio_like_server() {
    let s = LabSession::start();
    let w1 = s.ip("w1");
    let (mut peer, mut lines) = peer_in_w1(&s, "server", &[]);

    // a1's connection to w1 (an HBONE workload in the mesh config) goes over HBONE to the peer,
    // which answers as the application would (the JSON report lab-tool expects).
    let report = send("a1", s.addr("w1", APP_PORT), 5 * MIB);
    assert_eq!(report.server.bytes, 5 * MIB);
    assert_eq!(
        report.server.peer, report.local,
        "forwarded carried the application's client"
    );
    let logged = next_json(&mut lines);
    assert_eq!(
        logged["client_identity"],
        spiffe("demo", "sa-a"),
        "{logged:#}"
    );
    assert_eq!(logged["authority"], format!("{w1}:{APP_PORT}"));
    assert_eq!(logged["status"], 200);
    let _ = peer.kill();
    let _ = peer.wait();
}

/// A server that retires a connection (GOAWAY once it has replied to 2 streams, the streams
/// it named finishing first, as a draining or ageing peer does): the pool stops offering that
/// connection, and the stream that met the GOAWAY goes again on a new one, so no application
/// connection pays for it.
#[test]
fn our_client_pool_leaves_a_connection_the_server_retired() {
    let s = LabSession::start();
    let (mut peer, mut lines) = peer_in_w1(&s, "server", &["--goaway-after", "2"]);
    let to = s.addr("w1", APP_PORT);
    let mut refused = 0;
    // Each connection's stream as the peer logged it (refusals of streams it did not process
    // aside): the HBONE connection it came on.
    let mut quick = || {
        let report = send("a1", to, KIB);
        assert_eq!(report.server.bytes, KIB);
        loop {
            let logged = next_json(&mut lines);
            if logged["reason"] == "refused after GOAWAY (REFUSED_STREAM)" {
                refused += 1;
                continue;
            }
            assert_eq!(logged["status"], 200, "{logged:#}");
            return logged["client"].as_str().unwrap().to_owned();
        }
    };
    // A transfer paused halfway keeps the first connection open after its GOAWAY.
    let paused = send_pausing(
        "a1",
        to,
        MIB,
        Duration::from_secs(3),
        Duration::from_secs(20),
    );
    eventually("the paused transfer is open", || {
        connections(&s.lab, "node1").iter().any(|c| c.open)
    });
    let first = quick();
    assert_eq!(quick(), first, "pooled");
    // The second reply was followed by GOAWAY: the next stream must not be lost on it.
    let after = quick();
    assert_ne!(after, first, "a new connection after the GOAWAY");
    assert_eq!(quick(), after, "the new connection is pooled in turn");
    assert!(
        refused <= 1,
        "only the stream that met the GOAWAY: {refused}"
    );
    let report = paused
        .join()
        .unwrap()
        .expect("the stream the GOAWAY named finished intact");
    assert_eq!(report.server.bytes, MIB);
    assert_eq!(next_json(&mut lines)["client"], first.as_str());
    let _ = peer.kill();
    let _ = peer.wait();
}

#[test]
fn traffic_to_a_workload_with_a_waypoint_passes_through_it_once() {
    let s = LabSession::start();
    let b1_app = serve("b1", APP_PORT);
    let (a1, b1, u1, w1) = (s.ip("a1"), s.ip("b1"), s.ip("u1"), s.ip("w1"));
    let waypoint = format!("  waypoint: {{destination: /{w1}, hboneMtlsPort: 15008}}\n");
    apply_mesh(
        &s.lab,
        &MeshChanges {
            workload_fields: &[("b1", &waypoint)],
            ..MeshChanges::default()
        },
    );
    let (mut peer, mut lines) = peer_in_w1(&s, "waypoint", &[]);
    let authority = format!("{b1}:{APP_PORT}");

    // From a mesh pod on the other node: a1's proxy sends the connection to the waypoint,
    // which sends it on to b1 over HBONE; b1's proxy delivers it (it comes from the waypoint)
    // instead of sending it back.
    let report = send("a1", s.addr("b1", APP_PORT), 5 * MIB);
    assert_eq!(report.server.bytes, 5 * MIB);
    assert_eq!(report.server.peer.ip(), w1, "b1's app sees the waypoint");
    assert_eq!(next_report(&b1_app).peer.ip(), w1);
    let logged = next_json(&mut lines);
    assert_eq!(logged["status"], 200, "{logged:#}");
    assert_eq!(logged["authority"], authority);
    assert_eq!(logged["client_identity"], spiffe("demo", "sa-a"));
    assert_eq!(logged["upstream_identity"], spiffe("demo", "sa-b"));
    assert!(
        logged["forwarded_for"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{a1}:"))
    );
    assert_eq!(logged["bytes_up"], 5 * MIB);

    // From a plaintext client that tried to bypass the waypoint: b1's own proxy sends it to
    // the waypoint first, as b1.
    let report = send("u1", s.addr("b1", APP_PORT), MIB);
    assert_eq!(report.server.peer.ip(), w1);
    assert_eq!(next_report(&b1_app).peer.ip(), w1);
    let logged = next_json(&mut lines);
    assert_eq!(logged["status"], 200, "{logged:#}");
    assert_eq!(logged["authority"], authority);
    assert_eq!(logged["client_identity"], spiffe("demo", "sa-b"));
    assert!(
        logged["forwarded_for"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{u1}:"))
    );

    // Each connection passed through the waypoint exactly once.
    let _ = peer.kill();
    let _ = peer.wait();
    assert_eq!(lines.count(), 0, "the waypoint saw more streams");
}

/// A service with a waypoint: a client's connection to the VIP goes to the waypoint with the
/// VIP as its authority (the waypoint chooses the endpoint), and the endpoint's proxy delivers
/// what comes from the waypoint. A connection straight to the endpoint's address is not the
/// service's: it goes directly.
#[test]
fn traffic_to_a_service_with_a_waypoint_goes_to_it_with_the_vip() {
    let s = LabSession::start();
    let b1_app = serve("b1", APP_PORT);
    let (b1, w1) = (s.ip("b1"), s.ip("w1"));
    let vip = "10.96.0.10";
    apply_mesh(
        &s.lab,
        &MeshChanges {
            workload_fields: &[("b1", ECHO_ENDPOINT)],
            sections: &echo_service(
                vip,
                &format!("  waypoint: {{destination: /{w1}, hboneMtlsPort: 15008}}\n"),
            ),
            ..MeshChanges::default()
        },
    );
    let route = format!("{vip}:80={b1}:{APP_PORT}");
    let (mut peer, mut lines) = peer_in_w1(&s, "waypoint", &["--route", &route]);

    let report = send(
        "a1",
        format!("{vip}:80").parse::<std::net::SocketAddr>().unwrap(),
        MIB,
    );
    assert_eq!(report.server.bytes, MIB);
    assert_eq!(report.server.peer.ip(), w1, "b1's app sees the waypoint");
    assert_eq!(next_report(&b1_app).peer.ip(), w1);
    let logged = next_json(&mut lines);
    assert_eq!(logged["status"], 200, "{logged:#}");
    assert_eq!(logged["authority"], format!("{vip}:80"));
    assert_eq!(logged["client_identity"], spiffe("demo", "sa-a"));
    assert_eq!(logged["upstream_identity"], spiffe("demo", "sa-b"));

    let report = send("a1", s.addr("b1", APP_PORT), KIB);
    assert_eq!(report.server.peer, report.local, "straight from a1");
    next_report(&b1_app);
    let _ = peer.kill();
    let _ = peer.wait();
    assert_eq!(
        lines.count(),
        0,
        "the waypoint saw only the VIP's connection"
    );
}

/// A service with a weighted set of waypoints (Istio's waypoint canary): each connection goes
/// through one of them, drawn by weight; a weight of 0 takes none.
#[test]
fn a_weighted_waypoint_set_shares_the_connections_by_weight() {
    let s = LabSession::start();
    let _b1_app = serve("b1", APP_PORT);
    let (b1, w1) = (s.ip("b1"), s.ip("w1"));
    let vip = "10.96.0.10";
    let with_weights = |primary: u32, canary: u32| {
        echo_service(
            vip,
            &format!(
                "  waypoint: {{destination: /{w1}}}
  weightedWaypoints:
                   - {{waypoint: {{destination: /{w1}, hboneMtlsPort: 15008}}, weight: {primary}}}
                   - {{waypoint: {{destination: /{w1}, hboneMtlsPort: 15009}}, weight: {canary}}}
"
            ),
        )
    };
    let route = format!("{vip}:80={b1}:{APP_PORT}");
    let (mut primary, primary_lines) = peer_in_w1_on(&s, "waypoint", 15008, &["--route", &route]);
    let (mut canary, canary_lines) = peer_in_w1_on(&s, "waypoint", 15009, &["--route", &route]);
    let (primary_seen, canary_seen) = (count_lines(primary_lines), count_lines(canary_lines));
    let send_all = |sections: &str, connections: usize| {
        apply_mesh(
            &s.lab,
            &MeshChanges {
                workload_fields: &[("b1", ECHO_ENDPOINT)],
                sections,
                ..MeshChanges::default()
            },
        );
        for _ in 0..connections {
            let report = send(
                "a1",
                format!("{vip}:80").parse::<std::net::SocketAddr>().unwrap(),
                KIB,
            );
            assert_eq!(report.server.peer.ip(), w1, "through a waypoint");
        }
    };
    // 3 to 1: both take some (the canary none of 40 has odds of 1 in 100,000).
    send_all(&with_weights(3, 1), 40);
    eventually("both waypoints to log their streams", || {
        primary_seen.load(Ordering::SeqCst) + canary_seen.load(Ordering::SeqCst) == 40
    });
    let (to_primary, to_canary) = (
        primary_seen.load(Ordering::SeqCst),
        canary_seen.load(Ordering::SeqCst),
    );
    assert!(
        to_primary > to_canary && to_canary > 0,
        "{to_primary} to {to_canary}"
    );
    // Promoted: the canary takes everything.
    send_all(&with_weights(0, 1), 10);
    eventually("the canary to log its streams", || {
        canary_seen.load(Ordering::SeqCst) == to_canary + 10
    });
    assert_eq!(primary_seen.load(Ordering::SeqCst), to_primary);
    for peer in [&mut primary, &mut canary] {
        let _ = peer.kill();
        let _ = peer.wait();
    }
}

/// A count of the lines `lines` gives, kept up to date by a thread of its own.
fn count_lines(lines: Lines<BufReader<ChildStdout>>) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        for _ in lines.map_while(Result::ok) {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    count
}

/// A workload on another network is reached through that network's east-west gateway by
/// double HBONE. c1 is on node3, network `net2`, of which node1 routes to nothing but the
/// gateway g1 (the peer, gateway mode). The outer stream, as a1 and checked against the
/// gateway's identity, asks for c1's HBONE port; the inner connection inside it is a1's own
/// mutual TLS with node3's proxy, which delivers to c1's app from the gateway's address.
#[test]
fn a_workload_on_another_network_is_reached_through_its_gateway() {
    let s = LabSession::start();
    let c1_app = serve("c1", APP_PORT);
    let (c1, g1) = (s.ip("c1"), s.ip("g1"));
    // A socket with the proxy's mark is not captured: a1 itself cannot reach c1.
    let direct = send_from("a1", s.addr("c1", APP_PORT), KIB, Some(DEFAULT_MARK), QUICK);
    assert!(direct.is_err(), "node1 routes to c1: {direct:?}");
    // Without its gateway at work, the workload cannot be reached at all.
    denied("a1", s.addr("c1", APP_PORT));
    let (mut gateway, mut lines) = peer_in(&s, "g1", "gateway", 15008, &[]);

    let report = send("a1", s.addr("c1", APP_PORT), 2 * MIB);
    assert_eq!(report.server.bytes, 2 * MIB);
    assert_eq!(report.server.peer.ip(), g1, "c1's app sees the gateway");
    assert_eq!(next_report(&c1_app).peer.ip(), g1);
    // node3's proxy took the inner connection as a1's: the inner TLS ran end to end.
    let inbound = closed_connections(&s.lab, "node3", Direction::Inbound);
    let delivered = inbound.last().expect("c1's inbound record");
    assert_eq!(delivered.source_identity, spiffe("demo", "sa-a"));
    assert_eq!(
        delivered.original_destination,
        s.addr("c1", APP_PORT).into()
    );
    // The gateway relays one stream, for a1, to c1's HBONE port (the stream lasts as long as
    // a1's proxy keeps the inner connection).
    let relaying = next_json(&mut lines);
    assert_eq!(relaying["event"], "relaying", "{relaying:#}");
    assert_eq!(relaying["authority"], format!("{c1}:15008"));
    assert_eq!(relaying["upstream"], format!("{c1}:15008"));
    assert_eq!(relaying["client_identity"], spiffe("demo", "sa-a"));
    let _ = gateway.kill();
    let _ = gateway.wait();
}

#[test]
fn our_server_says_goaway_when_the_daemon_stops() {
    let s = LabSession::start();
    let _server = serve("b1", APP_PORT);
    let b1 = s.ip("b1");
    let checks = json!([{"name": "echo", "authority": format!("{b1}:{APP_PORT}"), "expect_status": 200, "send": 1024, "expect_reply_json": true}]);
    let mut peer = peer_client_against_b1(&s, checks, &["--await-goaway", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(peer.stderr.take().unwrap());
    let mut waiting = false;
    for line in stderr.lines().map_while(Result::ok) {
        if line.contains("awaiting GOAWAY") {
            waiting = true;
            break;
        }
    }
    assert!(waiting, "the peer ran its checks and holds the connection");
    ztunnel_lab::stop_daemon("node2").expect("SIGTERM to node2's daemon");
    let output = peer.wait_with_output().unwrap();
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let goaway = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "goaway")
        .cloned();
    assert_eq!(
        goaway.as_ref().map(|c| c["ok"].clone()),
        Some(Value::Bool(true)),
        "{report:#}"
    );
}

//! Restarting a node's daemon on the lab, under a loop of new connections: while it is down
//! the pods' new connections fail closed and nothing leaves a pod in plaintext; the restarted
//! daemon takes its pods over (pinned maps and links adopted, listeners re-opened) and every
//! connection after the restart is captured again. Run serially (`--test-threads=1`).

mod support;

use std::net::{IpAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use support::*;
use ztunnel_common::maps::{PodInfo, names};
use ztunnel_lab::capture::{Segment, UnderlayCapture};
use ztunnel_lab::topology::MESH_CONFIG;
use ztunnel_lab::{ControlPlane, DaemonOptions, Lab, Started, send_from};
use ztunnel_user::api::Direction;

/// Each connection of the loop: small, so the first segment carries the marker.
const LOOP_BYTES: u64 = 4096;
/// Bounds on the loop, whatever happens to the daemon.
const LOOP_MAX_CONNECTIONS: usize = 2000;
const LOOP_MAX_DURATION: Duration = Duration::from_secs(90);
/// How long one connection of the loop may take (connect, send, report).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the daemon stays down.
const DOWN_FOR: Duration = Duration::from_secs(3);
/// Connections the loop must complete before the stop and after the restart.
const SUCCESSES_EACH_SIDE: usize = 10;
/// tcpdump gets packets from the kernel in blocks, handed over at least once a second: wait
/// that long before stopping it, or the last packets are missing.
const CAPTURE_HANDOVER: Duration = Duration::from_millis(1500);

/// One connection of the loop.
#[derive(Debug)]
struct Attempt {
    started: Instant,
    finished: Instant,
    error: Option<String>,
}

/// `lab-tool send` from a pod, one new connection after the other, in a thread.
struct ConnectionLoop {
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    thread: JoinHandle<()>,
}

impl ConnectionLoop {
    fn start(pod: &'static str, to: SocketAddrV4) -> ConnectionLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let (stopping, recording) = (stop.clone(), attempts.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + LOOP_MAX_DURATION;
            for _ in 0..LOOP_MAX_CONNECTIONS {
                if stopping.load(Ordering::Relaxed) || Instant::now() >= deadline {
                    break;
                }
                let started = Instant::now();
                let result = send_from(pod, to, LOOP_BYTES, None, CONNECTION_TIMEOUT);
                recording.lock().unwrap().push(Attempt {
                    started,
                    finished: Instant::now(),
                    error: result.err().map(|e| e.to_string()),
                });
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        ConnectionLoop {
            stop,
            attempts,
            thread,
        }
    }

    /// Waits (bounded) until `count` connections begun after `since` succeeded.
    fn wait_for_successes(&self, count: usize, since: Instant) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let succeeded = self
                .attempts
                .lock()
                .unwrap()
                .iter()
                .filter(|a| a.started >= since && a.error.is_none())
                .count();
            if succeeded >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {succeeded} of {count} connections succeeded"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the connection loop panicked");
        std::mem::take(&mut *self.attempts.lock().unwrap())
    }
}

/// How the daemon is taken down.
#[derive(Clone, Copy, Debug)]
enum Stop {
    Kill,
    Terminate,
}

fn restart_under_a_connection_loop(stop: Stop) {
    let s = LabSession::start();
    let lab = &s.lab;
    let _b1 = serve("b1", APP_PORT);
    let a2_server = serve("a2", APP_PORT);
    let pcap = std::env::temp_dir().join(format!("ztunnel-restart-{}.pcap", std::process::id()));
    let capture = UnderlayCapture::start("node1", &pcap).expect("tcpdump on node1's underlay");
    let programs_before = newest_program_id();
    let links_before = our_link_count();

    let looping = ConnectionLoop::start("a1", s.addr("b1", APP_PORT));
    looping.wait_for_successes(SUCCESSES_EACH_SIDE, Instant::now());
    let stopping = Instant::now();
    match stop {
        Stop::Kill => ztunnel_lab::kill_daemon("node1").expect("SIGKILL node1's daemon"),
        Stop::Terminate => ztunnel_lab::stop_daemon("node1").expect("SIGTERM node1's daemon"),
    }
    let down = Instant::now();
    // Inbound too: sk_lookup finds no listener, so a plaintext client is refused rather than
    // let through to the app.
    let to_a2 = s.addr("a2", APP_PORT);
    let refused = send_from("u1", to_a2, LOOP_BYTES, None, CONNECTION_TIMEOUT)
        .expect_err("u1's connection to a2 while node1's daemon is down");
    assert!(
        refused.to_string().contains("Connection refused"),
        "{refused}"
    );
    std::thread::sleep(DOWN_FOR);
    assert!(
        a2_server.next_report(Duration::ZERO).is_err(),
        "u1's connection reached a2 while node1's daemon was down"
    );
    let starting = Instant::now();
    ztunnel_lab::start_daemon("node1").expect("restarting node1's daemon");
    let ready = Instant::now();
    let counters_at_ready = counters(lab, "node1");
    looping.wait_for_successes(SUCCESSES_EACH_SIDE, ready);
    let attempts = looping.stop();

    // Failures only while the daemon was down; every connection after the restart works.
    let before: Vec<&Attempt> = attempts.iter().filter(|a| a.finished < stopping).collect();
    let while_down: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.started >= down && a.finished <= starting)
        .collect();
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.started >= ready).collect();
    let failed = |set: &[&Attempt]| set.iter().filter(|a| a.error.is_some()).count();
    let in_flight = attempts.len() - before.len() - while_down.len() - after.len();
    let in_flight_failed = attempts.iter().filter(|a| a.error.is_some()).count()
        - failed(&before)
        - failed(&while_down)
        - failed(&after);
    println!(
        "restart ({stop:?}): {} connections; before the stop {} ({} failed), while down {} ({} failed), \
         in flight at the stop or the start {in_flight} ({in_flight_failed} failed), after the restart {} ({} failed)",
        attempts.len(),
        before.len(),
        failed(&before),
        while_down.len(),
        failed(&while_down),
        after.len(),
        failed(&after),
    );
    assert!(
        before.len() >= SUCCESSES_EACH_SIDE && failed(&before) == 0,
        "{before:?}"
    );
    assert!(
        after.len() >= SUCCESSES_EACH_SIDE && failed(&after) == 0,
        "{after:?}"
    );
    assert!(
        !while_down.is_empty(),
        "the loop ran while the daemon was down"
    );
    for attempt in &while_down {
        let error = attempt.error.as_deref().unwrap_or("it succeeded");
        assert!(
            error.contains("Connection refused"),
            "a connection while the daemon was down was not refused: {error}"
        );
    }

    // a2's outbound capture works again. And the positive control: u1 is outside the mesh,
    // so its bytes to a2 cross in clear, and the capture and the search do see them (a2's
    // inbound capture works again, too).
    let outbound_before_a2 = counters(lab, "node1")["outbound_captured"];
    send("a2", s.addr("b1", APP_PORT), LOOP_BYTES);
    assert_eq!(
        counters(lab, "node1")["outbound_captured"],
        outbound_before_a2 + 1
    );
    send("u1", to_a2, LOOP_BYTES);
    assert_eq!(next_report(&a2_server).peer.ip(), s.ip("u1"));
    std::thread::sleep(CAPTURE_HANDOVER);
    let segments = capture.finish().expect("reading the capture");
    let _ = std::fs::remove_file(&pcap);
    assert!(
        segments
            .iter()
            .any(|seg| IpAddr::V4(*seg.source.ip()) == s.ip("u1") && carries_plaintext(seg)),
        "the capture shows u1's plaintext"
    );
    // Between node1's pods and b1 only HBONE, never the application's bytes in clear.
    let node1_pods = [s.ip("a1"), s.ip("a2")];
    let meshed: Vec<&Segment> = segments
        .iter()
        .filter(|seg| {
            let ends = [
                IpAddr::V4(*seg.source.ip()),
                IpAddr::V4(*seg.destination.ip()),
            ];
            ends.contains(&s.ip("b1")) && ends.iter().any(|end| node1_pods.contains(end))
        })
        .collect();
    assert!(
        meshed.len() > 2 * SUCCESSES_EACH_SIDE,
        "{} segments",
        meshed.len()
    );
    let plain = outside_hbone(meshed.iter().copied());
    assert!(plain.is_empty(), "{:?}", plain.first());
    assert!(
        !meshed.iter().any(|seg| carries_plaintext(seg)),
        "plaintext on the underlay"
    );

    assert_taken_over(lab, programs_before, links_before);
    assert!(daemon_log("node1").contains("adopting the maps pinned by the previous run"));
    // The restarted daemon proxies again, and it is its kernel counters that move.
    let kernel = counters(lab, "node1");
    assert!(
        kernel["outbound_captured"] >= counters_at_ready["outbound_captured"] + after.len() as u64
    );
    assert!(kernel["inbound_steered"] > counters_at_ready["inbound_steered"]);
    let records = closed_connections(lab, "node1", Direction::Outbound);
    let served = |pod: &str| {
        records
            .iter()
            .filter(|r| r.pod == pod && r.error.is_none())
            .count()
    };
    assert!(served("demo/a1") >= after.len(), "{records:?}");
    assert_eq!(served("demo/a2"), 1, "{records:?}");
    let inbound = closed_connections(lab, "node1", Direction::Inbound);
    assert!(
        inbound
            .iter()
            .any(|r| r.pod == "demo/a2" && r.source.ip() == s.ip("u1")),
        "u1's connection went through the restarted proxy: {inbound:?}"
    );
    assert_release_of_an_adopted_pod(&s);
}

/// Node1's pods are enrolled, captured and served by the restarted daemon.
fn assert_taken_over(lab: &Lab, programs_before: u32, links_before: usize) {
    let status = status(lab, "node1");
    let mut pods: Vec<&str> = status.pods.iter().map(|p| p.name.as_str()).collect();
    pods.sort();
    assert_eq!(pods, ["a1", "a2"]);
    for pod in &status.pods {
        assert_eq!(pod.links.len(), HOOKS_PER_POD, "{pod:?}");
        assert!(pod.links.iter().all(|l| l.exists()), "{pod:?}");
    }
    ztunnel_lab::cni_check("a1").expect("CNI CHECK of an adopted pod");
    // The same links, moved on to the new daemon's programs; the old programs are gone.
    assert_eq!(our_link_count(), links_before);
    let link_programs = pinned_link_programs(lab, "node1");
    assert_eq!(link_programs.len(), 2 * HOOKS_PER_POD);
    assert!(
        link_programs.values().all(|&id| id > programs_before),
        "every link runs a program the restarted daemon loaded: {link_programs:?}"
    );
    eventually("only the daemons' programs are loaded", || {
        our_program_count() == ztunnel_lab::topology::NODES.len() * HOOKS_PER_POD
    });
    assert_eq!(pinned_map_len::<u64, PodInfo>(lab, "node1", names::PODS), 2);
    // A repeated ADD of an adopted pod changes nothing.
    let a1 = status.pods.iter().find(|p| p.name == "a1").unwrap();
    assert_eq!(&enroll_again(lab, "node1", "a1"), a1);
    assert_eq!(pinned_link_programs(lab, "node1"), link_programs);
}

/// CNI DEL of a pod the restarted daemon adopted leaves nothing of it behind.
fn assert_release_of_an_adopted_pod(s: &LabSession) {
    let lab = &s.lab;
    let links = our_link_count();
    ztunnel_lab::cni_del("a2").expect("CNI DEL of a2");
    assert!(status(lab, "node1").pods.iter().all(|p| p.name != "a2"));
    let a2 = lab.pod("a2").unwrap();
    let pins = lab.node("node1").unwrap().bpffs.join("pods").join(&a2.uid);
    assert!(!pins.exists(), "a2's pins are gone");
    eventually("a2's links are released", || {
        our_link_count() == links - HOOKS_PER_POD
    });
    assert_eq!(pinned_map_len::<u64, PodInfo>(lab, "node1", names::PODS), 1);
    assert_eq!(
        pod_record_files("node1"),
        [format!("{}.json", lab.pod("a1").unwrap().uid)]
    );
    assert!(!run_in("a2", &["ip", "rule"]).contains("0x111"));
    let listening = run_in("a2", &["ss", "-Htln"]);
    assert!(
        !listening.contains(":15001") && !listening.contains(":15006"),
        "{listening}"
    );
}

#[test]
fn sigkilled_daemon_fails_closed_and_takes_its_pods_over_on_restart() {
    restart_under_a_connection_loop(Stop::Kill);
}

#[test]
fn sigtermed_daemon_fails_closed_and_takes_its_pods_over_on_restart() {
    restart_under_a_connection_loop(Stop::Terminate);
}

#[test]
fn restart_keeps_pods_it_cannot_take_over_captured_until_they_are_gone() {
    let s = LabSession::start();
    let lab = &s.lab;
    let links_before = our_link_count();
    assert_eq!(links_before, 4 * HOOKS_PER_POD, "a1, a2, b1 and c1");
    ztunnel_lab::kill_daemon("node1").expect("SIGKILL node1's daemon");
    ztunnel_lab::kill_daemon("node2").expect("SIGKILL node2's daemon");
    // a2 was deleted while the daemon was down: CNI DEL (which cannot reach the daemon and
    // says so), then the runtime removes the netns. b1 lost its address for a while (so
    // the proxy cannot listen there). a1's record was damaged.
    ztunnel_lab::cni_del("a2").expect("CNI DEL of a2 while the daemon is down");
    let deleted = std::process::Command::new("ip")
        .args(["netns", "delete", "ztlab-a2"])
        .status()
        .expect("ip netns delete");
    assert!(deleted.success());
    let b1_address = PodAddress::remove("b1");
    let a1 = lab.pod("a1").unwrap();
    let record = ztunnel_lab::topology::node_spec("node1")
        .unwrap()
        .daemon_state_dir()
        .join("pods")
        .join(format!("{}.json", a1.uid));
    std::fs::write(&record, b"{\"version\": 1, \"pod\": ").expect("damaging a1's record");

    ztunnel_lab::start_daemon("node1").expect("restarting node1's daemon");
    ztunnel_lab::start_daemon("node2").expect("restarting node2's daemon");
    let log = daemon_log("node1");
    assert!(
        log.contains("refusing pod record") && log.contains(&a1.uid),
        "the refusal names the record"
    );
    assert!(log.contains("cannot open network namespace /run/netns/ztlab-a2"));
    assert!(
        daemon_log("node2").contains(&format!("listening on {}", s.addr("b1", 15001))),
        "b1's address is gone"
    );
    // a2 is gone, and so is everything of it. a1 (no record) and b1 (no address) stay
    // captured, and say so: listed as waiting, links pinned, map entry in place.
    for (node, pod, named) in [("node1", "a1", false), ("node2", "b1", true)] {
        let uid = &lab.pod(pod).unwrap().uid;
        let pods = status(lab, node).pods;
        assert_eq!(pods.len(), 1, "{node}: {pods:?}");
        assert_eq!(&pods[0].uid, uid);
        assert_eq!(pods[0].name.is_empty(), !named);
        assert!(
            pods[0].waiting.as_ref().is_some_and(|w| w.attempts >= 1),
            "{:?}",
            pods[0].waiting
        );
        assert_eq!(pods[0].links.len(), HOOKS_PER_POD);
        assert_eq!(pinned_link_programs(lab, node).len(), HOOKS_PER_POD);
        assert_eq!(pinned_map_len::<u64, PodInfo>(lab, node, names::PODS), 1);
        assert_eq!(
            sample(&scrape(node), "ztunnel_pods", &[("state", "waiting")]),
            1.0
        );
        assert!(
            cli(node, &["pods"]).contains("WAITING"),
            "`ztunnel pods` shows it"
        );
        assert!(cli(node, &["status"]).contains("1 waiting"));
    }
    assert_eq!(pod_record_files("node2").len(), 1, "b1's record is kept");
    eventually("a2's links are released, a1's, b1's and c1's kept", || {
        our_link_count() == 3 * HOOKS_PER_POD
    });
    // Waiting means captured with its connections refused, never sent uncaptured: not a1's
    // own, and not those to its app.
    let u1 = serve("u1", APP_PORT);
    let _a1_app = serve("a1", APP_PORT);
    let out = send_from(
        "a1",
        s.addr("u1", APP_PORT),
        KIB,
        None,
        Duration::from_secs(3),
    );
    assert!(out.is_err(), "a1's connection got out: {out:?}");
    let into = send_from(
        "u1",
        s.addr("a1", APP_PORT),
        KIB,
        None,
        Duration::from_secs(3),
    );
    assert!(into.is_err(), "a connection reached a1's app: {into:?}");
    let kernel = counters(lab, "node1");
    assert!(kernel["inbound_refused_no_proxy"] >= 1, "{kernel:?}");

    // b1's address is back: a retry (backing off to a minute at most) serves it again.
    b1_address.restore();
    eventually_within("b1 is served again", Duration::from_secs(70), || {
        status(lab, "node2").pods[0].waiting.is_none()
    });
    let b1 = serve("b1", APP_PORT);
    send("u1", s.addr("b1", APP_PORT), KIB);
    next_report(&b1);
    assert_eq!(
        closed_connections(lab, "node2", Direction::Inbound).len(),
        1
    );

    // a1 enrolled again (the runtime's next ADD) is served on the links it kept.
    let enrolled = enroll_again(lab, "node1", "a1");
    assert_eq!(enrolled.waiting, None);
    send("a1", s.addr("u1", APP_PORT), KIB);
    next_report(&u1);
    assert_eq!(
        closed_connections(lab, "node1", Direction::Outbound).len(),
        1
    );
    assert_eq!(our_link_count(), 3 * HOOKS_PER_POD, "a1, b1 and c1");
}

/// A pod's IPv4 address and routes, taken away for a while.
struct PodAddress {
    pod: &'static str,
    address: String,
    routes: Vec<String>,
}

impl PodAddress {
    fn remove(pod: &'static str) -> PodAddress {
        let shown = run_in(pod, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        let address = shown
            .split_whitespace()
            .skip_while(|word| *word != "inet")
            .nth(1)
            .expect("an IPv4 address on eth0")
            .to_owned();
        let routes = run_in(pod, &["ip", "-4", "route", "show"])
            .lines()
            .map(str::to_owned)
            .collect();
        run_in(pod, &["ip", "addr", "del", &address, "dev", "eth0"]);
        PodAddress {
            pod,
            address,
            routes,
        }
    }

    fn restore(self) {
        run_in(
            self.pod,
            &["ip", "addr", "add", &self.address, "dev", "eth0"],
        );
        for route in &self.routes {
            let mut argv = vec!["ip", "route", "replace"];
            argv.extend(route.split_whitespace());
            run_in(self.pod, &argv);
        }
    }
}

#[test]
fn restart_replaces_maps_whose_layout_changed_without_releasing_pods() {
    let s = LabSession::start();
    let lab = &s.lab;
    let b1 = serve("b1", APP_PORT);
    send("a1", s.addr("b1", APP_PORT), 1024);
    next_report(&b1);
    let programs_before = newest_program_id();
    let links_before = our_link_count();
    let maps_before = our_map_count();
    ztunnel_lab::kill_daemon("node1").expect("SIGKILL node1's daemon");
    // As after an upgrade that widened nothing but shrank the counters to 32 bits.
    let counters_pin = lab
        .node("node1")
        .unwrap()
        .bpffs
        .join("maps")
        .join(names::COUNTERS);
    std::fs::remove_file(&counters_pin).unwrap();
    let narrower =
        aya::maps::PerCpuArray::<aya::maps::MapData, u32>::create(64, 0).expect("creating a map");
    narrower.pin(&counters_pin).expect("pinning it");

    ztunnel_lab::start_daemon("node1").expect("restarting node1's daemon");
    let log = daemon_log("node1");
    assert!(
        log.contains("do not fit these programs") && log.contains("ZT_COUNTERS is pinned as"),
        "the log says which map does not fit"
    );
    // Both pods are still enrolled, on the same links, now running the new programs with
    // the new maps: the counters start from zero and count a1's next connection.
    assert_taken_over(lab, programs_before, links_before);
    assert_eq!(counters(lab, "node1")["outbound_captured"], 0);
    send("a1", s.addr("b1", APP_PORT), 1024);
    next_report(&b1);
    assert_eq!(counters(lab, "node1")["outbound_captured"], 1);
    assert_eq!(
        closed_connections(lab, "node1", Direction::Outbound).len(),
        1
    );
    // The old maps went with the old programs.
    eventually("only the running daemons' maps remain", || {
        our_map_count() == maps_before
    });
}

#[test]
fn pods_are_taken_over_only_once_the_mesh_config_is_in_force() {
    let s = LabSession::start();
    let lab = &s.lab;
    let b1 = serve("b1", APP_PORT);
    let programs_before = newest_program_id();
    let links_before = our_link_count();
    ztunnel_lab::kill_daemon("node1").expect("SIGKILL node1's daemon");
    // The mesh's source away: the file hidden, or istiod stopped.
    let control_plane = DaemonOptions::load()
        .expect("the lab's options")
        .control_plane;
    let kept = format!("{MESH_CONFIG}.kept");
    let awaited = match control_plane {
        ControlPlane::File => {
            std::fs::rename(MESH_CONFIG, &kept).expect("hiding the mesh config");
            "the mesh config"
        }
        ControlPlane::Istiod => {
            ztunnel_lab::istiod::stop_istiod().expect("stopping istiod");
            "istiod's xDS"
        }
    };
    ztunnel_lab::start_daemon_until("node1", Started::Answering).expect("restarting node1");
    let waiting = ztunnel_lab::daemon_not_ready("node1")
        .expect("asking node1")
        .expect("node1 is not ready");
    assert!(
        waiting.contains(awaited) && waiting.contains("the pods of the previous run"),
        "{waiting}"
    );
    // Served without their config, the pods would have the wrong identity and no policy:
    // they stay captured and refused.
    assert!(status(lab, "node1").pods.is_empty());
    assert_eq!(pinned_link_programs(lab, "node1").len(), 2 * HOOKS_PER_POD);
    let refused = send_from("a1", s.addr("b1", APP_PORT), 1024, None, CONNECTION_TIMEOUT)
        .expect_err("a1's connection while node1 waits for its config");
    assert!(
        refused.to_string().contains("Connection refused"),
        "{refused}"
    );

    match control_plane {
        ControlPlane::File => std::fs::rename(&kept, MESH_CONFIG).expect("restoring the config"),
        ControlPlane::Istiod => {
            ztunnel_lab::istiod::start_istiod().expect("starting istiod again");
        }
    }
    eventually("node1 is ready", || {
        ztunnel_lab::daemon_not_ready("node1").is_ok_and(|waiting| waiting.is_none())
    });
    assert_taken_over(lab, programs_before, links_before);
    send("a1", s.addr("b1", APP_PORT), 1024);
    next_report(&b1);
    assert_eq!(
        closed_connections(lab, "node1", Direction::Outbound).len(),
        1
    );
}

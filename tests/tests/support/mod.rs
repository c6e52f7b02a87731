//! Helpers for the end-to-end tests: a lab per test, traffic endpoints inside pods, and views of
//! the daemons and the kernel.

#![allow(dead_code, reason = "each test binary uses its own subset")]

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use ztunnel_common::maps::names;
use ztunnel_lab::traffic::{SendReport, ServerReport};
use ztunnel_lab::{DaemonOptions, Lab, LabLock, PodServer, exec_node, send_from};
use ztunnel_user::api::{self, ConnectionRecord, Direction, Request, Response, Status};

pub const APP_PORT: u16 = 8080;
pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
/// The bpf_links that capture a pod: sk_lookup, sock_ops, bind4/6 and connect4/6.
pub const HOOKS_PER_POD: usize = 6;

/// A lab brought up for one test and torn down when the test ends, pass or fail; tests run
/// one at a time whatever cargo's `--test-threads`.
pub struct LabSession {
    pub lab: Lab,
    _lock: LabLock,
}

impl LabSession {
    pub fn start() -> LabSession {
        LabSession::start_with(&DaemonOptions::default())
    }

    /// A lab whose daemons read the mesh file whatever `ZTUNNEL_LAB_CONTROL_PLANE` says: for
    /// tests of the file's own handling (its versions, its refusal).
    pub fn start_from_file() -> LabSession {
        LabSession::start_with(&DaemonOptions {
            control_plane: ztunnel_lab::ControlPlane::File,
            ..DaemonOptions::default()
        })
    }

    pub fn start_with(options: &DaemonOptions) -> LabSession {
        let lock = LabLock::acquire("test").expect("taking the lab's lock");
        *lock_ignoring_poison(&FOREIGN) = Foreign::now();
        // A previous test that was killed may have left a lab behind; `up` clears it first.
        let lab = ztunnel_lab::up_with(options).expect("bringing the lab up");
        LabSession { lab, _lock: lock }
    }

    pub fn ip(&self, pod: &str) -> IpAddr {
        IpAddr::V4(self.lab.pod(pod).expect("pod").ip)
    }

    pub fn addr(&self, pod: &str, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.lab.pod(pod).expect("pod").ip, port)
    }

    /// The pod's IPv6 address (the lab is dual stack).
    pub fn ip6(&self, pod: &str) -> IpAddr {
        IpAddr::V6(
            self.lab
                .pod(pod)
                .expect("pod")
                .ip6
                .expect("an IPv6 address"),
        )
    }

    pub fn addr6(&self, pod: &str, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip6(pod), port)
    }
}

impl Drop for LabSession {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the daemons saw explains most failures; the lab's files go with `down`.
            for node in ["node1", "node2"] {
                let log = ztunnel_lab::topology::node_spec(node)
                    .map(|spec| std::fs::read_to_string(spec.log_path()).unwrap_or_default())
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(LOG_TAIL_LINES).collect();
                eprintln!("--- the last lines of {node}'s daemon log:");
                tail.iter().rev().for_each(|line| eprintln!("{line}"));
            }
        }
        if let Err(err) = ztunnel_lab::down() {
            // Do not panic while unwinding from a failed assertion; the next `up` cleans again.
            eprintln!("lab down failed: {err}");
        }
    }
}

/// How much of each daemon's log a failed test prints.
const LOG_TAIL_LINES: usize = 40;

/// A server in `pod` on `port`, ready to accept.
pub fn serve(pod: &str, port: u16) -> PodServer {
    PodServer::start(pod, port).unwrap_or_else(|e| panic!("{e}"))
}

/// The next connection `server` finished.
pub fn next_report(server: &PodServer) -> ServerReport {
    server
        .next_report(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Starts sending `bytes` from `pod` to `to` on a thread of its own, pausing `pause` halfway
/// (the connection stays open meanwhile); joining the thread gives the outcome.
pub fn send_pausing(
    pod: &'static str,
    to: impl Into<SocketAddr>,
    bytes: u64,
    pause: Duration,
    timeout: Duration,
) -> std::thread::JoinHandle<ztunnel_lab::Result<SendReport>> {
    let to = to.into();
    std::thread::spawn(move || ztunnel_lab::send_pausing_from(pod, to, bytes, pause, timeout))
}

/// Sends `bytes` from `pod` to `to` and returns the report; the tool itself checks that the
/// server received exactly those bytes (length and SHA-256).
pub fn send(pod: &str, to: impl Into<SocketAddr>, bytes: u64) -> SendReport {
    send_from(pod, to, bytes, None, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"))
}

fn call(lab: &Lab, node: &str, request: Request) -> Response {
    let socket = &lab.node(node).expect("node").api_socket;
    api::call(socket, &request, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("API of {node}: {e}"))
}

/// Asks `node`'s daemon to release a pod, as the CNI plugin's DEL does.
pub fn disenroll(lab: &Lab, node: &str, uid: &str, container_id: &str) {
    let request = Request::Disenroll {
        uid: uid.to_owned(),
        container_id: container_id.to_owned(),
    };
    assert_eq!(
        call(lab, node, request),
        Response::Disenrolled { was_enrolled: true }
    );
}

pub fn status(lab: &Lab, node: &str) -> Status {
    match call(lab, node, Request::Status) {
        Response::Status(status) => status,
        other => panic!("unexpected response {other:?}"),
    }
}

/// (identity, expiry in Unix seconds) of every certificate `node`'s daemon holds.
pub fn certificate_expiries(lab: &Lab, node: &str) -> Vec<(String, u64)> {
    status(lab, node)
        .certificates
        .into_iter()
        .map(|c| (c.identity, c.expires_unix))
        .collect()
}

pub fn counters(lab: &Lab, node: &str) -> BTreeMap<String, u64> {
    status(lab, node)
        .counters
        .into_iter()
        .map(|c| (c.name, c.value))
        .collect()
}

pub fn connections(lab: &Lab, node: &str) -> Vec<ConnectionRecord> {
    match call(lab, node, Request::Connections) {
        Response::Connections { connections } => connections,
        other => panic!("unexpected response {other:?}"),
    }
}

/// The records of `direction` on `node`, once none of them is still open (a relay finishes
/// its record just after the client saw the server's reply).
pub fn closed_connections(lab: &Lab, node: &str, direction: Direction) -> Vec<ConnectionRecord> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records: Vec<_> = connections(lab, node)
            .into_iter()
            .filter(|c| c.direction == direction)
            .collect();
        if records.iter().all(|c| !c.open) || Instant::now() > deadline {
            return records;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn socket(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// Number of entries in one of a node's pinned maps (hash-like maps only).
pub fn pinned_map_len<K: aya::Pod, V: aya::Pod>(lab: &Lab, node: &str, name: &str) -> usize {
    let path = lab.node(node).expect("node").bpffs.join("maps").join(name);
    let data =
        MapData::from_pin(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let map = match name {
        names::PODS | names::EXCLUDED_PORTS => Map::HashMap(data),
        _ => Map::LruHashMap(data),
    };
    let map: BpfHashMap<_, K, V> = BpfHashMap::try_from(map).expect("a hash map");
    map.keys().count()
}

/// The capture programs and maps in the kernel when the session began, the lab's own not yet
/// (another ztunnel on the host): what the lab's counts below leave out.
#[derive(Default)]
struct Foreign {
    programs: BTreeSet<u32>,
    maps: BTreeSet<u32>,
}

static FOREIGN: Mutex<Foreign> = Mutex::new(Foreign {
    programs: BTreeSet::new(),
    maps: BTreeSet::new(),
});

impl Foreign {
    fn now() -> Foreign {
        Foreign {
            programs: capture_program_ids().collect(),
            maps: capture_map_ids().collect(),
        }
    }
}

fn lock_ignoring_poison<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every capture program in the kernel, whoever loaded it.
fn capture_program_ids() -> impl Iterator<Item = u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("zt_")))
        .map(|p| p.id())
}

/// Every capture map in the kernel, whoever created it.
fn capture_map_ids() -> impl Iterator<Item = u32> {
    aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str().is_some_and(|n| n.starts_with("ZT_")))
        .map(|m| m.id())
}

/// The ids of the capture programs the lab's daemons loaded.
fn our_program_ids() -> Vec<u32> {
    let foreign = lock_ignoring_poison(&FOREIGN);
    capture_program_ids()
        .filter(|id| !foreign.programs.contains(id))
        .collect()
}

/// The capture programs the lab's daemons loaded.
pub fn our_program_count() -> usize {
    our_program_ids().len()
}

/// bpf_links in the kernel that run one of the lab's programs.
pub fn our_link_count() -> usize {
    let ours = our_program_ids();
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .filter(|l| ours.contains(&l.program_id()))
        .count()
}

/// Waits until `condition` holds (kernel objects are freed asynchronously).
pub fn eventually(what: &str, condition: impl Fn() -> bool) {
    eventually_within(what, Duration::from_secs(10), condition);
}

/// Waits until `condition` holds, at most `limit`.
pub fn eventually_within(what: &str, limit: Duration, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Output of a command run inside a pod (or node) netns.
pub fn run_in(pod: &str, argv: &[&str]) -> String {
    let output = ztunnel_lab::exec(pod, argv)
        .expect("exec")
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "{argv:?} in {pod}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn mesh_status(lab: &Lab, node: &str) -> ztunnel_user::mesh::MeshStatus {
    status(lab, node).mesh
}

/// Writes the lab's mesh config with `changes` and waits until both daemons have exactly
/// that file in force (by its version: an earlier write still being applied does not count):
/// read from the file, or, when the lab runs istiod, ACKed from istiod's deltas of it.
pub fn apply_mesh(lab: &Lab, changes: &ztunnel_lab::mesh::MeshChanges) {
    let text = ztunnel_lab::mesh::mesh_config_with(changes);
    ztunnel_lab::mesh::write_mesh_config_text(&text).expect("writing the mesh config");
    let from_istiod = DaemonOptions::load()
        .expect("the lab's options")
        .control_plane
        == ztunnel_lab::ControlPlane::Istiod;
    let version = if from_istiod {
        ztunnel_lab::istiod::digest(text.as_bytes())
    } else {
        ztunnel_user::mesh::config::reload::version_of(&text)
    };
    for node in NODES {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if from_istiod {
                let synced = ztunnel_lab::istiod::synced_versions();
                if synced.get(node) == Some(&version) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{node} did not ACK version {version} of the mesh from istiod: {synced:?}"
                );
            } else {
                let config = mesh_status(lab, node).config;
                if config.version == version && config.rejected.is_none() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{node} did not apply the new mesh config: {config:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub const NODES: [&str; 2] = ["node1", "node2"];

/// The line that makes a workload an endpoint of the `echo` service (for
/// `MeshChanges::workload_fields`).
pub const ECHO_ENDPOINT: &str = "  services: {demo/echo.demo.svc.cluster.local: {}}\n";

/// The `echo` service's port on its VIP.
pub const ECHO_PORT: u16 = 80;

/// A `services:` section with the `echo` service: `vip` port `ECHO_PORT` to the app's port, and the
/// `extra` fields given (lines indented by two spaces).
pub fn echo_service(vip: impl std::fmt::Display, extra: &str) -> String {
    format!(
        "services:\n- name: echo\n  namespace: demo\n  hostname: echo.demo.svc.cluster.local\n  \
         vips: [/{vip}]\n  ports: {{{ECHO_PORT}: {APP_PORT}}}\n{extra}"
    )
}

/// The pinned `ZT_WORKLOADS` map of `node`.
pub fn kernel_workloads(
    lab: &Lab,
    node: &str,
) -> BTreeMap<IpAddr, ztunnel_common::maps::WorkloadEntry> {
    let path = lab
        .node(node)
        .expect("node")
        .bpffs
        .join("maps")
        .join(names::WORKLOADS);
    let data =
        MapData::from_pin(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let map: BpfHashMap<_, ztunnel_common::Addr, ztunnel_common::maps::WorkloadEntry> =
        BpfHashMap::try_from(Map::HashMap(data)).expect("a hash map");
    map.iter()
        .map(|entry| {
            let (addr, value) = entry.expect("reading ZT_WORKLOADS");
            (IpAddr::from(addr), value)
        })
        .collect()
}

/// The id of the newest capture program in the kernel (ids only grow, so a program loaded
/// later has a larger one).
pub fn newest_program_id() -> u32 {
    our_program_ids().into_iter().max().unwrap_or(0)
}

/// The capture maps the lab's daemons created.
pub fn our_map_count() -> usize {
    let foreign = lock_ignoring_poison(&FOREIGN);
    capture_map_ids()
        .filter(|id| !foreign.maps.contains(id))
        .count()
}

/// The program each pinned link of `node` runs, by pin path.
pub fn pinned_link_programs(lab: &Lab, node: &str) -> BTreeMap<std::path::PathBuf, u32> {
    let mut programs = BTreeMap::new();
    let mut pending = vec![lab.node(node).expect("node").bpffs.join("pods")];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)
            .expect("reading the pod pins")
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let link = aya::programs::links::PinnedLink::from_pin(&path)
                .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
            let info = aya::programs::links::FdLink::from(link)
                .info()
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            programs.insert(path, info.program_id());
        }
    }
    programs
}

/// The records `node`'s daemon keeps of its enrolled pods, by file name.
pub fn pod_record_files(node: &str) -> Vec<String> {
    let dir = ztunnel_lab::topology::node_spec(node)
        .expect("node")
        .daemon_state_dir()
        .join("pods");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// How long a connection that must fail may take to.
pub const QUICK: Duration = Duration::from_secs(5);

/// A connection `pod -> to` that must not get through; returns the client's error.
/// It must be refused or closed by a proxy or the kernel, not time out: a connection that
/// merely got lost proves no policy.
pub fn denied(pod: &str, to: impl Into<SocketAddr>) -> String {
    let to = to.into();
    let error = match send_from(pod, to, 4 * KIB, None, QUICK) {
        Ok(report) => panic!("{pod} -> {to} got through: {report:?}"),
        Err(err) => err.to_string(),
    };
    let timed_out = ["timed out", "os error 11)", "os error 110)"];
    assert!(
        !timed_out.iter().any(|sign| error.contains(sign)),
        "{pod} -> {to} timed out rather than being denied: {error}"
    );
    error
}

/// What `ztunnel ARGS` prints on `node`; the command must succeed.
pub fn cli(node: &str, args: &[&str]) -> String {
    let output = ztunnel_lab::daemon_cli(node, args).expect("ztunnel CLI");
    assert!(
        output.status.success(),
        "ztunnel {args:?} on {node}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// What `node`'s daemon logged so far (all its runs).
pub fn daemon_log(node: &str) -> String {
    let path = ztunnel_lab::topology::node_spec(node)
        .expect("node")
        .log_path();
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Asks `node`'s daemon to enroll `pod` with exactly what the CNI plugin's ADD sends.
pub fn enroll_again(lab: &Lab, node: &str, pod: &str) -> api::EnrolledPod {
    let pod = lab.pod(pod).expect("pod");
    let request = Request::Enroll {
        pod: api::PodSpec {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            uid: pod.uid.clone(),
            container_id: pod.container_id.clone(),
            netns: pod.netns.clone(),
            ips: pod.ips(),
        },
    };
    match call(lab, node, request) {
        Response::Enrolled { pod } => pod,
        other => panic!("unexpected response {other:?}"),
    }
}

/// Whether `segment` carries the start of what `lab-tool send` streams: on the underlay, that
/// means application bytes crossed in clear.
pub fn carries_plaintext(segment: &ztunnel_lab::capture::Segment) -> bool {
    let mut marker = [0u8; 64];
    ztunnel_lab::traffic::PseudoRandom::default().fill(&mut marker);
    segment.payload.windows(marker.len()).any(|w| w == marker)
}

/// The segments that belong to no HBONE connection (port 15008 at neither end).
pub fn outside_hbone<'a>(
    segments: impl IntoIterator<Item = &'a ztunnel_lab::capture::Segment>,
) -> Vec<&'a ztunnel_lab::capture::Segment> {
    segments
        .into_iter()
        .filter(|s| s.source.port() != 15008 && s.destination.port() != 15008)
        .collect()
}

/// `curl` inside `node`'s netns; the body, or the HTTP status as an error.
pub fn curl(node: &str, args: &[&str]) -> Result<String, String> {
    let mut argv = vec!["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}"];
    argv.extend(args);
    let output = exec_node(node, &argv)
        .expect("curl command")
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
    match code {
        "200" => Ok(body.to_owned()),
        _ => Err(format!(
            "{code}: {body}{}",
            String::from_utf8_lossy(&output.stderr)
        )),
    }
}

/// `node`'s `/metrics`.
pub fn scrape(node: &str) -> String {
    curl(node, &["http://127.0.0.1:15020/metrics"]).unwrap_or_else(|e| panic!("{node}: {e}"))
}

/// The sum of the samples of `name` whose labels include all of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            let set = rest.strip_suffix('}')?;
            let has = |(key, value): &(&str, &str)| {
                set.split("\",")
                    .any(|pair| pair.trim_end_matches('"') == format!("{key}=\"{value}"))
            };
            (metric == name && labels.iter().all(has)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

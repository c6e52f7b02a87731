//! `cargo xtask fuzz`: coverage-guided fuzzing of the parsers with cargo-fuzz (libFuzzer, on
//! the nightly toolchain). The targets are in `fuzz/fuzz_targets/`; each runs for a time from
//! its committed seeds (`fuzz/corpus/<target>/`, which `seeds` below writes) and the corpus
//! earlier runs grew (`target/fuzz/corpus/<target>/`, where libFuzzer adds what it finds). The
//! build, the grown corpus, the logs and any crash reproducer stay under `target/fuzz/`.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;
use ztunnel_lab::mesh::{MeshChanges, mesh_config, mesh_config_with};
use ztunnel_lab::topology::{
    EXCLUDED_NAMESPACES, POD_IFNAME, PODS, PodSpec, SYSTEM_CNI_DIR, workspace_root,
};

/// Every fuzz target, as named in `fuzz/Cargo.toml`.
pub const TARGETS: [&str; 4] = ["mesh_config", "cni", "api_json", "hbone_server"];
/// How long `cargo xtask test` runs each target.
pub const TEST_SECONDS: u64 = 20;
/// libFuzzer's own limit for one input, behind the targets' tighter bounds.
const INPUT_TIMEOUT_SECONDS: u64 = 30;

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// How long to run each target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Run only this target (repeatable); default: all of them.
    #[arg(long = "target", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    targets: Vec<String>,
}

pub fn run(args: FuzzArgs) -> Result<()> {
    let targets = if args.targets.is_empty() {
        TARGETS.map(str::to_owned).to_vec()
    } else {
        args.targets
    };
    crate::setup::build_tools()?;
    run_targets(&targets, args.seconds)
}

/// What libFuzzer reported at the end of a run.
#[derive(Debug, Default, PartialEq)]
struct Report {
    executions: u64,
    exec_per_sec: u64,
    coverage: u64,
    features: u64,
    corpus: String,
    seconds: u64,
}

/// Builds every target once, then runs each for `seconds`; fails on the first crash or hang,
/// naming its reproducer.
pub fn run_targets(targets: &[String], seconds: u64) -> Result<()> {
    let root = workspace_root();
    let written = write_seeds(&root)?;
    println!("fuzz: seed corpus in fuzz/corpus/ ({written} files rewritten)");
    let work = root.join("target/fuzz");
    println!("fuzz: building the targets (nightly, address sanitizer)");
    let status = fuzz_command(&root)
        .args(["build", "--target-dir"])
        .arg(&work)
        .status()
        .context("running cargo +nightly fuzz (run `cargo xtask setup` to install cargo-fuzz)")?;
    if !status.success() {
        bail!("building the fuzz targets failed ({status})");
    }
    let mut reports = Vec::new();
    for target in targets {
        let report = run_target(&root, &work, target, seconds)?;
        println!(
            "fuzz: {target}: {} executions in {} s ({} exec/s), coverage {} edges, {} features, corpus {}",
            report.executions,
            report.seconds,
            report.exec_per_sec,
            report.coverage,
            report.features,
            report.corpus
        );
        reports.push((target, report));
    }
    println!("\nfuzz: {seconds} s per target, no crash or hang:");
    println!(
        "{:<14} {:>12} {:>9} {:>9} {:>9} {:>6}",
        "target", "executions", "exec/s", "coverage", "features", "time"
    );
    for (target, r) in reports {
        println!(
            "{target:<14} {:>12} {:>9} {:>9} {:>9} {:>5}s",
            r.executions, r.exec_per_sec, r.coverage, r.features, r.seconds
        );
    }
    Ok(())
}

/// `cargo +nightly fuzz` in the workspace, through rustup's proxy (the `cargo` that runs
/// xtask is the stable one and would ignore `+nightly`), without what `cargo run` set for
/// xtask: build scripts that read `CARGO_PKG_NAME` and the like (ring's) would otherwise see
/// xtask's and rebuild whenever the targets are built another way (a replay by hand).
fn fuzz_command(root: &Path) -> Command {
    let mut command = Command::new("cargo");
    command
        .current_dir(root)
        .args(["+nightly", "fuzz"])
        .stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if set_by_cargo_run(&name.to_string_lossy()) {
            command.env_remove(name);
        }
    }
    command
}

/// The variables `cargo run` sets for the program it runs (and rustup's toolchain choice).
fn set_by_cargo_run(name: &str) -> bool {
    const PREFIXES: [&str; 2] = ["CARGO_PKG_", "CARGO_MANIFEST_"];
    const NAMES: [&str; 7] = [
        "CARGO",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
    ];
    NAMES.contains(&name) || PREFIXES.iter().any(|prefix| name.starts_with(prefix))
}

fn run_target(root: &Path, work: &Path, target: &str, seconds: u64) -> Result<Report> {
    let grown = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    let logs = work.join("logs");
    for dir in [&grown, &artifacts, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log_path = logs.join(format!("{target}.log"));
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    println!(
        "fuzz: {target}: running for {seconds} s (log: {})",
        log_path.display()
    );
    let mut artifact_prefix = artifacts.into_os_string();
    artifact_prefix.push("/");
    let started = Instant::now();
    let mut child = fuzz_command(root)
        .args(["run", target, "--target-dir"])
        .arg(work)
        .arg(&grown)
        .arg(root.join("fuzz/corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .arg("-print_final_stats=1")
        .arg({
            let mut arg = std::ffi::OsString::from("-artifact_prefix=");
            arg.push(&artifact_prefix);
            arg
        })
        .stderr(Stdio::piped())
        .spawn()
        .context("running cargo +nightly fuzz run")?;
    let stderr = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let mut report = Report::default();
    let mut failure = Failure::default();
    for line in stderr.lines() {
        let line = line.context("reading libFuzzer's output")?;
        writeln!(log, "{line}").context("writing the log")?;
        report.read_line(&line);
        failure.read_line(&line);
        // The progress lines (`#123 NEW ...`) go to the log only.
        if !is_progress(&line) {
            println!("  {line}");
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    report.seconds = started.elapsed().as_secs();
    if !status.success() || failure.reproducer.is_some() {
        let reproducer = failure.reproducer.map_or_else(
            || "none written (see the log)".to_owned(),
            |path| {
                format!(
                    "{path} (replay: cargo +nightly fuzz run --target-dir target/fuzz {target} {path})"
                )
            },
        );
        bail!(
            "fuzz target {target} failed ({status}): {}; reproducer {reproducer}; log {}",
            failure.what.join(": "),
            log_path.display()
        );
    }
    if report.executions == 0 {
        bail!(
            "fuzz target {target} printed no final statistics; log {}",
            log_path.display()
        );
    }
    Ok(report)
}

/// What a failed run said about its failure.
#[derive(Debug, Default, PartialEq)]
struct Failure {
    /// A panic's place and message, the target's own word on a hang, and libFuzzer's or the
    /// sanitizer's `ERROR:` line (deadly signal, timeout, out-of-memory, ...), in order.
    what: Vec<String>,
    /// The input libFuzzer kept (`crash-*`, `timeout-*`, `oom-*`, `leak-*`).
    reproducer: Option<String>,
    /// The last line was a panic's `thread '...' panicked at FILE:LINE:COL:`; its message is next.
    panicking: bool,
}

impl Failure {
    fn read_line(&mut self, line: &str) {
        if let Some(path) = line.split("Test unit written to ").nth(1) {
            let path = path.trim();
            // A slow input is only reported (`-report_slow_units`), not a failure.
            let slow = Path::new(path)
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("slow-unit-"));
            if !slow {
                self.reproducer = Some(path.to_owned());
            }
        } else if std::mem::take(&mut self.panicking) {
            self.note(line);
        } else if line.contains(" panicked at ") {
            self.panicking = true;
            self.note(line);
        } else if let Some((_, error)) = line.split_once("ERROR: ") {
            self.note(error);
        } else if line.starts_with("fuzz: ") {
            // The targets' watchdog (fuzz/src/lib.rs) naming a hang.
            self.note(line);
        }
    }

    fn note(&mut self, line: &str) {
        if self.what.len() < 4 {
            self.what.push(line.trim().to_owned());
        }
    }
}

/// libFuzzer's progress lines (`#4096 pulse cov: ...`, except the final `DONE`), the functions
/// it newly reached and its recommended dictionary.
fn is_progress(line: &str) -> bool {
    let counted = line
        .strip_prefix('#')
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
    (counted && !line.contains("DONE"))
        || line.trim_start().starts_with("NEW_FUNC")
        || line.contains("# Uses: ")
        || line.starts_with("###### ")
}

impl Report {
    /// Takes the figures of libFuzzer's closing lines: `#N DONE cov: C ft: F corp: K/S lim: L
    /// exec/s: E rss: R` and `stat::number_of_executed_units: N`.
    fn read_line(&mut self, line: &str) {
        if let Some(count) = line.strip_prefix("stat::number_of_executed_units:") {
            self.executions = count.trim().parse().unwrap_or(self.executions);
            return;
        }
        if !(line.starts_with('#') && line.contains("DONE")) {
            return;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |key: &str| {
            words
                .iter()
                .position(|word| *word == key)
                .and_then(|at| words.get(at + 1))
                .copied()
        };
        let number = |key: &str| after(key).and_then(|value| value.parse().ok()).unwrap_or(0);
        self.executions = line[1..]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        self.coverage = number("cov:");
        self.features = number("ft:");
        self.exec_per_sec = number("exec/s:");
        self.corpus = after("corp:").unwrap_or("?").to_owned();
    }
}

/// Writes the generated seeds into `fuzz/corpus/<target>/`; returns how many files changed.
fn write_seeds(root: &Path) -> Result<usize> {
    let mut changed = 0;
    for (target, name, bytes) in seeds() {
        let dir = root.join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path: PathBuf = dir.join(name);
        if std::fs::read(&path).ok().as_deref() != Some(bytes.as_slice()) {
            std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
            changed += 1;
        }
    }
    Ok(changed)
}

/// The seed corpus: small valid inputs of each target, in the shapes the lab uses.
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut seeds = vec![
        ("mesh_config", "lab.yaml", mesh_config().into_bytes()),
        (
            "mesh_config",
            "lab-services-policies.yaml",
            lab_config_with_services_and_policies().into_bytes(),
        ),
    ];
    let (a1, u1) = (&PODS[0], &PODS[3]);
    for (name, command, pod, version) in [
        ("add", "ADD", a1, "1.0.0"),
        ("add-excluded", "ADD", u1, "1.0.0"),
        ("del", "DEL", a1, "1.0.0"),
        ("check", "CHECK", a1, "0.4.0"),
        ("check-0.3.1", "CHECK", a1, "0.3.1"),
        ("version", "VERSION", a1, "1.0.0"),
    ] {
        seeds.push(("cni", name, cni_invocation(command, pod, version)));
    }
    for (name, message) in api_messages() {
        seeds.push(("api_json", name, message.to_string().into_bytes()));
    }
    seeds.extend(
        hbone_client_inputs()
            .into_iter()
            .map(|(name, bytes)| ("hbone_server", name, bytes)),
    );
    seeds
}

/// The lab's config with a service, a waypoint and policies of each scope (the README's
/// example, on the lab's pods).
fn lab_config_with_services_and_policies() -> String {
    mesh_config_with(&MeshChanges {
        workload_fields: &[
            (
                "b1",
                "  status: Healthy\n  services:\n    demo/echo.demo.svc.cluster.local: {80: 8080}\n  authorizationPolicies: [demo/b1-only]\n",
            ),
            (
                "a2",
                "  waypoint: {destination: /10.244.2.4, hboneMtlsPort: 15008}\n",
            ),
        ],
        sections: "services:\n- name: echo\n  namespace: demo\n  hostname: echo.demo.svc.cluster.local\n  vips: [/10.96.0.10]\n  ports: {80: 8080}\n  subjectAltNames: []\npolicies:\n- name: sa-a-only\n  namespace: demo\n  scope: Namespace\n  action: Allow\n  rules:\n  - - - principals: [{Exact: cluster.local/ns/demo/sa/sa-a}]\n        destinationPorts: [8080]\n- name: b1-only\n  namespace: demo\n  scope: WorkloadSelector\n  action: Deny\n  dryRun: true\n  rules:\n  - - - notSourceIps: [10.244.0.0/16]\n      - namespaces: [{Prefix: leg}]\n- name: deny-legacy\n  scope: Global\n  action: Deny\n  rules:\n  - - - namespaces: [{Exact: legacy}]\n",
        ..MeshChanges::default()
    })
}

/// The daemon socket of the `cni` target's seeds: where the target points every configuration
/// (`NOWHERE` in fuzz/fuzz_targets/cni.rs), so that it runs these bytes as they are.
const CNI_NO_DAEMON: &str = "/proc/self/ztunnel-fuzz-no-daemon.sock";

/// A CNI invocation as the `cni` target reads it: the runtime's environment as the lab's
/// runtime sets it, an empty line, then the plugin's stdin as the lab's conflist and libcni
/// make it (the ztunnel-cni entry, the list's name and version, ptp's result).
fn cni_invocation(command: &str, pod: &PodSpec, version: &str) -> Vec<u8> {
    let node = pod.node;
    let ip = pod.expected_ip();
    let [a, b, c, _] = ip.octets();
    let stdin = json!({
        "type": "ztunnel-cni",
        "apiSocket": CNI_NO_DAEMON,
        "excludeNamespaces": EXCLUDED_NAMESPACES,
        "timeoutSeconds": 30,
        "cniVersion": version,
        "name": node.network_name(),
        "prevResult": {
            "cniVersion": version,
            "interfaces": [
                {"name": "veth1a2b3c4d", "mac": "02:42:0a:f4:01:02"},
                {"name": POD_IFNAME, "mac": "02:42:0a:f4:01:03", "sandbox": pod.netns_path()},
            ],
            "ips": [{"address": format!("{ip}/24"), "gateway": format!("{a}.{b}.{c}.1"), "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {},
        },
    });
    let mut input = String::new();
    let _ = writeln!(input, "CNI_COMMAND={command}");
    let _ = writeln!(input, "CNI_CONTAINERID={}", pod.container_id());
    let _ = writeln!(input, "CNI_NETNS={}", pod.netns_path().display());
    let _ = writeln!(input, "CNI_IFNAME={POD_IFNAME}");
    let _ = writeln!(
        input,
        "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        pod.namespace,
        pod.name,
        pod.container_id(),
        pod.uid
    );
    let _ = writeln!(input, "CNI_PATH={SYSTEM_CNI_DIR}");
    input.push('\n');
    input.push_str(&serde_json::to_string_pretty(&stdin).unwrap_or_default());
    input.into_bytes()
}

/// Control API requests and responses, as the CNI plugin and the daemon exchange them.
fn api_messages() -> Vec<(&'static str, Value)> {
    let pod = &PODS[0];
    let node = pod.node;
    let identity = format!(
        "spiffe://cluster.local/ns/{}/sa/{}",
        pod.namespace, pod.service_account
    );
    vec![
        (
            "request-enroll.json",
            json!({"op": "enroll", "pod": {
                "name": pod.name, "namespace": pod.namespace, "uid": pod.uid,
                "container_id": pod.container_id(), "netns": pod.netns_path(),
                "ips": [pod.expected_ip(), "fd00::1:2"],
            }}),
        ),
        (
            "request-disenroll.json",
            json!({"op": "disenroll", "uid": pod.uid, "container_id": pod.container_id()}),
        ),
        (
            "request-check.json",
            json!({"op": "check", "uid": pod.uid, "container_id": pod.container_id()}),
        ),
        ("request-status.json", json!({"op": "status"})),
        ("request-connections.json", json!({"op": "connections"})),
        (
            "response-enrolled.json",
            json!({"result": "enrolled", "pod": {
                "name": pod.name, "namespace": pod.namespace, "uid": pod.uid,
                "container_id": pod.container_id(), "netns": pod.netns_path(),
                "cgroup": format!("/sys/fs/cgroup/kubepods/pod{}", pod.uid),
                "ips": [pod.expected_ip()],
                "identity": identity,
                "links": [node.bpffs_dir().join("pods").join(pod.uid).join("connect4")],
            }}),
        ),
        (
            "response-disenrolled.json",
            json!({"result": "disenrolled", "was_enrolled": true}),
        ),
        (
            "response-checked.json",
            json!({"result": "checked", "enrolled": false}),
        ),
        (
            "response-error.json",
            json!({"result": "error", "message": "not ready: mesh config"}),
        ),
        (
            "response-status.json",
            json!({"result": "status", "node": node.name, "pods": [],
                "certificates": [{"identity": identity, "expires_unix": 1_900_000_000u64}],
                "counters": [{"name": "captured_connect4", "value": 3}],
                "mesh": {"config": {"path": "/run/ztunnel-lab/mesh.yaml", "version": "0123abcd",
                    "generation": 1, "rejected": null, "reads": 1},
                    "services": 0, "policies": 0,
                    "workloads": [{"uid": pod.uid, "workload_index": 1, "identity": identity,
                        "identity_index": 1, "addresses": [pod.expected_ip()], "flags": 1}]}}),
        ),
        (
            "response-connections.json",
            json!({"result": "connections", "connections": [{
                "direction": "inbound", "pod": "demo/b1", "source": "10.244.1.2:51234",
                "original_destination": "10.244.2.2:8080",
                "source_identity": identity, "destination_identity": "spiffe://cluster.local/ns/demo/sa/sa-b",
                "bytes_sent": 10, "bytes_received": 20, "open": false, "response_flags": "-",
                "error": null}]}),
        ),
    ]
}

/// Options byte of the `hbone_server` target: send the client preface first; small buffer.
const WITH_PREFACE: u8 = 1;
const IPV6: u8 = 1 << 1;
const DRAIN_AFTER: u8 = 1 << 3;
const BUFFER_1K: u8 = 1 << 4;

/// HTTP/2 clients of the HBONE server: the options byte, then what the client sends.
fn hbone_client_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let connect = |stream, authority: &str| headers(stream, &connect_headers(authority, None));
    let settings = frame(FRAME_SETTINGS, 0, 0, &[]);
    // The `hbone_server` target answers by the port: 8082 is accepted, 8080 denied, 8081 fails.
    let accepted = [
        settings.clone(),
        connect(1, "10.244.2.2:8082"),
        frame(FRAME_DATA, END_STREAM, 1, b"hello"),
    ]
    .concat();
    let forwarded = [
        settings.clone(),
        headers(
            1,
            &connect_headers("10.244.2.2:8082", Some("for=\"10.244.1.2:51234\"")),
        ),
        connect(3, "10.244.2.2:8080"),
        connect(5, "10.244.2.2:8081"),
        frame(FRAME_DATA, 0, 1, b"ping"),
        frame(FRAME_SETTINGS, SETTINGS_ACK, 0, &[]),
        frame(FRAME_RST_STREAM, 0, 1, &8u32.to_be_bytes()),
        frame(FRAME_GOAWAY, 0, 0, &[0, 0, 0, 5, 0, 0, 0, 0]),
    ]
    .concat();
    let get = [
        settings.clone(),
        headers(
            1,
            &[
                literal(STATIC_METHOD, "GET"),
                literal(STATIC_SCHEME, "http"),
                literal(STATIC_PATH, "/"),
                literal(STATIC_AUTHORITY, "10.244.2.2:8082"),
            ]
            .concat(),
        ),
    ]
    .concat();
    let with = |options: u8, frames: Vec<u8>| [vec![options], frames].concat();
    let one = |authority: &str| {
        with(
            WITH_PREFACE,
            [settings.clone(), connect(1, authority)].concat(),
        )
    };
    vec![
        (
            "connect-accepted",
            with(WITH_PREFACE | BUFFER_1K, accepted.clone()),
        ),
        ("connect-denied", one("10.244.2.2:8080")),
        ("connect-failed", one("10.244.2.2:8081")),
        ("connect-proxy-port", one("10.244.2.2:15006")),
        ("connect-wrong-address", one("10.244.2.9:8082")),
        ("connect-no-port", one("10.244.2.2")),
        (
            "connect-ipv6",
            with(
                WITH_PREFACE | IPV6,
                [settings.clone(), connect(1, "[fd00::2:2]:8082")].concat(),
            ),
        ),
        ("get", with(WITH_PREFACE, get)),
        ("streams-forwarded-goaway", with(WITH_PREFACE, forwarded)),
        (
            "drain-after",
            with(WITH_PREFACE | DRAIN_AFTER, accepted.clone()),
        ),
        (
            "raw-preface",
            with(0, [PREFACE.to_vec(), accepted].concat()),
        ),
    ]
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const SETTINGS_ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// HPACK's static table (RFC 7541, appendix A): the names used here.
const STATIC_AUTHORITY: u8 = 1;
const STATIC_METHOD: u8 = 2;
const STATIC_PATH: u8 = 4;
const STATIC_SCHEME: u8 = 6;

/// An HTTP/2 frame (RFC 9113, 4.1).
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("a small frame");
    let mut bytes = len.to_be_bytes()[1..].to_vec();
    bytes.extend_from_slice(&[kind, flags]);
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// A HEADERS frame holding the whole block (no END_STREAM: a CONNECT stream stays open).
fn headers(stream: u32, block: &[u8]) -> Vec<u8> {
    frame(FRAME_HEADERS, END_HEADERS, stream, block)
}

/// The header block of an HBONE CONNECT request.
fn connect_headers(authority: &str, forwarded: Option<&str>) -> Vec<u8> {
    let mut block = [
        literal(STATIC_METHOD, "CONNECT"),
        literal(STATIC_AUTHORITY, authority),
    ]
    .concat();
    if let Some(forwarded) = forwarded {
        block.extend(literal_named("forwarded", forwarded));
    }
    block
}

/// An HPACK literal without indexing whose name is the static table's `index` (RFC 7541,
/// 6.2.2), its value as plain octets.
fn literal(index: u8, value: &str) -> Vec<u8> {
    assert!(index < 15, "a one-byte index");
    [vec![index], string(value)].concat()
}

/// An HPACK literal without indexing with a new name.
fn literal_named(name: &str, value: &str) -> Vec<u8> {
    [vec![0], string(name), string(value)].concat()
}

/// An HPACK string literal, not Huffman-coded (RFC 7541, 5.2).
fn string(value: &str) -> Vec<u8> {
    let len = u8::try_from(value.len())
        .ok()
        .filter(|len| *len < 127)
        .expect("a one-byte length");
    [vec![len], value.as_bytes().to_vec()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_closing_lines() {
        let mut report = Report::default();
        report.read_line("#1024\tpulse  cov: 10 ft: 11 corp: 5/80b exec/s: 512 rss: 40Mb");
        report.read_line(
            "#1234567\tDONE   cov: 2345 ft: 6789 corp: 123/4567b lim: 4096 exec/s: 20576 rss: 123Mb",
        );
        assert_eq!(
            report,
            Report {
                executions: 1_234_567,
                exec_per_sec: 20576,
                coverage: 2345,
                features: 6789,
                corpus: "123/4567b".to_owned(),
                seconds: 0,
            }
        );
        report.read_line("stat::number_of_executed_units: 1234600");
        assert_eq!(report.executions, 1_234_600);
        assert!(is_progress("#1024\tpulse  cov: 10"));
        assert!(!is_progress("#1234567\tDONE   cov: 2345"));
        assert!(!is_progress("INFO: Seed: 1"));
        assert!(is_progress(
            "\tNEW_FUNC[1/2]: 0x5 in serde_json::read::error"
        ));
        assert!(is_progress("\"PRI * HTTP/2\" # Uses: 4"));
        assert!(is_progress("###### Recommended dictionary. ######"));
    }

    #[test]
    fn the_targets_build_without_what_cargo_run_set_for_xtask() {
        for set in [
            "CARGO",
            "CARGO_PKG_NAME",
            "CARGO_MANIFEST_DIR",
            "RUSTUP_TOOLCHAIN",
        ] {
            assert!(set_by_cargo_run(set), "{set}");
        }
        for kept in ["CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_TERM_COLOR", "PATH"] {
            assert!(!set_by_cargo_run(kept), "{kept}");
        }
    }

    #[test]
    fn reads_what_failed_and_where_its_input_is() {
        let mut failure = Failure::default();
        for line in [
            "INFO: Seed: 1",
            "thread '<unnamed>' panicked at fuzz_targets/cni.rs:60:13:",
            "ADD changed the previous result",
            "==123== ERROR: libFuzzer: deadly signal",
            "artifact_prefix='/w/target/fuzz/artifacts/cni/'; Test unit written to /w/target/fuzz/artifacts/cni/crash-00ff",
        ] {
            failure.read_line(line);
        }
        assert_eq!(
            failure.what,
            [
                "thread '<unnamed>' panicked at fuzz_targets/cni.rs:60:13:",
                "ADD changed the previous result",
                "libFuzzer: deadly signal",
            ]
        );
        assert_eq!(
            failure.reproducer.as_deref(),
            Some("/w/target/fuzz/artifacts/cni/crash-00ff")
        );

        let mut slow = Failure::default();
        slow.read_line("artifact_prefix='a/'; Test unit written to a/slow-unit-00ff");
        assert_eq!(slow, Failure::default());
    }

    #[test]
    fn hbone_seeds_are_whole_frames_after_the_preface() {
        for (name, input) in hbone_client_inputs() {
            let mut rest = &input[1..];
            if input[0] & WITH_PREFACE == 0 {
                rest = rest
                    .strip_prefix(PREFACE)
                    .expect("a raw seed has the preface");
            }
            while !rest.is_empty() {
                assert!(rest.len() >= 9, "{name}: a cut frame header");
                let len = (usize::from(rest[0]) << 16)
                    | (usize::from(rest[1]) << 8)
                    | usize::from(rest[2]);
                assert!(rest.len() >= 9 + len, "{name}: a cut frame");
                rest = &rest[9 + len..];
            }
        }
    }

    /// `(name, version)` of every package a Cargo.lock pins.
    fn locked(lock: &str) -> Vec<(String, String)> {
        let quoted = |line: &str, key: &str| {
            line.strip_prefix(key)
                .map(|value| value.trim_matches(|c| c == ' ' || c == '=' || c == '"'))
                .map(str::to_owned)
        };
        let mut packages = Vec::new();
        let mut name = None;
        for line in lock.lines() {
            if let Some(found) = quoted(line, "name ") {
                name = Some(found);
            } else if let (Some(version), Some(name)) = (quoted(line, "version "), name.take()) {
                packages.push((name, version));
            }
        }
        packages
    }

    /// The fuzz targets drive the code the product links: their own Cargo.lock pins the
    /// versions the workspace's does for what they exercise.
    #[test]
    fn fuzz_lock_pins_the_products_versions() {
        let root = workspace_root();
        let read = |path: &str| {
            std::fs::read_to_string(root.join(path)).unwrap_or_else(|err| panic!("{path}: {err}"))
        };
        let (product, fuzz) = (
            locked(&read("Cargo.lock")),
            locked(&read("fuzz/Cargo.lock")),
        );
        assert!(product.iter().any(|(name, _)| name == "h2"), "{product:?}");
        for exercised in [
            "h2",
            "http",
            "bytes",
            "tokio",
            "serde",
            "serde_json",
            "serde_yaml_ng",
            "ipnet",
        ] {
            let versions = |lock: &[(String, String)]| {
                let mut versions: Vec<String> = lock
                    .iter()
                    .filter(|(name, _)| name == exercised)
                    .map(|(_, version)| version.clone())
                    .collect();
                versions.sort();
                versions
            };
            assert_eq!(
                versions(&fuzz),
                versions(&product),
                "{exercised}: fuzz/Cargo.lock differs from Cargo.lock"
            );
        }
    }

    #[test]
    fn seeds_are_small_and_named_once() {
        let seeds = seeds();
        let mut names: Vec<_> = seeds.iter().map(|(t, n, _)| (t, n)).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), seeds.len());
        assert!(seeds.iter().all(|(target, _, _)| TARGETS.contains(target)));
        let total: usize = seeds.iter().map(|(_, _, bytes)| bytes.len()).sum();
        assert!(total < 32 * 1024, "{total} bytes of seeds");
    }
}

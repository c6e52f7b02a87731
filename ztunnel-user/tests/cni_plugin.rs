//! Runs the `ztunnel-cni` binary as a container runtime would: `CNI_*` variables and the network
//! config on stdin. No daemon is running, so these cover every path that must not need one.

use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=a1;\
                        K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=1234-5678";
const SYSTEM_POD_ARGS: &str =
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1;K8S_POD_UID=abcd";

struct Outcome {
    success: bool,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// Asserts a spec error object with `code` and returns it.
    fn error(&self, code: u64) -> Value {
        assert!(!self.success, "expected a failure; stdout: {}", self.stdout);
        let error = self.json();
        assert_eq!(error["code"], code, "{error}");
        assert!(
            error["msg"].as_str().is_some_and(|msg| !msg.is_empty()),
            "{error}"
        );
        error
    }
}

/// A socket path in a fresh directory, so nothing can be listening on it. The directory is
/// removed on drop.
struct AbsentSocket(PathBuf);

impl AbsentSocket {
    fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ztunnel-cni-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir.join("ztunnel.sock"))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for AbsentSocket {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn ptp_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "veth12ab", "mac": "aa:bb:cc:dd:ee:ff"},
            {"name": "eth0", "mac": "aa:bb:cc:dd:ee:00", "sandbox": "/var/run/netns/cni-1"},
        ],
        "ips": [{"address": "10.244.1.2/24", "gateway": "10.244.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    })
}

/// The plugin's entry of a conflist as the runtime hands it over.
fn netconf(socket: &Path, prev_result: Option<Value>) -> Value {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "ztunnel-cni",
        "apiSocket": socket,
        "timeoutSeconds": 5,
        "runtimeConfig": {"portMappings": []},
    });
    if let Some(prev_result) = prev_result {
        conf["prevResult"] = prev_result;
    }
    conf
}

fn plugin(env: &[(&str, &str)], stdin: &str) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ztunnel-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ztunnel-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    Outcome {
        success: output.status.success(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// Runs `command` with the variables a runtime sets for a pod sandbox.
fn pod_plugin(command: &str, cni_args: &str, conf: &Value) -> Outcome {
    plugin(
        &[
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", cni_args),
            ("CNI_PATH", "/opt/cni/bin"),
        ],
        &conf.to_string(),
    )
}

#[test]
fn version() {
    let outcome = plugin(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
    assert!(outcome.success, "{}", outcome.stderr);
    assert_eq!(
        outcome.stdout.trim(),
        r#"{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}"#
    );
}

#[test]
fn add_without_daemon_asks_to_try_again() {
    let socket = AbsentSocket::new();
    let outcome = pod_plugin("ADD", POD_ARGS, &netconf(socket.path(), Some(ptp_result())));
    let error = outcome.error(11);
    assert_eq!(error["cniVersion"], "1.0.0");
    let msg = error["msg"].as_str().unwrap();
    assert!(msg.contains(socket.path().to_str().unwrap()), "{msg}");
    assert!(msg.contains("must run on this node"), "{msg}");
    assert!(error["details"].as_str().is_some(), "{error}");
}

#[test]
fn add_must_be_chained() {
    let socket = AbsentSocket::new();
    let outcome = pod_plugin("ADD", POD_ARGS, &netconf(socket.path(), None));
    let error = outcome.error(7);
    let msg = error["msg"].as_str().unwrap();
    assert!(msg.contains("chained") && msg.contains("ptp"), "{msg}");
}

#[test]
fn add_without_pod_uid() {
    let socket = AbsentSocket::new();
    let args = "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=a1";
    let outcome = pod_plugin("ADD", args, &netconf(socket.path(), Some(ptp_result())));
    let error = outcome.error(4);
    assert!(
        error["msg"].as_str().unwrap().contains("K8S_POD_UID"),
        "{error}"
    );
}

#[test]
fn add_in_excluded_namespace_passes_the_result_through() {
    let socket = AbsentSocket::new();
    let outcome = pod_plugin(
        "ADD",
        SYSTEM_POD_ARGS,
        &netconf(socket.path(), Some(ptp_result())),
    );
    assert!(outcome.success, "{}\n{}", outcome.stdout, outcome.stderr);
    assert_eq!(outcome.json(), ptp_result());
}

#[test]
fn add_honours_configured_exclusions() {
    let socket = AbsentSocket::new();
    let mut conf = netconf(socket.path(), Some(ptp_result()));
    conf["excludeNamespaces"] = json!(["demo"]);
    let outcome = pod_plugin("ADD", POD_ARGS, &conf);
    assert!(outcome.success, "{}\n{}", outcome.stdout, outcome.stderr);
    assert_eq!(outcome.json(), ptp_result());
}

#[test]
fn del_without_daemon_succeeds() {
    let socket = AbsentSocket::new();
    let outcome = pod_plugin("DEL", POD_ARGS, &netconf(socket.path(), Some(ptp_result())));
    assert!(outcome.success, "{}\n{}", outcome.stdout, outcome.stderr);
    assert_eq!(outcome.stdout, "");
    assert!(
        outcome.stderr.contains("cannot reach the ztunnel daemon"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn del_tolerates_missing_netns_prev_result_and_uid() {
    let socket = AbsentSocket::new();
    let outcome = plugin(
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=a1"),
        ],
        &netconf(socket.path(), None).to_string(),
    );
    assert!(outcome.success, "{}\n{}", outcome.stdout, outcome.stderr);
    assert_eq!(outcome.stdout, "");
}

#[test]
fn del_of_excluded_pod_succeeds() {
    let socket = AbsentSocket::new();
    let outcome = pod_plugin("DEL", SYSTEM_POD_ARGS, &netconf(socket.path(), None));
    assert!(outcome.success, "{}\n{}", outcome.stdout, outcome.stderr);
    assert_eq!(outcome.stdout, "");
}

#[test]
fn check_without_daemon_asks_to_try_again() {
    let socket = AbsentSocket::new();
    let outcome = pod_plugin(
        "CHECK",
        POD_ARGS,
        &netconf(socket.path(), Some(ptp_result())),
    );
    let error = outcome.error(11);
    assert!(
        error["msg"]
            .as_str()
            .unwrap()
            .contains(socket.path().to_str().unwrap()),
        "{error}"
    );
}

#[test]
fn malformed_config() {
    let outcome = plugin(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_NETNS", "/x"),
        ],
        "{\"cniVersion\": ",
    );
    let error = outcome.error(6);
    assert_eq!(error["cniVersion"], "1.0.0");
    assert!(error["details"].as_str().is_some(), "{error}");
}

#[test]
fn missing_command() {
    let socket = AbsentSocket::new();
    let conf = netconf(socket.path(), Some(ptp_result()));
    let outcome = plugin(&[("CNI_CONTAINERID", "c0ffee")], &conf.to_string());
    let error = outcome.error(4);
    assert!(
        error["msg"].as_str().unwrap().contains("CNI_COMMAND"),
        "{error}"
    );
}

#[test]
fn missing_container_id() {
    let socket = AbsentSocket::new();
    let conf = netconf(socket.path(), Some(ptp_result()));
    let outcome = plugin(&[("CNI_COMMAND", "DEL")], &conf.to_string());
    let error = outcome.error(4);
    assert!(
        error["msg"].as_str().unwrap().contains("CNI_CONTAINERID"),
        "{error}"
    );
}

#[test]
fn unsupported_version() {
    let socket = AbsentSocket::new();
    let mut conf = netconf(socket.path(), Some(ptp_result()));
    conf["cniVersion"] = json!("0.2.0");
    let outcome = pod_plugin("ADD", POD_ARGS, &conf);
    let error = outcome.error(1);
    assert!(error["msg"].as_str().unwrap().contains("0.2.0"), "{error}");
}

#[test]
fn errors_use_the_config_version() {
    let socket = AbsentSocket::new();
    let mut conf = netconf(socket.path(), None);
    conf["cniVersion"] = json!("0.4.0");
    let error = pod_plugin("ADD", POD_ARGS, &conf).error(7);
    assert_eq!(error["cniVersion"], "0.4.0");
}

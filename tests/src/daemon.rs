//! Each node's ztunnel daemon: started detached inside the node's netns and its own cgroup,
//! logging to the node's `ztunnel.log`, tracked by a pid file.

use crate::command;
use crate::error::{LabError, Result};
use crate::exec::Placement;
use crate::state;
use crate::topology::{self, NodeSpec};
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

/// How long a daemon may take to answer, or to become ready. On this machine it takes about a
/// second; an emulated guest of `cargo xtask vm-test` on a busy host took over 20 s (key
/// generation and the verifier run at emulation speed). A daemon that exits is seen at once.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
const LOG_TAIL_LINES: usize = 30;

/// Where the daemon (and its CLI and CNI plugin) come from when the options do not say: the
/// directory of another build's binaries, e.g. to see an end-to-end test fail on an older one
/// (`ZTUNNEL_DAEMON_BIN_DIR=/path/to/old/bins cargo test -p ztunnel-lab --test security`).
pub const DAEMON_BIN_DIR_VARIABLE: &str = "ZTUNNEL_DAEMON_BIN_DIR";

/// Where the daemons take the mesh and their certificates from.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ControlPlane {
    /// The lab's mesh file (`--config`) and the built-in CA, shared by the nodes.
    File,
    /// The lab's istiod (`fake-istiod`): delta xDS and the Istio CA, serving the same file.
    Istiod,
}

/// What sets the control plane of labs that do not choose one (`istiod` or `file`): the
/// test suite runs some end-to-end suites a second time against istiod through it.
pub const CONTROL_PLANE_VARIABLE: &str = "ZTUNNEL_LAB_CONTROL_PLANE";

impl Default for ControlPlane {
    fn default() -> Self {
        match std::env::var(CONTROL_PLANE_VARIABLE).as_deref() {
            Ok("istiod") => ControlPlane::Istiod,
            _ => ControlPlane::File,
        }
    }
}

/// How the lab starts its daemons; saved by `up` so daemons restarted later match.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DaemonOptions {
    /// `--cert-lifetime-secs` (the daemon's default when absent).
    pub cert_lifetime_secs: Option<u64>,
    /// Capture by iptables REDIRECT instead of eBPF (`--capture iptables`): the baseline.
    #[serde(default)]
    pub iptables_capture: bool,
    /// Where the `ztunnel` daemon (and its CLI) and the `ztunnel-cni` plugin are, when not
    /// in `topology::bin_dir()`: another build's, to measure it beside this one.
    #[serde(default)]
    pub bin_dir: Option<PathBuf>,
    /// The eBPF programs' debug lines in the daemon's log (`--ebpf-log`).
    #[serde(default)]
    pub ebpf_log: bool,
    /// The daemon's RLIMIT_NOFILE, soft and hard (when absent, the daemon raises its soft
    /// limit to the hard one it inherits).
    #[serde(default)]
    pub open_files: Option<u64>,
    /// Further settings, as the environment a DaemonSet gives them (`ZTUNNEL_EXCLUDE_PORTS`,
    /// `ZTUNNEL_ACCESS_LOG`, ...): an older build ignores a variable it does not know, where
    /// it would refuse the flag.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub control_plane: ControlPlane,
    /// Enroll pods by their labels in the lab's Kubernetes API (`fake-kube-apiserver`), as
    /// the DaemonSet does, instead of every pod the CNI plugin is called for.
    #[serde(default)]
    pub kubernetes: bool,
}

impl DaemonOptions {
    /// The daemon flags these options stand for.
    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(secs) = self.cert_lifetime_secs {
            args.extend(["--cert-lifetime-secs".to_owned(), secs.to_string()]);
        }
        if self.iptables_capture {
            args.extend(["--capture".to_owned(), "iptables".to_owned()]);
        }
        if self.ebpf_log {
            args.push("--ebpf-log".to_owned());
        }
        args
    }

    /// The directory the daemon and the CNI plugin are run from.
    pub fn daemon_bin_dir(&self) -> PathBuf {
        self.bin_dir
            .clone()
            .or_else(|| std::env::var_os(DAEMON_BIN_DIR_VARIABLE).map(PathBuf::from))
            .unwrap_or_else(topology::bin_dir)
    }

    /// `ztunnel` or `ztunnel-cni`, from `daemon_bin_dir`.
    pub fn daemon_binary(&self, name: &str) -> Result<PathBuf> {
        topology::binary_in(&self.daemon_bin_dir(), name)
    }

    fn path() -> PathBuf {
        std::path::Path::new(topology::STATE_DIR).join("daemon-options.json")
    }

    pub(crate) fn save(&self) -> Result<()> {
        let text = serde_json::to_string(self).expect("options serialize");
        std::fs::write(Self::path(), text).map_err(|e| LabError::io("writing", Self::path(), e))
    }

    /// The options the lab's daemons run with (the defaults when none are saved).
    pub fn load() -> Result<DaemonOptions> {
        match std::fs::read_to_string(Self::path()) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| LabError::State {
                path: Self::path(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DaemonOptions::default()),
            Err(e) => Err(LabError::io("reading", Self::path(), e)),
        }
    }
}

/// How far `start_daemon_until` waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Started {
    /// The admin API answers `ztunnel status`.
    Answering,
    /// It also says it is ready (config and certificates in place).
    Ready,
}

/// Starts the node's daemon and waits until it is ready. Returns its pid.
pub fn start_daemon(node: &str) -> Result<u32> {
    start_daemon_until(node, Started::Ready)
}

/// Starts the node's daemon and waits until `until`. Returns its pid.
pub fn start_daemon_until(node: &str, until: Started) -> Result<u32> {
    let node = topology::node_spec(node)?;
    if let Some(pid) = daemon_pid(node.name) {
        return Err(daemon_error(
            node,
            format!("is already running (pid {pid})"),
        ));
    }
    let options = DaemonOptions::load()?;
    let binary = options.daemon_binary("ztunnel")?;
    let mut command = Placement::new(&node.daemon_cgroup(), &node.netns_path(), true)?
        .command(binary.as_os_str());
    command
        .arg("run")
        .arg("--node")
        .arg(node.name)
        .arg("--api-socket")
        .arg(node.api_socket())
        .arg("--cgroup-root")
        .arg(node.kubepods_cgroup())
        .arg("--bpffs")
        .arg(node.bpffs_dir())
        .arg("--state-dir")
        .arg(node.daemon_state_dir())
        .arg("--trust-domain")
        .arg(topology::TRUST_DOMAIN)
        .arg("--network")
        .arg(node.network)
        .args(options.args())
        .stdin(Stdio::null());
    log_output_to(&mut command, &node.log_path())?;
    match options.control_plane {
        ControlPlane::File => {
            command
                .arg("--config")
                .arg(topology::MESH_CONFIG)
                .arg("--ca-dir")
                .arg(topology::CA_DIR);
        }
        ControlPlane::Istiod => {
            command.envs(crate::istiod::daemon_env(node));
        }
    }
    if options.kubernetes {
        command.envs(crate::kube::daemon_env());
    }
    // After istiod's: a test may point one of them elsewhere.
    command.envs(options.env.iter().map(|(name, value)| (name, value)));
    if let Some(open_files) = options.open_files {
        // SAFETY: setrlimit is async-signal-safe, and the closure allocates nothing.
        unsafe {
            command.pre_exec(move || {
                setrlimit(Resource::RLIMIT_NOFILE, open_files, open_files).map_err(Into::into)
            });
        }
    }
    let child = command
        .spawn()
        .map_err(|e| daemon_error(node, format!("could not be started: {e}")))?;
    let pid = child.id();
    // The child is deliberately not waited for: it outlives us. `is_alive` reaps it if it dies
    // while we are still its parent.
    drop(child);
    let pid_file = node.pid_file();
    std::fs::write(&pid_file, pid.to_string()).map_err(|e| LabError::io("writing", pid_file, e))?;
    state::record_daemon_pid(node.name, Some(pid))?;

    if let Err(error) = wait_started(node, pid, until) {
        signal_and_wait(pid, Signal::SIGKILL, STOP_TIMEOUT);
        forget_pid(node)?;
        return Err(error);
    }
    Ok(pid)
}

/// Appends `command`'s standard output and error to the log at `path`.
pub(crate) fn log_output_to(command: &mut std::process::Command, path: &Path) -> Result<()> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| LabError::io("opening", path, e))?;
    let log_for_stderr = log
        .try_clone()
        .map_err(|e| LabError::io("duplicating", path, e))?;
    command.stdout(log).stderr(log_for_stderr);
    Ok(())
}

/// SIGKILLs the daemon, leaving whatever it set up behind (to test crash recovery).
pub fn kill_daemon(node: &str) -> Result<()> {
    let node = topology::node_spec(node)?;
    let pid = daemon_pid(node.name).ok_or_else(|| LabError::DaemonNotRunning {
        node: node.name.to_owned(),
    })?;
    if !signal_and_wait(pid, Signal::SIGKILL, STOP_TIMEOUT) {
        return Err(daemon_error(node, "survived SIGKILL".to_owned()));
    }
    forget_pid(node)
}

/// SIGTERMs the daemon and waits for it to exit; after `STOP_TIMEOUT` it is SIGKILLed and the
/// slow shutdown reported as an error.
pub fn stop_daemon(node: &str) -> Result<()> {
    let node = topology::node_spec(node)?;
    let pid = daemon_pid(node.name).ok_or_else(|| LabError::DaemonNotRunning {
        node: node.name.to_owned(),
    })?;
    let stopped = signal_and_wait(pid, Signal::SIGTERM, STOP_TIMEOUT);
    if !stopped {
        signal_and_wait(pid, Signal::SIGKILL, STOP_TIMEOUT);
    }
    forget_pid(node)?;
    if stopped {
        Ok(())
    } else {
        Err(daemon_error(
            node,
            format!(
                "did not exit within {}s of SIGTERM; killed it",
                STOP_TIMEOUT.as_secs()
            ),
        ))
    }
}

/// The pid of the node's daemon, if it is running.
pub fn daemon_pid(node: &str) -> Option<u32> {
    let node = topology::node_spec(node).ok()?;
    let pid = std::fs::read_to_string(node.pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    is_daemon_of(pid, node).then_some(pid)
}

/// `ztunnel status` against the node's daemon (run in the node's netns, where its admin API
/// listens on localhost).
pub fn daemon_status(node: &str) -> Result<Output> {
    daemon_cli(node, &["status"])
}

/// What the node's daemon says it still waits for (`None`: ready).
pub fn daemon_not_ready(node: &str) -> Result<Option<String>> {
    Ok(match &daemon_config_dump(node)?["not_ready"] {
        serde_json::Value::Null => None,
        missing => Some(missing.as_str().unwrap_or_default().to_owned()),
    })
}

/// What the node's daemon reports about itself (`ztunnel status -o json`: readiness, pods,
/// certificates, counters, the mesh config in force), as plain JSON.
pub fn daemon_config_dump(node: &str) -> Result<serde_json::Value> {
    let output = daemon_cli(node, &["status", "-o", "json"])?;
    let failed = |detail: String| LabError::Command {
        command: format!("ztunnel status -o json on {node}"),
        detail,
    };
    if !output.status.success() {
        return Err(failed(String::from_utf8_lossy(&output.stderr).into_owned()));
    }
    // Read as plain JSON: the lab itself does not depend on ztunnel-user (see Cargo.toml).
    serde_json::from_slice(&output.stdout).map_err(|e| failed(e.to_string()))
}

/// A `ztunnel` CLI command against the node's daemon (the CLI of the daemon's own build).
pub fn daemon_cli(node: &str, args: &[&str]) -> Result<Output> {
    let binary = DaemonOptions::load()?.daemon_binary("ztunnel")?;
    let mut argv = vec![binary.as_os_str()];
    argv.extend(args.iter().map(std::ffi::OsStr::new));
    let mut cli = crate::exec_node(node, &argv)?;
    let described = command::describe(&cli);
    let child = cli
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::Command {
            command: described.clone(),
            detail: e.to_string(),
        })?;
    command::output_within(child, STATUS_TIMEOUT)
        .map_err(|e| LabError::Command {
            command: described.clone(),
            detail: e.to_string(),
        })?
        .ok_or_else(|| LabError::Command {
            command: described,
            detail: format!("no answer within {}s", STATUS_TIMEOUT.as_secs()),
        })
}

/// The last lines of the node's daemon log, for error messages.
pub fn log_tail(node: &NodeSpec) -> String {
    let log = std::fs::read_to_string(node.log_path()).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

fn wait_started(node: &NodeSpec, pid: u32, until: Started) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut waiting_for = "answer `ztunnel status`".to_owned();
    loop {
        if !is_alive(pid) {
            return Err(daemon_error(node, "exited while starting".to_owned()));
        }
        match (until, daemon_not_ready(node.name)) {
            (Started::Answering, Ok(_)) | (Started::Ready, Ok(None)) => return Ok(()),
            (Started::Ready, Ok(Some(missing))) => {
                waiting_for = format!("become ready (it waits for {missing})");
            }
            (_, Err(_)) => {}
        }
        if Instant::now() >= deadline {
            return Err(daemon_error(
                node,
                format!("did not {waiting_for} within {}s", READY_TIMEOUT.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn forget_pid(node: &NodeSpec) -> Result<()> {
    let pid_file = node.pid_file();
    match std::fs::remove_file(&pid_file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(LabError::io("removing", pid_file, e));
        }
        _ => {}
    }
    state::record_daemon_pid(node.name, None)
}

fn daemon_error(node: &NodeSpec, problem: String) -> LabError {
    LabError::Daemon {
        node: node.name.to_owned(),
        problem,
        log: node.log_path(),
        tail: log_tail(node),
    }
}

/// Is `pid` alive and serving this node's API socket? Matching the command line keeps a
/// recycled pid from a stale pid file from being mistaken for the daemon.
fn is_daemon_of(pid: u32, node: &NodeSpec) -> bool {
    let socket = node.api_socket();
    let socket = socket.as_os_str().as_bytes();
    is_alive(pid)
        && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
            let argv: Vec<&[u8]> = cmdline.split(|byte| *byte == 0).collect();
            argv.windows(2)
                .any(|pair| pair[0] == b"--api-socket" && pair[1] == socket)
        })
}

/// Alive: a thread of it is not yet a zombie. The leader of a killed process turns zombie
/// while its other threads may still be closing the process's files (its sockets), so every
/// thread is looked at. A dead child of ours is reaped on the way.
pub(crate) fn is_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    // Fails harmlessly (ECHILD) when the process is not our child.
    let _ = waitpid(Pid::from_raw(raw), Some(WaitPidFlag::WNOHANG));
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    threads.flatten().any(|thread| {
        std::fs::read_to_string(thread.path().join("stat")).is_ok_and(|stat| {
            // The state follows the parenthesised command name, which may itself hold spaces.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
    })
}

/// Sends `signal` and waits, bounded, for the process to be gone. True if it is.
pub(crate) fn signal_and_wait(pid: u32, signal: Signal, timeout: Duration) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return true;
    };
    let _ = kill(Pid::from_raw(raw), signal);
    let deadline = Instant::now() + timeout;
    while is_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemons_come_from_the_options_bin_dir() {
        let dir = std::env::temp_dir().join(format!("ztlab-bin-dir-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ztunnel"), b"").unwrap();
        let other = DaemonOptions {
            bin_dir: Some(dir.clone()),
            ..DaemonOptions::default()
        };
        assert_eq!(other.daemon_binary("ztunnel").unwrap(), dir.join("ztunnel"));
        assert!(matches!(
            other.daemon_binary("ztunnel-cni"),
            Err(LabError::MissingBinary { .. })
        ));
        assert_eq!(
            DaemonOptions::default().daemon_bin_dir(),
            topology::bin_dir()
        );
        // Options saved before bin_dir existed still load, with this build's binaries.
        let old: DaemonOptions =
            serde_json::from_str(r#"{"cert_lifetime_secs":null,"iptables_capture":true}"#).unwrap();
        assert_eq!(old.bin_dir, None);
        // The flags do not change: the directory picks the binary, not an argument.
        assert_eq!(other.args(), Vec::<String>::new());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

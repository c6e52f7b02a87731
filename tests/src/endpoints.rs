//! `lab-tool` processes inside pods, driven from outside: the demo's and the tests' traffic.

use crate::error::{LabError, Result};
use crate::topology;
use crate::traffic::{BurstReport, LatencyReport, SendReport, ServerReport};
use serde::de::DeserializeOwned;
use std::io::{BufRead, BufReader};
use std::net::SocketAddrV4;
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

/// How long a server may take to start listening.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// `lab-tool serve` running inside a pod; killed when dropped.
pub struct PodServer {
    pod: String,
    child: Child,
    reports: Receiver<ServerReport>,
}

impl PodServer {
    /// Starts `lab-tool serve` (hash and report each connection) and waits until it listens.
    pub fn start(pod: &str, port: u16) -> Result<PodServer> {
        PodServer::spawn(pod, "serve", port)
    }

    /// Starts `lab-tool echo` (the request/response benchmark's server).
    pub fn start_echo(pod: &str, port: u16) -> Result<PodServer> {
        PodServer::spawn(pod, "echo", port)
    }

    fn spawn(pod: &str, mode: &str, port: u16) -> Result<PodServer> {
        let lab_tool = topology::binary("lab-tool")?;
        let port = port.to_string();
        let argv = [
            lab_tool.as_os_str(),
            mode.as_ref(),
            "--port".as_ref(),
            port.as_ref(),
        ];
        let mut command = crate::exec(pod, &argv)?;
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| LabError::io("starting lab-tool in pod", pod, e))?;
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let (ready_tx, ready_rx) = channel();
        let (report_tx, reports) = channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(std::result::Result::ok) {
                if line == "ready" {
                    let _ = ready_tx.send(());
                } else if let Ok(report) = serde_json::from_str(&line) {
                    let _ = report_tx.send(report);
                }
            }
        });
        let mut server = PodServer {
            pod: pod.to_owned(),
            child,
            reports,
        };
        if ready_rx.recv_timeout(READY_TIMEOUT).is_err() {
            let _ = server.child.kill();
            return Err(LabError::Command {
                command: format!("lab-tool {mode} --port {port} in {pod}"),
                detail: "did not start listening".into(),
            });
        }
        Ok(server)
    }

    /// The report of the next connection the server finished, waiting up to `timeout`.
    pub fn next_report(&self, timeout: Duration) -> Result<ServerReport> {
        self.reports
            .recv_timeout(timeout)
            .map_err(|_| LabError::Command {
                command: format!("lab-tool serve in {}", self.pod),
                detail: format!("reported no connection within {timeout:?}"),
            })
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `lab-tool send` inside `pod`: `bytes` pseudo-random bytes to `to`, checked by the
/// server's report (length and SHA-256). `mark` sets SO_MARK on the socket; `timeout` bounds
/// the connect and every read and write.
pub fn send_from(
    pod: &str,
    to: SocketAddrV4,
    bytes: u64,
    mark: Option<u32>,
    timeout: Duration,
) -> Result<SendReport> {
    let mut args = send_args(to, bytes);
    if let Some(mark) = mark {
        args.extend(["--mark".into(), mark.to_string()]);
    }
    run_lab_tool(pod, args, timeout)
}

/// `send_from` with a pause of `pause` halfway through, the connection held open.
pub fn send_pausing_from(
    pod: &str,
    to: SocketAddrV4,
    bytes: u64,
    pause: Duration,
    timeout: Duration,
) -> Result<SendReport> {
    let mut args = send_args(to, bytes);
    args.extend(["--pause-ms".into(), pause.as_millis().to_string()]);
    run_lab_tool(pod, args, timeout + pause)
}

fn send_args(to: SocketAddrV4, bytes: u64) -> Vec<String> {
    [
        "send",
        "--to",
        &to.to_string(),
        "--bytes",
        &bytes.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs `lab-tool burst` inside `pod`: `connections` connections to `to` held open at once,
/// each exchanging `bytes`.
pub fn burst_from(
    pod: &str,
    to: SocketAddrV4,
    connections: usize,
    bytes: u64,
    timeout: Duration,
) -> Result<BurstReport> {
    let args = vec![
        "burst".to_owned(),
        "--to".into(),
        to.to_string(),
        "--connections".into(),
        connections.to_string(),
        "--bytes".into(),
        bytes.to_string(),
    ];
    run_lab_tool(pod, args, timeout)
}

/// Runs `lab-tool rr` inside `pod`: round trips on one warm connection to an echo server.
pub fn round_trips_from(pod: &str, to: SocketAddrV4, duration: Duration) -> Result<LatencyReport> {
    let args = vec![
        "rr".to_owned(),
        "--to".into(),
        to.to_string(),
        "--duration-secs".into(),
        duration.as_secs().max(1).to_string(),
    ];
    run_lab_tool(pod, args, duration + Duration::from_secs(30))
}

/// Runs a `lab-tool` client command in `pod` and reads its one-line JSON report.
fn run_lab_tool<Report: DeserializeOwned>(
    pod: &str,
    mut args: Vec<String>,
    timeout: Duration,
) -> Result<Report> {
    let described = format!("lab-tool {} in {pod}", args.join(" "));
    args.extend([
        "--timeout-secs".into(),
        timeout.as_secs().max(1).to_string(),
    ]);
    let lab_tool = topology::binary("lab-tool")?;
    let mut argv = vec![lab_tool.display().to_string()];
    argv.extend(args);
    let output = crate::exec(pod, &argv)?
        .output()
        .map_err(|e| LabError::io("running lab-tool in pod", pod, e))?;
    if !output.status.success() {
        return Err(LabError::Command {
            command: described,
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    serde_json::from_slice(&output.stdout).map_err(|e| LabError::Command {
        command: described,
        detail: format!("unreadable report: {e}"),
    })
}

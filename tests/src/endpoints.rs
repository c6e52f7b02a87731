//! `lab-tool` and `load-tool` processes inside pods, driven from outside: the demo's, the
//! tests' and the benchmark's traffic.

use crate::error::{LabError, Result};
use crate::topology;
use crate::traffic::{
    BurstReport, ConnectRateReport, HoldReport, LatencyReport, SendReport, ServerReport,
};
use serde::de::DeserializeOwned;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, SocketAddrV4};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

/// How long a server may take to start listening.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A server (`lab-tool serve` or `load-tool serve`) running inside a pod; killed when dropped.
pub struct PodServer {
    pod: String,
    child: Child,
    reports: Receiver<ServerReport>,
}

impl PodServer {
    /// Starts `lab-tool serve` (hash and report each connection) and waits until it listens.
    pub fn start(pod: &str, port: u16) -> Result<PodServer> {
        PodServer::spawn(pod, "lab-tool", &["serve", "--port", &port.to_string()])
    }

    /// Starts `lab-tool serve` reading a PROXY protocol v2 header first on each connection
    /// (an app behind an application tunnel); its reports carry the header.
    pub fn start_proxy_protocol(pod: &str, port: u16) -> Result<PodServer> {
        let port = port.to_string();
        PodServer::spawn(
            pod,
            "lab-tool",
            &["serve", "--port", &port, "--proxy-protocol"],
        )
    }

    /// Starts `lab-tool serve` with a listen backlog of `backlog`, accepting nothing for
    /// `accept_after`: an app whose accept queue is full.
    pub fn start_stalled(
        pod: &str,
        port: u16,
        backlog: u32,
        accept_after: Duration,
    ) -> Result<PodServer> {
        let args = [
            "serve".to_owned(),
            "--port".to_owned(),
            port.to_string(),
            "--backlog".to_owned(),
            backlog.to_string(),
            "--accept-after-ms".to_owned(),
            accept_after.as_millis().to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        PodServer::spawn(pod, "lab-tool", &args)
    }

    /// Starts `load-tool serve`, the benchmark's server: an echo port (latency, idle
    /// connections) and a port that replies once and closes (connection rate).
    pub fn start_load(pod: &str, echo_port: u16, reply_port: u16) -> Result<PodServer> {
        let (echo_port, reply_port) = (echo_port.to_string(), reply_port.to_string());
        let args = [
            "serve",
            "--echo-port",
            &echo_port,
            "--reply-port",
            &reply_port,
        ];
        PodServer::spawn(pod, "load-tool", &args)
    }

    /// Starts `load-tool relay` in `pod`, one listener per (listen, to) pair, each connection
    /// copied to its `to`.
    pub fn start_relay(pod: &str, forwards: &[(SocketAddrV4, SocketAddrV4)]) -> Result<PodServer> {
        let forwards: Vec<String> = forwards
            .iter()
            .flat_map(|(listen, to)| ["--forward".to_owned(), format!("{listen}={to}")])
            .collect();
        let mut args = vec!["relay"];
        args.extend(forwards.iter().map(String::as_str));
        PodServer::spawn(pod, "load-tool", &args)
    }

    fn spawn(pod: &str, tool: &str, args: &[&str]) -> Result<PodServer> {
        let described = format!("{tool} {} in {pod}", args.join(" "));
        let mut command = crate::exec(pod, &[topology::binary(tool)?.as_os_str()])?;
        let mut child = command
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| LabError::io("starting a server in pod", pod, e))?;
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
                command: described,
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
    to: impl Into<SocketAddr>,
    bytes: u64,
    mark: Option<u32>,
    timeout: Duration,
) -> Result<SendReport> {
    let mut options = vec![("bytes", bytes.to_string())];
    options.extend(mark.map(|mark| ("mark", mark.to_string())));
    let args = client_args("send", to, &options);
    run_tool(pod, "lab-tool", args, timeout)
}

/// `send_from`, from the local address and port `bind` (bound with SO_REUSEADDR first).
pub fn send_bound_from(
    pod: &str,
    bind: impl Into<SocketAddr>,
    to: impl Into<SocketAddr>,
    bytes: u64,
    timeout: Duration,
) -> Result<SendReport> {
    let options = [
        ("bytes", bytes.to_string()),
        ("bind", bind.into().to_string()),
    ];
    let args = client_args("send", to, &options);
    run_tool(pod, "lab-tool", args, timeout)
}

/// `send_from` with a pause of `pause` halfway through, the connection held open.
pub fn send_pausing_from(
    pod: &str,
    to: impl Into<SocketAddr>,
    bytes: u64,
    pause: Duration,
    timeout: Duration,
) -> Result<SendReport> {
    let options = [
        ("bytes", bytes.to_string()),
        ("pause-ms", pause.as_millis().to_string()),
    ];
    let args = client_args("send", to, &options);
    run_tool(pod, "lab-tool", args, timeout + pause)
}

/// Runs `lab-tool burst` inside `pod`: `connections` connections to `to` held open at once,
/// each exchanging `bytes`.
pub fn burst_from(
    pod: &str,
    to: impl Into<SocketAddr>,
    connections: usize,
    bytes: u64,
    timeout: Duration,
) -> Result<BurstReport> {
    let options = [
        ("connections", connections.to_string()),
        ("bytes", bytes.to_string()),
    ];
    let args = client_args("burst", to, &options);
    run_tool(pod, "lab-tool", args, timeout)
}

/// `burst_from` for a caller that expects some connections to fail: the tool's report comes
/// back whether or not all of them succeeded (`succeeded` counts those whose bytes the server
/// confirmed; `failures` names the first few others). An error only when the tool printed no
/// report at all.
pub fn burst_outcome_from(
    pod: &str,
    to: impl Into<SocketAddr>,
    connections: usize,
    bytes: u64,
    timeout: Duration,
) -> Result<BurstReport> {
    let options = [
        ("connections", connections.to_string()),
        ("bytes", bytes.to_string()),
        ("timeout-secs", whole_seconds(timeout)),
    ];
    let args = client_args("burst", to, &options);
    let described = format!("lab-tool {} in {pod}", args.join(" "));
    let mut argv = vec![topology::binary("lab-tool")?.display().to_string()];
    argv.extend(args);
    let output = crate::exec(pod, &argv)?
        .output()
        .map_err(|e| LabError::io("running a client in pod", pod, e))?;
    // The report is printed before the tool decides its exit status.
    serde_json::from_slice(&output.stdout).map_err(|e| LabError::Command {
        command: described,
        detail: format!(
            "no report ({e}): {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    })
}

/// Runs `load-tool rr` inside `pod`: round trips on one warm connection to an echo port.
pub fn latency_from(pod: &str, to: SocketAddrV4, duration: Duration) -> Result<LatencyReport> {
    let args = client_args("rr", to, &[("duration-secs", whole_seconds(duration))]);
    run_tool(pod, "load-tool", args, duration + CLIENT_GRACE)
}

/// Runs `load-tool connect-rate` inside `pod`: `workers` loops of connect, one request, reply,
/// close, against a reply port.
pub fn connect_rate_from(
    pod: &str,
    to: SocketAddrV4,
    workers: usize,
    duration: Duration,
) -> Result<ConnectRateReport> {
    let options = [
        ("workers", workers.to_string()),
        ("duration-secs", whole_seconds(duration)),
    ];
    let args = client_args("connect-rate", to, &options);
    run_tool(pod, "load-tool", args, duration + CLIENT_GRACE)
}

/// How much longer than its measurement a benchmark client may take (start, warm-up, exit).
const CLIENT_GRACE: Duration = Duration::from_secs(30);

/// `load-tool hold` inside a pod, holding its connections open until dropped.
pub struct HeldConnections {
    child: Child,
    /// Closing it tells the tool to let go.
    stdin: Option<ChildStdin>,
    pub report: HoldReport,
}

/// What each connection of `HeldConnections` says before it idles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opening {
    /// One round trip to an echo port.
    RoundTrip,
    /// Nothing at all: a hostile client's flood (those that do not open are counted).
    Silent,
}

impl HeldConnections {
    /// Opens `connections` connections from `pod` to `to`, each `opening` as it says, and
    /// returns once all are up or have failed (within `timeout`). Those up stay open, idle,
    /// until the value is dropped (or for `hold` at most).
    pub fn open(
        pod: &str,
        to: SocketAddrV4,
        connections: usize,
        opening: Opening,
        hold: Duration,
        timeout: Duration,
    ) -> Result<HeldConnections> {
        let options = [
            ("connections", connections.to_string()),
            ("hold-secs", whole_seconds(hold)),
            ("timeout-secs", whole_seconds(timeout)),
        ];
        let mut args = client_args("hold", to, &options);
        if opening == Opening::Silent {
            args.push("--silent".to_owned());
        }
        let described = format!("load-tool {} in {pod}", args.join(" "));
        let mut child = crate::exec(pod, &[topology::binary("load-tool")?.as_os_str()])?
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LabError::io("starting load-tool in pod", pod, e))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let (report_tx, report) = channel();
        std::thread::spawn(move || {
            let line = stdout.lines().next().and_then(std::result::Result::ok);
            let _ = report_tx.send(line);
        });
        let mut held = HeldConnections {
            child,
            stdin,
            report: HoldReport {
                connections: 0,
                failed: 0,
                seconds_to_open: 0.0,
            },
        };
        // The tool gives up by itself at `timeout`; a little more covers its start and exit.
        let line = report
            .recv_timeout(timeout + Duration::from_secs(5))
            .ok()
            .flatten();
        match line.map(|line| serde_json::from_str::<HoldReport>(&line)) {
            Some(Ok(report)) => {
                held.report = report;
                Ok(held)
            }
            other => {
                held.close();
                let mut stderr = String::new();
                if let Some(mut pipe) = held.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                Err(LabError::Command {
                    command: described,
                    detail: match other {
                        Some(Err(e)) => format!("unreadable report: {e}"),
                        _ => format!("no report: {}", stderr.trim()),
                    },
                })
            }
        }
    }

    fn close(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HeldConnections {
    fn drop(&mut self) {
        self.close();
    }
}

/// Runs a client command of `tool` (`lab-tool`, `load-tool`) in `pod` and reads its one-line
/// JSON report.
fn run_tool<Report: DeserializeOwned>(
    pod: &str,
    tool: &str,
    mut args: Vec<String>,
    timeout: Duration,
) -> Result<Report> {
    let described = format!("{tool} {} in {pod}", args.join(" "));
    args.extend(["--timeout-secs".into(), whole_seconds(timeout)]);
    let mut argv = vec![topology::binary(tool)?.display().to_string()];
    argv.extend(args);
    let output = crate::exec(pod, &argv)?
        .output()
        .map_err(|e| LabError::io("running a client in pod", pod, e))?;
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

/// A client's command line: `<mode> --to <to>` and `--<name> <value>` for each option.
fn client_args(mode: &str, to: impl Into<SocketAddr>, options: &[(&str, String)]) -> Vec<String> {
    let mut args = vec![mode.to_owned(), "--to".into(), to.into().to_string()];
    for (name, value) in options {
        args.extend([format!("--{name}"), value.clone()]);
    }
    args
}

/// The tools take whole seconds: at least one.
fn whole_seconds(duration: Duration) -> String {
    duration.as_secs().max(1).to_string()
}

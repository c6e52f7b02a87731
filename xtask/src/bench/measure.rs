//! One turn of the benchmark: a fresh lab for one path, then every figure on every route.

use super::cpu::{self, CpuTime};
use super::handshakes;
use super::memory;
use super::path::{Path, Route};
use super::results::{Daemon, Measured, Metric, Results};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use ztunnel_lab::{Lab, PodServer, connect_rate_from, latency_from};

const IPERF_PORT: u16 = 5201;
/// `load-tool serve`'s ports: echo (latency, idle connections), reply-then-close (rate).
const ECHO_PORT: u16 = 9000;
const REPLY_PORT: u16 = 9001;
/// Concurrent workers of the connection-rate client: enough to keep both cores busy through
/// the proxies' accept, connect and stream set-up.
const CONNECT_WORKERS: usize = 8;
/// Host steal above this share of the CPU time makes a measurement's figures suspect: a run
/// with it is slower, and its latency bimodal (docs/PERFORMANCE.md).
const NOISY_STEAL_PERCENT: f64 = 10.0;
/// How long a server may take to say it listens.
const SERVER_READY: Duration = Duration::from_secs(10);
/// How much longer than its measurement iperf3 -c may take before it is killed.
const IPERF_GRACE: Duration = Duration::from_secs(30);

/// How long and how much each turn measures.
pub struct Settings {
    /// What each round measures, in order.
    pub paths: Vec<Path>,
    pub runs: usize,
    pub length: Duration,
    pub idle_connections: usize,
}

/// Measures `path` in round `round`: brings up its lab, measures, tears the lab down.
pub fn turn(round: usize, path: Path, settings: &Settings, results: &mut Results) -> Result<()> {
    let mut turn = Turn {
        round,
        path,
        settings,
        results,
    };
    turn.say(
        None,
        &format!("bringing up the lab ({})", path.description()),
    );
    let measured = path.bring_up().and_then(|lab| turn.measure(&lab));
    turn.say(None, "tearing down the lab");
    let down = ztunnel_lab::down();
    measured?;
    down.context("tearing down the lab")
}

struct Turn<'a> {
    round: usize,
    path: Path,
    settings: &'a Settings,
    results: &'a mut Results,
}

impl Turn<'_> {
    fn say(&self, route: Option<Route>, what: &str) {
        let place = route.map_or(String::new(), |route| format!(", {}", route.name()));
        println!(
            "bench: run {}/{}, {}{place}: {what}",
            self.round,
            self.settings.runs,
            self.path.name()
        );
    }

    fn record(&mut self, route: Route, metric: Metric, value: f64) {
        self.results
            .record(self.round, self.path, route, metric, value);
    }

    /// Something the report must mention; `place` is a route or a node.
    fn anomaly(&mut self, place: &str, what: String) {
        let line = format!("run {}, {}, {place}: {what}", self.round, self.path.name());
        println!("bench: WARNING: {line}");
        self.results.anomalies.push(line);
    }

    fn measure(&mut self, lab: &Lab) -> Result<()> {
        // Memory first, while "idle" still means that no connection was ever proxied.
        if self.path.has_proxy() {
            self.memory(lab, Route::CrossNode)?;
        }
        let _relays = self
            .path
            .start_relays(lab, &[IPERF_PORT, ECHO_PORT, REPLY_PORT])?;
        for route in Route::ALL {
            self.say(Some(route), &format!("pods {}", route.pods()));
            let server_ip = lab.pod(route.server())?.ip;
            for (streams, metric, cost) in [
                (1, Metric::Throughput1, Metric::CpuPerGb1),
                (8, Metric::Throughput8, Metric::CpuPerGb8),
            ] {
                self.throughput(route, server_ip, streams, metric, cost)?;
            }
            let _server = PodServer::start_load(route.server(), ECHO_PORT, REPLY_PORT)?;
            self.latency(route, server_ip)?;
            self.connect_rate(route, server_ip)?;
        }
        if self.path.has_proxy() {
            self.daemon_warnings(lab);
        }
        Ok(())
    }

    /// The daemons log a warning or an error for trouble the clients may not see (accept
    /// failures, a refused HBONE handshake, ...): each one is an anomaly of this turn.
    fn daemon_warnings(&mut self, lab: &Lab) {
        for node in &lab.nodes {
            let log = std::fs::read_to_string(&node.log).unwrap_or_default();
            let warnings: Vec<&str> = log
                .lines()
                .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
                .collect();
            if let Some(first) = warnings.first() {
                let what = format!(
                    "the daemon logged {} warnings or errors, the first: {first}",
                    warnings.len()
                );
                self.anomaly(&node.name, what);
            }
        }
    }

    fn throughput(
        &mut self,
        route: Route,
        server_ip: Ipv4Addr,
        streams: usize,
        metric: Metric,
        cost: Metric,
    ) -> Result<()> {
        let plural = if streams == 1 { "" } else { "s" };
        self.say(
            Some(route),
            &format!("throughput, {streams} stream{plural}..."),
        );
        let length = self.settings.length;
        let to = self.path.target(route, server_ip, IPERF_PORT);
        let (transfer, cpu) = cpu::during(|| iperf3(route, to, streams, length))?;
        let gbit_per_s = transfer.bits_per_second / 1e9;
        let cpu_per_gb = cpu.busy_seconds / (transfer.bytes / 1e9);
        self.say(
            Some(route),
            &format!(
                "  {gbit_per_s:.2} Gbit/s, {cpu_per_gb:.2} CPU s per GB, host steal {:.1}%",
                cpu.steal_percent
            ),
        );
        self.record(route, metric, gbit_per_s);
        self.record(route, cost, cpu_per_gb);
        self.steal(route, Measured::Throughput, cpu);
        Ok(())
    }

    fn latency(&mut self, route: Route, server_ip: Ipv4Addr) -> Result<()> {
        self.say(Some(route), "request/response latency on one connection...");
        let to = self.path.target(route, server_ip, ECHO_PORT);
        let (report, cpu) =
            cpu::during(|| Ok(latency_from(route.client(), to, self.settings.length)?))?;
        let cpu_per_thousand = cpu.busy_seconds / (report.round_trips as f64 / 1000.0);
        self.say(
            Some(route),
            &format!(
                "  p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, max {:.0} us over {} round trips; {cpu_per_thousand:.3} CPU s per 1,000, host steal {:.1}%",
                report.p50_us,
                report.p99_us,
                report.p999_us,
                report.max_us,
                report.round_trips,
                cpu.steal_percent
            ),
        );
        self.record(route, Metric::LatencyP50, report.p50_us);
        self.record(route, Metric::LatencyP99, report.p99_us);
        self.record(route, Metric::CpuPerThousandRoundTrips, cpu_per_thousand);
        self.steal(route, Measured::RequestResponse, cpu);
        Ok(())
    }

    fn connect_rate(&mut self, route: Route, server_ip: Ipv4Addr) -> Result<()> {
        self.say(
            Some(route),
            &format!("new connections, {CONNECT_WORKERS} workers..."),
        );
        let to = self.path.target(route, server_ip, REPLY_PORT);
        let retried_before = handshakes::syn_retransmissions(route.client())?;
        let (report, cpu) = cpu::during(|| {
            Ok(connect_rate_from(
                route.client(),
                to,
                CONNECT_WORKERS,
                self.settings.length,
            )?)
        })?;
        if report.succeeded == 0 {
            bail!(
                "no connection from {} to {to} succeeded: {:?}",
                route.client(),
                report.failures
            );
        }
        let retried =
            handshakes::syn_retransmissions(route.client())?.saturating_sub(retried_before);
        let cpu_per_thousand = cpu.busy_seconds / (report.succeeded as f64 / 1000.0);
        self.say(
            Some(route),
            &format!(
                "  {:.0} connections/s ({} in {:.1} s), {cpu_per_thousand:.3} CPU s per 1,000, host steal {:.1}%, {retried} SYN retransmissions",
                report.per_second(),
                report.succeeded,
                report.seconds,
                cpu.steal_percent
            ),
        );
        if retried > 0 {
            self.anomaly(
                route.name(),
                format!(
                    "SYN retransmissions in {} during the connection rate: {retried} (each a handshake that waited a second or more, holding the rate back beyond its CPU cost)",
                    route.client()
                ),
            );
        }
        if report.failed > 0 {
            self.anomaly(
                route.name(),
                format!(
                    "{} of {} new connections failed, e.g. {:?}",
                    report.failed,
                    report.failed + report.succeeded,
                    report.failures
                ),
            );
        }
        self.record(route, Metric::ConnectRate, report.per_second());
        self.record(route, Metric::CpuPerThousandConnections, cpu_per_thousand);
        self.steal(route, Measured::NewConnections, cpu);
        Ok(())
    }

    /// Records the host's steal during a measurement, and warns when it was high enough to
    /// disturb the figures.
    fn steal(&mut self, route: Route, measured: Measured, cpu: CpuTime) {
        self.record(route, Metric::Steal(measured), cpu.steal_percent);
        if cpu.steal_percent > NOISY_STEAL_PERCENT {
            self.anomaly(
                route.name(),
                format!(
                    "the host stole {:.1}% of the CPU time during the {} measurement; its figures are slower than this machine's",
                    cpu.steal_percent,
                    measured.name()
                ),
            );
        }
    }

    fn memory(&mut self, lab: &Lab, route: Route) -> Result<()> {
        let connections = self.settings.idle_connections;
        self.say(
            Some(route),
            &format!("proxy memory, idle and with {connections} idle connections..."),
        );
        let _server = PodServer::start_load(route.server(), ECHO_PORT, REPLY_PORT)?;
        let to = SocketAddrV4::new(lab.pod(route.server())?.ip, ECHO_PORT);
        let memory = memory::measure(lab, route, to, connections)?;
        self.say(
            Some(route),
            &format!(
                "  {connections} connections opened in {:.1} s",
                memory.seconds_to_open
            ),
        );
        for daemon in Daemon::ALL {
            let of = memory.of(daemon);
            // A lab that ran another build than the path says would make the comparison a lie.
            let expected = match self.path {
                Path::MeshBaseline(dir) => dir.to_path_buf(),
                _ => ztunnel_lab::topology::bin_dir(),
            };
            let expected = std::fs::canonicalize(&expected).unwrap_or(expected);
            if !of.exe.starts_with(&expected) {
                bail!(
                    "the {} daemon runs {}, not a binary from {}",
                    daemon.name(),
                    of.exe.display(),
                    expected.display()
                );
            }
            self.say(
                Some(route),
                &format!(
                    "  {} daemon (pid {}, {}): idle {:.1} MiB ({:.1} anonymous, {:.1} file), {:.1} MiB with the connections: {:.0} bytes per connection; {:.1} MiB once closed",
                    daemon.name(),
                    of.pid,
                    of.exe.display(),
                    of.idle_mib,
                    of.idle_anon_mib,
                    of.idle_file_mib,
                    of.held_mib,
                    of.bytes_per_connection,
                    of.closed_mib
                ),
            );
            self.record(route, Metric::IdleRss(daemon), of.idle_mib);
            self.record(route, Metric::HeldRss(daemon), of.held_mib);
            self.record(
                route,
                Metric::BytesPerConnection(daemon),
                of.bytes_per_connection,
            );
            self.record(route, Metric::ClosedRss(daemon), of.closed_mib);
        }
        Ok(())
    }
}

struct Transfer {
    bits_per_second: f64,
    bytes: f64,
}

/// iperf3 from the route's client pod, connecting to `to`, to a server on `IPERF_PORT` in its
/// server pod; `streams` parallel streams.
fn iperf3(route: Route, to: SocketAddrV4, streams: usize, length: Duration) -> Result<Transfer> {
    let port = IPERF_PORT.to_string();
    // --forceflush: the banner must reach our pipe at once, not when a buffer fills.
    let mut server = ztunnel_lab::exec(
        route.server(),
        &["iperf3", "-s", "-1", "--forceflush", "-p", &port],
    )?
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .context("starting iperf3 -s (is iperf3 installed? `cargo xtask setup` installs it)")?;
    let stdout = server.stdout.take().expect("piped");
    let (listening_tx, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("Server listening") {
                let _ = listening_tx.send(());
            }
        }
    });
    let stop_server = |mut server: std::process::Child| {
        let _ = server.kill();
        let _ = server.wait();
    };
    if listening.recv_timeout(SERVER_READY).is_err() {
        stop_server(server);
        bail!("iperf3 -s in {} did not start listening", route.server());
    }
    let client = ztunnel_lab::exec(
        route.client(),
        &[
            "iperf3",
            "-c",
            &to.ip().to_string(),
            "-p",
            &to.port().to_string(),
            "-t",
            &length.as_secs().to_string(),
            "-P",
            &streams.to_string(),
            "-J",
            "--connect-timeout",
            "5000",
        ],
    )?;
    let output = output_within(client, length + IPERF_GRACE);
    stop_server(server);
    let output = output?;
    let result: Value = serde_json::from_slice(&output.stdout).context("iperf3 -J output")?;
    let received = &result["end"]["sum_received"];
    match (
        received["bits_per_second"].as_f64(),
        received["bytes"].as_f64(),
    ) {
        (Some(bits_per_second), Some(bytes)) if bytes > 0.0 => Ok(Transfer {
            bits_per_second,
            bytes,
        }),
        _ => bail!(
            "iperf3 from {} reported no throughput: {}",
            route.client(),
            result["error"]
        ),
    }
}

/// Runs `command` with piped output, killing it if it takes longer than `limit`.
fn output_within(mut command: Command, limit: Duration) -> Result<Output> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting iperf3 -c")?;
    let pid = child.id();
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    match done.recv_timeout(limit) {
        Ok(output) => Ok(output?),
        Err(_) => {
            // SAFETY: signals our own child, which the waiting thread has not reaped yet.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            bail!("iperf3 -c did not finish within {limit:?}; killed it")
        }
    }
}

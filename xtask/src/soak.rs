//! `cargo xtask soak`: everything at once, for minutes, on a fresh lab. Pods open short
//! connections in loops (a1 -> b1 across nodes over HBONE, a2 -> a1 on the same node, u1
//! outside the mesh -> b1 in plaintext), every connection's bytes checked by the server's
//! report; a DENY of u1 comes and goes every few seconds; certificates live a few seconds, so
//! they are renewed all the time; node1's daemon is stopped with SIGTERM halfway and started
//! again. The underlay is captured throughout. At the end: no test bytes crossed outside TLS
//! (with positive controls that did, in the open), every connection that nothing could stop
//! carried its bytes intact and the ones that had to fail failed, node1's pods were taken
//! over, and each daemon's descriptors and memory are where they were at the start.

mod churn;
mod figures;
mod policy;
mod underlay;

use anyhow::{Context, Result, bail, ensure};
use churn::{Churn, Expect, Route, Verdict};
use figures::Figures;
use policy::Flipper;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};
use ztunnel_lab::capture::{PlaintextFinder, UnderlayCapture};
use ztunnel_lab::traffic::SendReport;
use ztunnel_lab::{DaemonOptions, Lab, PodServer, send_from, topology};

const DEFAULT_MINUTES: u64 = 10;
/// Certificates this short-lived are renewed every two seconds.
const CERT_LIFETIME_SECS: u64 = 4;
const APP_PORT: u16 = 8080;
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Quiet before the daemons' figures are read: open connections finish, freed pages go back
/// to the kernel (jemalloc returns them after about a second).
const SETTLE: Duration = Duration::from_secs(5);
/// How long node1's daemon stays down.
const DOWN_FOR: Duration = Duration::from_secs(3);
/// tcpdump hands packets over in blocks, at least once a second: wait before stopping it.
const CAPTURE_HANDOVER: Duration = Duration::from_millis(1500);
const CONTROL_BYTES: u64 = 4096;
/// Connections each loop must have completed for its figures to mean something: node1's
/// clients before the stop and after the restart, u1 under each state of the policy.
const MIN_CONNECTIONS: u64 = 10;
/// Different expiries each identity's certificate must have shown over the run.
const MIN_CERTIFICATES: usize = 3;

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long the churn runs, in minutes (at least 1).
    #[arg(long, default_value_t = DEFAULT_MINUTES)]
    minutes: u64,
}

pub fn run(args: SoakArgs) -> Result<()> {
    ensure!(args.minutes >= 1, "--minutes must be at least 1");
    crate::setup::run()?;
    crate::lab::build_binaries(false, false)?;
    soak(Duration::from_secs(args.minutes * 60))
}

/// On binaries already built: brings a lab up, runs the soak for `duration`, tears the lab
/// down whatever happened, and fails if the soak could not run or any check failed.
pub fn soak(duration: Duration) -> Result<()> {
    let out = topology::workspace_root()
        .join("target/soak")
        .join(crate::bench::utc_timestamp(SystemTime::now()));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    println!(
        "soak: {} s of churn, policy flips every {} s, certificates of {CERT_LIFETIME_SECS} s, \
         node1's daemon restarted halfway; evidence in {}",
        duration.as_secs(),
        policy::FLIP_EVERY.as_secs(),
        out.display()
    );
    let options = DaemonOptions {
        cert_lifetime_secs: Some(CERT_LIFETIME_SECS),
        ..DaemonOptions::default()
    };
    let _lock = ztunnel_lab::LabLock::acquire("soak")?;
    let lab = ztunnel_lab::up_with(&options)?;
    let teardown = Teardown { done: false };
    let outcome = Soak {
        lab: &lab,
        duration,
        out: &out,
    }
    .run();
    keep_daemon_logs(&out);
    println!("soak: tearing the lab down");
    let down = teardown.finish();
    if let Err(error) = &down {
        eprintln!("soak: tearing the lab down failed: {error:#}");
    }
    let checks = outcome.context("the soak could not run to its end")?;
    down?;
    let summary = summary(&checks);
    println!("\n{summary}");
    let summary_file = out.join("summary.txt");
    std::fs::write(&summary_file, &summary)
        .with_context(|| format!("writing {}", summary_file.display()))?;
    let failed: Vec<&str> = checks
        .iter()
        .filter(|check| !check.passed)
        .map(|check| check.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "soak failed: {} of {} checks: {}; see above and {}",
            failed.len(),
            checks.len(),
            failed.join("; "),
            out.display()
        );
    }
    println!("soak: all {} checks passed", checks.len());
    Ok(())
}

/// Tears the lab down when dropped (a panic), or when told to with the result.
struct Teardown {
    done: bool,
}

impl Teardown {
    fn finish(mut self) -> Result<()> {
        self.done = true;
        ztunnel_lab::down()?;
        Ok(())
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if !self.done
            && let Err(error) = ztunnel_lab::down()
        {
            eprintln!("soak: tearing the lab down failed: {error}");
        }
    }
}

/// Copies the daemons' logs (all their runs) next to the summary before the lab goes.
fn keep_daemon_logs(out: &Path) {
    for node in &topology::NODES {
        let to = out.join(format!("{}.log", node.name));
        if let Err(error) = std::fs::copy(node.log_path(), &to) {
            eprintln!("soak: keeping {}: {error}", node.log_path().display());
        }
    }
}

/// One verdict of the run.
struct Check {
    name: String,
    passed: bool,
    lines: Vec<String>,
}

impl Check {
    fn new(name: &str, passed: bool, lines: Vec<String>) -> Check {
        Check {
            name: name.to_owned(),
            passed,
            lines,
        }
    }
}

fn summary(checks: &[Check]) -> String {
    let mut text = String::from("soak: summary\n");
    for check in checks {
        let mark = if check.passed { "PASS" } else { "FAIL" };
        text.push_str(&format!("{mark} {}\n", check.name));
        for line in &check.lines {
            text.push_str(&format!("     {line}\n"));
        }
    }
    text
}

/// When node1's daemon went and came back.
struct Restart {
    stop_issued: Instant,
    exited: Instant,
    start_issued: Instant,
    ready: Instant,
    old_pid: Option<u32>,
    new_pid: u32,
    /// Set if it did not exit within the lab's bound after SIGTERM (it was then killed).
    stop_error: Option<String>,
    /// The pods the restarted daemon serves, as it reports them.
    pods: Vec<String>,
}

impl Restart {
    /// What the restart says about a connection of a node1 pod.
    fn expectation(&self, started: Instant, finished: Instant) -> Expect {
        if finished < self.stop_issued || started > self.ready {
            Expect::Success
        } else if started >= self.exited && finished <= self.start_issued {
            Expect::Failure("node1's daemon was down")
        } else {
            Expect::Either("while node1's daemon stopped or started")
        }
    }
}

/// The lab's servers, whose reports are read as they come so they do not pile up.
struct Servers {
    servers: Vec<(&'static str, PodServer, u64)>,
}

impl Servers {
    fn start(pods: &[&'static str]) -> Result<Servers> {
        let servers = pods
            .iter()
            .map(|&pod| Ok((pod, PodServer::start(pod, APP_PORT)?, 0)))
            .collect::<Result<_>>()?;
        Ok(Servers { servers })
    }

    fn drain(&mut self) {
        for (_, server, count) in &mut self.servers {
            while server.next_report(Duration::ZERO).is_ok() {
                *count += 1;
            }
        }
    }

    fn line(&self) -> String {
        let counts: Vec<String> = self
            .servers
            .iter()
            .map(|(pod, _, count)| format!("{pod} {count}"))
            .collect();
        format!(
            "connections the servers reported: {} (with the controls and the connections a \
             change cut after the server had read everything)",
            counts.join(", ")
        )
    }
}

struct Soak<'a> {
    lab: &'a Lab,
    duration: Duration,
    out: &'a Path,
}

/// What the soak's main thread keeps while the others run.
struct Watch<'a> {
    start: Instant,
    end: Instant,
    churn: &'a Churn,
    flipper: &'a Flipper,
    servers: &'a mut Servers,
    phase: &'static str,
    next_progress: Instant,
    /// (node, identity) -> the expiries its certificate was seen with.
    certificates: BTreeMap<(&'static str, String), BTreeSet<u64>>,
}

impl Watch<'_> {
    /// Lets everything run until `until`, with a progress line every `PROGRESS_EVERY`.
    fn run_until(&mut self, until: Instant) {
        while Instant::now() < until {
            if Instant::now() >= self.next_progress {
                self.progress();
                self.next_progress += PROGRESS_EVERY;
            }
            self.servers.drain();
            let step = until
                .min(self.next_progress)
                .saturating_duration_since(Instant::now());
            std::thread::sleep(step.min(Duration::from_secs(1)));
        }
    }

    fn progress(&mut self) {
        let clock = |d: Duration| format!("{}:{:02}", d.as_secs() / 60, d.as_secs() % 60);
        let clients: Vec<String> = self
            .churn
            .live()
            .iter()
            .map(|(label, ok, failed)| format!("{label} {ok} ok {failed} failed"))
            .collect();
        let policy = if self.flipper.denying() {
            "DENY u1"
        } else {
            "allow"
        };
        let mut line = format!(
            "soak {} / {} {:<9} | {} | policy {policy} ({} flips)",
            clock(self.start.elapsed()),
            clock(self.end - self.start),
            self.phase,
            clients.join(" | "),
            self.flipper.flip_count()
        );
        for node in ["node1", "node2"] {
            match figures::of_node(node) {
                Ok(figures) => line.push_str(&format!(
                    " | {node} fds {} rss {:.1} MiB",
                    figures.fds,
                    figures.rss_kib as f64 / 1024.0
                )),
                Err(_) => line.push_str(&format!(" | {node} down")),
            }
        }
        println!("{line}");
        self.sample_certificates();
    }

    /// Notes each daemon's certificates (their expiry moves at every renewal).
    fn sample_certificates(&mut self) {
        for node in ["node1", "node2"] {
            let Ok(dump) = ztunnel_lab::daemon_config_dump(node) else {
                continue;
            };
            for certificate in dump["certificates"].as_array().into_iter().flatten() {
                if let (Some(identity), Some(expires)) = (
                    certificate["identity"].as_str(),
                    certificate["expires_unix"].as_u64(),
                ) {
                    self.certificates
                        .entry((node, identity.to_owned()))
                        .or_default()
                        .insert(expires);
                }
            }
        }
    }

    /// Stops the traffic and the flips, lets the daemons settle, reads both, and resumes.
    fn measure(&mut self, what: &str) -> Result<[Figures; 2]> {
        self.churn.pause();
        self.flipper.pause();
        std::thread::sleep(SETTLE);
        let figures = [figures::of_node("node1")?, figures::of_node("node2")?];
        println!(
            "soak: {what}, after {} s without traffic: node1 {} | node2 {}",
            SETTLE.as_secs(),
            figures[0],
            figures[1]
        );
        self.sample_certificates();
        self.churn.resume();
        self.flipper.resume();
        Ok(figures)
    }
}

impl Soak<'_> {
    fn addr(&self, pod: &str) -> Result<SocketAddrV4> {
        Ok(SocketAddrV4::new(self.lab.pod(pod)?.ip, APP_PORT))
    }

    fn run(&self) -> Result<Vec<Check>> {
        let mut servers = Servers::start(&["b1", "a1", "a2"])?;
        let pcap = self.out.join("underlay.pcap");
        let capture = UnderlayCapture::start("node1", &pcap)?;
        let first_control = self.control()?;
        let routes = [
            Route {
                label: "a1->b1",
                pod: "a1",
                to: self.addr("b1")?,
                through_node1: true,
                policed: false,
            },
            Route {
                label: "a2->a1",
                pod: "a2",
                to: self.addr("a1")?,
                through_node1: true,
                policed: false,
            },
            Route {
                label: "u1->b1",
                pod: "u1",
                to: self.addr("b1")?,
                through_node1: false,
                policed: true,
            },
        ];
        let start = Instant::now();
        let end = start + self.duration;
        let churn = Churn::start(&routes, end);
        let flipper = Flipper::start(self.lab.pod("u1")?.ip, end);
        let mut watch = Watch {
            start,
            end,
            churn: &churn,
            flipper: &flipper,
            servers: &mut servers,
            phase: "warm-up",
            next_progress: start,
            certificates: BTreeMap::new(),
        };
        let warm_up = (self.duration / 10).clamp(Duration::from_secs(10), Duration::from_secs(30));

        watch.run_until(start + warm_up);
        let at_start = watch.measure("the start of the steady state")?;
        watch.phase = "steady";
        watch.run_until(start + self.duration / 2);
        watch.phase = "restart";
        watch.progress();
        let restart = restart_node1()?;
        watch.phase = "restarted";
        // The restarted daemon's own start of the steady state, if the run leaves room.
        let measure_at = (restart.ready + warm_up).min(end.checked_sub(SETTLE * 2).unwrap_or(end));
        watch.run_until(measure_at);
        let after_restart = watch.measure("node1's restarted daemon, warmed up")?;
        watch.phase = "steady";
        watch.run_until(end);
        watch.phase = "stopping";
        watch.progress();
        let certificates = std::mem::take(&mut watch.certificates);
        drop(watch);

        let attempts = churn.finish();
        let flips = flipper.finish();
        std::thread::sleep(SETTLE);
        let at_end = [figures::of_node("node1"), figures::of_node("node2")];
        let last_control = self.control()?;
        std::thread::sleep(CAPTURE_HANDOVER);
        let segments = capture.finish()?;
        servers.drain();

        let mut checks = Vec::new();
        checks.extend(self.connection_checks(start, &attempts, &flips, &restart));
        checks.push(policy_check(&flips));
        checks.push(restart_check(&restart));
        checks.push(certificate_check(&certificates));
        checks.push(self.underlay_check(&segments, &[first_control, last_control], &pcap)?);
        checks.push(figures_check(&at_start, &after_restart, &at_end, &restart));
        checks.push(daemons_check(&at_start, &restart));
        if let Some(check) = checks
            .iter_mut()
            .find(|c| c.name.starts_with("connections"))
        {
            check.lines.push(servers.line());
        }
        Ok(checks)
    }

    /// u1 (outside the mesh, on node2) sends to a2 (on node1) in plaintext: these bytes cross
    /// the underlay in clear, so the capture must show them.
    fn control(&self) -> Result<SocketAddrV4> {
        let report: SendReport = send_from(
            "u1",
            self.addr("a2")?,
            CONTROL_BYTES,
            None,
            churn::CONNECTION_TIMEOUT,
        )
        .context("the positive control, u1 -> a2 in plaintext")?;
        match report.local {
            std::net::SocketAddr::V4(local) => Ok(local),
            other => bail!("the control's client address {other} is not IPv4"),
        }
    }

    fn connection_checks(
        &self,
        start: Instant,
        attempts: &[(Route, Vec<churn::Attempt>)],
        flips: &[policy::Flip],
        restart: &Restart,
    ) -> Vec<Check> {
        let mut lines = Vec::new();
        let mut enough = Vec::new();
        let (mut lost, mut through) = (0, 0);
        for (route, attempts) in attempts {
            let expect = |attempt: &churn::Attempt| {
                if route.policed {
                    policy::expectation(flips, start, attempt.started, attempt.finished)
                } else if route.through_node1 {
                    restart.expectation(attempt.started, attempt.finished)
                } else {
                    Expect::Success
                }
            };
            let verdict = Verdict::judge(route.label, attempts, start, expect);
            lost += verdict.unexpected_failures + verdict.corrupted;
            through += verdict.got_through;
            lines.extend(verdict.lines());
            let ok_where = |wanted: Expect| {
                attempts
                    .iter()
                    .filter(|attempt| expect(attempt) == wanted)
                    .map(|attempt| attempt.ok)
                    .sum::<u64>()
            };
            if route.through_node1 {
                let before: u64 = attempts
                    .iter()
                    .filter(|a| a.finished < restart.stop_issued)
                    .map(|a| a.ok)
                    .sum();
                let after: u64 = attempts
                    .iter()
                    .filter(|a| a.started > restart.ready)
                    .map(|a| a.ok)
                    .sum();
                enough.push((route.label, "before the stop", before));
                enough.push((route.label, "after the restart", after));
            }
            if route.policed {
                enough.push((route.label, "while allowed", ok_where(Expect::Success)));
                let refused = verdict.refused_as_required.values().copied().sum::<u64>();
                enough.push((route.label, "refused while denied", refused));
            }
            enough.push((route.label, "in all", verdict.ok));
        }
        let short: Vec<String> = enough
            .iter()
            .filter(|(_, _, count)| *count < MIN_CONNECTIONS)
            .map(|(label, when, count)| format!("{label} {when}: {count}"))
            .collect();
        let enough_line = format!(
            "at least {MIN_CONNECTIONS} connections in each phase: {}",
            if short.is_empty() {
                "yes".to_owned()
            } else {
                format!("no: {}", short.join(", "))
            }
        );
        vec![
            Check::new(
                "connections: none lost or corrupted where nothing could stop it, and none \
                 got through where it had to fail",
                lost == 0 && through == 0,
                lines,
            ),
            Check::new(
                "connections: the churn ran in every phase",
                short.is_empty(),
                vec![enough_line],
            ),
        ]
    }

    fn underlay_check(
        &self,
        segments: &[ztunnel_lab::capture::Segment],
        controls: &[SocketAddrV4],
        pcap: &Path,
    ) -> Result<Check> {
        let ips = |pods: &[&str]| -> Result<Vec<_>> {
            pods.iter().map(|p| Ok(self.lab.pod(p)?.ip)).collect()
        };
        let meshed = underlay::Meshed {
            node1: ips(&["a1", "a2"])?,
            node2: ips(&["b1"])?,
        };
        let finder = PlaintextFinder::new(churn::MAX_BYTES as usize);
        let verdict = underlay::Verdict::judge(segments, &meshed, controls, &finder);
        let mut lines = verdict.lines();
        let size = std::fs::metadata(pcap).map_or(0, |m| m.len());
        if verdict.passed() {
            let _ = std::fs::remove_file(pcap);
            lines.push(format!("capture of {size} bytes checked and removed"));
        } else {
            lines.push(format!("capture kept: {}", pcap.display()));
        }
        Ok(Check::new(
            "underlay: only HBONE crossed, none of the test's bytes in clear, the controls seen",
            verdict.passed(),
            lines,
        ))
    }
}

/// SIGTERM to node1's daemon (it drains and exits), a few seconds down, a new one started;
/// the new one must serve node1's pods again.
fn restart_node1() -> Result<Restart> {
    let old_pid = ztunnel_lab::daemon_pid("node1");
    println!("soak: SIGTERM to node1's daemon (pid {old_pid:?})");
    let stop_issued = Instant::now();
    let stop_error = ztunnel_lab::stop_daemon("node1")
        .err()
        .map(|e| e.to_string());
    let exited = Instant::now();
    std::thread::sleep(DOWN_FOR);
    let start_issued = Instant::now();
    let new_pid = ztunnel_lab::start_daemon("node1").context("starting node1's daemon again")?;
    let ready = Instant::now();
    let dump = ztunnel_lab::daemon_config_dump("node1")?;
    let mut pods: Vec<String> = dump["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|pod| pod["name"].as_str().map(str::to_owned))
        .collect();
    pods.sort();
    println!(
        "soak: node1's daemon exited {:.1} s after SIGTERM, was down {:.1} s, the new one \
         (pid {new_pid}) was ready {:.1} s after its start and serves {pods:?}",
        (exited - stop_issued).as_secs_f64(),
        (start_issued - exited).as_secs_f64(),
        (ready - start_issued).as_secs_f64()
    );
    Ok(Restart {
        stop_issued,
        exited,
        start_issued,
        ready,
        old_pid,
        new_pid,
        stop_error,
        pods,
    })
}

fn policy_check(flips: &[policy::Flip]) -> Check {
    let applied: Vec<Duration> = flips
        .iter()
        .filter_map(|flip| Some(flip.applied? - flip.written))
        .collect();
    let problems: Vec<String> = flips
        .iter()
        .filter_map(|flip| flip.problem.clone())
        .collect();
    let denials = flips.iter().filter(|flip| flip.deny).count();
    let mut sorted = applied.clone();
    sorted.sort();
    let mut lines = vec![format!(
        "{} flips ({denials} to DENY), applied by node2 in median {} ms, at most {} ms",
        flips.len(),
        sorted.get(sorted.len() / 2).map_or(0, Duration::as_millis),
        sorted.last().map_or(0, Duration::as_millis)
    )];
    lines.extend(problems.iter().take(5).map(|p| format!("! {p}")));
    Check::new(
        "policy: every flip applied",
        problems.is_empty() && denials >= 1 && applied.len() == flips.len(),
        lines,
    )
}

fn restart_check(restart: &Restart) -> Check {
    let adopted = std::fs::read_to_string(topology::NODES[0].log_path())
        .is_ok_and(|log| log.contains("adopting the maps pinned by the previous run"));
    let mut lines = vec![format!(
        "pid {:?} -> {}: exited {:.1} s after SIGTERM, down {:.1} s, ready {:.1} s after its \
         start; serves {:?}; adopted the pinned maps: {adopted}",
        restart.old_pid,
        restart.new_pid,
        (restart.exited - restart.stop_issued).as_secs_f64(),
        (restart.start_issued - restart.exited).as_secs_f64(),
        (restart.ready - restart.start_issued).as_secs_f64(),
        restart.pods
    )];
    if let Some(error) = &restart.stop_error {
        lines.push(format!("! {error}"));
    }
    Check::new(
        "restart: node1's daemon drained on SIGTERM and the new one took a1 and a2 over",
        restart.stop_error.is_none() && restart.pods == ["a1", "a2"] && adopted,
        lines,
    )
}

fn certificate_check(certificates: &BTreeMap<(&'static str, String), BTreeSet<u64>>) -> Check {
    let lines: Vec<String> = certificates
        .iter()
        .map(|((node, identity), expiries)| {
            format!(
                "{node} {identity}: {} different certificates seen",
                expiries.len()
            )
        })
        .collect();
    let passed = certificates.len() >= 2
        && certificates
            .values()
            .all(|expiries| expiries.len() >= MIN_CERTIFICATES);
    Check::new(
        &format!(
            "certificates: renewed all along (each identity seen with at least \
             {MIN_CERTIFICATES})"
        ),
        passed,
        lines,
    )
}

fn figures_check(
    at_start: &[Figures; 2],
    after_restart: &[Figures; 2],
    at_end: &[Result<Figures>; 2],
    restart: &Restart,
) -> Check {
    let mut passed = true;
    let mut lines = Vec::new();
    // node1's daemon of the end is the restarted one: it is compared with its own start.
    for (index, node, start) in [(0, "node1", &after_restart[0]), (1, "node2", &at_start[1])] {
        match &at_end[index] {
            Ok(end) if end.pid == start.pid => {
                let (flat, line) = figures::flat(node, start, end);
                passed &= flat;
                lines.push(line);
            }
            Ok(end) => {
                passed = false;
                lines.push(format!(
                    "! {node}: the daemon at the end (pid {}) is not the one measured at its \
                     start (pid {})",
                    end.pid, start.pid
                ));
            }
            Err(error) => {
                passed = false;
                lines.push(format!("! {node}: {error:#}"));
            }
        }
    }
    lines.push(format!(
        "for comparison, node1's daemon before the restart (pid {:?}) at the start of the \
         steady state: fds {}, rss {} KiB",
        restart.old_pid, at_start[0].fds, at_start[0].rss_kib
    ));
    lines.push(format!(
        "tolerance: +{} fds; rss +{} KiB plus {:.0}% of the start",
        figures::FD_TOLERANCE,
        figures::RSS_TOLERANCE_KIB,
        figures::RSS_TOLERANCE_FRACTION * 100.0
    ));
    Check::new(
        "daemons: file descriptors and memory flat from the steady state to the end",
        passed,
        lines,
    )
}

/// Each daemon still runs (node2's since the start, node1's since the restart) and neither
/// log holds a panic.
fn daemons_check(at_start: &[Figures; 2], restart: &Restart) -> Check {
    let mut passed = true;
    let mut lines = Vec::new();
    for (node, pid) in [("node1", restart.new_pid), ("node2", at_start[1].pid)] {
        let running = ztunnel_lab::daemon_pid(node);
        let log = std::fs::read_to_string(
            topology::node_spec(node)
                .map(|spec| spec.log_path())
                .unwrap_or_else(|_| PathBuf::from("/nonexistent")),
        )
        .unwrap_or_default();
        let panics = log.matches("panicked").count();
        let errors = log.lines().filter(|line| line.contains("ERROR")).count();
        let warnings = log.lines().filter(|line| line.contains("WARN")).count();
        passed &= running == Some(pid) && panics == 0;
        lines.push(format!(
            "{node}: running {running:?} (expected pid {pid}); log: {panics} panics, {errors} \
             ERROR lines, {warnings} WARN lines"
        ));
    }
    Check::new(
        "daemons: still running, no panic in their logs",
        passed,
        lines,
    )
}

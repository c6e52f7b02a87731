//! `cargo xtask bench scale`: what the size of the mesh costs a node. The lab's mesh config
//! grows by synthetic workloads, services and policies (none on the lab's nodes, so nothing
//! else changes), then one workload changes again and again; each step is timed from the
//! file's replacement until node1's daemon logs it applied, and the daemon's RSS and idle CPU
//! are read from /proc. With `--baseline DIR` another build runs the same steps beside this
//! one, for the figures before and after a change.

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use procfs::process::Process;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use ztunnel_lab::mesh::{MeshChanges, mesh_config_with, write_mesh_config_text};
use ztunnel_lab::topology::{self, node_spec};
use ztunnel_lab::{ControlPlane, DaemonOptions, daemon_pid, istiod};

#[derive(Args)]
pub struct ScaleArgs {
    /// Mesh sizes in workloads, with a fifth as many services and a tenth as many policies.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
    sizes: Vec<u32>,
    /// Single-workload changes timed at each size.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Also run another build's daemon (DIR holds its release `ztunnel` and `ztunnel-cni`).
    #[arg(long, value_name = "DIR")]
    baseline: Option<PathBuf>,
    /// Where the daemons take the mesh from: the file itself, or the lab's istiod pushing
    /// each version of it as a delta-xDS difference.
    #[arg(long, value_enum, default_value_t = ControlPlane::File)]
    control_plane: ControlPlane,
}

/// How long a daemon may take to apply one version of the file.
const APPLY_LIMIT: Duration = Duration::from_secs(180);
/// The window idle CPU is counted over.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// Time for the daemon's memory to settle after an apply (freed pages go back in about a
/// second).
const SETTLE: Duration = Duration::from_secs(3);

/// One build's figures at one size.
struct Figures {
    build: String,
    workloads: u32,
    /// From the file's replacement until the daemon logged it applied, or (from istiod)
    /// ACKed it.
    full_seen: Duration,
    /// The daemon's own account, if its build logs one.
    full_daemon: Option<DaemonTook>,
    /// From istiod only: the longest time from one of its pushes to the daemon's ACK of it.
    full_push_to_ack: Option<Duration>,
    change_seen: Vec<Duration>,
    change_daemon: Vec<(EntryKind, DaemonTook)>,
    change_push_to_ack: Vec<Duration>,
    idle_rss_kib: u64,
    rss_kib: u64,
    peak_rss_kib: u64,
    idle_ticks: u64,
}

pub fn run(args: &ScaleArgs) -> Result<()> {
    ensure!(
        !args.sizes.is_empty() && args.sizes.iter().all(|n| (10..=200_000).contains(n)),
        "--sizes: each between 10 and 200000 workloads"
    );
    ensure!(args.changes >= 1, "--changes must be at least 1");
    super::build_release_binaries()?;
    let this = topology::workspace_root().join("target/release");
    let mut builds = vec![("this build".to_owned(), this)];
    if let Some(dir) = &args.baseline {
        let dir = std::fs::canonicalize(dir)
            .with_context(|| format!("--baseline {}: no such directory", dir.display()))?;
        builds.push((format!("baseline ({})", dir.display()), dir));
    }
    let _lock = ztunnel_lab::LabLock::acquire("bench scale")?;
    let mut all = Vec::new();
    for &size in &args.sizes {
        for (build, dir) in &builds {
            println!("bench scale: {build}, {size} workloads...");
            let figures = measure(build, dir, size, args.changes, args.control_plane);
            ztunnel_lab::down()?;
            all.push(figures?);
        }
    }
    let report = report(&all, args.changes, args.control_plane);
    println!("\n{report}");
    let out = topology::workspace_root()
        .join("target/bench")
        .join(format!(
            "scale-{}",
            super::utc_timestamp(std::time::SystemTime::now())
        ));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    super::write(&out.join("report.md"), &report)?;
    println!("bench scale: report written to {}", out.display());
    Ok(())
}

fn measure(
    build: &str,
    bin_dir: &std::path::Path,
    size: u32,
    changes: usize,
    control_plane: ControlPlane,
) -> Result<Figures> {
    let options = DaemonOptions {
        bin_dir: Some(bin_dir.to_owned()),
        control_plane,
        ..DaemonOptions::default()
    };
    let apply = |text: &str| match control_plane {
        ControlPlane::File => apply_from_file(text),
        ControlPlane::Istiod => apply_from_istiod(text),
    };
    ztunnel_lab::up_with(&options)?;
    let pid = daemon_pid("node1").context("node1's daemon is not running")?;
    std::thread::sleep(SETTLE);
    let idle_rss_kib = rss_kib(pid)?.0;

    let mut mesh = Synthetic::new(size);
    let full = apply(&mesh.text())?;
    std::thread::sleep(SETTLE);
    let (rss_kib, peak_rss_kib) = rss_kib(pid)?;
    let idle_ticks = ticks_over(pid, IDLE_WINDOW)?;

    let mut change_seen = Vec::with_capacity(changes);
    let mut change_daemon = Vec::with_capacity(changes);
    let mut change_push_to_ack = Vec::with_capacity(changes);
    for round in 0..changes {
        // Each kind twice in a row: changed, then back; every version one entry's change.
        let kind = EntryKind::ALL[(round / 2) % EntryKind::ALL.len()];
        mesh.changed = (round % 2 == 0).then_some(kind);
        let change = apply(&mesh.text())?;
        change_seen.push(change.seen);
        change_daemon.extend(change.daemon.map(|took| (kind, took)));
        change_push_to_ack.extend(change.push_to_ack);
    }
    Ok(Figures {
        build: build.to_owned(),
        workloads: size,
        full_seen: full.seen,
        full_daemon: full.daemon,
        full_push_to_ack: full.push_to_ack,
        change_seen,
        change_daemon,
        change_push_to_ack,
        idle_rss_kib,
        rss_kib,
        peak_rss_kib,
        idle_ticks,
    })
}

/// The lab's mesh config with `workloads` synthetic workloads in 100 namespaces (on 1,000
/// nodes that are not the lab's), a fifth as many services (each workload an endpoint of one)
/// and a tenth as many policies; `changed`: the first entry of that kind changed (the
/// workload at another address, the service with another VIP, the policy's action turned).
struct Synthetic {
    workloads: u32,
    changed: Option<EntryKind>,
}

/// The kinds of entry the bench changes, one at a time.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    Workload,
    Service,
    Policy,
}

impl EntryKind {
    const ALL: [EntryKind; 3] = [EntryKind::Workload, EntryKind::Service, EntryKind::Policy];
}

impl Synthetic {
    fn new(workloads: u32) -> Synthetic {
        Synthetic {
            workloads,
            changed: None,
        }
    }

    fn text(&self) -> String {
        let services = (self.workloads / 5).max(1);
        let policies = (self.workloads / 10).max(1);
        let address = |first: u32, index: u32| {
            format!(
                "10.{}.{}.{}",
                first + (index >> 16),
                (index >> 8) & 255,
                index & 255
            )
        };
        let mut extra = String::new();
        for i in 0..self.workloads {
            let service = i % services;
            let ip = if i == 0 && self.changed == Some(EntryKind::Workload) {
                address(150, 0)
            } else {
                address(100, i)
            };
            let _ = writeln!(
                extra,
                "- {{uid: scale-{i}, name: scale-{i}, namespace: scale-{ns}, serviceAccount: sa-{sa}, \
                 workloadIps: [{ip}], protocol: HBONE, node: node-{node}, \
                 services: {{scale-{sns}/svc-{service}.scale-{sns}.svc: {{80: 8080}}}}}}",
                ns = i % 100,
                sa = i % 500,
                node = i % 1000,
                sns = service % 100,
            );
        }
        let mut sections = String::from("services:\n");
        for j in 0..services {
            let _ = writeln!(
                sections,
                "- {{name: svc-{j}, namespace: scale-{ns}, hostname: svc-{j}.scale-{ns}.svc, \
                 vips: [/{vip}], ports: {{80: 8080}}}}",
                ns = j % 100,
                vip = if j == 0 && self.changed == Some(EntryKind::Service) {
                    address(210, 0)
                } else {
                    address(200, j)
                },
            );
        }
        sections.push_str("policies:\n");
        for k in 0..policies {
            let turned = k == 0 && self.changed == Some(EntryKind::Policy);
            let action = if (k % 2 == 0) != turned {
                "Allow"
            } else {
                "Deny"
            };
            let _ = writeln!(
                sections,
                "- {{name: p-{k}, namespace: scale-{ns}, scope: Namespace, action: {action}, \
                 rules: [[[{{principals: [{{Exact: cluster.local/ns/scale-{ns}/sa/sa-{sa}}}], \
                 destinationPorts: [8080]}}]]]}}",
                ns = k % 100,
                sa = k % 500,
            );
        }
        mesh_config_with(&MeshChanges {
            extra_workloads: &extra,
            sections: &sections,
            ..MeshChanges::default()
        })
    }
}

/// One version of the mesh, applied: from the file's replacement until node1 had it, the
/// daemon's own account if it logs one (read and parse, apply), and from istiod, the longest
/// time from one of istiod's pushes of it to node1's ACK.
struct Applied {
    seen: Duration,
    daemon: Option<DaemonTook>,
    push_to_ack: Option<Duration>,
}

/// What node1's daemon logs a version took.
#[derive(Clone, Copy)]
enum DaemonTook {
    /// From the file: reading it (and parsing what changed), then applying the changes to the
    /// model and the kernel maps.
    File { read: Duration, apply: Duration },
    /// From istiod: from each response's arrival to its answer (conversion, apply), summed
    /// over the version's responses.
    Istiod { responses: Duration },
}

impl DaemonTook {
    fn total(self) -> Duration {
        match self {
            DaemonTook::File { read, apply } => read + apply,
            DaemonTook::Istiod { responses } => responses,
        }
    }

    fn apply(self) -> Duration {
        match self {
            DaemonTook::File { apply, .. } => apply,
            DaemonTook::Istiod { responses } => responses,
        }
    }
}

/// node1's daemon's log lines that contain `marker`.
fn node1_log_lines(marker: &str) -> Result<Vec<String>> {
    let log_path = node_spec("node1")?.log_path();
    let log = std::fs::read_to_string(&log_path)
        .with_context(|| format!("reading {}", log_path.display()))?;
    Ok(log
        .lines()
        .filter(|line| line.contains(marker))
        .map(str::to_owned)
        .collect())
}

/// Writes `text` as the lab's mesh config and waits for node1's daemon to log it applied:
/// the time that took, and the daemon's own read and apply times if it logs them.
fn apply_from_file(text: &str) -> Result<Applied> {
    let log_path = node_spec("node1")?.log_path();
    let applied_lines = || node1_log_lines("mesh config applied");
    let before = applied_lines()?.len();
    let seen = write_and_wait(
        text,
        || Ok(applied_lines()?.len() > before),
        || {
            format!(
                "node1's daemon did not apply the mesh config (see {})",
                log_path.display()
            )
        },
    )?;
    let lines = applied_lines()?;
    let line = lines.last().expect("the line waited for");
    let field = |name| micros_field(line, name);
    Ok(Applied {
        seen,
        daemon: field("read_us")
            .zip(field("apply_us"))
            .map(|(read, apply)| DaemonTook::File { read, apply }),
        push_to_ack: None,
    })
}

/// Writes `text` as the lab's mesh config and waits until istiod says node1's daemon ACKed
/// it for every type: the time that took (it includes istiod's poll of the file, up to
/// 100 ms), the daemon's own time for the responses that brought it (what it logs, summed),
/// and the longest time from one of istiod's pushes of it to the daemon's ACK.
fn apply_from_istiod(text: &str) -> Result<Applied> {
    let node1 = format!("peer={}:", node_spec("node1")?.underlay_ip);
    let acks = || -> Result<Vec<Duration>> {
        let log = std::fs::read_to_string(istiod::log_path())
            .with_context(|| format!("reading {}", istiod::log_path().display()))?;
        Ok(log
            .lines()
            .filter(|line| line.contains(&node1))
            .filter_map(|line| micros_field(line, "after_us"))
            .collect())
    };
    let responses = || node1_log_lines("xds: response applied");
    let before = acks()?.len();
    let responses_before = responses()?.len();
    let version = istiod::digest(text.as_bytes());
    let synced = || Ok(istiod::synced_versions().get("node1") == Some(&version));
    let seen = write_and_wait(text, synced, || {
        format!(
            "node1's daemon did not ACK the mesh from istiod (see {})",
            istiod::log_path().display()
        )
    })?;
    let push_to_ack = acks()?.into_iter().skip(before).max().unwrap_or_default();
    // A build that does not log its responses' times has no account of its own.
    let took: Vec<Duration> = responses()?
        .iter()
        .skip(responses_before)
        .filter_map(|line| micros_field(line, "took_us"))
        .collect();
    Ok(Applied {
        seen,
        daemon: (!took.is_empty()).then(|| DaemonTook::Istiod {
            responses: took.iter().sum(),
        }),
        push_to_ack: Some(push_to_ack),
    })
}

/// Writes `text` as the lab's mesh config, then waits until `done`: the time from the write.
/// After `APPLY_LIMIT`, fails with what `late` says.
fn write_and_wait(
    text: &str,
    mut done: impl FnMut() -> Result<bool>,
    late: impl FnOnce() -> String,
) -> Result<Duration> {
    let written = Instant::now();
    write_mesh_config_text(text)?;
    loop {
        if done()? {
            return Ok(written.elapsed());
        }
        if written.elapsed() > APPLY_LIMIT {
            bail!("{} within {APPLY_LIMIT:?}", late());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The microseconds a log line gives as `name=N`.
fn micros_field(line: &str, name: &str) -> Option<Duration> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    let digits: String = line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some(Duration::from_micros(digits.parse().ok()?))
}

/// The RSS and its peak, in KiB.
fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = Process::new(pid as i32)
        .and_then(|p| p.status())
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok((
        status.vmrss.context("no VmRSS")?,
        status.vmhwm.context("no VmHWM")?,
    ))
}

/// The CPU ticks (user and system) `pid` spends over `window`.
fn ticks_over(pid: u32, window: Duration) -> Result<u64> {
    let ticks = || -> Result<u64> {
        let stat = Process::new(pid as i32)
            .and_then(|p| p.stat())
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        Ok(stat.utime + stat.stime)
    };
    let before = ticks()?;
    std::thread::sleep(window);
    Ok(ticks()? - before)
}

fn report(all: &[Figures], changes: usize, control_plane: ControlPlane) -> String {
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    let how = match control_plane {
        ControlPlane::File => {
            "The daemons read the file. \"Seen\" runs from the file's replacement to the \
             daemon's log line (it includes the daemon's wait for the writes to settle, 50 ms \
             with inotify; a build that polls the file adds up to its 500 ms poll); \"daemon\" \
             is what the daemon logs it took: reading the file (and parsing what changed: the \
             whole file at first, then the entries whose text changed) + applying the changes \
             to the model and the kernel maps."
        }
        ControlPlane::Istiod => {
            "The daemons take the mesh from the lab's istiod, which pushes each version of the \
             file as a delta-xDS difference. \"Seen\" runs from the file's replacement until \
             istiod has node1's ACK of it for every type (it includes istiod's poll of the \
             file, up to 100 ms); \"daemon\" and \"apply\" are node1's own time from each \
             response's arrival to its answer (conversion, apply to the model and the kernel \
             maps), summed over the version's responses; \"push to \
             ACK\" is istiod's time from a push to node1's ACK of it, the longest of the \
             version's pushes (it adds the transfer, the decode, and the wait of both sides' \
             threads for a core: the other node's daemon takes the same push at once)."
        }
    };
    let mut out = format!(
        "# Mesh size on node1's daemon\n\nEach size: the lab's 5 workloads plus N synthetic \
         workloads (100 namespaces, on other nodes), N/5 services, N/10 policies; then {changes} \
         changes, each of one entry: a workload's address, a service's VIP, a policy's action, in \
         turn, each changed and then back. {how}\n\n\
         | build | workloads | full: seen (ms) | full: daemon read + apply (ms) | one change: \
         seen, median (ms) | one change: daemon median / p99 (ms) | one change: apply median, workload / service / policy (ms) | push to ACK: full; one \
         change median / p99 (ms) | RSS idle lab (MiB) | RSS (MiB) | per workload above idle \
         (B) | peak RSS (MiB) | idle CPU ticks in {} s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        IDLE_WINDOW.as_secs()
    );
    for f in all {
        let daemon = f.full_daemon.map_or("-".to_owned(), |took| match took {
            DaemonTook::File { read, apply } => format!("{} + {}", ms(read), ms(apply)),
            DaemonTook::Istiod { responses } => ms(responses),
        });
        let median_and_p99 = |values: &[Duration]| {
            if values.is_empty() {
                "-".to_owned()
            } else {
                format!(
                    "{} / {}",
                    ms(quantile(values, 0.5)),
                    ms(quantile(values, 0.99))
                )
            }
        };
        let totals: Vec<Duration> = f.change_daemon.iter().map(|(_, t)| t.total()).collect();
        let change_daemon = median_and_p99(&totals);
        let by_kind: Vec<String> = EntryKind::ALL
            .iter()
            .map(|kind| {
                let applies: Vec<Duration> = f
                    .change_daemon
                    .iter()
                    .filter(|(of, _)| of == kind)
                    .map(|(_, took)| took.apply())
                    .collect();
                if applies.is_empty() {
                    "-".to_owned()
                } else {
                    ms(quantile(&applies, 0.5))
                }
            })
            .collect();
        let change_apply = by_kind.join(" / ");
        let push_to_ack = f.full_push_to_ack.map_or("-".to_owned(), |full| {
            format!("{}; {}", ms(full), median_and_p99(&f.change_push_to_ack))
        });
        let per_workload =
            (f.rss_kib.saturating_sub(f.idle_rss_kib) * 1024) / u64::from(f.workloads);
        let mib = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {daemon} | {} | {change_daemon} | {change_apply} | {push_to_ack} | {} | {} | {per_workload} | {} | {} |",
            f.build,
            f.workloads,
            ms(f.full_seen),
            ms(quantile(&f.change_seen, 0.5)),
            mib(f.idle_rss_kib),
            mib(f.rss_kib),
            mib(f.peak_rss_kib),
            f.idle_ticks,
        );
    }
    out
}

/// The `q` quantile (nearest rank) of `values`.
fn quantile(values: &[Duration], q: f64) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&values, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&values, 0.99), Duration::from_millis(99));
        assert_eq!(
            quantile(&[Duration::from_millis(7)], 0.99),
            Duration::from_millis(7)
        );
    }

    /// The synthetic mesh is a valid config of the size asked, and each change changes one
    /// entry of its kind and nothing else.
    #[test]
    fn the_synthetic_mesh_is_valid_and_each_change_changes_one_entry() {
        use ztunnel_user::mesh::config::MeshConfig;
        fn differing<T: PartialEq>(a: &[T], b: &[T]) -> usize {
            a.iter().zip(b).filter(|(x, y)| x != y).count()
        }
        let mut mesh = Synthetic::new(1000);
        let path = std::path::Path::new("scale.yaml");
        let parse = |text: &str| MeshConfig::parse(path, text).expect("a valid config");
        let config = parse(&mesh.text());
        assert_eq!(config.workload_count(), 1000 + topology::PODS.len());
        assert_eq!(config.service_count(), 200);
        assert_eq!(config.policies.len(), 100);
        for kind in EntryKind::ALL {
            mesh.changed = Some(kind);
            let changed = parse(&mesh.text());
            let counts = (
                differing(&config.sorted_workloads(), &changed.sorted_workloads()),
                differing(&config.sorted_services(), &changed.sorted_services()),
                differing(&config.policies.all(), &changed.policies.all()),
            );
            let expected = match kind {
                EntryKind::Workload => (1, 0, 0),
                EntryKind::Service => (0, 1, 0),
                EntryKind::Policy => (0, 0, 1),
            };
            assert_eq!(counts, expected);
        }
    }
}

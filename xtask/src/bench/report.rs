//! The Markdown report: the figures of every path on every route with the comparisons to the
//! baseline, the proxies' memory, the targets met or not, anomalies, and the machine.

use super::machine::Machine;
use super::measure::Settings;
use super::path::{Path, Route};
use super::results::{Comparison, Daemon, Measured, Metric, Results, Spread};
use std::fmt::Write as _;

/// What the mesh is compared with.
const BASELINE: Path = Path::Direct;

/// A goal for a path's figure, checked on the median.
struct Target {
    path: Path,
    /// What a comparison is made with.
    baseline: Path,
    route: Route,
    metric: Metric,
    goal: Goal,
}

enum Goal {
    /// At least this many times the baseline's figure (a metric compared by ratio).
    RatioAtLeast(f64),
    /// At most this much over the baseline's figure (a metric compared by difference).
    AddsAtMost(f64),
    /// The figure itself at most this.
    AtMost(f64),
    /// Better than the baseline's: a higher ratio than 1, or a negative difference.
    Beats,
}

/// For a 2-vCPU machine, measured side by side.
fn targets() -> Vec<Target> {
    let mesh = |route, metric, goal| Target {
        path: Path::Mesh,
        baseline: BASELINE,
        route,
        metric,
        goal,
    };
    let mut targets = vec![
        mesh(
            Route::CrossNode,
            Metric::Throughput1,
            Goal::RatioAtLeast(0.50),
        ),
        mesh(
            Route::CrossNode,
            Metric::Throughput8,
            Goal::RatioAtLeast(0.50),
        ),
        mesh(Route::CrossNode, Metric::LatencyP50, Goal::AddsAtMost(90.0)),
        mesh(
            Route::CrossNode,
            Metric::LatencyP99,
            Goal::AddsAtMost(150.0),
        ),
        mesh(
            Route::CrossNode,
            Metric::ConnectRate,
            Goal::RatioAtLeast(0.33),
        ),
        mesh(
            Route::SameNode,
            Metric::Throughput1,
            Goal::RatioAtLeast(0.70),
        ),
        mesh(
            Route::SameNode,
            Metric::Throughput8,
            Goal::RatioAtLeast(0.70),
        ),
    ];
    // 2 KiB per idle proxied connection, 16 MiB idle, for each node's daemon.
    for (metric, most) in [
        (Metric::BytesPerConnection as fn(Daemon) -> Metric, 2048.0),
        (Metric::IdleRss, 16.0),
    ] {
        for daemon in Daemon::ALL {
            targets.push(mesh(Route::CrossNode, metric(daemon), Goal::AtMost(most)));
        }
    }
    // What eBPF capture buys over iptables capture, behind the same proxy.
    for metric in [Metric::ConnectRate, Metric::LatencyP50] {
        targets.push(Target {
            baseline: Path::Iptables,
            ..mesh(Route::CrossNode, metric, Goal::Beats)
        });
    }
    targets
}

impl Target {
    fn description(&self) -> String {
        let figure = format!(
            "{} {}: {}",
            self.path.name(),
            self.route.name(),
            self.metric.label()
        );
        let baseline = self.baseline.name();
        match self.goal {
            Goal::RatioAtLeast(min) => format!("{figure} >= {min:.2} x {baseline}"),
            Goal::AddsAtMost(max) => format!("{figure}: adds <= {max:.0} over {baseline}"),
            Goal::AtMost(max) => format!("{figure} <= {max}"),
            Goal::Beats => format!("{figure}: better than {baseline}"),
        }
    }

    /// The measured median as shown, and whether it meets the goal; None if not measured.
    fn check(&self, results: &Results) -> Option<(String, bool)> {
        let compared = || results.compared(self.path, self.baseline, self.route, self.metric);
        match self.goal {
            Goal::RatioAtLeast(min) => {
                let spread = compared()?;
                Some((compared_cell(self.metric, spread), spread.median >= min))
            }
            Goal::AddsAtMost(max) => {
                let spread = compared()?;
                Some((compared_cell(self.metric, spread), spread.median <= max))
            }
            Goal::AtMost(max) => {
                let spread = results.spread(self.path, self.route, self.metric)?;
                Some((spread.show(self.metric.digits()), spread.median <= max))
            }
            Goal::Beats => {
                let spread = compared()?;
                let better = match self.metric.comparison() {
                    Comparison::Ratio => spread.median > 1.0,
                    Comparison::Difference => spread.median < 0.0,
                };
                Some((compared_cell(self.metric, spread), better))
            }
        }
    }
}

fn compared_cell(metric: Metric, spread: Spread) -> String {
    match metric.comparison() {
        Comparison::Ratio => format!("{} x", spread.show(2)),
        Comparison::Difference => {
            let sign = if spread.median >= 0.0 { "+" } else { "" };
            format!("{sign}{} us", spread.show(0))
        }
    }
}

pub fn markdown(results: &Results, settings: &Settings, machine: &Machine) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# ztunnel benchmark on the lab\n");
    let _ = writeln!(
        out,
        "{} runs per path, interleaved ({}), {} s per measurement, release build. \
         Each cell: median (min–max) over the runs. A comparison is taken within each run, \
         between the paths measured side by side, then summarised the same way. CPU is \
         whole-machine busy time (user + nice + system + irq + softirq) over the measured \
         interval. See docs/PERFORMANCE.md for the method.\n",
        settings.runs,
        settings
            .paths
            .iter()
            .map(|path| path.name())
            .collect::<Vec<_>>()
            .join(", "),
        settings.length.as_secs()
    );
    if settings.runs < 3 {
        let _ = writeln!(
            out,
            "Fewer than 3 runs: a check that the benchmark works, not figures for the record.\n"
        );
    }
    for path in &settings.paths {
        let _ = writeln!(out, "- `{}`: {}", path.label(), path.description());
    }
    let paths = &settings.paths;
    let compared: Vec<Path> = paths.iter().copied().filter(|&p| p != BASELINE).collect();
    for route in Route::ALL {
        let _ = writeln!(out, "\n## {}\n", capitalized(&route.description()));
        let mut header = String::from("| figure |");
        let mut rule = String::from("|---|");
        for path in paths {
            let _ = write!(header, " {} |", path.label());
            rule.push_str("---|");
        }
        for path in &compared {
            let _ = write!(header, " {} vs {} |", path.label(), BASELINE.name());
            rule.push_str("---|");
        }
        let _ = writeln!(out, "{header}\n{rule}");
        for metric in Metric::ROUTE_FIGURES {
            let mut row = format!("| {} |", metric.label());
            for &path in paths {
                let _ = write!(row, " {} |", spread_cell(results, path, route, metric));
            }
            for &path in &compared {
                let cell = results.compared(path, BASELINE, route, metric);
                let _ = write!(
                    row,
                    " {} |",
                    cell.map_or("–".into(), |s| compared_cell(metric, s))
                );
            }
            let _ = writeln!(out, "{row}");
        }
    }
    memory_section(&mut out, results, settings);
    baseline_section(&mut out, results, paths);
    steal_section(&mut out, results, paths);
    let _ = writeln!(
        out,
        "\n## Targets (2-vCPU machine, measured side by side)\n"
    );
    let _ = writeln!(out, "| target | measured | |\n|---|---|---|");
    for target in targets() {
        let (measured, verdict) = match target.check(results) {
            Some((measured, true)) => (measured, "met"),
            Some((measured, false)) => (measured, "**not met**"),
            None => ("–".to_owned(), "not measured"),
        };
        let _ = writeln!(out, "| {} | {measured} | {verdict} |", target.description());
    }
    if !results.anomalies.is_empty() {
        let _ = writeln!(out, "\n## Anomalies\n");
        for anomaly in &results.anomalies {
            let _ = writeln!(out, "- {anomaly}");
        }
    }
    let _ = writeln!(out, "\n## Machine\n\n{}", machine.markdown());
    out
}

fn memory_section(out: &mut String, results: &Results, settings: &Settings) {
    let route = Route::CrossNode;
    let _ = writeln!(
        out,
        "\n## Proxy memory ({}; {} idle proxied connections)\n",
        route.description(),
        settings.idle_connections
    );
    let _ = writeln!(
        out,
        "| path | daemon | idle RSS, MiB | RSS with the connections, MiB | bytes per connection | RSS once they closed, MiB |\n|---|---|---|---|---|---|"
    );
    for &path in settings.paths.iter().filter(|p| p.has_proxy()) {
        for daemon in Daemon::ALL {
            let cell = |metric| spread_cell(results, path, route, metric);
            let node = match daemon {
                Daemon::Source => route.client(),
                Daemon::Destination => route.server(),
            };
            let _ = writeln!(
                out,
                "| {} | {} ({}'s node) | {} | {} | {} | {} |",
                path.label(),
                daemon.name(),
                node,
                cell(Metric::IdleRss(daemon)),
                cell(Metric::HeldRss(daemon)),
                cell(Metric::BytesPerConnection(daemon)),
                cell(Metric::ClosedRss(daemon))
            );
        }
    }
}

/// This build's mesh beside the baseline build's (`--baseline`), every figure with the ratio.
fn baseline_section(out: &mut String, results: &Results, paths: &[Path]) {
    let Some(&baseline) = paths
        .iter()
        .find(|path| matches!(path, Path::MeshBaseline(_)))
    else {
        return;
    };
    let Path::MeshBaseline(dir) = baseline else {
        return;
    };
    let built = std::fs::metadata(dir.join("ztunnel"))
        .and_then(|metadata| metadata.modified())
        .map_or("unknown".to_owned(), super::utc_timestamp);
    let _ = writeln!(
        out,
        "\n## This build's mesh against the baseline build\n\n`mesh` runs this working \
         tree's `ztunnel` and `ztunnel-cni`; `{}` runs the ones in `{}` (its `ztunnel` \
         modified {built}); both with this build's load tools, in the same rounds. The ratio \
         is mesh / baseline for every figure, latency and memory too, taken within each run \
         and summarised as median (min–max): 1.00 is the same; above 1 is better for \
         throughput and connection rate, worse for latency, CPU and memory.\n",
        baseline.label(),
        dir.display()
    );
    let _ = writeln!(
        out,
        "| route | figure | mesh | {} | mesh / baseline |\n|---|---|---|---|---|",
        baseline.label()
    );
    for row in results.side_by_side(Path::Mesh, baseline) {
        let digits = row.metric.digits();
        let cell = |spread: Option<Spread>| spread.map_or("–".into(), |s| s.show(digits));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            row.route.name(),
            row.metric.label(),
            cell(row.path),
            cell(row.other),
            row.ratio.map_or("–".into(), |s| format!("{} x", s.show(2)))
        );
    }
}

/// The host's noise: how much of the CPU time the hypervisor took during each path's
/// measurements, which explains runs that fall out of line with the others.
fn steal_section(out: &mut String, results: &Results, paths: &[Path]) {
    let _ = writeln!(
        out,
        "\n## Host steal\n\nThe share of the machine's CPU time the hypervisor gave to others \
         while this VM's vCPUs had work (`steal` in /proc/stat), per measurement: time lost to \
         the host, not work done here. Most of it comes when vCPUs wake from a halt, so it \
         stays small while idle CPUs poll (see the machine facts). A measurement with much of \
         it is slower, and its latency bimodal.\n"
    );
    let mut header = String::from("| path | route |");
    let mut rule = String::from("|---|---|");
    for measured in Measured::ALL {
        let _ = write!(header, " during {}, % |", measured.name());
        rule.push_str("---|");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    for &path in paths {
        for route in Route::ALL {
            let mut row = format!("| {} | {} |", path.label(), route.name());
            for measured in Measured::ALL {
                let cell = spread_cell(results, path, route, Metric::Steal(measured));
                let _ = write!(row, " {cell} |");
            }
            let _ = writeln!(out, "{row}");
        }
    }
}

/// A path's figure as "median (min–max)", or "–" where it was not measured.
fn spread_cell(results: &Results, path: Path, route: Route, metric: Metric) -> String {
    results
        .spread(path, route, metric)
        .map_or("–".into(), |s| s.show(metric.digits()))
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map_or(String::new(), |first| {
        first.to_uppercase().chain(chars).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_read_the_side_by_side_comparison() {
        let mut results = Results::default();
        for round in 1..=3 {
            results.record(
                round,
                Path::Direct,
                Route::CrossNode,
                Metric::Throughput1,
                10.0,
            );
            results.record(
                round,
                Path::Mesh,
                Route::CrossNode,
                Metric::Throughput1,
                4.0,
            );
            results.record(
                round,
                Path::Direct,
                Route::CrossNode,
                Metric::LatencyP50,
                30.0,
            );
            results.record(
                round,
                Path::Mesh,
                Route::CrossNode,
                Metric::LatencyP50,
                100.0,
            );
            results.record(
                round,
                Path::Mesh,
                Route::CrossNode,
                Metric::IdleRss(Daemon::Source),
                9.0,
            );
        }
        let verdicts: Vec<Option<bool>> = targets()
            .iter()
            .map(|t| t.check(&results).map(|(_, met)| met))
            .collect();
        // 1 stream: 0.4 x, not met; p50: +70 us, met; source idle RSS 9 MiB, met.
        assert_eq!(verdicts[0], Some(false));
        assert_eq!(verdicts[2], Some(true));
        assert_eq!(verdicts[1], None);
        assert!(verdicts.contains(&Some(true)));
        let idle_source = targets()
            .iter()
            .position(|t| t.metric == Metric::IdleRss(Daemon::Source))
            .unwrap();
        assert_eq!(verdicts[idle_source], Some(true));
    }

    #[test]
    fn steal_is_shown_per_path_route_and_measurement() {
        let mut results = Results::default();
        for (round, steal) in [(1, 2.0), (2, 24.5), (3, 3.0)] {
            let metric = Metric::Steal(Measured::RequestResponse);
            results.record(round, Path::Mesh, Route::CrossNode, metric, steal);
        }
        let mut out = String::new();
        steal_section(&mut out, &results, &Path::all(None));
        assert!(
            out.contains("| mesh | cross node | – | 3.0 (2.0–24.5) | – |"),
            "{out}"
        );
        assert!(out.contains("| direct | same node | – | – | – |"), "{out}");
    }

    #[test]
    fn the_baseline_build_is_shown_beside_the_mesh() {
        let dir = std::path::Path::new("/opt/old");
        let paths = Path::all(Some(dir));
        let baseline = paths[2];
        let mut results = Results::default();
        let bytes = Metric::BytesPerConnection(Daemon::Destination);
        for (round, mesh, old) in [(1, 1800.0, 1500.0), (2, 1600.0, 2000.0)] {
            results.record(round, Path::Mesh, Route::CrossNode, bytes, mesh);
            results.record(round, baseline, Route::CrossNode, bytes, old);
        }
        let mut out = String::new();
        baseline_section(&mut out, &results, &paths);
        assert!(
            out.contains(
                "| cross node | destination daemon bytes per idle connection | 1700 (1600–1800) \
                 | 1750 (1500–2000) | 1.00 (0.80–1.20) x |"
            ),
            "{out}"
        );
        let mut none = String::new();
        baseline_section(&mut none, &results, &Path::all(None));
        assert!(none.is_empty());
    }
}
